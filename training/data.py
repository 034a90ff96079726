"""Data adapters: a dataset on disk -> checked labels and class names -> decoded, preprocessed images in memory.

Layouts of `--data PATH` (and `--test PATH`):

    PATH/<class>/.../<image>    a folder per class (ImageFolder); class names are the folder names, '_' read as ' '
    PATH.jsonl                  one JSON object per line: {"path": "imgs/001.png", "label": 3}  or  "label": "cat"
    PATH.csv                    a header with `path` and `label` columns, then one row per image
    PATH.npz                    `images` uint8 [N, H, W, 3] (or [N, H, W] greyscale) and `labels` int or str [N]

Image paths in a manifest are relative to the manifest's folder (or absolute). Integer labels index the class
names; string labels are class names. Class names come from `--class-names A,B,...` or `--classnames FILE` (a JSON
list, a JSON object {folder: name} for folders, or one name per line), else from the layout: folder names, the
label strings of a manifest or an .npz (sorted), `classnames.json` beside the .npz, or a `class_names` array inside it.

Everything is checked before any image is decoded, and every image is decoded before training starts; each error
names the file, line or field. Decoding runs the PIL part of the backbone's own eval transform once per image
(`backbone.preprocessing.PixelPipeline`); the uint8 pixels are kept, and the rest of the transform runs per batch.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
import stat
import sys
import tempfile
import unicodedata
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, UnidentifiedImageError

from backbone.loading import available_cores
from backbone.preprocessing import Reading, to_rgb
from backbone.settings import MAX_IMAGE_PIXELS

from .errors import InputError

if TYPE_CHECKING:
    from backbone.preprocessing import PixelPipeline

log = logging.getLogger(__name__)

NPZ_CLASSNAMES = "classnames.json"  # looked for beside an .npz (the layout of ../shared/data)
MANIFEST_SUFFIXES = {".jsonl": "jsonl", ".csv": "csv"}
SHOW_AT_MOST = 10  # file names listed in one error message


class ImageTooLarge(ValueError):
    """An image file whose header gives more pixels than allowed: listed among the unreadable, never decoded."""


# ---------------------------------------------------------------- class names and templates
def _key(name: str) -> str:
    """How the text encoder sees a class name: open_clip's tokenizer lowercases and splits on whitespace."""
    return " ".join(name.lower().split())


def spoken(key: str) -> str:
    """A class name from a folder name or a manifest's label: `golden_retriever` is read "golden retriever", so one
    class gets one name whichever layout carries it."""
    return key.replace("_", " ")


def name_key(name: str) -> str:
    """What two spellings of one class share: `Sea_lion`, `sea lion` and `sea  lion` are one class name."""
    return _key(spoken(name))


def spoken_names(keys: list[str], where: str) -> list[str]:
    """The class names of folder names or manifest labels; two keys that read the same (`a_b`, `a b`) are refused."""
    seen: dict[str, str] = {}
    for key in keys:
        first = seen.setdefault(name_key(key), key)
        if first != key:
            raise InputError(f"{where}: {first!r} and {key!r} are the same class name {spoken(key)!r} ('_' reads as a "
                             "space, and case does not count); give the class one spelling")
    return [spoken(key) for key in keys]


def check_class_names(names: list[str], where: str) -> list[str]:
    """Non-empty strings, no two the same for the text encoder ('Cat' and 'cat ' count as the same)."""
    if not isinstance(names, list) or not names:
        raise InputError(f"{where}: no class names")
    seen: dict[str, str] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise InputError(f"{where}: class name #{i} is {name!r}; class names must be non-empty strings")
        if any(unicodedata.category(c) in ("Cc", "Cs") for c in name):  # a newline, NUL, an undecodable byte
            raise InputError(f"{where}: class name #{i} is {name!r}; it holds a control character or invalid Unicode")
        if _key(name) in seen:
            first = seen[_key(name)]
            same = "" if first == name else " (the text encoder sees them as the same name)"
            raise InputError(f"{where}: duplicate class names {first!r} and {name!r}{same}; each class needs its own name")
        seen[_key(name)] = name
    return [name.strip() for name in names]


def parse_class_names(text: str) -> list[str]:
    """`--class-names "cat,dog,bird"`."""
    return check_class_names([part.strip() for part in text.split(",")], "--class-names")


def _parse_json(text: str, path: Path, option: str, line: int | None = None):
    at = f"{option} {path}" + (f", line {line}" if line else "")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{at}: not valid JSON ({e.msg}" + ("" if line else f", line {e.lineno}") + ")") from None
    except RecursionError:
        raise InputError(f"{at}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer of more digits than Python converts
        raise InputError(f"{at}: not valid JSON ({e})") from None


def read_class_names(path: str | Path) -> list[str] | dict[str, str]:
    """A JSON list, a JSON object {folder or label: name}, or a text file with one name per line (blank lines skipped)."""
    path = Path(path)
    text = _read_text(path, "--classnames")
    if path.suffix.lower() == ".json":
        data = _parse_json(text, path, "--classnames")
        if isinstance(data, dict):
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
                raise InputError(f"--classnames {path}: a JSON object must map folder names to class names (strings)")
            check_class_names(list(data.values()), f"--classnames {path}")
            return {k: v.strip() for k, v in data.items()}
        if not isinstance(data, list):
            raise InputError(f"--classnames {path}: expected a JSON list of class names, got {type(data).__name__}")
        return check_class_names(data, f"--classnames {path}")
    return check_class_names([line.strip() for line in text.splitlines() if line.strip()], f"--classnames {path}")


def read_templates(path: str | Path) -> list[str]:
    """A JSON list or one template per line (blank lines skipped); each holds `{}` once, where the class name goes."""
    path = Path(path)
    text = _read_text(path, "--templates")
    if path.suffix.lower() == ".json":
        templates = _parse_json(text, path, "--templates")
        if not isinstance(templates, list) or not all(isinstance(t, str) for t in templates):
            raise InputError(f"--templates {path}: expected a JSON list of strings")
        where = [f"--templates {path}, entry {i}" for i in range(len(templates))]
    else:
        numbered = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        templates = [t for _, t in numbered]
        where = [f"--templates {path}, line {n}" for n, _ in numbered]
    return check_templates(templates, where, f"--templates {path}")


def check_templates(templates: list[str], where: list[str] | None = None, source: str = "templates") -> list[str]:
    if not templates:
        raise InputError(f"{source}: no templates")
    for i, template in enumerate(templates):
        at = where[i] if where else f"{source}, template {i}"
        if template.count("{}") != 1 or re.search(r"\{[^}]+\}", template) or not _formats(template):
            raise InputError(f"{at}: {template!r} must contain '{{}}' exactly once (where the class name goes; "
                             "write other braces twice: '{{' or '}}')")
    if len(set(templates)) != len(templates):
        raise InputError(f"{source}: duplicate templates")
    return list(templates)


def _formats(template: str) -> bool:
    try:
        template.format("x")
        return True
    except (ValueError, IndexError, KeyError):
        return False


def _read_text(path: Path, option: str) -> str:
    if not path.exists():
        raise InputError(f"{option} {path}: no such file")
    if not path.is_file():  # a directory, or a FIFO or device that would block or never end
        raise InputError(f"{option} {path}: not a regular file")
    try:
        return path.read_text(encoding="utf-8-sig")  # a leading BOM (Excel's "CSV UTF-8", Notepad) is not data
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{option} {path}: cannot be read as UTF-8 text ({e})") from None


# ---------------------------------------------------------------- what a dataset holds (before decoding)
@dataclass
class LabeledSource:
    """A dataset on disk, checked: class names, one label per image, and where each image comes from."""

    path: Path
    format: str  # "folder" | "jsonl" | "csv" | "npz"
    class_names: list[str]
    labels: np.ndarray  # (N,) int64 in [0, len(class_names))
    class_keys: list[str]  # how the layout names each class (folder names, label strings); used to map a test set
    class_names_from: str  # where the class names came from, for messages and the recipe
    files: list[Path] | None = None  # (N,) image files (folder, manifest)
    arrays: np.ndarray | None = None  # (N, H, W[, C]) uint8 images (npz)

    def __len__(self) -> int:
        return len(self.labels)

    def where(self, i: int) -> str:
        return str(self.files[i]) if self.files is not None else f"{self.path}: images[{i}]"

    def open(self, i: int, max_pixels: int = MAX_IMAGE_PIXELS, reading: Reading = Reading()) -> Image.Image:
        """Image i in RGB, read for the model as the service reads it (`reading`: the pipeline's); a file whose header
        says it is larger than `max_pixels` is refused before decoding."""
        if self.arrays is not None:
            image = self.arrays[i]  # (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) uint8
            return reading.after_rgb(Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image))
        if not stat.S_ISREG(os.stat(self.files[i]).st_mode):  # a FIFO or device would block or never end
            raise OSError("not a regular file")
        with Image.open(self.files[i]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"{width}x{height} = {width * height} pixels, over the limit of {max_pixels} (--max-image-pixels)")
            reading.before_load(image)
            image.load()
            return reading.after_rgb(to_rgb(image))

    def describe(self) -> dict:
        return {"path": str(self.path), "format": self.format, "n_images": len(self), "class_names_from": self.class_names_from}


def scan(
    path: str | Path,
    class_names: list[str] | dict[str, str] | None = None,
    class_names_from: str | None = None,
    reference: LabeledSource | None = None,
    option: str = "--data",
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> LabeledSource:
    """Read and check a dataset's layout, labels and class names; no image is decoded yet.

    `class_names` (from --class-names/--classnames, described by `class_names_from`) override the layout's own.
    With `reference` (the training set), this is a test set: it takes the reference's classes and may lack some.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{option} {path}: no such file or directory")
    if reference is not None:
        class_names, class_names_from = reference.class_names, reference.class_names_from
    if path.is_dir():
        source = _scan_folder(path, class_names, class_names_from, reference, option)
    elif path.suffix.lower() == ".npz":
        source = _scan_npz(path, class_names, class_names_from, reference, option, max_pixels)
    elif path.suffix.lower() in MANIFEST_SUFFIXES:
        source = _scan_manifest(path, class_names, class_names_from, reference, option)
    elif path.name.lower().endswith(ARCHIVES):
        raise InputError(f"{option} {path}: an archive; unpack it and pass the folder of class folders (or the manifest) "
                         "it holds")
    else:
        raise InputError(
            f"{option} {path}: unknown data format; expected a folder per class, a .jsonl or .csv manifest "
            "(path, label), or an .npz with `images` and `labels`"
        )
    if len(source) == 0:
        raise InputError(f"{option} {path}: no images")
    if reference is None:
        check_no_empty_class(source, option)
    return source


def check_no_empty_class(source: LabeledSource, option: str = "--data", labels: np.ndarray | None = None, after: str = "") -> None:
    """Every class needs images (`labels`: those left after decoding, default all of the source's)."""
    counts = np.bincount(source.labels if labels is None else labels, minlength=len(source.class_names))
    empty = [i for i, n in enumerate(counts) if n == 0]
    if not empty:
        return
    i = empty[0]
    more = f" (and {len(empty) - 1} more empty classes)" if len(empty) > 1 else ""
    if source.format == "folder":
        raise InputError(f"{option} {source.path}: class folder {source.path / source.class_keys[i]} has no images{after}{more}")
    raise InputError(
        f"{option} {source.path}: class {source.class_names[i]!r} (label {i}, names from {source.class_names_from}) "
        f"has no images{after}{more}; every class needs training images"
    )


# what operating systems leave beside images: Windows' thumbnail caches and folder settings, the resource forks a zip
# made on a Mac unpacks into __MACOSX/ (names starting with "." are skipped anyway: .DS_Store, ._photo.jpg)
NOT_DATA = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini", "__macosx"})


def _visible(name: str) -> bool:
    return not name.startswith(".") and name.lower() not in NOT_DATA


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and all(_visible(part) for part in p.relative_to(folder).parts))


def reference_index(reference: LabeledSource) -> dict[str, int]:
    """How a test set may name the training data's classes: by its keys (folder names, labels), its class names, or a
    name written with `_` for spaces."""
    index = {name.replace(" ", "_"): i for i, name in enumerate(reference.class_names)}
    index.update({name: i for i, name in enumerate(reference.class_names)})
    index.update({key: i for i, key in enumerate(reference.class_keys)})
    return index


ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".7z", ".rar")
SPLIT_NAMES = {"train", "training", "val", "valid", "validation", "test", "testing"}


def _refuse_split_folders(path: Path, folders: list[str], option: str) -> None:
    """`dataset/` holding `train/<class>/` and `test/<class>/` would otherwise be learned as two classes, train and test."""
    if not folders or not {f.lower() for f in folders} <= SPLIT_NAMES:
        return
    if any(d.is_dir() for f in folders for d in (path / f).iterdir()):
        train = next((f for f in folders if f.lower().startswith("train")), folders[0])
        test = next((f for f in folders if f.lower().startswith("test")), None)
        hint = f"pass --data {path / train}" + (f" --test {path / test}" if test else "")
        raise InputError(f"{option} {path}: its folders {folders} are splits of a dataset, not classes (they hold class "
                         f"folders); {hint}")


def _scan_folder(path, class_names, names_from, reference, option) -> LabeledSource:
    folders = sorted(d.name for d in path.iterdir() if d.is_dir() and _visible(d.name))
    if not folders:
        raise InputError(f"{option} {path}: no class folders; expected one sub-folder of images per class (ImageFolder layout)")
    if reference is not None:  # a test set: its folders must be among the training set's
        index = reference_index(reference)
        unknown = [f for f in folders if f not in index]
        if unknown:
            raise InputError(f"{option} {path}: class folders {unknown} are not classes of the training data "
                             f"(classes: {reference.class_keys})")
        names, names_from, class_keys = reference.class_names, reference.class_names_from, list(reference.class_keys)
    else:
        _refuse_split_folders(path, folders, option)
        if class_names is None:
            names, names_from = spoken_names(folders, f"{option} {path}: class folders"), "folder names"
        elif isinstance(class_names, dict):
            missing = [f for f in folders if f not in class_names]
            extra = [k for k in class_names if k not in folders]
            if missing or extra:
                raise InputError(
                    f"{names_from}: does not match the class folders of {path}: "
                    f"{'no name for folders ' + str(missing) if missing else ''}"
                    f"{'; ' if missing and extra else ''}{'no folders for ' + str(extra) if extra else ''}"
                )
            names = [class_names[f] for f in folders]
        else:
            if len(class_names) != len(folders):
                raise InputError(
                    f"{names_from}: lists {len(class_names)} class names but {path} has {len(folders)} class folders "
                    f"({', '.join(folders[:5])}{', ...' if len(folders) > 5 else ''}); names are matched to folders in sorted order"
                )
            names = list(class_names)
        names = check_class_names(names, names_from)
        index = {f: i for i, f in enumerate(folders)}
        class_keys = folders
    files, labels = [], []
    for folder in folders:
        found = _visible_files(path / folder)
        if not found and reference is None:
            raise InputError(f"{option} {path}: class folder {path / folder} has no images")
        files += found
        labels += [index[folder]] * len(found)
    stray = [p.name for p in path.iterdir() if p.is_file() and _visible(p.name)]
    if stray:
        log.info("%s: ignoring %d files outside the class folders (%s)", path, len(stray), ", ".join(stray[:3]))
    return LabeledSource(path, "folder", names, np.asarray(labels, dtype=np.int64), class_keys, names_from, files=files)


def _natural(text: str):
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _scan_manifest(path, class_names, names_from, reference, option) -> LabeledSource:
    kind = MANIFEST_SUFFIXES[path.suffix.lower()]
    rows = _read_jsonl(path, option) if kind == "jsonl" else _read_csv(path, option)
    if isinstance(class_names, dict):
        raise InputError(f"{names_from}: a JSON object of class names only applies to a folder per class; give a list for {path}")
    names = list(class_names) if class_names is not None else None
    if names is None:  # class names are the (string) labels, sorted
        ints = [(line, label) for line, _, label in rows if isinstance(label, int)]
        if ints:
            line, label = ints[0]
            raise InputError(
                f"{option} {path}, line {line}: label {label} is a class index, but no class names were given "
                "(pass --classnames FILE or --class-names A,B,...)"
            )
        label_keys, names, names_from = _names_of_labels({label for _, _, label in rows}, path, f"{option} {path}: labels")
    else:
        label_keys = names
    index = {name: i for i, name in enumerate(names)}
    keys = reference.class_keys if reference is not None else label_keys
    key_index = reference_index(reference) if reference is not None else {k: i for i, k in enumerate(keys)}
    files, labels = [], []
    for line, file, label in rows:
        if isinstance(label, str) and label in index:
            labels.append(index[label])
        elif isinstance(label, str) and label in key_index:
            labels.append(key_index[label])
        elif isinstance(label, int) or (isinstance(label, str) and re.fullmatch(r"-?\d+", label)):
            value = int(label)
            if not 0 <= value < len(names):
                raise InputError(
                    f"{option} {path}, line {line}: label {value} is out of range: there are {len(names)} classes "
                    f"(0-{len(names) - 1}, names from {names_from})"
                )
            labels.append(value)
        else:
            raise InputError(f"{option} {path}, line {line}: label {label!r} is not one of the class names (from {names_from})")
        files.append(_manifest_file(path.parent, file))
    return LabeledSource(path, kind, names, np.asarray(labels, dtype=np.int64), list(keys), names_from, files=files)


def _names_of_labels(labels: set[str], path: Path, where: str) -> tuple[list[str], list[str], str]:
    """(keys, class names, where they come from) of a data set whose string labels are its classes: sorted naturally,
    read like folder names."""
    keys = sorted(labels, key=_natural)
    names_from = f"the labels of {path}"
    return keys, check_class_names(spoken_names(keys, where), names_from), names_from


def _manifest_file(folder: Path, file: str) -> Path:
    """A manifest row's image: relative to the manifest's folder; `imgs\\001.png` written on Windows is `imgs/001.png`
    when only that exists (a backslash is a legal character in a POSIX file name)."""
    found = Path(file) if Path(file).is_absolute() else folder / file
    if "\\" in file and os.sep == "/" and not found.exists():
        slashed = folder / file.replace("\\", "/")
        if slashed.exists():
            return slashed
    return found


def _read_jsonl(path: Path, option: str) -> list[tuple[int, str, int | str]]:
    rows = []
    for line, text in enumerate(_read_text(path, option).splitlines(), 1):
        if not text.strip():
            continue
        row = _parse_json(text, path, option, line)
        if not isinstance(row, dict):
            raise InputError(f"{option} {path}, line {line}: expected a JSON object with fields 'path' and 'label'")
        for field in ("path", "label"):
            if field not in row:
                raise InputError(f"{option} {path}, line {line}: missing field {field!r}")
        file, label = row["path"], row["label"]
        if not isinstance(file, str) or not file:
            raise InputError(f"{option} {path}, line {line}: field 'path' must be a non-empty string")
        if isinstance(label, bool) or not isinstance(label, (int, str)):
            raise InputError(f"{option} {path}, line {line}: field 'label' must be a class index or a class name, got {label!r}")
        rows.append((line, file, label.strip() if isinstance(label, str) else label))
    return rows


def _read_csv(path: Path, option: str) -> list[tuple[int, str, int | str]]:
    lines = _read_text(path, option).splitlines()
    reader = csv.DictReader(lines, delimiter=_delimiter(lines[0] if lines else ""))
    try:
        return _csv_rows(reader, path, option)
    except csv.Error as e:
        raise InputError(f"{option} {path}: not valid CSV after line {reader.line_num} ({e})") from None


def _delimiter(header: str) -> str:
    """',' unless the header has none and a ';' (what Excel writes where ',' is the decimal mark) or a tab."""
    if "," in header:
        return ","
    return next((d for d in (";", "\t") if d in header), ",")


def _csv_rows(reader: csv.DictReader, path: Path, option: str) -> list[tuple[int, str, int | str]]:
    if not reader.fieldnames:
        raise InputError(f"{option} {path}: empty CSV; expected a header with columns 'path' and 'label'")
    header = [h.strip() for h in reader.fieldnames]
    for column in ("path", "label"):
        if column not in header:
            raise InputError(f"{option} {path}: missing column {column!r} in the header (found: {header})")
        if header.count(column) > 1:
            raise InputError(f"{option} {path}: column {column!r} appears {header.count(column)} times in the header")
    reader.fieldnames = header
    rows = []
    for row in reader:
        file, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
        if not file:
            raise InputError(f"{option} {path}, line {reader.line_num}: empty 'path'")
        if not label:
            raise InputError(f"{option} {path}, line {reader.line_num}: empty 'label'")
        rows.append((reader.line_num, file, label))
    return rows


def _scan_npz(path, class_names, names_from, reference, option, max_pixels: int = MAX_IMAGE_PIXELS) -> LabeledSource:
    _check_is_zip(path, option)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            fields = list(arrays.files)
            missing = [f for f in ("images", "labels") if f not in fields]
            if missing:
                raise InputError(f"{option} {path}: no {' or '.join(repr(m) for m in missing)} array (found: {fields})")
            _check_npz_fits(arrays, path, option, max_pixels)
            images, labels = _npz_array(arrays, "images", path, option), _npz_array(arrays, "labels", path, option)
            inner_names = _npz_class_names(arrays, path, option) if "class_names" in fields else None
    except InputError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{option} {path}: cannot be read as an .npz file ({type(e).__name__}: {e})") from None
    except MemoryError:  # an array header may claim any size
        raise InputError(f"{option} {path}: an array in it is larger than this machine's memory") from None
    if images.ndim == 4 and images.shape[1] in (1, 3, 4) and images.shape[-1] not in (1, 3, 4):  # PyTorch's layout
        log.info("%s: 'images' is [N, C, H, W] %s (channels first): read as [N, H, W, C]", path, list(images.shape))
        images = images.transpose(0, 2, 3, 1)
        _check_npz_pixels(images.shape, path, option, max_pixels)
    if (images.dtype != np.uint8 or images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3, 4))
            or 0 in images.shape[1:3]):
        raise InputError(
            f"{option} {path}: field 'images' must be uint8 [N, H, W, 3] (or [N, H, W] greyscale, or [N, 3, H, W]) with H, W > 0, "
            f"got {images.dtype} {list(images.shape)}"
        )
    text_labels = labels.dtype.kind in "US"
    if not (np.issubdtype(labels.dtype, np.integer) or text_labels) or labels.ndim != 1:
        raise InputError(f"{option} {path}: field 'labels' must be integers or strings [N], got {labels.dtype} "
                         f"{list(labels.shape)}")
    if len(labels) != len(images):
        raise InputError(f"{option} {path}: field 'labels' has {len(labels)} entries but 'images' has {len(images)}")
    if isinstance(class_names, dict):
        raise InputError(f"{names_from}: a JSON object of class names only applies to a folder per class; give a list for {path}")
    if class_names is None:
        beside = path.parent / NPZ_CLASSNAMES
        if beside.is_file():
            class_names, names_from = read_class_names(beside), str(beside)
            if isinstance(class_names, dict):
                raise InputError(f"{beside}: expected a JSON list of class names")
        elif inner_names is not None:
            class_names, names_from = check_class_names([str(n) for n in inner_names], f"{path}: field 'class_names'"), f"{path}: field 'class_names'"
        elif not text_labels:
            raise InputError(
                f"{option} {path}: no class names; pass --classnames FILE (a JSON list or one name per line) or "
                f"--class-names A,B,..., or put {NPZ_CLASSNAMES} beside the .npz"
            )
    if not text_labels:
        _check_labels_in_range(path, labels, len(class_names), names_from, option)
        names = list(class_names)
        return LabeledSource(path, "npz", names, labels.astype(np.int64), names, names_from, arrays=images)
    texts = _label_texts(labels, path, option)
    if class_names is None:
        keys, class_names, names_from = _names_of_labels(set(texts), path, f"{option} {path}: field 'labels'")
    else:
        keys = list(reference.class_keys) if reference is not None else list(class_names)
    index = reference_index(reference) if reference is not None else {}
    index.update({key: i for i, key in enumerate(keys)})
    index.update({name: i for i, name in enumerate(class_names)})
    unknown = next((i for i, text in enumerate(texts) if text not in index), None)
    if unknown is not None:
        raise InputError(f"{option} {path}: labels[{unknown}] = {texts[unknown]!r} is not one of the class names "
                         f"(from {names_from})")
    labels = np.asarray([index[text] for text in texts], dtype=np.int64)
    return LabeledSource(path, "npz", list(class_names), labels, keys, names_from, arrays=images)


def _label_texts(labels: np.ndarray, path: Path, option: str) -> list[str]:
    """An .npz's string labels as text: str arrays as they are, bytes arrays as UTF-8."""
    if labels.dtype.kind == "U":
        return labels.tolist()
    texts = []
    for i, raw in enumerate(labels.tolist()):
        try:
            texts.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise InputError(f"{option} {path}: labels[{i}] = {raw!r} is not UTF-8 text") from None
    return texts


def _check_npz_pixels(shape: tuple[int, ...], path: Path, option: str, max_pixels: int) -> None:
    """`images` of `shape` [N, H, W(, C)]: each image within the pixel limit."""
    height, width = shape[1], shape[2]
    if height * width > max_pixels:
        raise InputError(f"{option} {path}: field 'images' holds {height}x{width} images = {height * width} pixels each, "
                         f"over the limit of {max_pixels} (--max-image-pixels)")


def _check_npz_fits(arrays, path: Path, option: str, max_pixels: int) -> None:
    """From the members' .npy headers, before a byte is decompressed: refuse images over the pixel limit, and arrays
    larger than the memory this machine has free (a small compressed file can hold a huge array)."""
    shape, _ = _npy_header(arrays, "images")
    if shape is not None and len(shape) in (3, 4):
        _check_npz_pixels(shape, path, option, max_pixels)
    free = _available_memory()
    for field in ("images", "labels", "class_names"):
        shape, dtype = _npy_header(arrays, field)
        if shape is None or free is None:
            continue  # not .npy data (the checks after loading name the problem), or the memory is unknown
        size = math.prod(shape) * dtype.itemsize
        if size > free:
            raise InputError(f"{option} {path}: field {field!r} {list(shape)} {dtype} takes {size / 2**30:.1f} GiB when "
                             f"loaded; this machine has {free / 2**30:.1f} GiB available")


def _npy_header(arrays, field: str) -> tuple[tuple[int, ...] | None, np.dtype | None]:
    """(shape, dtype) of an .npz member from its header alone; (None, None) where it cannot be read so."""
    try:
        with arrays.zip.open(f"{field}.npy") as f:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                return None, None
            shape, _, dtype = read(f)
            return tuple(shape), dtype
    except (KeyError, OSError, ValueError, EOFError, zipfile.BadZipFile):
        return None, None


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable), or None where that is unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _npz_array(arrays, field: str, path: Path, option: str) -> np.ndarray:
    try:
        value = arrays[field]
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise InputError(f"{option} {path}: field {field!r} holds Python objects, which are never unpickled; save it as a "
                         f"plain array (strings: np.asarray(values, dtype=str))") from None
    if not isinstance(value, np.ndarray):  # numpy hands back the raw bytes of a member that is not .npy data
        raise InputError(f"{option} {path}: cannot be read as an .npz file (field {field!r} is not .npy data)")
    return value


def _npz_class_names(arrays, path: Path, option: str) -> list[str]:
    names = _npz_array(arrays, "class_names", path, option)
    if names.ndim != 1 or names.dtype.kind != "U":
        raise InputError(f"{option} {path}: field 'class_names' must be a 1-D array of strings, got {names.dtype} {list(names.shape)}")
    return names.tolist()


def _check_is_zip(path: Path, option: str) -> None:
    # np.load takes any file that is neither .npy nor zip for a pickle, and refuses it by blaming allow_pickle
    try:
        with open(path, "rb") as f:
            is_zip = zipfile.is_zipfile(f)
    except OSError as e:
        raise InputError(f"{option} {path}: cannot be read ({e.strerror or e})") from None
    if not is_zip:
        raise InputError(f"{option} {path}: not an .npz file (numpy .npz archives are zip files)")


def _check_labels_in_range(path: Path, labels: np.ndarray, n_names: int, names_from: str, option: str) -> None:
    if len(labels) and labels.min() >= 0 and labels.max() >= n_names:  # too few names rather than a bad label
        top, names = int(labels.max()), names_from.removeprefix(f"{path}: ")  # "field 'class_names'" of this .npz
        raise InputError(f"{option} {path}: {names} has {n_names} names, but labels go up to {top} ({top + 1} classes)")
    bad = (labels < 0) | (labels >= n_names)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise InputError(
            f"{option} {path}: field 'labels' has {int(bad.sum())} values out of range, e.g. labels[{i}] = {int(labels[i])}; "
            f"there are {n_names} classes (0-{n_names - 1}, names from {names_from})"
        )


# ---------------------------------------------------------------- decoded images
@dataclass
class ImageSet:
    """Decoded images ready for batching, with their labels."""

    pixels: np.ndarray  # (N, 3, H, W) uint8 — backbone.PixelPipeline.pixels of each image
    labels: np.ndarray  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> "ImageSet":
        return ImageSet(self.pixels[index], self.labels[index])

    def split(self, first: np.ndarray, second: np.ndarray) -> tuple["ImageSet", "ImageSet"]:
        """(rows `first`, rows `second`), the two together being every row once: the rows are reordered in place,
        so both halves are views of this set's pixels, not copies (a copy would double the biggest array add-task
        holds)."""
        order = np.concatenate([first, second]).astype(np.int64)
        if len(order) != len(self) or not np.array_equal(np.sort(order), np.arange(len(self))):
            raise ValueError("split: the two index sets must hold every row exactly once")
        permute_rows(self.pixels, order)
        self.labels = self.labels[order]
        cut = len(first)
        return ImageSet(self.pixels[:cut], self.labels[:cut]), ImageSet(self.pixels[cut:], self.labels[cut:])

    @staticmethod
    def concat(*sets: "ImageSet | None") -> "ImageSet":
        sets = [s for s in sets if s is not None and len(s)]
        return ImageSet(np.concatenate([s.pixels for s in sets]), np.concatenate([s.labels for s in sets]))


def permute_rows(array: np.ndarray, order: np.ndarray) -> None:
    """array[i] = old array[order[i]] for every row, in place: one row of extra memory, each row moved once."""
    done = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if done[start]:
            continue
        done[start] = True
        if order[start] == start:
            continue
        held, i = array[start].copy(), start
        while order[i] != start:  # follow the cycle through start
            array[i] = array[order[i]]
            i = order[i]
            done[i] = True
        array[i] = held


def pixel_store(n: int, row: np.ndarray, option: str, path: Path, available: int | None = None) -> np.ndarray:
    """Room for n decoded images like `row`: in memory where they fit in half of what is available, else in a file under the
    temporary directory (deleted when the array is), else a clear error instead of the kernel's OOM kill.
    `available`: bytes of memory (default: what this machine has available now)."""
    need = n * row.nbytes
    available = _available_memory() if available is None else available
    if available is None or need <= available // 2:
        return np.empty((n, *row.shape), dtype=row.dtype)
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if need > free * 0.9:
        raise InputError(f"{option} {path}: its {n} images take {need / 2**30:.1f} GiB once decoded; this machine has "
                         f"{available / 2**30:.1f} GiB of memory available and {free / 2**30:.1f} GiB free in {folder} "
                         "(TMPDIR): learn the task from fewer images, or point TMPDIR at a larger disk")
    log.info("%s: its %d decoded images (%.1f GiB) are more than half of the %.1f GiB of memory available: they are "
             "kept in a file in %s (TMPDIR)", option, n, need / 2**30, available / 2**30, folder)
    with tempfile.TemporaryFile(dir=folder) as backing:  # no name on disk: the space returns when the mapping goes
        backing.truncate(need)
        return np.memmap(backing, dtype=row.dtype, mode="r+", shape=(n, *row.shape))


DECODE_THREADS = min(8, available_cores())  # Pillow decodes and resizes without the GIL: 80 photos 2.8 -> 1.4 s on 2 cores


def _read_row(source: LabeledSource, pipeline: PixelPipeline, max_pixels: int, i: int) -> tuple[np.ndarray | None, str | None]:
    """(image i's pixels after the backbone's resize and crop, None) or (None, why it cannot be read)."""
    try:
        image = source.open(i, max_pixels, pipeline.reading)
    except FileNotFoundError:
        return None, "file not found"
    except UnidentifiedImageError:
        return None, "not an image file"
    except ImageTooLarge as e:
        return None, f"too large: {e}"
    except Exception as e:  # truncated, corrupt or exotic files: Pillow raises many kinds
        return None, f"{type(e).__name__}: {e}"
    return pipeline.pixels(image), None


def in_order(fn, items, threads: int, ahead: int = 4):
    """fn(item) for each item on `threads` threads, yielded in the items' order; at most `ahead` results per thread
    wait to be taken, so a slow image does not let the others pile up in memory."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    if threads <= 1:
        yield from map(fn, items)
        return
    pool, pending = ThreadPoolExecutor(threads, thread_name_prefix="decode"), deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= threads * ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:  # stopped early (an error, Ctrl-C): the images not started yet are dropped, not decoded
        pool.shutdown(wait=True, cancel_futures=True)


def decode(
    source: LabeledSource, pipeline: PixelPipeline, skip_unreadable: bool = False, option: str = "--data", progress: bool = True,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[ImageSet, list[str]]:
    """Decode every image once (Pillow, RGB, the backbone's transform). -> (images, skipped files).

    Unreadable files (missing, not an image, truncated) are all collected first; then either the error lists how many
    and which, or, with `skip_unreadable`, they are left out with a warning.
    """
    from tqdm.auto import tqdm

    pixels, keep, failures = None, [], []
    rows = in_order(lambda i: _read_row(source, pipeline, max_pixels, i), range(len(source)), DECODE_THREADS)
    if progress and len(source) >= 512:
        rows = tqdm(rows, total=len(source), desc=f"decoding {source.path.name}", unit="img", file=sys.stderr,
                    mininterval=1 if sys.stderr.isatty() else 30)
    for i, (row, why) in enumerate(rows):
        if why is not None:
            failures.append((source.where(i), why))
            continue
        if pixels is None:  # every image gives the same shape (the backbone's resize and crop)
            pixels = pixel_store(len(source), row, option, source.path)
        pixels[len(keep)] = row
        keep.append(i)
    if failures:
        listed = "; ".join(f"{where} ({why})" for where, why in failures[:SHOW_AT_MOST])
        more = f"; and {len(failures) - SHOW_AT_MOST} more" if len(failures) > SHOW_AT_MOST else ""
        counted = f"{len(failures)} of {len(source)} images in {option} {source.path}"
        if not skip_unreadable:
            raise InputError(f"{counted} cannot be read: {listed}{more}. Fix or remove them, or pass --skip-unreadable to leave them out")
        log.warning("--skip-unreadable: leaving out %s that cannot be read: %s%s", counted, listed, more)
    if not keep:
        raise InputError(f"{option} {source.path}: none of its {len(source)} images can be read")
    images = ImageSet(pixels[: len(keep)], source.labels[np.asarray(keep)])
    return images, [where for where, _ in failures]


def split_train_val(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split -> (train index, val index), both sorted; every class keeps at least one training image."""
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[rng.permutation(len(members))]
        take = min(math.floor(val_fraction * len(members) + 0.5), len(members) - 1)
        val.extend(members[:take].tolist())
    if val_fraction > 0 and not val and len(labels) >= 2:  # tiny data: still hold out one image of the largest class
        counts = np.bincount(labels)
        if counts.max() >= 2:
            members = np.flatnonzero(labels == counts.argmax())
            val.append(int(members[rng.integers(len(members))]))
    val = np.sort(np.asarray(val, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), val)
    return train, val
