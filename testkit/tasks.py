"""Servable tasks made by hand, for tests, the UI screenshot script and the speed benchmark's dry runs.

A real task comes from `training/`; these have random (small) prompts but a real fingerprint fitted on the frozen
features of the images given, so routing and the gate behave as they would for a learned task.

    backbone = load_backbone(config_json, checkpoint)
    model = PromptedCLIP(backbone)
    store.publish(make_color_task(model, "red", (220, 30, 30)))
"""
from __future__ import annotations

import itertools
import os
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import save_file

from backbone import DEFAULT_TEMPLATES, Backbone, PixelPipeline, PromptConfig, PromptedCLIP, fit_task_stats, image_features

from prompts_store import DEFAULT_KIND, TaskArtifact

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (30, 40, 220),
    "yellow": (230, 220, 30),
    "purple": (140, 30, 160),
    "cyan": (30, 210, 210),
    "orange": (240, 140, 20),
    "gray": (128, 128, 128),
}
_tmp_names = itertools.count()


def save_checkpoint(backbone: Backbone, path: str | os.PathLike) -> str:
    """Write the backbone's weights as safetensors, so another process loads the same weights (and fingerprint)."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in backbone.model.state_dict().items()}
    save_file(state, str(path))
    return str(path)


def color_images(rgb: Sequence[int], n: int, size: int = 32, noise: float = 20.0, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8 images of one colour plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    base = np.asarray(rgb, dtype=np.float64)[None, None, None, :]
    return np.clip(base + rng.normal(0, noise, (n, size, size, 3)), 0, 255).astype(np.uint8)


def make_task(
    model: PromptedCLIP,
    name: str,
    images: np.ndarray,
    labels: Sequence[int],
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    config: PromptConfig = PromptConfig(depth=2, n_prefix=4),
    prompt_scale: float = 0.05,
    seed: int = 0,
    metrics: dict | None = None,
) -> TaskArtifact:
    """An artifact with random prompts (values ~ N(0, prompt_scale^2)) and a fingerprint of `images`' frozen features."""
    tmp = f"__make_task_{next(_tmp_names)}"
    model.add_task(tmp, config)
    try:
        shapes = {k: v.shape for k, v in model.task_state(tmp).items()}
    finally:
        model.delete_task(tmp)
    gen = torch.Generator().manual_seed(seed)
    prompts = {}
    for key, shape in shapes.items():
        if key.endswith(".key"):
            prompts[key] = (torch.rand(shape, generator=gen) * 2 - 1) * config.key_init
        else:
            prompts[key] = torch.randn(shape, generator=gen) * prompt_scale
    features = image_features(model, images)  # frozen, normalised
    stats = fit_task_stats(features, torch.as_tensor(list(labels)))
    return TaskArtifact(
        name=name,
        class_names=list(class_names),
        backbone=model.backbone.fingerprint.to_dict(),
        kind=DEFAULT_KIND,
        templates=list(templates),
        recipe={"prompts": config.to_dict(), "made_by": "testkit.tasks.make_task"},
        metrics=dict(metrics or {}),
        prompts=prompts,
        stats=stats.to_tensors(),
    )


def shades(rgb: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The light and dark shade of a colour that a colour task's two classes are made of."""
    rgb = np.asarray(rgb, dtype=np.float64)
    return np.clip(rgb * 1.1 + 10, 0, 255), rgb * 0.8


def color_sample(name_or_rgb: str | Sequence[int], n: int = 1, size: int = 32, seed: int = 100) -> np.ndarray:
    """(n, size, size, 3) uint8 images from a colour task's distribution (alternating light and dark shades)."""
    rgb = COLORS[name_or_rgb] if isinstance(name_or_rgb, str) else name_or_rgb
    light, dark = shades(rgb)
    return np.stack([color_images(light if i % 2 == 0 else dark, 1, size, seed=seed + i)[0] for i in range(n)])


def color_task_data(model: PromptedCLIP, name: str, rgb: Sequence[int] | None = None, n: int = 32, seed: int = 0):
    """The images (n, size, size, 3), labels and class names ('light <name>', 'dark <name>') of a colour task."""
    light_rgb, dark_rgb = shades(rgb if rgb is not None else COLORS[name])
    size = model.backbone.model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    images = np.concatenate([color_images(light_rgb, n // 2, size, seed=seed), color_images(dark_rgb, n - n // 2, size, seed=seed + 1)])
    labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
    return images, labels, [f"light {name}", f"dark {name}"]


def make_color_task(
    model: PromptedCLIP, name: str, rgb: Sequence[int] | None = None, n: int = 32, seed: int = 0, **kwargs
) -> TaskArtifact:
    """A two-class task ('light <name>', 'dark <name>') fingerprinted on noisy images of one colour."""
    images, labels, class_names = color_task_data(model, name, rgb, n, seed)
    return make_task(model, name, images, labels.tolist(), class_names, seed=seed, **kwargs)


def make_image_text_task(model: PromptedCLIP, name: str, n: int = 32, epochs: int = 3, seed: int = 0) -> TaskArtifact:
    """A learned image-text prompt task (kind "image-text-prompts") on the colour task's images: a few epochs of the
    real learner (`training/image_text_prompts.py`), small prompts, on the model's frozen backbone."""
    from PIL import Image

    from training.data import ImageSet
    from training.image_text_prompts import ImageTextPromptLearner, ImageTextPromptSettings
    from training.learner import RunContext, TaskData

    images, labels, class_names = color_task_data(model, name, n=n, seed=seed)
    pipeline = PixelPipeline(model.backbone.preprocess)
    pixels = np.stack([pipeline.pixels(Image.fromarray(im)) for im in images])
    task = TaskData(name, class_names, list(DEFAULT_TEMPLATES), ImageSet(pixels, labels))
    settings = ImageTextPromptSettings(visual_tokens=2, text_context=2, epochs=epochs, batch_size=16, seed=seed)
    return ImageTextPromptLearner(settings).fit(task, model.backbone, RunContext(progress=False))


def default_prompt_config(model: PromptedCLIP, **changes) -> PromptConfig:
    """add-task's default prompt shape (depth, prefixes, placement) on the model's backbone, with `changes`."""
    from training.settings import ResidualPromptSettings

    default = ResidualPromptSettings().for_tower(len(model.backbone.image_blocks))
    return PromptConfig(**{**default.prompt_shape(), **changes})


def publish_domain_tasks(
    model: PromptedCLIP,
    store,
    data_dir: str | os.PathLike,
    names: Sequence[str],
    n: int = 300,
    prompt_scale: float = 0.02,
    config: PromptConfig = PromptConfig(),
    seed: int = 0,
) -> dict[str, int]:
    """Publish one hand-made task per data domain (`<data_dir>/<name>/train.npz` + `classnames.json`, the layout of
    ../shared/data): fingerprint fitted on `n` training images, random prompts of the given config. -> versions."""
    import json
    from pathlib import Path

    versions = {}
    for i, name in enumerate(names):
        folder = Path(data_dir) / name
        data = np.load(folder / "train.npz")
        keep = np.sort(np.random.default_rng(seed + i).permutation(len(data["labels"]))[:n])
        class_names = json.loads((folder / "classnames.json").read_text())
        artifact = make_task(
            model, name, data["images"][keep], data["labels"][keep].tolist(), class_names,
            config=config, prompt_scale=prompt_scale, seed=seed + i, metrics={"note": "hand-made: random prompts"},
        )
        versions[name] = store.publish(artifact)
    return versions
