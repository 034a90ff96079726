"""Every bad input of the issue: exit code 2, `error: ...` naming the file or field, no traceback, nothing published,
and no training started (no checkpoint written)."""
import io
import json
import os
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


def test_a_store_that_cannot_be_written_fails_before_learning_with_exit_1(paths, add_task):
    """Not bad input (exit 1, as a failed training): a store path under a file, as a read-only mount would be."""
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    (paths.root / "a-file").write_text("x")
    store = paths.root / "a-file" / "store"
    run = add_task(tiny_args("t", data, store, paths.checkpoints, kind="head"))
    assert run.code == 1 and f"error: store {store}: cannot write to it: Not a directory; nothing changed" in run.err, run.err
    assert "head λ" not in run.err + run.out and "Traceback" not in run.err  # refused before any learning


def test_bad_numbers_and_unknown_formats(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--lr", "-1")), paths, "--lr must be a positive number")
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--val-fraction", "1")), paths, "--val-fraction")
    weird = paths.root / "data.parquet"
    weird.write_text("x")
    assert_refused(add_task(tiny_args("t", weird, paths.store, paths.checkpoints)), paths, str(weird), "unknown data format")
    archive = paths.root / "dataset.tar.gz"
    archive.write_bytes(b"\x1f\x8b")
    assert_refused(add_task(tiny_args("t", archive, paths.store, paths.checkpoints)), paths, str(archive), "an archive; unpack it")
    usage = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--epochs", "many"))
    assert usage.code == 2 and "--epochs: invalid int value" in usage.err


def test_a_missing_model_config_is_named(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2, classnames_beside=True)
    args = tiny_args("t", data, paths.store, paths.checkpoints)
    args[args.index("--model") + 1] = str(paths.root / "missing.json")
    assert_refused(add_task(args), paths, "model config file not found", "missing.json")


# ---------------------------------------------------------------- found by an outside trial (hostile files)

def _lying_npz(path, shape=(40, 100_000, 100_000, 3), labels_shape=None):
    """A 100-byte 'images' member whose .npy header claims `shape` in bytes (and 'labels' `labels_shape` strings of
    1,000 characters, if given)."""
    def lying(descr, claimed):
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": claimed})
        return buf.getvalue() + b"\0" * 100

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images.npy", lying("|u1", shape))
        if labels_shape is not None:
            archive.writestr("labels.npy", lying("<U1000", labels_shape))
            return path
        labels = io.BytesIO()
        np.save(labels, np.zeros(40, np.int64))
        archive.writestr("labels.npy", labels.getvalue())
    return path


@pytest.mark.parametrize("case, fragments", [
    ("zero-height images", ["field 'images' must be uint8", "H, W > 0"]),
    ("scalar class_names", ["field 'class_names' must be a 1-D array of strings"]),
    ("bytes class_names", ["field 'class_names' must be a 1-D array of strings"]),
    ("a header claiming a terabyte", ["field 'images' holds 100000x100000 images", "over the limit of 40000000 (--max-image-pixels)"]),
    ("a header claiming more than the memory", ["field 'images' [1000000000, 100, 100, 3] uint8 takes 27939.7 GiB when loaded",
                                                "GiB available"]),
    ("labels claiming more than the memory", ["field 'labels' [1000000000] <U1000 takes 3725.3 GiB when loaded"]),
])
def test_hostile_npz_files(paths, add_task, case, fragments):
    data = paths.root / "d.npz"
    if case == "zero-height images":
        np.savez(data, images=np.zeros((4, 0, 8, 3), np.uint8), labels=np.zeros(4, np.int64), class_names=np.array(["a"]))
    elif case == "scalar class_names":
        write_npz(data, per_class=2, class_names=np.array(5))
    elif case == "bytes class_names":
        write_npz(data, per_class=2, class_names=np.array([b"red", b"green", b"blue", b"yellow"]))
    elif case == "a header claiming a terabyte":
        _lying_npz(data)
    elif case == "labels claiming more than the memory":
        _lying_npz(data, (40, 8, 8, 3), labels_shape=(10**9,))
    else:
        _lying_npz(data, (10**9, 100, 100, 3))
    assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints)), paths, str(data), *fragments)


@pytest.mark.parametrize("name, text, fragment", [
    ("deep.jsonl", "[" * 100_000 + "\n", "line 1: not valid JSON (nested too deeply)"),
    ("bigint.jsonl", '{"path": "a.png", "label": ' + "1" * 5000 + "}\n", "line 1: not valid JSON"),
    ("bigfield.csv", "path,label\n" + "a" * 200_000 + ",red\n", "not valid CSV after line 1 (field larger than field limit"),
    ("dupcol.csv", "path,label,label\na.png,red,z\n", "column 'label' appears 2 times"),
])
def test_hostile_manifests(paths, add_task, name, text, fragment):
    manifest = paths.root / name
    manifest.write_text(text)
    assert_refused(add_task(tiny_args("t", manifest, paths.store, paths.checkpoints)), paths, str(manifest), fragment)


def test_deeply_nested_classnames_and_templates(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    deep = paths.root / "deep.json"
    deep.write_text("[" * 100_000)
    for option in ("--classnames", "--templates"):
        extra = (option, deep) if option == "--classnames" else ("--class-names", "a,b,c,d", option, deep)
        assert_refused(add_task(tiny_args("t", data, paths.store, paths.checkpoints, *extra)), paths, f"{option} {deep}: not valid JSON (nested too deeply)")


def test_templates_that_would_not_format_and_class_names_with_control_characters(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=2)
    templates = paths.root / "t.json"
    templates.write_text(json.dumps(["a photo of {}. }"]))
    run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--class-names", "a,b,c,d", "--templates", templates))
    assert_refused(run, paths, f"--templates {templates}, entry 0", "write other braces twice")
    for bad in ("cat\nx", "\ud800", "a\x00b"):
        names = paths.root / "names.json"
        names.write_text(json.dumps(["red", "green", "blue", bad]))
        run = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--classnames", names))
        assert_refused(run, paths, f"--classnames {names}", "control character or invalid Unicode")


@pytest.mark.timeout(120)
def test_fifos_are_refused_not_waited_on(paths, add_task):
    fifo = paths.root / "pipe.jsonl"
    os.mkfifo(fifo)
    assert_refused(add_task(tiny_args("t", fifo, paths.store, paths.checkpoints)), paths, f"--data {fifo}: not a regular file")
    manifest = write_manifest(paths.root / "m" / "m.jsonl", per_class=2)
    os.mkfifo(manifest.parent / "images" / "pipe.png")
    with manifest.open("a") as f:
        f.write(json.dumps({"path": "images/pipe.png", "label": "red"}) + "\n")
    assert_refused(add_task(tiny_args("t", manifest, paths.store, paths.checkpoints)), paths, "pipe.png (OSError: not a regular file)")


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(paths, add_task):
    folder = write_folder(paths.root / "data", per_class=3)
    huge = folder / "red" / "huge.png"
    Image.new("L", (8000, 6000)).save(huge, optimize=True)  # a small file (a few KiB) of 48 M pixels
    assert huge.stat().st_size < 200_000
    run = add_task(tiny_args("t", folder, paths.store, paths.checkpoints))
    assert_refused(run, paths, "1 of 13 images", str(huge), "too large: 8000x6000 = 48000000 pixels, over the limit of 40000000 (--max-image-pixels)")
    lowered = add_task(tiny_args("t", folder, paths.store, paths.checkpoints, "--max-image-pixels", "100", "--skip-unreadable", epochs=1))
    assert lowered.code == 2 and "over the limit of 100 (--max-image-pixels)" in lowered.err  # every image is over it
    assert "none of its 13 images can be read" in lowered.err


def test_a_mistyped_option_is_named_with_its_likely_meaning(paths, add_task):
    run = add_task(["t", "--dta", str(paths.root / "x"), "--store", str(paths.store)])
    assert run.code == 2 and "Traceback" not in run.err
    assert "unrecognized option --dta (did you mean --data" in run.err.strip().splitlines()[-1], run.err
    assert "the following arguments are required" not in run.err
