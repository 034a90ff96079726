"""The closed-form head: a classifier on the frozen image feature, fused with the zero-shot logits (the RAIL family).

    head = AnalyticHead.from_parts(tensors, config)          # what a task artifact of kind "head" holds
    logits = head.logits(frozen, zero_shot_logits, weights)   # (B, C): zero-shot + w · fusion · ridge scores

The expansion `[ReLU((f − μ) R), √d (f − μ)]` lifts the L2-normalised frozen feature `f`, centred on the task's mean
`μ`, to `width` random features plus the centred feature itself (its linear part; measured on the proxy's six domains:
mean test 70.5 against 70.2 % without it); `R` (d × width, N(0, 1/d)) is drawn from a seeded NumPy PCG64 stream, so it is never stored:
every task made with the same seed shares one cached matrix. A ridge regression to one-hot targets (fitted in
`training/head_learner.py`) maps the random features to class scores. The fused logits add those scores to the
frozen zero-shot logits with the weight `w · fusion`: `w` is the router's gate, so `w = 0` is exactly the frozen answer.
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

DEFAULT_WIDTH = 4096
DEFAULT_SEED = 0


class HeadConfigError(ValueError):
    """An analytic head's tensors or config do not fit together (shapes, a projection drawn differently)."""


@functools.lru_cache(maxsize=4)
def _projection(dim: int, width: int, seed: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    return torch.from_numpy(rng.standard_normal((dim, width), dtype=np.float32) / np.float32(np.sqrt(dim)))


@dataclass(frozen=True)
class RandomFeatures:
    """x (B, dim) -> [ReLU(x R), √dim · x] (B, width + dim), R seeded and regenerated, never stored."""

    dim: int
    width: int = DEFAULT_WIDTH
    seed: int = DEFAULT_SEED

    def matrix(self) -> torch.Tensor:
        return _projection(self.dim, self.width, self.seed)  # (dim, width) float32, shared by every task with this seed

    @property
    def out_dim(self) -> int:
        return self.width + self.dim

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.relu(x @ self.matrix().to(x)), x * self.dim**0.5], dim=-1)

    def by_rows(self, x: torch.Tensor, rows: int = 2048) -> torch.Tensor:
        """The same for a training set, filled in blocks of rows: the result is the one (n, width + dim) array, without
        the three full-size temporaries a single call makes (product, ReLU, concatenation)."""
        out = x.new_empty(len(x), self.out_dim)
        for start in range(0, len(x), rows):
            out[start : start + rows] = self(x[start : start + rows])
        return out

    def digest(self) -> str:
        """SHA-256 of R's bytes: a task records it, a reader refuses a projection drawn differently (another NumPy)."""
        return hashlib.sha256(self.matrix().numpy().tobytes()).hexdigest()


@dataclass(frozen=True, eq=False)
class AnalyticHead:
    features: RandomFeatures
    center: torch.Tensor  # (dim,) the task's mean frozen feature: the expansion's hyperplanes pass near the data
    weights: torch.Tensor  # (width + dim, C) ridge solution
    fusion: float  # head scores are added to the zero-shot logits with weight w · fusion (chosen on validation)

    @property
    def nbytes(self) -> int:
        """Bytes this task's head holds (the random projection is shared by every head of the same seed)."""
        return self.weights.nbytes + self.center.nbytes

    @property
    def num_classes(self) -> int:
        return int(self.weights.shape[1])

    def expand(self, frozen: torch.Tensor) -> torch.Tensor:
        """(B, width + dim) random features of L2-normalised frozen features."""
        return self.features(frozen - self.center.to(frozen))

    def scores(self, frozen: torch.Tensor) -> torch.Tensor:
        """(B, C) ridge outputs (one-hot regression targets: about 1 for the class, 0 for the others)."""
        return self.expand(frozen) @ self.weights.to(frozen)

    def logits(self, frozen: torch.Tensor, zero_shot: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, C) fused logits; rows with weight 0 are the zero-shot logits, bit for bit."""
        out = zero_shot.clone()
        weights = torch.as_tensor(weights, dtype=zero_shot.dtype)
        on = (weights > 0).nonzero().flatten()
        if len(on):
            out[on] = zero_shot[on] + (weights[on] * self.fusion)[:, None] * self.scores(frozen[on].to(zero_shot.dtype))
        return out

    # ------------------------------------------------------------------ artifact form
    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"head.weights": self.weights.float().contiguous(), "head.center": self.center.float().contiguous()}

    def config(self) -> dict[str, Any]:
        f = self.features
        return {"dim": f.dim, "width": f.width, "seed": f.seed, "projection_sha256": f.digest(), "fusion": self.fusion}

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], config: dict[str, Any], num_classes: int) -> "AnalyticHead":
        """Rebuild and check a head from an artifact's tensors and recipe["head"]."""
        try:
            features = RandomFeatures(int(config["dim"]), int(config["width"]), int(config["seed"]))
            fusion, digest = float(config["fusion"]), str(config["projection_sha256"])
        except (KeyError, TypeError, ValueError) as e:
            raise HeadConfigError(f"recipe.head needs dim, width, seed, fusion and projection_sha256: {e!r}") from None
        weights, center = tensors.get("head.weights"), tensors.get("head.center")
        if weights is None or center is None:
            raise HeadConfigError(f"a head needs tensors head.weights and head.center, got {sorted(tensors)}")
        if tuple(weights.shape) != (features.out_dim, num_classes) or tuple(center.shape) != (features.dim,):
            raise HeadConfigError(
                f"head.weights {tuple(weights.shape)} and head.center {tuple(center.shape)} do not match width "
                f"{features.width} + dim {features.dim} and {num_classes} classes"
            )
        if not (torch.isfinite(weights).all() and torch.isfinite(center).all() and np.isfinite(fusion) and fusion >= 0):
            raise HeadConfigError("the head's weights, center and fusion must be finite (fusion >= 0)")
        if features.digest() != digest:
            raise HeadConfigError(
                f"the random projection (seed {features.seed}) drawn here differs from the one the head was fitted with "
                "(another NumPy random stream?): refit the task"
            )
        return cls(features, center.float(), weights.float(), fusion)
