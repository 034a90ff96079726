"""Every bad input of the issue: exit code 2, `error: ...` naming the file or field, no traceback, nothing published,
and no training started (no checkpoint written)."""
import json
import shutil
import zipfile

import numpy as np
import pytest
from PIL import Image

from prompts_store import TaskArtifact, open_store
from tests.unit.training.helpers import CLASS_NAMES, TINY_MODEL, tiny_args, write_folder, write_manifest, write_npz


def assert_refused(run, paths, *fragments, published=()):
    assert run.code == 2, (run.code, run.err)
    last = run.err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in run.err, run.err
    for fragment in fragments:
        assert fragment in last, f"{fragment!r} not in {last!r}"
    assert [t.name for t in open_store(paths.store).list()] == list(published)
    assert not list(paths.checkpoints.rglob("epoch-*")), "training started"


def test_missing_data_path(paths, add_task):
    missing = paths.root / "nowhere.npz"
    assert_refused(add_task(tiny_args("t", missing, paths.store, paths.checkpoints)), paths, "--data", str(missing), "no such file")


def test_missing_classnames_and_templates_files(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    missing = paths.root / "names.txt"
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--classnames", missing)), paths, f"--classnames {missing}: no such file")
    template = paths.root / "templates.txt"
    template.write_text("a photo of a {}.\na photo of a cat.\n")
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", "a,b,c,d", "--templates", template))
    assert_refused(run, paths, f"--templates {template}, line 2", "'a photo of a cat.'")


def test_npz_without_class_names(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints)), paths, str(data), "no class names", "--classnames")


def test_empty_class_folder(paths, add_task):
    folder = write_folder(paths.root / "data", per_class=2)
    (folder / "purple").mkdir()
    assert_refused(add_task(tiny_args("t", folder, paths.store, paths.checkpoints)), paths, str(folder / "purple"), "has no images")


def test_empty_class_in_labels(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", "red,green,blue,yellow,purple"))
    assert_refused(run, paths, str(data), "class 'purple' (label 4", "has no images")


def test_unreadable_and_non_image_files_are_listed_with_their_count(paths, add_task):
    folder = write_folder(paths.root / "data", per_class=3)
    (folder / "red" / "notes.txt").write_text("not an image")
    truncated = folder / "blue" / "cut.png"
    truncated.write_bytes((folder / "blue" / "006.png").read_bytes()[:40])
    run = add_task(tiny_args("t", folder, paths.store, paths.checkpoints))
    assert_refused(run, paths, "2 of 14 images", str(folder / "red" / "notes.txt"), "not an image file", str(truncated), "--skip-unreadable")


def test_skip_unreadable_leaves_them_out_and_records_them(paths, add_task):
    folder = write_folder(paths.root / "data", per_class=3)
    (folder / "red" / "notes.txt").write_text("not an image")
    run = add_task(tiny_args("t", folder, paths.store, paths.checkpoints, "--skip-unreadable", epochs=1))
    assert run.code == 0, run.err
    assert "leaving out 1 of 13 images" in run.err and "notes.txt" in run.err
    source = open_store(paths.store).get("t").recipe["data"]["train"]
    assert source["n_skipped"] == 1 and source["skipped_unreadable"] == [str(folder / "red" / "notes.txt")]


def test_a_class_left_empty_by_skipping(paths, add_task):
    folder = write_folder(paths.root / "data", per_class=2)
    for image in (folder / "green").iterdir():
        image.write_text("broken")
    run = add_task(tiny_args("t", folder, paths.store, paths.checkpoints, "--skip-unreadable"))
    assert_refused(run, paths, str(folder / "green"), "has no images left after skipping unreadable files")


def test_missing_manifest_image_is_an_unreadable_image(paths, add_task):
    manifest = write_manifest(paths.root / "m" / "train.jsonl", per_class=2)
    (paths.root / "m" / "images" / "003.png").unlink()
    run = add_task(tiny_args("t", manifest, paths.store, paths.checkpoints))
    assert_refused(run, paths, "1 of 8 images", str(paths.root / "m" / "images" / "003.png"), "file not found")


def test_negative_labels_in_npz(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    with np.load(data) as arrays:
        images, labels = arrays["images"], arrays["labels"].copy()
    labels[5] = -1
    np.savez(data, images=images, labels=labels)
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", ",".join(CLASS_NAMES)))
    assert_refused(run, paths, str(data), "field 'labels'", "labels[5] = -1", "4 classes")


def test_fewer_class_names_than_the_labels_need_names_the_names_file(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)  # labels 0..3
    beside = paths.root / "classnames.json"
    beside.write_text(json.dumps(CLASS_NAMES[:3]))
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints))
    assert_refused(run, paths, f"--data {data}: {beside} has 3 names, but labels go up to 3 (4 classes)")
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", "red,green"))
    assert_refused(run, paths, f"--data {data}: --class-names has 2 names, but labels go up to 3 (4 classes)")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_labels_out_of_range_in_manifest(paths, add_task, suffix):
    manifest = write_manifest(paths.root / "m" / f"train{suffix}", per_class=2, label_as="index")
    lines = manifest.read_text().splitlines()
    lines[3] = "images/002.png,9" if suffix == ".csv" else json.dumps({"path": "images/002.png", "label": 9})
    manifest.write_text("\n".join(lines) + "\n")
    run = add_task(tiny_args("t", manifest, paths.store, paths.checkpoints, "--class-names", ",".join(CLASS_NAMES)))
    assert_refused(run, paths, f"{manifest}, line 4", "label 9 is out of range", "4 classes")


def test_unknown_label_name_in_manifest(paths, add_task):
    manifest = write_manifest(paths.root / "m" / "train.csv", per_class=2)
    manifest.write_text(manifest.read_text().replace("yellow", "purple"))
    run = add_task(tiny_args("t", manifest, paths.store, paths.checkpoints, "--class-names", ",".join(CLASS_NAMES)))
    assert_refused(run, paths, f"{manifest}, line", "'purple' is not one of the class names")


def test_manifest_missing_column(paths, add_task):
    manifest = paths.root / "m.csv"
    manifest.write_text("file,label\na.png,red\n")
    assert_refused(add_task(tiny_args("t", manifest, paths.store, paths.checkpoints)), paths, str(manifest), "missing column 'path'")


def test_npz_missing_field_and_unreadable_npz(paths, add_task):
    data = paths.root / "d.npz"
    np.savez(data, images=np.zeros((4, 8, 8, 3), np.uint8))
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints)), paths, str(data), "no 'labels' array")
    with zipfile.ZipFile(data, "w") as archive:  # a zip archive, but its arrays are not .npy data
        archive.writestr("images.npy", b"garbage")
        archive.writestr("labels.npy", b"garbage")
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints)), paths, f"--data {data}: cannot be read as an .npz file")
    np.savez(data, images=np.zeros((4, 8, 8, 3), np.float32), labels=np.zeros(4, np.int64))
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", "a")), paths, "field 'images' must be uint8")


@pytest.mark.parametrize("content", [b"this is not a zip archive", b"", b"\x93NUMPY a lone .npy array"])
def test_a_file_that_is_not_an_npz_archive(paths, add_task, content):
    data = paths.root / "d.npz"
    data.write_bytes(content)
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints))
    assert_refused(run, paths, f"--data {data}: not an .npz file (numpy .npz archives are zip files)")
    assert "pickle" not in run.err


def test_duplicate_class_names(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", "red,green,red,yellow"))
    assert_refused(run, paths, "--class-names", "duplicate class names 'red' and 'red'")
    names = paths.root / "names.json"
    names.write_text(json.dumps(["Red", "green", "red ", "yellow"]))
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--classnames", names))
    assert_refused(run, paths, f"--classnames {names}", "duplicate class names 'Red' and 'red '", "the same name")


def test_class_name_count_must_match_the_class_folders(paths, add_task):
    folder = write_folder(paths.root / "data", per_class=1)
    run = add_task(tiny_args("t", folder, paths.store, paths.checkpoints, "--class-names", "a,b,c"))
    assert_refused(run, paths, "--class-names", "3 class names", "4 class folders")


@pytest.mark.parametrize("name", ["Colours", "bad name", "../x", ""])
def test_task_names_the_store_refuses(paths, add_task, name):
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    run = add_task(tiny_args(name, data, paths.store, paths.checkpoints))
    assert_refused(run, paths, "invalid task name")


def test_a_backbone_that_does_not_match_the_stores_tasks(paths, add_task):
    other = {"name": "keepclip-tiny-b", "sha256": "ab" * 32}
    open_store(paths.store).publish(TaskArtifact(name="older", class_names=["x"], backbone=other))
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints))
    assert_refused(run, paths, f"--store {paths.store}", "task 'older' (version 1)", "keepclip-tiny-b", TINY_MODEL, published=["older"])


def test_bad_numbers_and_unknown_formats(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--lr", "-1")), paths, "--lr must be a positive number")
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--val-fraction", "1")), paths, "--val-fraction")
    weird = paths.root / "data.parquet"
    weird.write_text("x")
    assert_refused(add_task(tiny_args("t", weird, paths.store, paths.checkpoints)), paths, str(weird), "unknown data format")
    usage = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--epochs", "many"))
    assert usage.code == 2 and "--epochs: invalid int value" in usage.err


def test_a_missing_model_config_is_named(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    args = tiny_args("t", data, paths.store, paths.checkpoints)
    args[args.index("--model") + 1] = str(paths.root / "missing.json")
    assert_refused(add_task(args), paths, "model config file not found", "missing.json")
