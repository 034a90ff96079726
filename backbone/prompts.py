"""Residual attention prompts: a wrapper around a frozen open_clip attention module, and the functions that compute
a prompted block (`fused_attention`, `prompt_delta`, both over `prefix_attention`), used by the torch wrapper and
by the ONNX export alike.

For a block with frozen projected queries, keys and values q, k, v, per head (h = head dim):

    out = W_o (softmax(q kᵀ/√h + mask) v + w · softmax(q P_Kᵀ/√h) P_V) + b_o

Which samples take which path:
- no sample of the batch has prompts: the frozen module, called unchanged;
- every sample has prompts (what the service's prompted pass sends): `fused_attention`, one in-projection for q, k, v
  and ONE output projection over both terms; the frozen module is not called;
- a mixed batch: the frozen module for the whole batch, which keeps the rows without prompts bit for bit, plus
  `prompt_delta` = w · W_o · softmax(q P_Kᵀ/√h) P_V on the prompted rows (equal because W_o is linear; only q is
  projected again, as the frozen output is needed anyway).
Only `in_proj_weight`, `in_proj_bias`, `out_proj` and `num_heads` of the base module are used: they exist on open_clip
3.3's nn.MultiheadAttention (which returns a tuple) and on open_clip's own `Attention` (which returns a tensor); the
wrapper returns what the base returns.
"""
from __future__ import annotations

import inspect
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .scoped import ScopedValue

PLACEMENTS = ("input", "output")  # where a task's prompts sit in each tower (PromptConfig.placement)
MASKED_LOGIT = -1e9  # logit of a padded prefix slot: exp(-1e9 - max) == 0 exactly in fp32


def default_depth(image_blocks: int) -> int:
    """add-task's prompt depth when --depth is not given: a third of the image tower's blocks, rounded (at least 1).
    The ONNX graphs' top part (`backbone/onnx_export.py`) is this deep, so the default shape runs in the graphs."""
    return max(1, round(image_blocks / 3))


@dataclass(frozen=True)
class PromptConfig:
    """Shape of one task's prompts; defaults follow the reference recipe."""

    depth: int = 8  # prompted blocks in each tower (capped at the tower's depth)
    n_prefix: int = 8  # prefix keys and values per prompted block
    key_init: float = 0.02  # P_K ~ U(-key_init, key_init); P_V starts at zero, so a new task changes nothing
    # which blocks: "input" the first `depth` (the reference recipe), "output" the last `depth`; then the blocks below
    # them see frozen activations, and the service runs those once for routing and answering (service/runtime.py)
    placement: str = "input"

    def __post_init__(self):
        if self.depth < 1 or self.n_prefix < 1:
            raise ValueError(f"prompt depth and n_prefix must be >= 1, got {self.depth} and {self.n_prefix}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"prompt placement must be one of {', '.join(PLACEMENTS)}, got '{self.placement}'")
        if not self.key_init >= 0:
            raise ValueError(f"key_init must be >= 0, got {self.key_init}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def layers(self, blocks: int) -> range:
        """The prompted blocks of a tower of `blocks` blocks."""
        depth = min(self.depth, blocks)
        return range(depth) if self.placement == "input" else range(blocks - depth, blocks)

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
    index: torch.Tensor  # (g,) int64 positions in the batch, ascending (no sample in two groups)
    weight: torch.Tensor  # (g,) per-sample w, never 0 (those samples are left out)


class RoutingState:
    """Which samples of the running forward use which task, per tower (`ScopedValue`: concurrent forwards don't mix)."""

    def __init__(self):
        self._towers: dict[str, ScopedValue[tuple[PromptGroup, ...]]] = {t: ScopedValue(()) for t in ("visual", "text")}

    def groups(self, tower: str) -> tuple[PromptGroup, ...]:
        return self._towers[tower].get()

    def use(self, tower: str, groups: tuple[PromptGroup, ...]) -> AbstractContextManager[None]:
        return self._towers[tower].use(groups)


# ----------------------------------------------------------------------------- the math (torch and ONNX export)


def fused_attention(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj: nn.Linear,
    heads: int,
    attn_mask: torch.Tensor | None,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_mask: torch.Tensor | None,
    weight: torch.Tensor,
    queries: torch.Tensor | None = None,
) -> torch.Tensor:
    """`W_o (softmax(q kᵀ/√h + attn_mask) v + w · softmax(q P_Kᵀ/√h) P_V) + b_o` per head, for batch-first x.

    x (B, L, D); attn_mask None or additive float, (L, L) or (B, H, L, L) (see `additive_mask`);
    prefix_keys/prefix_values (B or 1, n, D): each sample's prompts (a leading 1: the same for every sample);
    prefix_mask (B or 1, n) or None: 1 = real prefix, 0 = padding (see `prefix_attention`); weight (B,) or (1,);
    queries (B, M, D) or None: the positions whose output is wanted (the pooled token of a tower's last block),
    attending over all of x; None: every position of x.
    -> (B, L or M, D). The frozen term is open_clip's own math (same in-projection, same SDPA call as
    nn.MultiheadAttention and open_clip's `Attention`); the prompt term has its own softmax and no attention mask.
    """
    if queries is None:
        q, k, v = (_split_heads(t, heads) for t in F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1))
    else:  # the same rows of the same in-projection, q for the wanted positions only
        q = _split_heads(_query_projection(queries, in_proj_weight, in_proj_bias), heads)
        width = x.shape[-1]
        kv_bias = in_proj_bias[width:] if in_proj_bias is not None else None
        k, v = (_split_heads(t, heads) for t in F.linear(x, in_proj_weight[width:], kv_bias).chunk(2, dim=-1))
    frozen = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, H, L, h)
    prompt = prefix_attention(q, _split_heads(prefix_keys, heads), _split_heads(prefix_values, heads), prefix_mask)
    o = frozen + weight.to(x.dtype).view(-1, 1, 1, 1) * prompt
    return F.linear(o.transpose(1, 2).flatten(2), out_proj.weight, out_proj.bias)  # one W_o for both terms


def prompt_delta(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor | None,
    out_proj: nn.Linear,
    heads: int,
    prefix_keys: torch.Tensor,
    prefix_values: torch.Tensor,
    prefix_mask: torch.Tensor | None,
    weight: torch.Tensor,
) -> torch.Tensor:
    """`w · W_o · softmax(q P_Kᵀ/√h) P_V`, no output bias: what the prompts add to the frozen module's output.

    Arguments as `fused_attention`'s (no attention mask: the prompt term has none). For the prompted rows of a batch
    whose other rows keep the frozen module's output: that output is computed anyway, so only q is projected again.
    """
    q = _split_heads(_query_projection(x, in_proj_weight, in_proj_bias), heads)
    prompt = prefix_attention(q, _split_heads(prefix_keys, heads), _split_heads(prefix_values, heads), prefix_mask)
    prompt = weight.to(x.dtype).view(-1, 1, 1, 1) * prompt
    return F.linear(prompt.transpose(1, 2).flatten(2), out_proj.weight)


def prefix_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
) -> torch.Tensor:
    """softmax(q P_Kᵀ/√h) P_V, per head; q (B, H, L, h), keys/values (B or 1, H, n, h), mask (B or 1, n) or None.

    Padding (mask 0) must change nothing: a zero key still takes softmax mass (exp(q·0) = 1), so padded slots get the
    logit MASKED_LOGIT (finite, unlike -inf, so a row of padding stays NaN-free) whose exp underflows to exactly 0, and
    a sample with no real slot at all (a layer beyond its task's depth) is multiplied by 0: it adds exactly nothing,
    whatever the padding holds.
    """
    # logits as (B, H, n, L), the softmax over dim -2: CPU softmax kernels are ~20x slower over a last dim of size n
    # (measured on the proxy: 0.48 ms vs 0.025 ms per block at batch 16, more than the rest of the term)
    logits = keys @ q.transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits.masked_fill(mask[:, None, :, None] <= 0, MASKED_LOGIT)
    out = logits.softmax(dim=-2).transpose(-1, -2) @ values  # (B, H, L, h)
    return out if mask is None else out * mask.amax(dim=-1).to(q.dtype).view(-1, 1, 1, 1)


def additive_mask(mask: torch.Tensor | None, batch: int, heads: int, dtype: torch.dtype) -> torch.Tensor | None:
    """An attention mask as open_clip passes it -> what `fused_attention` takes: additive float, (L, S) or (B, H, L, S).

    A boolean mask marks what may NOT be attended (nn.MultiheadAttention's convention and open_clip's `Attention`'s;
    SDPA's is the opposite, hence the conversion); a 3-d mask is per sample and head, (B·H, L, S).
    """
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    mask = mask.to(dtype)
    return mask.view(batch, heads, *mask.shape[-2:]) if mask.dim() == 3 else mask


def _query_projection(x: torch.Tensor, in_proj_weight: torch.Tensor, in_proj_bias: torch.Tensor | None) -> torch.Tensor:
    width = x.shape[-1]
    return F.linear(x, in_proj_weight[:width], in_proj_bias[:width] if in_proj_bias is not None else None)


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, L, D) -> (B, H, L, h)


# ----------------------------------------------------------------------------- the wrapper


@dataclass(frozen=True)
class SamplePrompts:
    """One block's prompts for the samples of a batch that have any, as `fused_attention` takes them."""

    rows: torch.Tensor | None  # (p,) ascending batch positions; None: every sample of the batch
    keys: torch.Tensor  # (p or 1, n, D); a leading 1: the same prompts for every row
    values: torch.Tensor  # (p or 1, n, D)
    mask: torch.Tensor | None  # (p or 1, n), 1 = real prefix, 0 = padding; None: all real
    weight: torch.Tensor  # (p,) or (1,)


class PromptedAttention(nn.Module):
    """Holds the frozen attention as `base_layer` and adds the prompts of the task routed to each sample.

    Which path a batch takes (frozen module, `fused_attention`, or frozen module + `prompt_delta`): module docstring.
    """

    def __init__(self, base_layer: nn.Module, tower: str, routing: RoutingState):
        super().__init__()
        _check_supported(base_layer)
        self.base_layer = base_layer
        self.tower = tower
        self.routing = routing  # shared, not a submodule
        self.width = base_layer.in_proj_weight.shape[1]
        self.num_heads = base_layer.num_heads
        self.batch_first = getattr(base_layer, "batch_first", True)  # open_clip's own Attention is batch-first
        self.returns_tuple = isinstance(base_layer, nn.MultiheadAttention)  # (output, weights); else a tensor
        self._signature = inspect.signature(base_layer.forward)  # to read the call's arguments by name
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
        batch = x.shape[0 if self.batch_first else 1]
        prompts = self.sample_prompts(batch)
        if prompts is None:  # no sample has prompts here: the frozen module, unchanged
            return self.base_layer(x, *args, **kwargs)
        # x is the query; `source` the keys and values: x itself, or the whole sequence when x holds only the
        # positions whose output is wanted (PromptedCLIP's last image block computes the pooled token alone)
        attn_mask, source = self._call(x, batch, args, kwargs)  # also refuses a call the prompted math cannot answer
        x_bf = x if self.batch_first else x.transpose(0, 1)  # (B, L, D)
        base, p = self.base_layer, prompts
        if p.rows is None:  # every sample has prompts: one fused pass, the frozen module is not needed
            source_bf = source if self.batch_first else source.transpose(0, 1)
            out = fused_attention(source_bf, base.in_proj_weight, base.in_proj_bias, base.out_proj, self.num_heads,
                                  attn_mask, p.keys, p.values, p.mask, p.weight, queries=None if source is x else x_bf)
        else:  # a mixed batch: the frozen module's output (bit for bit on the rows without prompts) plus, on the
            # prompted rows, the prompt term through W_o (cheaper than fusing them: only q is projected again)
            frozen = base(x, *args, **kwargs)
            frozen = frozen[0] if isinstance(frozen, tuple) else frozen
            delta = prompt_delta(x_bf.index_select(0, p.rows), base.in_proj_weight, base.in_proj_bias, base.out_proj,
                                 self.num_heads, p.keys, p.values, p.mask, p.weight)
            out = (frozen if self.batch_first else frozen.transpose(0, 1)).index_add(0, p.rows, delta)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out, None) if self.returns_tuple else out  # need_weights=False: nn.MultiheadAttention gives None

    def sample_prompts(self, batch: int) -> SamplePrompts | None:
        """The prompts of the samples routed to a task that has a slot in this block; None if there are none.

        One task: its (n, D) prompts broadcast over its rows (no copy). Several: a table of the tasks' prompts
        (padded to the largest n, with a mask, when their n differ) gathered per row in batch order.
        """
        groups = [g for g in self.routing.groups(self.tower) if g.slot in self.prefix_keys]
        if not groups:
            return None
        if len(groups) == 1:
            g = groups[0]
            rows = None if len(g.index) == batch else g.index  # `index` is ascending: all rows means 0..B-1
            return SamplePrompts(rows, self.prefix_keys[g.slot][None], self.prefix_values[g.slot][None], None, g.weight)
        sizes = [self.prefix_keys[g.slot].shape[0] for g in groups]
        n = max(sizes)
        pad = lambda t: F.pad(t, (0, 0, 0, n - t.shape[0]))  # noqa: E731 - (m, D) -> (n, D), zero rows after
        keys = torch.stack([pad(self.prefix_keys[g.slot]) for g in groups])  # (G, n, D)
        values = torch.stack([pad(self.prefix_values[g.slot]) for g in groups])
        rows = torch.cat([g.index for g in groups])
        which = torch.cat([torch.full_like(g.index, i) for i, g in enumerate(groups)])  # row -> its task in the table
        weight = torch.cat([g.weight for g in groups])
        order = rows.argsort()
        rows, which, weight = rows[order], which[order], weight[order]
        mask = None
        if min(sizes) < n:
            real = torch.arange(n, device=keys.device)[None, :] < torch.tensor(sizes, device=keys.device)[:, None]
            mask = real.to(keys.dtype)[which]  # (p, n)
        return SamplePrompts(None if len(rows) == batch else rows, keys[which], values[which], mask, weight)

    def _call(self, x: torch.Tensor, batch: int, args, kwargs) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(the call's attention mask for `fused_attention`, the keys' and values' tensor); a call the fused math
        cannot answer is refused."""
        call = self._signature.bind(x, *args, **kwargs).arguments
        source = x
        if self.returns_tuple:  # nn.MultiheadAttention(query, key, value, ...): self-attention, or a query subset
            source = call["key"]
            if call["value"] is not source:
                raise NotImplementedError("prompted attention takes one tensor as key and value")
            if call.get("key_padding_mask") is not None or call.get("is_causal", False):
                raise NotImplementedError("prompted attention takes attn_mask only (no key_padding_mask, is_causal)")
            if call.get("need_weights", True):
                raise NotImplementedError("prompted attention does not return attention weights (need_weights=False)")
        return additive_mask(call.get("attn_mask"), batch, self.num_heads, x.dtype), source


def _check_supported(base: nn.Module) -> None:
    """Refuse attention variants whose math `fused_attention` does not reproduce (none of open_clip's CLIP configs)."""
    extras = [n for n in ("bias_k", "bias_v", "logit_scale", "head_scale") if getattr(base, n, None) is not None]
    extras += [n for n in ("ln_q", "ln_k", "ln_inner") if not isinstance(getattr(base, n, nn.Identity()), nn.Identity)]
    if getattr(base, "add_zero_attn", False):
        extras.append("add_zero_attn")
    if extras:
        raise ValueError(f"residual prompts do not support {type(base).__name__} with {', '.join(extras)}")
