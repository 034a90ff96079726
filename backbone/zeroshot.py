"""Zero-shot: class names and templates to a text classifier, and image features in batches.

`zero_shot_classifier` is the one place where class names become a classifier, whatever encodes the text: the torch
model (`text_classifier`), the ONNX graphs (`service/runtime_onnx.py`) and the prompt learner's training step
(`training/learner.py`, through `template_texts` and `mean_over_templates` on its cached tokens).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .preprocessing import images_to_batch
from .prompted_clip import PromptedCLIP
from .settings import DEFAULT_TEMPLATES


def template_texts(class_names: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every class name in every template, class by class: text `c * T + t` is class c in template t."""
    return [t.format(name) for name in class_names for t in templates]


def mean_over_templates(features: torch.Tensor) -> torch.Tensor:
    """(C, T, D) L2-normalised features of `template_texts` -> (C, D): each class's mean, re-normalised."""
    return F.normalize(features.mean(1), dim=-1)


def zero_shot_classifier(
    encode_texts: Callable[[list[str]], torch.Tensor], class_names: Sequence[str], templates: Sequence[str]
) -> torch.Tensor:
    """(C, D) class embeddings; `encode_texts` maps strings to their (N, D) L2-normalised text features."""
    features = encode_texts(template_texts(class_names, templates))  # (C * T, D)
    return mean_over_templates(features.view(len(class_names), len(templates), -1))


@torch.no_grad()
def text_classifier(
    model: PromptedCLIP,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    task: str | None = None,
    weight: float = 1.0,
) -> torch.Tensor:
    """`zero_shot_classifier` on the torch model, through `task`'s prompts scaled by `weight` (None: frozen)."""

    def encode(texts: list[str]) -> torch.Tensor:
        tokens = model.backbone.tokenizer(texts).to(model.backbone.device)
        return model.encode_text(tokens, task=task, weight=weight, normalize=True)

    return zero_shot_classifier(encode, class_names, templates)


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
