"""The per-task gate: how strongly an image's features say "this is my task", calibrated on the task's own data.

The reference method gates with `sigmoid(ℓ/d − 1)`, a constant that depends on the backbone (and, in d² units, a
very soft slope of 2d). Here the gate is a sigmoid in the squared Mahalanobis distance d² to the task's Gaussian,
placed from the distances of the task's own held-out images: `w = w_inside` at their `inside_quantile`, and w falls
to `w_far` a fraction `falloff` of the spread (that quantile minus the median) further out. Everything is measured in
units of the task's own distance distribution, so nothing needs retuning when the backbone changes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


@dataclass(frozen=True)
class Gate:
    center: float  # d² at which w = 0.5
    scale: float  # d² change that moves the sigmoid's logit by 1

    def __call__(self, d2: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((self.center - d2) / self.scale)

    @classmethod
    def calibrate(
        cls,
        held_out_d2: torch.Tensor,
        inside_quantile: float = 0.99,
        w_inside: float = 0.9,
        w_far: float = 0.1,
        falloff: float = 0.25,
    ) -> "Gate":
        """Fit from distances of the task's own held-out images (never seen by the Gaussian they are measured with)."""
        if held_out_d2.numel() < 2:
            raise ValueError("gate calibration needs at least 2 held-out distances")
        d2 = held_out_d2.double()
        inside, median = torch.quantile(d2, inside_quantile).item(), torch.median(d2).item()
        spread = max(inside - median, 1e-6 * max(abs(median), 1.0))
        scale = falloff * spread / (_logit(w_inside) - _logit(w_far))
        return cls(center=inside + scale * _logit(w_inside), scale=scale)

    def to_tensor(self) -> torch.Tensor:
        return torch.tensor([self.center, self.scale], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "Gate":
        center, scale = t.double().tolist()
        return cls(center=center, scale=scale)
