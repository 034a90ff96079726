"""Retrieval gallery: frozen image embeddings under string ids, searched by inner product with FAISS.

One gallery lives in each replica's memory (it is not persisted and not shared between replicas).
"""
from __future__ import annotations

import threading

import faiss
import numpy as np
import torch
import torch.nn.functional as F


class GalleryFull(ValueError):
    pass


class Gallery:
    def __init__(self, dim: int, capacity: int = 100_000):
        self.dim = dim
        self.capacity = capacity
        self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._ids: dict[str, int] = {}  # external id -> FAISS id
        self._names: dict[int, str] = {}
        self._next = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: list[str], features: torch.Tensor) -> int:
        """Add (or replace) embeddings; returns the gallery size."""
        if len(ids) != features.shape[0]:
            raise ValueError(f"{len(ids)} ids for {features.shape[0]} embeddings")
        if len(set(ids)) != len(ids):
            raise ValueError("gallery ids in one request must be distinct")
        vectors = np.ascontiguousarray(F.normalize(features.float(), dim=-1).numpy(), dtype=np.float32)
        with self._lock:
            new = len({i for i in ids if i not in self._ids})
            if len(self._ids) + new > self.capacity:
                raise GalleryFull(f"the gallery holds at most {self.capacity} items ({len(self._ids)} now)")
            replaced = np.array([self._ids[i] for i in ids if i in self._ids], dtype=np.int64)
            if len(replaced):
                self._index.remove_ids(replaced)
            numeric = []
            for external in ids:
                if external in self._ids:
                    del self._names[self._ids[external]]
                self._ids[external] = self._next
                self._names[self._next] = external
                numeric.append(self._next)
                self._next += 1
            self._index.add_with_ids(vectors, np.asarray(numeric, dtype=np.int64))
            return len(self._ids)

    def search(self, query: torch.Tensor, k: int) -> list[tuple[str, float]]:
        q = np.ascontiguousarray(F.normalize(query.float().reshape(1, -1), dim=-1).numpy(), dtype=np.float32)
        with self._lock:
            if not self._ids:
                return []
            scores, rows = self._index.search(q, min(k, len(self._ids)))
            return [(self._names[int(r)], float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
