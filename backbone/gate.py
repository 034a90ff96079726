"""The per-task gate: how strongly an image's features say "this is my task", calibrated on the task's own data.

The reference method gates with `sigmoid(ℓ/d − 1)`, a constant that depends on the backbone (and, in d² units, a
very soft slope of 2d). Here the gate is a sigmoid in the squared Mahalanobis distance d² to the task's Gaussian,
placed from the distances of the task's own held-out images: `w = w_inside` at their `inside_quantile`, and w falls
to `w_far` a fraction `falloff` of the spread (that quantile minus the median) further out. Everything is measured in
units of the task's own distance distribution, so nothing needs retuning when the backbone changes.
"""
from __future__ import annotations

import dataclasses
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


# ----------------------------------------------------------------------------------------- zero-shot check


@dataclass(frozen=True, eq=False)
class Vocabulary:
    """The open vocabulary a task is compared against: class names and their frozen text, at the model's logit scale.

    The service's own (`service/vocabulary.py`: ImageNet-1k names for a real CLIP; for a proxy, the names it was
    pretrained on), encoded once by the frozen text tower with the service's default template. Names equal to a task's
    own class names (case and runs of spaces ignored) are not alternatives to that task.
    """

    names: tuple[str, ...]
    text: torch.Tensor  # (V, D) L2-normalised frozen class text
    logit_scale: float

    def __post_init__(self):
        if self.text.ndim != 2 or self.text.shape[0] != len(self.names):
            raise ValueError(f"a vocabulary of {len(self.names)} names needs ({len(self.names)}, D) text, got {tuple(self.text.shape)}")
        if self.text.dtype != torch.float32:  # every task's check holds this very tensor: no per-task copy
            object.__setattr__(self, "text", self.text.float())

    def others(self, class_names) -> torch.Tensor:
        """(V,) bool: the names that are not among `class_names`."""
        own = {_canonical(n) for n in class_names}
        return torch.tensor([_canonical(n) not in own for n in self.names], dtype=torch.bool)

    def alternatives_to(self, class_names) -> torch.Tensor:
        """(V', D) text of the names that are not among `class_names`."""
        return self.text[self.others(class_names)].float()


def _canonical(name: str) -> str:
    return " ".join(str(name).split()).casefold()


@dataclass(frozen=True, eq=False)
class ZeroShotCheck:
    """Does the task explain an image better than the open vocabulary does? The task's log-odds in two views:

        text view:   logsumexp_c s·f·t_c − logsumexp_v s·f·a_v          (the task's class text t, alternatives a)
        image view:  s·max_c f·k_c       − logsumexp_v s·f·m_v          (class means k, m_v = normalise(a_v + g))

    `g = mean(k) − mean(t)` is the task's modality gap (its image class means minus its class text): it moves the
    alternatives' text to where their images would be, so that both sides of the image view are measured alike.
    The check passes when the sum z reaches `threshold`, the `quantile` of z over a held-out sample of the task's own
    images (their class-mean similarity cross-fitted), so it needs no constant per backbone. The default 0.005 keeps
    99.5 % of the task's own held-out images, about as many as the distance gate's midpoint (w = 0.5) keeps.

    Holds the vocabulary's text by reference (one copy for all tasks): per task only a mask, `g` and the norms
    |a_v + g| (so f·m_v = (f·a_v + f·g) / |a_v + g| costs no second product with the vocabulary).
    """

    class_text: torch.Tensor  # (C, D) the task's frozen class text
    keys: torch.Tensor  # (K, D) L2-normalised class means
    vocabulary: torch.Tensor  # (V, D) the vocabulary's text (shared)
    others: torch.Tensor  # (V,) bool: the vocabulary names that are not the task's own
    gap: torch.Tensor  # (D,) g
    moved_norm: torch.Tensor  # (V,) |a_v + g|
    scale: float
    threshold: float

    def __post_init__(self):
        # per vocabulary name, precomputed: an additive mask that leaves out the task's own names, and s / |a_v + g|
        object.__setattr__(self, "_excluded", torch.zeros(self.others.shape).masked_fill(~self.others, float("-inf")))
        object.__setattr__(self, "_moved_scale", self.scale / self.moved_norm)

    @property
    def own_nbytes(self) -> int:
        """Bytes the check holds for its task alone (the vocabulary's text and the task's keys are shared)."""
        return sum(t.nbytes for t in (self.class_text, self.others, self.gap, self.moved_norm, self._excluded, self._moved_scale))

    def score(self, features: torch.Tensor, key_cos: torch.Tensor | None = None,
              vocabulary_cos: torch.Tensor | None = None) -> torch.Tensor:
        """z per row of `features` (L2-normalised); `key_cos` replaces max_c f·k_c (cross-fitted, for calibration),
        `vocabulary_cos` is f·a for the whole vocabulary when the caller has it (the router computes it once per image
        for every candidate task)."""
        f = features.float()
        s = self.scale
        alt = f @ self.vocabulary.T if vocabulary_cos is None else vocabulary_cos  # (B, V)
        near = (f @ self.keys.T).amax(-1) if key_cos is None else key_cos.float()
        text = torch.logsumexp(s * (f @ self.class_text.T), -1) - torch.logsumexp(s * alt + self._excluded, -1)
        moved = torch.logsumexp((alt + (f @ self.gap)[:, None]) * self._moved_scale + self._excluded, -1)  # s·f·m_v
        return text + s * near - moved

    def __call__(self, features: torch.Tensor, vocabulary_cos: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) bool: the task, rather than the vocabulary, explains the image."""
        return self.score(features, vocabulary_cos=vocabulary_cos) >= self.threshold

    @classmethod
    def calibrate(
        cls,
        own: torch.Tensor,
        own_key_cos: torch.Tensor,
        keys: torch.Tensor,
        class_text: torch.Tensor,
        vocabulary: torch.Tensor,
        others: torch.Tensor,
        scale: float,
        quantile: float = 0.005,
    ) -> "ZeroShotCheck":
        """From held-out own features (L2-normalised) and their cross-fitted class-mean similarity; `others` marks the
        rows of `vocabulary` (V, D) that are alternatives to the task."""
        if own.shape[0] < 2 or not others.any():
            raise ValueError("a zero-shot check needs at least 2 held-out images and one alternative name")
        keys, class_text, vocabulary = keys.float(), class_text.float(), vocabulary.float()
        gap = keys.mean(0) - class_text.mean(0)
        moved_norm = (vocabulary + gap).norm(dim=-1).clamp_min(1e-12)
        check = cls(class_text, keys, vocabulary, others.bool(), gap, moved_norm, float(scale), 0.0)
        z = check.score(own.float(), own_key_cos)
        return dataclasses.replace(check, threshold=torch.quantile(z.double(), quantile).item())
