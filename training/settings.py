"""The residual-prompt recipe as typed settings: the one source of the defaults of `add-task` and the Python API.

Kept free of torch imports so that `python -m training.add_task --help` is fast.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import InputError


@dataclass(frozen=True)
class ResidualPromptSettings:
    """The recipe; defaults follow the reference (DIKI-style residual prompts on MTIL)."""

    depth: int = 8  # prompted blocks from the input, in each tower (capped at the tower's depth)
    n_prefix: int = 8  # prefix keys and values per prompted block
    epochs: int = 10
    batch_size: int = 128  # global batch: split across data-parallel workers
    lr: float = 5.0  # high, as in the reference: the prompts start at zero output
    lr_reference_logit_scale: float | None = 100.0  # lr is meant at CLIP's logit scale (100): the step applied is
    #   lr x 100 / the backbone's own logit scale, so a backbone with a softer temperature gets the same gradient
    #   step (ViT-B-16/openai: exactly lr; the proxy, 17.6: 5.7 x lr). None: apply lr as it is
    key_init: float | None = None  # P_K ~ U(-key_init, key_init); None: matched to the std of each block's own keys
    momentum: float = 0.0  # plain SGD in the reference
    weight_decay: float = 0.0
    final_lr_ratio: float = 1e-3  # the cosine schedule decays per step from lr to lr * final_lr_ratio
    warmup_steps: int = 0  # linear warm-up steps before the cosine (reference: none)
    val_fraction: float = 0.1  # stratified hold-out of the training data for picking the best epoch (0: keep the last)
    seed: int = 0  # split, data order, template sampling and prompt initialisation
    text_templates: Literal["mean", "sample"] = "mean"  # per step: the mean over all templates (the classifier that is
    #   evaluated and served), or one random template per class (T x less text-tower work, noisier gradients)
    eval_batch_size: int = 256  # images per forward pass when evaluating and fingerprinting
    augment: Literal["none", "random-crop"] = "none"  # training images only: a random resized crop per image, per step
    crop_scale: float = 0.5  # random-crop: the smallest crop, as a fraction of the image's area

    def __post_init__(self):
        positive = ("depth", "n_prefix", "epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise InputError(f"--lr must be a positive number, got {self.lr}")
        for name in ("momentum", "weight_decay", "warmup_steps"):
            if getattr(self, name) < 0:
                raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.lr_reference_logit_scale is not None and not self.lr_reference_logit_scale > 0:
            raise InputError(f"--lr-reference-logit-scale must be > 0, got {self.lr_reference_logit_scale}")
        if self.key_init is not None and not self.key_init >= 0:
            raise InputError(f"--key-init must be >= 0, got {self.key_init}")
        if not 0 < self.final_lr_ratio <= 1:
            raise InputError(f"--final-lr-ratio must be in (0, 1], got {self.final_lr_ratio}")
        if not 0 <= self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.augment not in ("none", "random-crop"):
            raise InputError(f"--augment must be 'none' or 'random-crop', got {self.augment!r}")
        if not 0 < self.crop_scale <= 1:
            raise InputError(f"--crop-scale must be in (0, 1], got {self.crop_scale}")
        if self.text_templates not in ("sample", "mean"):
            raise InputError(f"--text-templates must be 'sample' or 'mean', got {self.text_templates!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ResidualPromptSettings":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class HeadSettings:
    """The closed-form head's recipe (backbone/analytic_head.py): one frozen pass, then ridge regression."""

    width: int = 4096  # random features per image (the projection is seeded and shared, never stored)
    projection_seed: int = 0
    lambdas: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # ridge λ, in units of the mean ‖φ(f)‖²
    fusions: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)  # head weight beside zero-shot
    val_fraction: float = 0.1  # stratified split whose held-out accuracy is reported (λ and fusion: leave-one-out on all)
    seed: int = 0  # the split
    eval_batch_size: int = 256

    def __post_init__(self):
        if self.width < 1 or self.eval_batch_size < 1:
            raise InputError(f"--head-width and --eval-batch-size must be >= 1, got {self.width}, {self.eval_batch_size}")
        if not 0 < self.val_fraction < 1:
            raise InputError(f"--val-fraction must be in (0, 1) for a head (it picks λ and the fusion weight), got {self.val_fraction}")
        if not self.lambdas or not all(x > 0 and math.isfinite(x) for x in self.lambdas):
            raise InputError(f"head lambdas must be positive numbers, got {self.lambdas}")
        if not self.fusions or not all(x >= 0 and math.isfinite(x) for x in self.fusions):
            raise InputError(f"head fusion weights must be finite and >= 0, got {self.fusions}")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "lambdas": list(self.lambdas), "fusions": list(self.fusions)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HeadSettings":
        known = {f.name for f in fields(cls)}
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**values)
