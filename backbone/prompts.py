"""Residual attention prompts: a wrapper around a frozen open_clip attention module.

For a block with frozen projected queries q, the wrapper adds, per head (h = head dim),

    out = frozen_attention(x) + w · W_o · softmax(q P_Kᵀ / √h) P_V

which equals `W_o (O + w · softmax(q P_Kᵀ/√h) P_V) + b_o` because W_o is linear. The frozen module is called
unchanged, so samples with no task or w = 0 get its output bit for bit. Only `in_proj_weight`, `in_proj_bias`,
`out_proj` and `num_heads` of the base module are used: they exist on open_clip 3.3's nn.MultiheadAttention (which
returns a tuple) and on open_clip's own `Attention` (which returns a tensor); the wrapper returns what the base returns.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class PromptConfig:
    """Shape of one task's prompts; defaults follow the reference recipe."""

    depth: int = 8  # prompted blocks, counted from the input, in each tower (capped at the tower's depth)
    n_prefix: int = 8  # prefix keys and values per prompted block
    key_init: float = 0.02  # P_K ~ U(-key_init, key_init); P_V starts at zero, so a new task changes nothing

    def __post_init__(self):
        if self.depth < 1 or self.n_prefix < 1:
            raise ValueError(f"prompt depth and n_prefix must be >= 1, got {self.depth} and {self.n_prefix}")
        if not self.key_init >= 0:
            raise ValueError(f"key_init must be >= 0, got {self.key_init}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptConfig":
        """From an artifact's recipe; unknown keys are refused so a newer format is never half-read."""
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown prompt config keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class PromptGroup:
    """Samples of one batch that use the same task's prompts."""

    slot: str  # key of the task's tensors in every wrapper's ParameterDicts
    index: torch.Tensor  # (g,) int64 positions in the batch
    weight: torch.Tensor  # (g,) per-sample w, never 0 (those samples are left out)


class RoutingState:
    """Which samples of the running forward use which task, per tower; thread-local so concurrent forwards don't mix."""

    def __init__(self):
        self._local = threading.local()

    def groups(self, tower: str) -> tuple[PromptGroup, ...]:
        return getattr(self._local, tower, ())

    @contextmanager
    def use(self, tower: str, groups: tuple[PromptGroup, ...]) -> Iterator[None]:
        previous = self.groups(tower)
        setattr(self._local, tower, groups)
        try:
            yield
        finally:
            setattr(self._local, tower, previous)


class PromptedAttention(nn.Module):
    """Holds the frozen attention as `base_layer` and adds the prompt branch of the tasks routed to each sample."""

    def __init__(self, base_layer: nn.Module, tower: str, routing: RoutingState):
        super().__init__()
        self.base_layer = base_layer
        self.tower = tower
        self.routing = routing  # shared, not a submodule
        self.width = base_layer.in_proj_weight.shape[1]
        self.num_heads = base_layer.num_heads
        self.batch_first = getattr(base_layer, "batch_first", True)  # open_clip's own Attention is batch-first
        self.prefix_keys = nn.ParameterDict()  # slot -> (n, width)
        self.prefix_values = nn.ParameterDict()  # slot -> (n, width)

    def get_base_layer(self) -> nn.Module:
        return self.base_layer

    def set_slot(self, slot: str, keys: torch.Tensor, values: torch.Tensor) -> None:
        weight = self.base_layer.in_proj_weight
        self.prefix_keys[slot] = nn.Parameter(keys.to(weight), requires_grad=False)
        self.prefix_values[slot] = nn.Parameter(values.to(weight), requires_grad=False)

    def remove_slot(self, slot: str) -> None:
        if slot in self.prefix_keys:
            del self.prefix_keys[slot], self.prefix_values[slot]

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out = self.base_layer(x, *args, **kwargs)
        groups = [g for g in self.routing.groups(self.tower) if g.slot in self.prefix_keys]
        if not groups:
            return out
        attn_out = out[0] if isinstance(out, tuple) else out
        attn_out = self._add_prompts(x, attn_out, groups)
        return (attn_out, *out[1:]) if isinstance(out, tuple) else attn_out

    def _add_prompts(self, x: torch.Tensor, attn_out: torch.Tensor, groups: list[PromptGroup]) -> torch.Tensor:
        batch_dim = 0 if self.batch_first else 1
        for g in groups:
            x_g = x.index_select(batch_dim, g.index)
            if not self.batch_first:
                x_g = x_g.transpose(0, 1)  # (L, g, D) -> (g, L, D)
            delta = self.prompt_branch(x_g, self.prefix_keys[g.slot], self.prefix_values[g.slot])
            delta = delta * g.weight.to(delta.dtype).view(-1, 1, 1)  # (g, L, D)
            if not self.batch_first:
                delta = delta.transpose(0, 1)
            # index_add leaves rows outside the group untouched, bit for bit
            attn_out = attn_out.index_add(batch_dim, g.index, delta)
        return attn_out

    def prompt_branch(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """W_o · softmax(q P_Kᵀ/√h) P_V for batch-first x (B, L, D); the output bias is already in the frozen output."""
        base = self.base_layer
        width, heads = self.width, self.num_heads
        q_bias = base.in_proj_bias[:width] if base.in_proj_bias is not None else None
        q = F.linear(x, base.in_proj_weight[:width], q_bias)  # (B, L, D)
        q = q.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, H, L, h)
        k = keys.unflatten(-1, (heads, -1)).transpose(0, 1)  # (H, n, h)
        v = values.unflatten(-1, (heads, -1)).transpose(0, 1)  # (H, n, h)
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, L, n): own softmax, no mask
        o = (attn @ v).transpose(1, 2).flatten(2)  # (B, L, D)
        return F.linear(o, base.out_proj.weight)  # (B, L, D)
