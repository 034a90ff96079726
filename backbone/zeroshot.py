"""Zero-shot building blocks: images to a batch, class names to a text classifier, features in batches."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from .prompted_clip import PromptedCLIP

DEFAULT_TEMPLATES = ("a photo of a {}.",)  # class text when a task gives no templates


def images_to_batch(images: Iterable[np.ndarray | Image.Image], preprocess: Callable) -> torch.Tensor:
    """uint8 HWC arrays or PIL images -> (N, 3, H, W) through open_clip's eval transform."""
    pil = (im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images)
    return torch.stack([preprocess(im.convert("RGB")) for im in pil])


@torch.no_grad()
def text_classifier(
    model: PromptedCLIP,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    task: str | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """(C, D) class embeddings: the mean of each class's normalised template embeddings, re-normalised."""
    tokens = model.backbone.tokenizer([t.format(name) for name in class_names for t in templates])
    feats = model.encode_text(tokens.to(model.backbone.device), task=task, weight=weight, normalize=True)
    feats = feats.view(len(class_names), len(templates), -1).mean(1)  # (C, D)
    return feats / feats.norm(dim=-1, keepdim=True)


@torch.no_grad()
def image_features(
    model: PromptedCLIP,
    images: np.ndarray | Sequence[np.ndarray],
    batch_size: int = 256,
    task: str | None = None,
    weight: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """(N, D) features of uint8 HWC images, in batches, optionally through one task's prompts."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images_to_batch(images[start : start + batch_size], model.backbone.preprocess)
        out.append(model.encode_image(batch.to(model.backbone.device), tasks=task, weights=weight, normalize=normalize))
    return torch.cat(out).cpu()
