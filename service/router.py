"""Per-image routing: FAISS finds candidate tasks, exact Gaussian log-likelihoods rank them, the task's gate decides.

    router = Router({"cifar10": stats_a, "mnist": stats_b}, top_k=3, threshold=0.01,
                    vocabulary=Vocabulary(names, text, logit_scale),          # the service's open vocabulary
                    classes={"cifar10": (names_a, text_a), "mnist": (names_b, text_b)})  # each task's frozen class text
    routes = router.route(frozen_features)       # one Route per image, never a batch vote

The FAISS inner-product index holds every task's router keys (L2-normalised class means). For each image the
`top_k` distinct tasks owning its nearest keys become candidates, ranked by log N(f; mu, Sigma).

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
        keys, owners = [], []
        for i, name in enumerate(self.names):
            k = F.normalize(self.stats[name].keys.float(), dim=-1)  # (k_i, d)
            keys.append(k)
            owners.extend([i] * k.shape[0])
        self.dim = keys[0].shape[1] if keys else 0
        self.owners = np.asarray(owners, dtype=np.int64)  # key row -> task index
        self.index = faiss.IndexFlatIP(self.dim) if keys else None
        if self.index is not None:
            self.index.add(np.ascontiguousarray(torch.cat(keys).numpy(), dtype=np.float32))
        self.max_keys = max((k.shape[0] for k in keys), default=0)

    def __len__(self) -> int:
        return len(self.names)

    @property
    def checking(self) -> bool:
        """Whether tasks are checked against a vocabulary (then an image goes to the most likely task that claims it)."""
        return bool(self.classes)

    def calibrate(self) -> int:
        """Calibrate every task's check now (else each is calibrated the first time an image asks it); call it where a
        new router is built, off the request path. Tasks calibrated for an earlier router are not redone. Returns how
        many tasks have a check."""
        return sum(self._check(t) is not None for t in range(len(self.names)))

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
        return self._gate(self.names.index(name), features.detach().cpu())

    def _gate(self, t: int, features: torch.Tensor) -> torch.Tensor:
        stats = self.stats[self.names[t]]
        w = stats.weight(features).cpu()
        check = self._check(t)
        if check is None:
            return w
        claims = check(F.normalize(features.float(), dim=-1)) & (w >= CLAIM)
        return torch.where(claims, w, torch.zeros_like(w))

    def candidates(self, features: torch.Tensor, top_k: int | None = None) -> list[list[int]]:
        """Up to `top_k` distinct task indices per image, nearest key first."""
        if self.index is None:
            return [[] for _ in range(features.shape[0])]
        k_tasks = min(top_k or self.top_k, len(self.names))
        # enough keys to see k_tasks distinct owners even if the nearest keys all belong to one task
        n_keys = min(self.index.ntotal, k_tasks * self.max_keys)
        query = np.ascontiguousarray(F.normalize(features.detach().float().cpu(), dim=-1).numpy(), dtype=np.float32)
        _, rows = self.index.search(query, n_keys)
        out = []
        for row in rows:
            seen: list[int] = []
            for r in row:
                if r < 0:
                    break
                t = int(self.owners[r])
                if t not in seen:
                    seen.append(t)
                    if len(seen) == k_tasks:
                        break
            out.append(seen)
        return out

    def route(self, features: torch.Tensor, top_k: int | None = None, threshold: float | None = None) -> list[Route]:
        """One Route per row of `features` (frozen image features, any norm); knobs default to the router's."""
        threshold = self.threshold if threshold is None else threshold
        n = features.shape[0]
        if n == 0:
            return []
        if self.index is None:
            return [NO_ROUTE] * n
        cands = self.candidates(features, top_k)
        f = features.detach().cpu()
        ll = torch.full((n, len(self.names)), float("-inf"), dtype=torch.float64)
        for t in sorted({t for c in cands for t in c}):  # one exact pass per candidate task, over its images
            rows = torch.tensor([i for i, c in enumerate(cands) if t in c])
            ll[rows, t] = self.stats[self.names[t]].log_likelihood(f[rows]).cpu()
        order = [sorted(c, key=lambda t: -ll[i, t].item()) for i, c in enumerate(cands)]
        # without checks only the most likely task is asked (its gate is the weight); with them, each candidate in turn
        depth = max(map(len, order)) if self.checking else 1
        chosen: list[int | None] = [None] * n
        weights = torch.zeros(n)
        first = torch.zeros(n)  # the most likely task's gate
        pending = [i for i in range(n) if order[i]]
        for rank in range(depth):
            asked: dict[int, list[int]] = {}
            for i in pending:
                if rank < len(order[i]):
                    asked.setdefault(order[i][rank], []).append(i)
            for t, rows in sorted(asked.items()):
                w = self._gate(t, f[rows])
                for i, wi in zip(rows, w.tolist()):
                    if rank == 0:
                        first[i] = wi
                    if wi >= threshold and (wi > 0 or not self.checking):  # with checks, 0 means "not claimed"
                        chosen[i], weights[i] = t, wi
            pending = [i for i in pending if chosen[i] is None]
            if not pending:
                break
        routes = []
        for i in range(n):
            candidates = tuple(Candidate(self.names[t], float(ll[i, t])) for t in order[i])
            if chosen[i] is not None:
                name, w = self.names[chosen[i]], float(weights[i])
                routes.append(Route(name, w, best=name, best_weight=w, candidates=candidates))
            else:
                best = self.names[order[i][0]] if order[i] else None
                routes.append(Route(None, 0.0, best=best, best_weight=float(first[i]), candidates=candidates))
        return routes
