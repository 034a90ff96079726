"""Data adapters: each layout gives the same classes and images; the split is seeded and stratified.
(That the cached pixels are exactly the backbone's transform: tests/unit/backbone/test_preprocessing.py.)"""
import json

import numpy as np
import pytest
from PIL import Image

from backbone import DEFAULT_TEMPLATES, PixelPipeline
from tests.conftest import tiny_backbone
from tests.unit.training.helpers import CLASS_NAMES, colour_images, write_folder, write_manifest, write_npz
from training.data import ImageSet, decode, in_order, read_class_names, read_templates, scan, split_train_val
from training.errors import InputError


def test_all_layouts_read_the_same_classes_and_images(tmp_path):
    backbone = tiny_backbone()
    pipeline = PixelPipeline(backbone.preprocess)
    npz = write_npz(tmp_path / "npz" / "train.npz", per_class=3, classnames_beside=True)
    folder = write_folder(tmp_path / "folder", per_class=3)
    jsonl = write_manifest(tmp_path / "jsonl" / "train.jsonl", per_class=3)
    csv_ = write_manifest(tmp_path / "csv" / "train.csv", per_class=3, label_as="index")
    sources = [scan(npz), scan(folder), scan(jsonl), scan(csv_, class_names=CLASS_NAMES, class_names_from="--class-names")]
    decoded = [decode(s, pipeline)[0] for s in sources]
    for source, images in zip(sources, decoded):
        assert sorted(source.class_names) == sorted(CLASS_NAMES), source.format
        names = [source.class_names[i] for i in images.labels]
        assert sorted(names) == sorted(CLASS_NAMES[i] for i in colour_images(3)[1])
    # the same colour image decodes to the same pixels whatever the layout (PNG is lossless)
    by_name = [{s.class_names[l]: im.pixels[list(im.labels).index(l)] for l in set(im.labels.tolist())} for s, im in zip(sources, decoded)]
    for other in by_name[1:]:
        for cls in CLASS_NAMES:
            assert np.array_equal(by_name[0][cls], other[cls])


def test_class_names_from_folders_files_and_arrays(tmp_path):
    folder = write_folder(tmp_path / "f", per_class=1, names=["sea_lion", "b", "c", "d"])
    (folder / "b" / ".hidden").write_text("ignored")
    (folder / "README.txt").write_text("files beside the class folders are ignored")
    source = scan(folder)
    assert source.class_names == ["b", "c", "d", "sea lion"] and len(source) == 4  # sorted folders, '_' read as ' '
    mapping = tmp_path / "names.json"
    mapping.write_text(json.dumps({"sea_lion": "Steller sea lion", "b": "bee", "c": "cat", "d": "dog"}))
    assert scan(folder, read_class_names(mapping), "--classnames").class_names == ["bee", "cat", "dog", "Steller sea lion"]
    lines = tmp_path / "names.txt"
    lines.write_text("red\ngreen\n\nblue\nyellow\n")
    assert read_class_names(lines) == CLASS_NAMES
    inner = write_npz(tmp_path / "n" / "x.npz", per_class=1, class_names=np.array(CLASS_NAMES))
    assert scan(inner).class_names == CLASS_NAMES


def test_too_few_class_names_inside_the_npz_are_named_as_such(tmp_path):
    short = write_npz(tmp_path / "s.npz", per_class=1, class_names=np.array(CLASS_NAMES[:2]))
    with pytest.raises(InputError) as refused:
        scan(short)
    assert str(refused.value) == f"--data {short}: field 'class_names' has 2 names, but labels go up to 3 (4 classes)"


def test_manifest_string_labels_are_the_class_names_in_natural_order(tmp_path):
    manifest = tmp_path / "m.jsonl"
    Image.fromarray(colour_images(1)[0][0]).save(tmp_path / "a.png")
    manifest.write_text("".join(json.dumps({"path": "a.png", "label": f"class {i}"}) + "\n" for i in (10, 2, 1)))
    assert scan(manifest).class_names == ["class 1", "class 2", "class 10"]


def test_npz_string_labels_are_class_names_as_in_a_manifest(tmp_path):
    """`labels` as strings (str or UTF-8 bytes): the class names, sorted and read like folder names without class
    names given; a test set's string labels find the training classes by key or name; objects are never unpickled."""
    _, ints = colour_images(2)
    keys = np.array(["sea_lion", "b", "c", "d"])
    as_ints = scan(write_npz(tmp_path / "i" / "x.npz", per_class=2, class_names=np.array(["b", "c", "d", "sea lion"]),
                             labels=np.array([[3, 0, 1, 2][i] for i in ints])))
    for labels in (keys[ints], np.char.encode(keys[ints], "utf-8")):
        source = scan(write_npz(tmp_path / labels.dtype.kind / "x.npz", per_class=2, labels=labels))
        assert source.class_names == ["b", "c", "d", "sea lion"] and source.class_keys == ["b", "c", "d", "sea_lion"]
        assert source.labels.tolist() == as_ints.labels.tolist()
    train = write_folder(tmp_path / "f", per_class=1, names=list(keys))
    test = write_npz(tmp_path / "t" / "x.npz", per_class=2, labels=np.array(["sea lion", "b", "c", "d"])[ints])
    tested = scan(test, reference=scan(train), option="--test")
    assert [tested.class_names[i] for i in tested.labels] == [["sea lion", "b", "c", "d"][i] for i in ints]
    bad = write_npz(tmp_path / "u" / "x.npz", per_class=2, labels=np.array(["b"] * 7 + ["walrus"]))
    with pytest.raises(InputError, match=r"--test .*x.npz: labels\[7\] = 'walrus' is not one of the class names"):
        scan(bad, reference=scan(train), option="--test")
    undecodable = write_npz(tmp_path / "s" / "x.npz", per_class=2, labels=np.array([b"b"] * 7 + [b"\xff"]))
    with pytest.raises(InputError, match=r"labels\[7\] = b'\\xff' is not UTF-8 text"):
        scan(undecodable)
    pickled = write_npz(tmp_path / "o" / "x.npz", per_class=2, labels=np.array(list(keys[ints]), dtype=object))
    with pytest.raises(InputError, match=r"field 'labels' holds Python objects, which are never unpickled"):
        scan(pickled)


def test_a_folder_and_a_manifest_of_the_same_classes_give_them_the_same_names(tmp_path):
    """`sea_lion` is "sea lion" as a folder and as a manifest's label, so an update or a test set in the other layout
    finds its class instead of adding a second one."""
    keys = ["sea_lion", "b", "c", "d"]
    folder = write_folder(tmp_path / "f", per_class=1, names=keys)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\n" + "".join(f"f/{k}/{i:03d}.png,{k}\n" for i, k in enumerate(keys)))
    from_folder, from_manifest = scan(folder), scan(manifest)
    by_file = lambda source: {f.resolve(): source.class_names[i] for f, i in zip(source.files, source.labels)}
    assert from_folder.class_names == from_manifest.class_names == ["b", "c", "d", "sea lion"]
    for train, test in ((from_folder, manifest), (from_manifest, folder), (from_manifest, manifest)):
        tested = scan(test, reference=train, option="--test")
        assert by_file(tested) == by_file(train)
    with pytest.raises(InputError, match=r"label 'sea lions' is not one of the class names"):
        manifest.write_text("path,label\nf/sea_lion/000.png,sea lions\n")
        scan(manifest, reference=from_folder, option="--test")
    manifest.write_text("path,label\nf/b/001.png,sea_lion\nf/c/002.png,Sea lion\n")
    with pytest.raises(InputError, match=r"labels: 'Sea lion' and 'sea_lion' are the same class name 'sea lion' \('_' reads as a space"):
        scan(manifest)


def test_text_files_saved_with_a_byte_order_mark_read_as_without(tmp_path):
    """Excel's "CSV UTF-8" and Windows Notepad start a file with a BOM (and end lines with CRLF)."""
    Image.fromarray(colour_images(1)[0][0]).save(tmp_path / "a.png")
    bom = b"\xef\xbb\xbf"
    (tmp_path / "m.csv").write_bytes(bom + b"path,label\r\na.png,sea_lion\r\na.png,cat\r\n")
    (tmp_path / "m.jsonl").write_bytes(bom + b'{"path": "a.png", "label": "cat"}\r\n')
    (tmp_path / "names.json").write_bytes(bom + b'["cat", "dog"]')
    (tmp_path / "templates.txt").write_bytes(bom + b"a photo of a {}.\r\n")
    assert scan(tmp_path / "m.csv").class_names == ["cat", "sea lion"]
    for delimiter in (b";", b"\t"):  # Excel where ',' is the decimal mark; a tab-separated export
        (tmp_path / "m.csv").write_bytes(b"path" + delimiter + b"label\na.png" + delimiter + b"dog\n")
        assert scan(tmp_path / "m.csv").class_names == ["dog"]
    assert scan(tmp_path / "m.jsonl").class_names == ["cat"]
    assert read_class_names(tmp_path / "names.json") == ["cat", "dog"]
    assert read_templates(tmp_path / "templates.txt") == ["a photo of a {}."]


def test_a_folder_of_train_and_test_splits_is_not_taken_for_two_classes(tmp_path):
    write_folder(tmp_path / "ds" / "train", per_class=2)
    write_folder(tmp_path / "ds" / "test", per_class=1)
    with pytest.raises(InputError) as refused:
        scan(tmp_path / "ds")
    assert str(refused.value) == (f"--data {tmp_path / 'ds'}: its folders ['test', 'train'] are splits of a dataset, not "
                                  f"classes (they hold class folders); pass --data {tmp_path / 'ds' / 'train'} --test "
                                  f"{tmp_path / 'ds' / 'test'}")
    assert scan(tmp_path / "ds" / "train").class_names == sorted(CLASS_NAMES)
    flat = write_folder(tmp_path / "flat", per_class=1, names=["train", "test", "val", "valid"])  # images right inside
    assert scan(flat).class_names == ["test", "train", "val", "valid"]  # classes that happen to be named so


def test_what_operating_systems_leave_in_a_dataset_folder_is_not_data(tmp_path):
    """A folder copied from Windows or unzipped from a Mac-made zip: no __MACOSX class, no Thumbs.db image."""
    folder = write_folder(tmp_path / "f", per_class=1)
    (folder / "__MACOSX" / "red").mkdir(parents=True)
    (folder / "__MACOSX" / "red" / "._000.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "red" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (folder / "green" / "desktop.ini").write_text("[.ShellClassInfo]")
    (folder / "Thumbs.db").write_bytes(b"\xd0\xcf")
    source = scan(folder)
    assert source.class_names == sorted(CLASS_NAMES) and len(source) == 4
    assert all(f.suffix == ".png" for f in source.files)


def test_a_manifest_written_on_windows_finds_its_images(tmp_path):
    manifest = write_manifest(tmp_path / "m.csv", per_class=1)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\r\n".join([lines[0]] + [line.replace("/", "\\") for line in lines[1:]]) + "\r\n")
    assert "images\\000.png" in manifest.read_text()
    source = scan(manifest)
    assert [f.relative_to(tmp_path).as_posix() for f in source.files] == [f"images/{i:03d}.png" for i in range(4)]
    assert all(f.is_file() for f in source.files)


def test_channels_first_arrays_read_as_their_channels_last_twin(tmp_path):
    """PyTorch keeps images as [N, C, H, W]; an .npz saved from a tensor reads as the same images."""
    pipeline = PixelPipeline(tiny_backbone().preprocess)
    last = write_npz(tmp_path / "last" / "x.npz", per_class=2, class_names=np.array(CLASS_NAMES))
    with np.load(last) as arrays:
        first = tmp_path / "first" / "x.npz"
        first.parent.mkdir()
        np.savez(first, images=arrays["images"].transpose(0, 3, 1, 2), labels=arrays["labels"], class_names=arrays["class_names"])
    (a, _), (b, _) = (decode(scan(path), pipeline, progress=False) for path in (last, first))
    assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.labels, b.labels)


def test_templates_files_and_the_default(tmp_path):
    assert DEFAULT_TEMPLATES == ("a photo of a {}.",)
    json_file = tmp_path / "t.json"
    json_file.write_text(json.dumps(["a photo of a {}.", "a drawing of a {}."]))
    assert read_templates(json_file) == ["a photo of a {}.", "a drawing of a {}."]
    text = tmp_path / "t.txt"
    text.write_text("a photo of a {}.\n\nno placeholder here\n")
    with pytest.raises(InputError, match=r"t\.txt, line 3: 'no placeholder here' must contain '\{\}'"):
        read_templates(text)


def test_split_is_seeded_stratified_and_keeps_every_class_in_training():
    labels = np.repeat(np.arange(5), [40, 20, 10, 2, 1])
    train, val = split_train_val(labels, 0.1, seed=0)
    again = split_train_val(labels, 0.1, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(val, split_train_val(labels, 0.1, seed=1)[1])
    assert np.bincount(labels[val], minlength=5).tolist() == [4, 2, 1, 0, 0]
    assert set(labels[train]) == set(range(5)) and len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(labels)
    assert len(split_train_val(labels, 0.0, seed=0)[1]) == 0


def test_image_set_subset_and_concat():
    images = ImageSet(np.zeros((5, 3, 2, 2), np.uint8), np.arange(5))
    both = ImageSet.concat(images.subset(np.array([0, 1])), None, images.subset(np.array([4])))
    assert both.labels.tolist() == [0, 1, 4] and both.pixels.shape == (3, 3, 2, 2)


def test_a_split_reorders_in_place_and_gives_views_equal_to_subsets():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (200, 3, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 5, 200)
    train_index, val_index = split_train_val(labels, 0.3, seed=1)
    want_train, want_val = ImageSet(pixels, labels).subset(train_index), ImageSet(pixels, labels).subset(val_index)
    images = ImageSet(pixels.copy(), labels.copy())
    train, val = images.split(train_index, val_index)
    for got, want in ((train, want_train), (val, want_val)):
        assert np.array_equal(got.pixels, want.pixels) and np.array_equal(got.labels, want.labels)
        assert np.shares_memory(got.pixels, images.pixels)  # a view: the pixels are held once
    with pytest.raises(ValueError, match="every row exactly once"):
        images.split(train_index, train_index)


def test_decoded_images_that_would_not_fit_in_memory_go_to_a_file_or_are_refused(tmp_path):
    from training.data import pixel_store

    row = np.zeros((3, 8, 8), np.uint8)
    in_memory = pixel_store(10, row, "--data", tmp_path, available=10**9)
    assert type(in_memory) is np.ndarray and in_memory.shape == (10, 3, 8, 8)
    on_disk = pixel_store(10, row, "--data", tmp_path, available=1000)  # 1,920 bytes: more than half of 1,000
    assert isinstance(on_disk, np.memmap) and on_disk.shape == (10, 3, 8, 8)
    on_disk[3] = 7
    assert on_disk[3].sum() == 7 * 192 and on_disk.sum() == 7 * 192
    with pytest.raises(InputError, match=r"--data .*: its 1000000000000 images take .* GiB once decoded; .*TMPDIR"):
        pixel_store(10**12, row, "--data", tmp_path, available=1000)


def test_images_decoded_on_threads_come_out_in_order_and_equal_one_thread(tmp_path, monkeypatch):
    import threading
    import time

    import training.data as data

    started, lock = [], threading.Lock()

    def slow(i):
        with lock:
            started.append(i)
        time.sleep(0.002 * (i % 3))  # out-of-order finishing
        return i * i

    taken = []
    for value in in_order(slow, range(60), threads=3, ahead=2):
        taken.append(value)
        assert len(started) <= len(taken) + 3 * 2  # at most `ahead` per thread waiting: memory stays bounded
    assert taken == [i * i for i in range(60)]

    folder = write_folder(tmp_path / "f", per_class=5)
    (folder / "red" / "broken.png").write_bytes(b"not a png")
    pipeline = PixelPipeline(tiny_backbone().preprocess)
    results = {}
    for threads in (1, 3):
        monkeypatch.setattr(data, "DECODE_THREADS", threads)
        results[threads] = decode(scan(folder), pipeline, skip_unreadable=True, progress=False)
    (one, skipped_one), (three, skipped_three) = results[1], results[3]
    assert np.array_equal(one.pixels, three.pixels) and np.array_equal(one.labels, three.labels)
    assert skipped_one == skipped_three == [str(folder / "red" / "broken.png")]
