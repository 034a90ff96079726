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
    gate: float  # the gate w applied to the task's prompts; 0.0 when task is None
    best: str | None = None  # the routed task, else the most likely one even when its gate was below the threshold
    best_gate: float = 0.0  # that task's gate
    candidates: tuple[Candidate, ...] = field(default=())  # FAISS candidates, most likely first


NO_ROUTE = Route(task=None, gate=0.0)


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
        t, f = self.names.index(name), F.normalize(features.detach().cpu().float(), dim=-1)
        w = self.stats[name].likelihood_and_weight(f)[1]
        check = self._check(t)
        if check is None:
            return w
        return torch.where(check(f, self._vocabulary_cos(f)) & (w >= CLAIM), w, torch.zeros_like(w))

    def _vocabulary_cos(self, f: torch.Tensor) -> torch.Tensor | None:
        """(B, V) cosines of normalised features with the vocabulary's text: one product, shared by every task's check."""
        return f @ self.vocabulary.text.T if self.checking else None

    def candidates(self, features: torch.Tensor, top_k: int | None = None) -> list[list[int]]:
        """Up to `top_k` task indices per image, nearest task mean first."""
        return self._candidates(F.normalize(features.detach().float().cpu(), dim=-1), top_k)

    def _candidates(self, f: torch.Tensor, top_k: int | None) -> list[list[int]]:
        """`candidates` of L2-normalised float32 rows."""
        if self.index is None:
            return [[] for _ in range(f.shape[0])]
        k = min(top_k or self.top_k, len(self.names))
        _, rows = self.index.search(np.ascontiguousarray(f.numpy(), dtype=np.float32), k)
        return [[t for t in row if t >= 0] for row in rows.tolist()]

    def route(self, features: torch.Tensor, top_k: int | None = None, threshold: float | None = None) -> list[Route]:
        """One Route per row of `features` (frozen image features, any norm); knobs default to the router's."""
        threshold = self.threshold if threshold is None else threshold
        n = features.shape[0]
        if n == 0:
            return []
        if self.index is None:
            return [NO_ROUTE] * n
        f = F.normalize(features.detach().cpu().float(), dim=-1)
        cands = self._candidates(f, top_k)
        ll: dict[tuple[int, int], float] = {}  # (image, task) -> log-likelihood, for the candidates only
        gate: dict[tuple[int, int], float] = {}  # (image, task) -> distance gate (a float32 value)
        for t in sorted({t for c in cands for t in c}):  # one distance per candidate task and image: likelihood and gate
            rows = [i for i, c in enumerate(cands) if t in c]
            lik, w = self.stats[self.names[t]].likelihood_and_weight(f if len(rows) == n else f[rows], normalized=True)
            for i, a, b in zip(rows, lik.tolist(), w.tolist()):
                ll[i, t], gate[i, t] = a, b
        orders = [sorted(c, key=lambda t: -ll[i, t]) for i, c in enumerate(cands)]
        chosen = self._claims(orders, f, gate, threshold)
        return [self._route(i, orders[i], ll, gate, chosen.get(i)) for i in range(n)]

    def _claims(self, orders: list[list[int]], f: torch.Tensor, gate: dict[tuple[int, int], float],
                threshold: float) -> dict[int, int]:
        """image -> the task that takes it: without checks the most likely candidate if its gate reaches the threshold;
        with them the most likely candidate that claims it. A check runs only where the distance gate already reaches
        0.5, candidates in likelihood order, so most images cost one check or none."""
        threshold = float(np.float32(threshold))  # compared as float32, like the gates
        vocabulary_cos = None  # the images' cosines with the vocabulary, once the first check needs them
        chosen: dict[int, int] = {}
        pending = [i for i, order in enumerate(orders) if order]
        for rank in range(max(map(len, orders), default=0) if self.checking else 1):
            asked: dict[int, list[int]] = {}  # task -> images whose rank-th candidate it is and may claim them
            for i in pending:
                if rank < len(orders[i]):
                    t = orders[i][rank]
                    w = gate[i, t]
                    if w >= threshold and (w >= CLAIM or self._check(t) is None):
                        asked.setdefault(t, []).append(i)
            for t, rows in asked.items():
                check = self._check(t)
                if check is None:
                    passed = [True] * len(rows)
                else:
                    vocabulary_cos = self._vocabulary_cos(f) if vocabulary_cos is None else vocabulary_cos
                    whole = len(rows) == f.shape[0]
                    passed = check(f if whole else f[rows], vocabulary_cos if whole else vocabulary_cos[rows]).tolist()
                chosen.update((i, t) for i, ok in zip(rows, passed) if ok)
            pending = [i for i in pending if i not in chosen]
        return chosen

    def _route(self, i: int, order: list[int], ll: dict, gate: dict, task: int | None) -> Route:
        if not order:
            return NO_ROUTE
        candidates = tuple(Candidate(self.names[t], ll[i, t]) for t in order)
        if task is not None:
            name, w = self.names[task], gate[i, task]
            return Route(name, w, best=name, best_gate=w, candidates=candidates)
        best = order[0]  # unclaimed: with a check the best task's weight is 0 (it did not claim the image)
        w = gate[i, best] if self._check(best) is None else 0.0
        return Route(None, 0.0, best=self.names[best], best_gate=w, candidates=candidates)
