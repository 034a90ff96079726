"""The seam between the engine and whatever runs the towers.

`Runtime` is all the engine needs: encode images (frozen, or per sample with a task's prompts scaled by w), encode
text, and install/remove a task's prompts under an internal name. `TorchRuntime` runs `backbone.PromptedCLIP`
eagerly on CPU or CUDA; `service/runtime_onnx.py` provides the same methods with ONNX Runtime.

A task is loaded with the config of its kind: `PromptConfig` (residual prompts, weighted per sample inside
PromptedCLIP) or `TokenPromptConfig` (image-text prompt tokens, `backbone/token_prompts.py`: all or nothing, so any
w > 0 applies them in full; its class text is "<learned context> {class name}.", without templates).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from backbone import Backbone, BackboneFingerprint, PromptConfig, PromptedCLIP, load_backbone
from backbone.token_prompts import TokenPromptConfig, TokenPrompts, applied
from backbone.token_prompts import class_text as token_class_text
from backbone.zeroshot import text_classifier


@dataclass(frozen=True)
class Resume:
    """What a frozen pass kept for the other passes of the same images: the activations entering image block
    `block`, below which no loaded task has prompts (so those blocks run once per image). `provisional`: that pass
    computed its last block for the pooled token only (features good for routing), and so do the passes resumed from
    it; `last`, the activations entering that block for the whole batch, from which `Runtime.finish_frozen` gives
    the exact frozen features of the images answered from them."""

    block: int
    activations: torch.Tensor  # (B, tokens, width)
    provisional: bool = False
    last: torch.Tensor | None = None  # (B, tokens, width) of a provisional pass; not carried by `rows`

    def rows(self, index: Sequence[int]) -> "Resume":
        """The resume point of some of the images (for their prompted pass)."""
        return Resume(self.block, self.activations[list(index)], self.provisional)


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

    def encode_frozen(self, images: torch.Tensor) -> tuple[torch.Tensor, Resume | None]:
        """(B, D) frozen features, and what a prompted pass of (some of) these images may start from (None: the
        whole pass; `encode_image(..., resume=resume.rows(index))`). When `resume.provisional`, the features are
        the frozen ones to rounding only: rows answered from them go through `finish_frozen` first."""

    def finish_frozen(self, resume: Resume) -> torch.Tensor:
        """(B, D) the exact frozen features of a provisional frozen pass's batch (the same bits as `encode_image`)."""

    def encode_text(self, texts: Sequence[str], task: str | None = None, weight: float = 1.0) -> torch.Tensor:
        """(N, D) L2-normalised text features of raw strings, with `task`'s prompts scaled by `weight`."""

    def class_text(
        self, class_names: Sequence[str], templates: Sequence[str], task: str | None = None, weight: float = 1.0
    ) -> torch.Tensor:
        """(C, D) class embeddings: mean of normalised template embeddings, re-normalised."""

    def load_task(self, slot: str, prompts: dict[str, torch.Tensor], config: PromptConfig | TokenPromptConfig) -> None: ...

    def delete_task(self, slot: str) -> None: ...

    def logit_scale(self) -> float: ...

    def images_by_torch(self) -> bool:
        """Whether the image passes run in torch eager now (`engine_batches` auto runs two batches at once then)."""

    def prompted_graphs_in_use(self) -> bool:
        """Whether a loaded task runs in prompted ONNX graphs (two batches at once then too); torch: never."""


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
        self._token_tasks: dict[str, TokenPrompts] = {}  # slots of image-text prompt tasks

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
    def encode_frozen(self, images):
        """Keeps the activations below the lowest prompted block when some task is placed higher (and the tower
        has the ViT layout to resume from): the prompted pass then runs only the blocks from there up. While any
        prompt task is loaded and the feature is the first token's, the last block runs for that token alone, in
        this pass and in the prompted one (provisional features: `finish_frozen` makes the exact ones)."""
        images = images.to(self.device, non_blocking=True)
        block = self.model.first_prompted_block()
        if block < len(self.backbone.image_blocks) and self.model.pools_first_token():
            feats, kept, last = self.model.encode_image_pooled(images, block, normalize=True)
            return feats.float().cpu(), Resume(block, kept, provisional=True, last=last)
        if not 0 < block < len(self.backbone.image_blocks) or not self.model.can_resume():
            return self._residual_pass(images, [None] * len(images), [0.0] * len(images)), None
        feats, kept = self.model.encode_image_keeping(images, block, normalize=True)
        return feats.float().cpu(), Resume(block, kept)

    @torch.no_grad()
    def finish_frozen(self, resume):
        return self.model.finish_frozen(resume.last, normalize=True).float().cpu()

    @torch.no_grad()
    def encode_image(self, images, tasks=None, weights=None, resume: Resume | None = None):
        images = images.to(self.device, non_blocking=True)
        names = [None] * len(images) if tasks is None else list(tasks)
        w = [1.0] * len(images) if weights is None else [float(x) for x in weights]
        by_tokens: dict[str, list[int]] = {}  # image-text prompt tasks (at w > 0): one pass each
        for i, name in enumerate(names):
            if name in self._token_tasks and w[i] > 0:
                by_tokens.setdefault(name, []).append(i)
        if not by_tokens:
            return self._residual_pass(images, names, w, resume)
        tokened = {i for rows in by_tokens.values() for i in rows}
        rest = [i for i in range(len(names)) if i not in tokened]  # residual prompts, or frozen (a token task at w = 0)
        residual = [None if names[i] in self._token_tasks else names[i] for i in rest]
        rest_resume = resume.rows(rest) if resume is not None else None
        parts = [(rest, self._residual_pass(images[rest], residual, [w[i] for i in rest], rest_resume))] if rest else []
        for slot, rows in by_tokens.items():
            with applied(self.backbone.model, self._token_tasks[slot]):
                parts.append((rows, self.model.encode_image(images[rows], normalize=True).float().cpu()))
        feats = torch.empty(len(images), parts[0][1].shape[1])
        for rows, part in parts:
            feats[rows] = part
        return feats

    def _residual_pass(self, images, names, weights, resume: Resume | None = None) -> torch.Tensor:
        """Frozen, or residual prompts per sample (`names[i]` None: frozen); from `resume` when given."""
        if all(t is None for t in names):
            feats = self.model.encode_image(images, normalize=True)
        elif resume is not None:
            feats = self.model.encode_image_from(resume.activations, resume.block, names, weights, normalize=True,
                                                 pooled=resume.provisional)
        else:
            feats = self.model.encode_image(images, tasks=names, weights=weights, normalize=True)
        return feats.float().cpu()

    @torch.no_grad()
    def encode_text(self, texts, task=None, weight=1.0):
        if task in self._token_tasks and weight != 0:  # raw texts take the place of a class name
            return self._token_text(list(texts), task)
        tokens = self.backbone.tokenizer(list(texts)).to(self.device)
        if task is None or weight == 0:
            feats = self.model.encode_text(tokens, normalize=True)
        else:
            feats = self.model.encode_text(tokens, task=task, weight=float(weight), normalize=True)
        return feats.float().cpu()

    def class_text(self, class_names, templates, task=None, weight=1.0):
        if task is None or weight == 0:
            return text_classifier(self.model, list(class_names), list(templates)).float().cpu()
        if task in self._token_tasks:
            return self._token_text(list(class_names), task)
        return text_classifier(self.model, list(class_names), list(templates), task=task, weight=weight).float().cpu()

    def _token_text(self, names: list[str], slot: str) -> torch.Tensor:
        return token_class_text(self.backbone, self._token_tasks[slot], names).float().cpu()

    def load_task(self, slot, prompts, config):
        if isinstance(config, TokenPromptConfig):
            tokens = TokenPrompts(self.backbone.model, self.backbone.tokenizer, config).load(prompts)
            self._token_tasks[slot] = tokens.to(self.device).requires_grad_(False)
            return
        self.model.load_task(slot, prompts, config)

    def delete_task(self, slot):
        if self._token_tasks.pop(slot, None) is None:
            self.model.delete_task(slot)

    def logit_scale(self) -> float:
        return self._scale

    def images_by_torch(self) -> bool:
        return True

    def prompted_graphs_in_use(self) -> bool:
        return False
