"""Per-image routing: FAISS finds candidate tasks, exact Gaussian log-likelihoods pick one, its calibrated gate weighs it.

    router = Router({"cifar10": stats_a, "mnist": stats_b}, top_k=3, threshold=0.01)
    routes = router.route(frozen_features)       # one Route per image, never a batch vote

The FAISS inner-product index holds every task's router keys (L2-normalised class means). For each image the
`top_k` distinct tasks owning its nearest keys become candidates; among them the task with the highest
log N(f; mu, Sigma) wins, and `w = stats.weight(f)` of the winner is the gate. Below `threshold` the image gets no
task (the frozen CLIP answer, no prompted pass).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from backbone import TaskStats


@dataclass(frozen=True)
class Candidate:
    task: str
    log_likelihood: float


@dataclass(frozen=True)
class Route:
    """Where one image goes: `task` None means frozen CLIP (no task matched, or its gate was negligible)."""

    task: str | None
    weight: float  # the gate w applied to the task's prompts; 0.0 when task is None
    best: str | None = None  # the most likely task even when its gate was below the threshold
    best_weight: float = 0.0  # that task's gate
    candidates: tuple[Candidate, ...] = field(default=())  # FAISS candidates, most likely first


NO_ROUTE = Route(task=None, weight=0.0)


class Router:
    """Immutable: built once per engine state from the tasks' fingerprints."""

    def __init__(self, stats: Mapping[str, TaskStats], top_k: int = 3, threshold: float = 0.01):
        self.names = sorted(stats)
        self.stats = {name: stats[name] for name in self.names}
        self.top_k = top_k
        self.threshold = threshold
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
        best = ll.argmax(dim=1)  # (n,)
        weights = torch.zeros(n)
        for t in best.unique().tolist():
            rows = (best == t).nonzero().flatten()
            weights[rows] = self.stats[self.names[t]].weight(f[rows]).cpu()
        routes = []
        for i in range(n):
            order = sorted(cands[i], key=lambda t: -ll[i, t].item())
            candidates = tuple(Candidate(self.names[t], float(ll[i, t])) for t in order)
            name, w = self.names[int(best[i])], float(weights[i])
            if w < threshold:
                routes.append(Route(None, 0.0, best=name, best_weight=w, candidates=candidates))
            else:
                routes.append(Route(name, w, best=name, best_weight=w, candidates=candidates))
        return routes
