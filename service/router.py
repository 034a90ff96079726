"""Per-image routing: FAISS finds candidate tasks, exact Gaussian log-likelihoods rank them, the task's gate decides.

    router = Router({"cifar10": stats_a, "mnist": stats_b}, top_k=3, threshold=0.01,
                    vocabulary=Vocabulary(names, text, logit_scale),          # the service's open vocabulary
                    classes={"cifar10": (names_a, text_a), "mnist": (names_b, text_b)})  # each task's frozen class text
    routes = router.route(frozen_features)       # one Route per image, never a batch vote

The FAISS inner-product index holds one key per task, the L2-normalised mean of its Gaussian. For each image the
`top_k` tasks with the nearest keys become candidates, ranked by log N(f; mu, Sigma); one distance per (image,
candidate) gives both the likelihood and the gate, and the vocabulary's text meets each image once, for every check.

Without a vocabulary (or for a task without class text, or an artifact made before the calibration sample was kept)
the most likely candidate's distance gate `w = stats.weight(f)` is the weight, as before. With one, a task must also
explain the image better than the vocabulary does (`ZeroShotCheck`, calibrated per task on its own held-out images):
the image goes to the most likely candidate that *claims* it, i.e. passes its check with a distance gate of at least
0.5 (inside the gate's own midpoint), at that gate's weight; an image no candidate claims gets w = 0. A task is thereby
"this task, or nothing", never a distance to one Gaussian alone (issue 16: a diffuse task otherwise claims unrelated
domains). Below `threshold` the image gets no task (the frozen CLIP answer, no prompted pass).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from backbone import TaskStats
from backbone.gate import Vocabulary, ZeroShotCheck

__all__ = ["Candidate", "NO_ROUTE", "Route", "Router", "Vocabulary"]

CLAIM = 0.5  # with a zero-shot check, a task claims an image only inside its distance gate's midpoint (w >= 0.5)


@dataclass(frozen=True)
class Candidate:
    task: str
    log_likelihood: float


@dataclass(frozen=True)
class Route:
    """Where one image goes: `task` None means frozen CLIP (no task matched, or its gate was negligible)."""

    task: str | None
    weight: float  # the gate w applied to the task's prompts; 0.0 when task is None
    best: str | None = None  # the routed task, else the most likely one even when its gate was below the threshold
    best_weight: float = 0.0  # that task's gate
    candidates: tuple[Candidate, ...] = field(default=())  # FAISS candidates, most likely first


NO_ROUTE = Route(task=None, weight=0.0)


class Router:
    """Immutable: built once per engine state from the tasks' fingerprints (and the service's vocabulary)."""

    def __init__(
        self,
        stats: Mapping[str, TaskStats],
        top_k: int = 3,
        threshold: float = 0.01,
        *,
        vocabulary: Vocabulary | None = None,
        classes: Mapping[str, tuple[Sequence[str], torch.Tensor]] | None = None,
    ):
        self.names = sorted(stats)
        self.stats = {name: stats[name] for name in self.names}
        self.top_k = top_k
        self.threshold = threshold
        self.vocabulary = vocabulary if vocabulary is not None and len(vocabulary.names) else None
        self.classes = {n: classes[n] for n in self.names if n in classes} if classes and self.vocabulary else {}
        self._checks: dict[int, ZeroShotCheck | None] = {}  # task index -> its check, calibrated on first use
        # FAISS holds one key per task, its normalised mean: the exact likelihoods rank the candidates it hands over
        keys = [F.normalize(self.stats[name].gaussian.mean.float(), dim=-1) for name in self.names]
        self.dim = keys[0].shape[0] if keys else 0
        self.index = faiss.IndexFlatIP(self.dim) if keys else None
        if self.index is not None:
            self.index.add(np.ascontiguousarray(torch.stack(keys).numpy(), dtype=np.float32))

    def __len__(self) -> int:
        return len(self.names)

    @property
    def checking(self) -> bool:
        """Whether tasks are checked against a vocabulary (then an image goes to the most likely task that claims it)."""
        return bool(self.classes)

    def calibrate(self, release: bool = False) -> int:
        """Calibrate every task's check now (else each is calibrated the first time an image asks it); call it where a
        new router is built, off the request path. Tasks calibrated for an earlier router are not redone. `release`
        then frees each task's calibration sample (for a caller whose vocabulary never changes). Returns how many tasks
        have a check."""
        checked = sum(self._check(t) is not None for t in range(len(self.names)))
        if release and self.checking:
            for stats in self.stats.values():
                stats.release_calibration()
        return checked

    def check(self, name: str) -> ZeroShotCheck | None:
        """The task's zero-shot check (None: gated by distance alone)."""
        return self._check(self.names.index(name))

    def _check(self, t: int) -> ZeroShotCheck | None:
        if t not in self._checks:  # calibrated once per task version and vocabulary (memoised on its TaskStats too)
            name = self.names[t]
            if name in self.classes:
                class_names, class_text = self.classes[name]
                self._checks[t] = self.stats[name].zero_shot_check(class_names, class_text, self.vocabulary)
            else:
                self._checks[t] = None
        return self._checks[t]

    def gate(self, name: str, features: torch.Tensor) -> torch.Tensor:
        """(B,) the weight task `name` gives each image: its distance gate, 0 where it does not claim the image."""
        f = F.normalize(features.detach().cpu().float(), dim=-1)
        return self._likelihood_and_gate(self.names.index(name), f, self._vocabulary_cos(f))[1]

    def _vocabulary_cos(self, f: torch.Tensor) -> torch.Tensor | None:
        """(B, V) cosines of normalised features with the vocabulary's text: one product, shared by every task's check."""
        return f @ self.vocabulary.text.T if self.checking else None

    def _likelihood_and_gate(self, t: int, f: torch.Tensor, vocabulary_cos: torch.Tensor | None):
        """Task t's log-likelihood and weight for normalised rows f, from one distance; weight 0 where it does not claim."""
        ll, w = self.stats[self.names[t]].likelihood_and_weight(f)
        check = self._check(t)
        if check is not None:
            w = torch.where(check(f, vocabulary_cos) & (w >= CLAIM), w, torch.zeros_like(w))
        return ll, w

    def candidates(self, features: torch.Tensor, top_k: int | None = None) -> list[list[int]]:
        """Up to `top_k` task indices per image, nearest task mean first."""
        if self.index is None:
            return [[] for _ in range(features.shape[0])]
        k = min(top_k or self.top_k, len(self.names))
        query = np.ascontiguousarray(F.normalize(features.detach().float().cpu(), dim=-1).numpy(), dtype=np.float32)
        _, rows = self.index.search(query, k)
        return [[int(t) for t in row if t >= 0] for row in rows]

    def route(self, features: torch.Tensor, top_k: int | None = None, threshold: float | None = None) -> list[Route]:
        """One Route per row of `features` (frozen image features, any norm); knobs default to the router's."""
        threshold = self.threshold if threshold is None else threshold
        n = features.shape[0]
        if n == 0:
            return []
        if self.index is None:
            return [NO_ROUTE] * n
        cands = self.candidates(features, top_k)
        f = F.normalize(features.detach().cpu().float(), dim=-1)
        vocabulary_cos = self._vocabulary_cos(f)
        ll = torch.full((n, len(self.names)), float("-inf"), dtype=torch.float64)
        gate = torch.zeros(n, len(self.names))
        for t in sorted({t for c in cands for t in c}):  # one exact pass per candidate task, over its images
            rows = torch.tensor([i for i, c in enumerate(cands) if t in c])
            ll[rows, t], gate[rows, t] = self._likelihood_and_gate(t, f[rows], None if vocabulary_cos is None else vocabulary_cos[rows])
        return [self._pick(cands[i], ll[i], gate[i], threshold) for i in range(n)]

    def _pick(self, cands: list[int], ll: torch.Tensor, gate: torch.Tensor, threshold: float) -> Route:
        """The most likely candidate, or with checks the most likely one that claims the image; its gate is the weight."""
        order = sorted(cands, key=lambda t: -ll[t].item())
        candidates = tuple(Candidate(self.names[t], float(ll[t])) for t in order)
        if not order:
            return NO_ROUTE
        # without checks only the most likely task is asked; with them, each candidate in turn (0: "not claimed")
        for t in order if self.checking else order[:1]:
            w = float(gate[t])
            if w >= threshold and (w > 0 or not self.checking):
                return Route(self.names[t], w, best=self.names[t], best_weight=w, candidates=candidates)
        return Route(None, 0.0, best=self.names[order[0]], best_weight=float(gate[order[0]]), candidates=candidates)
