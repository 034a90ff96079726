"""The recipes as typed settings: the one source of their defaults and help texts, for `add-task` (its options read
both from the fields: `--epochs` is `epochs`), the Ray Train workers and the Python API.

Kept free of torch imports so that `python -m training.add_task --help` is fast. The checks raise `InputError`
naming the option, so that add-task reports them as bad input (exit 2).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .errors import InputError


def setting(default: Any, help: str) -> Any:
    """A recipe field: its default, and the help text of its add-task option."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SplitSettings:
    """What both recipes share: the validation split and the evaluation batch."""

    val_fraction: float = setting(0.1, "stratified validation hold-out that picks the best epoch (and reports a head's "
                                       "held-out accuracy); 0 keeps the last epoch")
    seed: int = setting(0, "split, data order, templates, prompt init")
    eval_batch_size: int | None = setting(None, "images per forward pass when evaluating and fingerprinting; none: 256 "
                                                "on GPU, 16 on CPU (where larger batches ran slower)")
    frozen_runtime: Literal["auto", "torch", "onnx"] = setting(
        "auto", "what runs the frozen image pass (the fingerprint, a head's features): onnx = ONNX Runtime on the "
        "service's exported graph (1.4-1.8x torch on CPU; exported once per backbone into the cache the service "
        "shares), torch = torch eager; auto = onnx on CPU, torch on GPU")


@dataclass(frozen=True)
class ResidualPromptSettings(SplitSettings):
    """The recipe; defaults follow the reference (DIKI-style residual prompts on MTIL), but for where the prompts sit."""

    # the reference recipe prompts the first 8 blocks of each tower; on the proxy (6 image blocks) the last 2 or 3
    # learned better than the first 8, equal to each other and better than the last 1, in less training time, and the
    # last 2 serve fastest of those (docs/backbone.md): the default is that share of the tower, resolved per backbone
    depth: int | None = setting(None, "prompted blocks per tower (capped at each tower's depth); none: a third of the image "
                                      "tower's blocks, rounded (2 of the proxy's 6, 4 of ViT-B/16's 12)")
    prompt_placement: Literal["input", "output"] = setting(
        "output", "which blocks hold the prompts: the last --depth of each tower, or the first (the reference "
                  "recipe: --depth 8 --prompt-placement input); with 'output' the service runs the blocks below them "
                  "once per image, for routing and answering alike")
    n_prefix: int = setting(8, "prefix tokens per prompted block")
    epochs: int = setting(10, "training epochs")
    batch_size: int = setting(128, "global batch, split across workers")
    # high, as in the reference: the prompts start at zero output
    lr: float = setting(5.0, "SGD learning rate, cosine-decayed per step")
    # so that a backbone with a softer temperature gets the same gradient step (ViT-B-16/openai: exactly lr; the
    # proxy, 17.6: 5.7 x lr)
    lr_reference_logit_scale: float | None = setting(
        100.0, "lr is meant at this logit scale (CLIP's); the step applied is lr x S / the backbone's logit scale; "
               "'none': lr as is")
    key_init: float | None = setting(None, "prefix keys ~ U(-X, X); 'none': matched to the spread of each block's own keys")
    momentum: float = setting(0.0, "SGD momentum")  # plain SGD in the reference
    weight_decay: float = setting(0.0, "SGD weight decay")
    final_lr_ratio: float = setting(1e-3, "the cosine ends at lr x this")
    warmup_steps: int = setting(0, "linear warm-up steps before the cosine")  # the reference has none
    # sample: T x less text-tower work, noisier gradients
    text_templates: Literal["mean", "sample"] = setting(
        "mean", "class text features per training step: the mean over all templates (what is evaluated and served), "
                "or one random template per class (cheaper)")
    augment: Literal["none", "random-crop"] = setting(
        "none", "training images only: 'random-crop' takes a random crop of each image at every step (no flips)")
    crop_scale: float = setting(0.5, "random-crop: the smallest crop as a fraction of the image area")

    def for_tower(self, image_blocks: int) -> "ResidualPromptSettings":
        """These settings with the default depth resolved for a backbone of `image_blocks` image blocks."""
        from backbone.prompts import default_depth  # here, not at the top: `add-task --help` imports no torch

        return self if self.depth is not None else replace(self, depth=default_depth(image_blocks))

    def prompt_shape(self) -> dict[str, Any]:
        """The recipe's `backbone.PromptConfig` fields (key_init aside: ResidualPromptLearner.prompt_config)."""
        if self.depth is None:
            raise ValueError("the default prompt depth depends on the backbone: resolve it first with for_tower()")
        return {"depth": self.depth, "n_prefix": self.n_prefix, "placement": self.prompt_placement}

    def __post_init__(self):
        positive = ("depth", "n_prefix", "epochs", "batch_size", "eval_batch_size")
        for name in positive:
            if getattr(self, name) is not None and getattr(self, name) < 1:
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
        if self.prompt_placement not in ("input", "output"):
            raise InputError(f"--prompt-placement must be 'input' or 'output', got {self.prompt_placement!r}")
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
class HeadSettings(SplitSettings):
    """The closed-form head's recipe (backbone/analytic_head.py): one frozen pass, then ridge regression. Its split
    is reported on; λ and the fusion weight are chosen by leave-one-out over all the images."""

    width: int = setting(4096, "head: random features per image")  # seeded and shared, never stored
    balance_classes: bool = setting(False, "head: weigh every class equally, in the fit and in choosing λ and the fusion "
                                           "weight, and report accuracies as the mean per-class recall; for classes with "
                                           "unequal image counts whose answers matter equally (off: the head follows the "
                                           "training data's class proportions)")
    projection_seed: int = 0
    lambdas: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0)  # ridge λ, in units of the mean ‖φ(f)‖²
    fusions: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)  # head weight beside zero-shot

    def __post_init__(self):
        if self.width < 1 or (self.eval_batch_size is not None and self.eval_batch_size < 1):
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
