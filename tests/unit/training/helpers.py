"""Tiny, learnable datasets written the ways users hand them in (.npz, a folder per class, manifests), and the
command line of a tiny add-task run. Shared by tests/unit/training and tests/e2e/test_training_ray.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import TINY_CONFIGS

TINY_MODEL = str(TINY_CONFIGS / "keepclip-tiny-a.json")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (40, 60, 230), "yellow": (230, 220, 40)}
CLASS_NAMES = list(COLOURS)


def colour_images(per_class: int = 24, seed: int = 0, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Noisy solid-colour images, one colour per class: learnable even by a randomly initialised tiny CLIP."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, colour in enumerate(COLOURS.values()):
        for _ in range(per_class):
            image = np.asarray(colour, dtype=np.float32) + rng.normal(0, 25, size=(size, size, 3))
            images.append(np.clip(image, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), np.asarray(labels, dtype=np.int64)


def write_npz(path: Path, per_class: int = 24, seed: int = 0, classnames_beside: bool = False, **arrays) -> Path:
    images, labels = colour_images(per_class, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{"images": images, "labels": labels, **arrays})
    if classnames_beside:
        (path.parent / "classnames.json").write_text(json.dumps(CLASS_NAMES))
    return path


def write_folder(root: Path, per_class: int = 6, seed: int = 0, names: list[str] | None = None) -> Path:
    """root/<class>/<i>.png, PNG files of the colour images."""
    images, labels = colour_images(per_class, seed)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / (names or CLASS_NAMES)[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{i:03d}.png")
    return root


def write_manifest(path: Path, per_class: int = 6, seed: int = 0, label_as: str = "name") -> Path:
    """A .jsonl or .csv manifest with image files in path.parent/images/; labels as class names or indices."""
    images, labels = colour_images(per_class, seed)
    folder = path.parent / "images"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / f"{i:03d}.png")
        rows.append((f"images/{i:03d}.png", CLASS_NAMES[label] if label_as == "name" else int(label)))
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({"path": p, "label": lab}) + "\n" for p, lab in rows))
    else:
        path.write_text("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    return path


def tiny_args(name: str, data: Path, store: Path, checkpoints: Path, *extra: str, epochs: int = 2, kind: str = "prompts") -> list[str]:
    """A fast add-task command line on the tiny random-init config (the prompts kind unless `kind` says otherwise)."""
    return [
        name, "--data", str(data), "--kind", kind, "--model", TINY_MODEL, "--pretrained", "none", "--device", "cpu",
        "--store", str(store), "--checkpoint-dir", str(checkpoints), "--epochs", str(epochs), "--batch-size", "16",
        "--val-fraction", "0.25", "--no-progress", *extra,
    ]
