"""The seam between the engine and whatever runs the towers.

`Runtime` is all the engine needs: encode images (frozen, or per sample with a task's prompts scaled by w), encode
text, and install/remove a task's prompts under an internal name. `TorchRuntime` runs `backbone.PromptedCLIP`
eagerly on CPU or CUDA. A later ONNX Runtime implementation only has to provide the same methods (e.g. an exported
frozen image tower for `encode_image(images)` with `tasks=None`, falling back to torch for prompted passes).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import torch

from backbone import Backbone, BackboneFingerprint, PromptConfig, PromptedCLIP, load_backbone
from backbone.zeroshot import text_classifier


@runtime_checkable
class Runtime(Protocol):
    device: torch.device
    fingerprint: BackboneFingerprint
    embed_dim: int
    preprocess: Callable  # PIL image -> (3, H, W) tensor

    def encode_image(
        self, images: torch.Tensor, tasks: Sequence[str | None] | None = None, weights: Sequence[float] | None = None
    ) -> torch.Tensor:
        """(B, D) L2-normalised image features; `tasks[i]`/`weights[i]` per sample (None: frozen)."""

    def encode_text(self, texts: Sequence[str], task: str | None = None, weight: float = 1.0) -> torch.Tensor:
        """(N, D) L2-normalised text features of raw strings, with `task`'s prompts scaled by `weight`."""

    def class_text(
        self, class_names: Sequence[str], templates: Sequence[str], task: str | None = None, weight: float = 1.0
    ) -> torch.Tensor:
        """(C, D) class embeddings: mean of normalised template embeddings, re-normalised."""

    def load_task(self, slot: str, prompts: dict[str, torch.Tensor], config: PromptConfig) -> None: ...

    def delete_task(self, slot: str) -> None: ...

    def logit_scale(self) -> float: ...


class TorchRuntime:
    """Eager torch on the backbone's device (CUDA when present with device=auto, else CPU)."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.model = PromptedCLIP(backbone)
        self.device = backbone.device
        self.fingerprint = backbone.fingerprint
        self.preprocess = backbone.preprocess
        self.embed_dim = int(backbone.model.text_projection.shape[1]) if getattr(
            backbone.model, "text_projection", None
        ) is not None else int(self._probe_dim())
        self._scale = float(self.model.logit_scale().item())

    @classmethod
    def load(cls, model: str, pretrained: str | None, device: str = "auto") -> "TorchRuntime":
        return cls(load_backbone(model, pretrained, device))

    def _probe_dim(self) -> int:
        tokens = self.backbone.tokenizer(["probe"]).to(self.device)
        with torch.no_grad():
            return self.model.encode_text(tokens).shape[-1]

    @property
    def image_size(self) -> tuple[int, int]:
        size = self.backbone.model.visual.image_size
        return tuple(size) if isinstance(size, (tuple, list)) else (size, size)

    @torch.no_grad()
    def encode_image(self, images, tasks=None, weights=None):
        images = images.to(self.device, non_blocking=True)
        if tasks is None or all(t is None for t in tasks):
            feats = self.model.encode_image(images, normalize=True)
        else:
            feats = self.model.encode_image(images, tasks=list(tasks), weights=list(weights), normalize=True)
        return feats.float().cpu()

    @torch.no_grad()
    def encode_text(self, texts, task=None, weight=1.0):
        tokens = self.backbone.tokenizer(list(texts)).to(self.device)
        if task is None or weight == 0:
            feats = self.model.encode_text(tokens, normalize=True)
        else:
            feats = self.model.encode_text(tokens, task=task, weight=float(weight), normalize=True)
        return feats.float().cpu()

    def class_text(self, class_names, templates, task=None, weight=1.0):
        if task is None or weight == 0:
            return text_classifier(self.model, list(class_names), list(templates)).float().cpu()
        return text_classifier(self.model, list(class_names), list(templates), task=task, weight=weight).float().cpu()

    def load_task(self, slot, prompts, config):
        self.model.load_task(slot, prompts, config)

    def delete_task(self, slot):
        self.model.delete_task(slot)

    def logit_scale(self) -> float:
        return self._scale
