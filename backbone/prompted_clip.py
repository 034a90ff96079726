"""A frozen CLIP that carries many tasks' residual attention prompts and routes each sample to one of them.

Wrappers are injected into the backbone's own attention modules (no copy of the model), the way adapter libraries
inject into frozen models. Each task owns one slot in every prompted block; a forward pass takes, per sample, a task
name (or None) and a weight `w`; every wrapper gathers, per sample, the prompts of its task (`PromptGroup`s).
"""
from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .loading import Backbone, sha256_tensors
from .prompts import PromptConfig, PromptedAttention, PromptGroup, RoutingState

log = logging.getLogger(__name__)

TOWERS = ("visual", "text")
TaskSpec = str | None | Sequence[str | None]


class UnknownTask(KeyError):
    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class PromptedCLIP(nn.Module):
    """`encode_image(images, tasks, weights)` / `encode_text(tokens, task, weight)` over a frozen open_clip CLIP."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.clip = backbone.model
        # a second PromptedCLIP on the same backbone finds the wrappers of the first: it shares their routing state
        wrapped = next((m for m in backbone.model.modules() if isinstance(m, PromptedAttention)), None)
        self.routing = wrapped.routing if wrapped is not None else RoutingState()
        self._blocks = {"visual": backbone.image_blocks, "text": backbone.text_blocks}
        self._slots: dict[str, str] = {}  # task name -> slot key (unique per load, so a reload never aliases)
        self._configs: dict[str, PromptConfig] = {}
        self._slot_ids = itertools.count()

    # ---------------------------------------------------------------- tasks
    @property
    def tasks(self) -> list[str]:
        return list(self._slots)

    def config(self, task: str) -> PromptConfig:
        self._slot(task)
        return self._configs[task]

    def prompted_layers(self, tower: str, config: PromptConfig) -> range:
        return config.layers(len(self._blocks[tower]))

    def width(self, tower: str) -> int:
        """Width of the tower's attention (prefix key/value size)."""
        attn = self._blocks[tower][0].attn
        return attn.width if isinstance(attn, PromptedAttention) else attn.in_proj_weight.shape[1]

    def add_task(self, task: str, config: PromptConfig = PromptConfig()) -> None:
        """New task with untrained prompts (P_V = 0: outputs unchanged until it is trained)."""

        def fresh(tower: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
            keys = torch.empty(config.n_prefix, self.width(tower)).uniform_(-config.key_init, config.key_init)
            return keys, torch.zeros_like(keys)

        self._install(task, config, fresh)

    def load_task(self, task: str, tensors: dict[str, torch.Tensor], config: PromptConfig) -> None:
        """Install (or replace) a task from `task_state`-style tensors; shapes are checked against this backbone."""
        expected = self._expected_shapes(config)
        if set(tensors) != set(expected):
            missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
            raise ValueError(f"prompts of task '{task}' do not fit this backbone: missing {missing}, unexpected {extra}")
        for key, shape in expected.items():
            if tuple(tensors[key].shape) != shape:
                raise ValueError(f"prompts of task '{task}': '{key}' has shape {tuple(tensors[key].shape)}, expected {shape}")
        self._install(task, config, lambda tower, layer: (tensors[f"{tower}.{layer}.key"], tensors[f"{tower}.{layer}.value"]))

    def delete_task(self, task: str) -> None:
        slot = self._slot(task)
        for wrapper in self._wrappers():
            wrapper.remove_slot(slot)
        del self._slots[task], self._configs[task]

    def task_state(self, task: str) -> dict[str, torch.Tensor]:
        """The task's prompts as contiguous CPU tensors with task-name-free keys `{tower}.{layer}.{key|value}`."""
        slot = self._slot(task)
        state = {}
        for tower, layer, wrapper in self._prompted_blocks(self._configs[task]):
            state[f"{tower}.{layer}.key"] = wrapper.prefix_keys[slot].detach().cpu().clone().contiguous()
            state[f"{tower}.{layer}.value"] = wrapper.prefix_values[slot].detach().cpu().clone().contiguous()
        return state

    def prompt_parameters(self, task: str) -> list[nn.Parameter]:
        slot = self._slot(task)
        return [
            param
            for _, _, wrapper in self._prompted_blocks(self._configs[task])
            for param in (wrapper.prefix_keys[slot], wrapper.prefix_values[slot])
        ]

    def num_prompt_parameters(self, task: str) -> int:
        return sum(p.numel() for p in self.prompt_parameters(task))

    def set_trainable(self, task: str | None) -> None:
        """Only `task`'s prompts get gradients (None: nothing does); the backbone and other tasks stay frozen."""
        for param in self.parameters():
            param.requires_grad_(False)
        if task is not None:
            for param in self.prompt_parameters(task):
                param.requires_grad_(True)
            trainable = self.num_prompt_parameters(task)
            frozen = sum(p.numel() for p in self.parameters()) - trainable
            log.info("task %s: %s trainable prompt parameters, %s frozen", task, f"{trainable:,}", f"{frozen:,}")

    def frozen_state_sha256(self) -> str:
        """Hash of every backbone tensor under its original open_clip name (prompts excluded)."""
        prompts = {id(p) for w in self._wrappers() for p in (*w.prefix_keys.values(), *w.prefix_values.values())}
        named = itertools.chain(self.clip.named_parameters(), self.clip.named_buffers())
        return sha256_tensors((name.replace(".base_layer", ""), t) for name, t in named if id(t) not in prompts)

    # ---------------------------------------------------------------- encoding
    def encode_image(
        self,
        images: torch.Tensor,
        tasks: TaskSpec = None,
        weights: float | Sequence[float] | torch.Tensor = 1.0,
        normalize: bool = False,
        pooled: bool = False,
    ) -> torch.Tensor:
        """Image features; `tasks` is one name for the batch or one name/None per sample, `weights` a scalar or per sample.
        `pooled`: the last block computes the pooled token only where the tower allows (`pools_first_token`): the
        same math to rounding, and cheaper to run and to backpropagate through (training takes it)."""
        if pooled and self.pools_first_token():
            return self.encode_image_from(self.clip.visual._embeds(images), 0, tasks, weights, normalize, pooled=True)
        groups = self._groups(tasks, weights, images.shape[0], images.device)
        with self.routing.use("visual", groups):
            return self.clip.encode_image(images, normalize=normalize)

    def encode_text(
        self, tokens: torch.Tensor, task: str | None = None, weight: float = 1.0, normalize: bool = False
    ) -> torch.Tensor:
        """Text features, with `task`'s prompts scaled by the scalar `weight` (per request on the text side)."""
        groups = self._groups(task, weight, tokens.shape[0], tokens.device)
        with self.routing.use("text", groups):
            return self.clip.encode_text(tokens, normalize=normalize)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    # ---------------------------------------------------------------- a shared bottom of the image tower
    def first_prompted_block(self) -> int:
        """The lowest image block any loaded task prompts (the tower's depth when none does): every block below it
        sees the same frozen activations whatever the task, so a batch can run them once for all its passes."""
        blocks = len(self._blocks["visual"])
        configs = list(self._configs.values())  # a snapshot: the service loads tasks from another thread
        return min((self.prompted_layers("visual", c).start for c in configs), default=blocks)

    def can_resume(self) -> bool:
        """Does the image tower have the open_clip ViT layout that `encode_image_keeping`/`_from` step through?"""
        visual = self.clip.visual
        return (all(hasattr(visual, name) for name in ("_embeds", "_pool", "proj", "transformer"))
                and getattr(visual.transformer, "batch_first", False) and not getattr(visual, "output_tokens", False))

    def pools_first_token(self) -> bool:
        """Is the image feature a function of the last block's first token alone (open_clip's 'tok' pool, no
        attention pool, plain residual blocks)? Then that block may compute the first token only (`pooled=True`)."""
        visual = self.clip.visual
        return (self.can_resume() and getattr(visual, "pool_type", None) == "tok" and getattr(visual, "attn_pool", None) is None
                and all(hasattr(layer, "attention") and not hasattr(layer, "ln_1_kv") for layer in self._blocks["visual"][-1:]))

    def encode_image_keeping(self, images: torch.Tensor, block: int, normalize: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen image features, the same ops as `encode_image` (so the same bits), and the activations entering
        image block `block`, from which `encode_image_from` runs the blocks above it with prompts."""
        kept = self.image_activations(images, block)
        x = kept
        for layer in self._blocks["visual"][block:]:
            x = layer(x)
        return self._image_head(x, normalize), kept

    def image_activations(self, images: torch.Tensor, block: int) -> torch.Tensor:
        """The frozen activations entering image block `block` (the shared bottom of every pass)."""
        x = self.clip.visual._embeds(images)
        for layer in self._blocks["visual"][:block]:
            x = layer(x)
        return x

    def encode_image_pooled(self, images: torch.Tensor, block: int, normalize: bool = False
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Frozen image features with the last block computed for the pooled token only (`pools_first_token`):
        the same math as `encode_image`, to rounding (~1e-6), at a fraction of that block's cost. -> (features,
        the activations entering block `block`, those entering the last block: `finish_frozen` gives the exact
        features of any of its rows)."""
        kept = self.image_activations(images, block)
        features, last = self.encode_pooled_from(kept, block, normalize)
        return features, kept, last

    def encode_pooled_from(self, activations: torch.Tensor, block: int, normalize: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode_image_pooled` from the activations entering image block `block`, frozen: -> (features, the
        activations entering the last block)."""
        blocks = self._blocks["visual"]
        x = activations
        for layer in blocks[block:-1]:
            x = layer(x)
        return self._image_head(_pooled_block(blocks[-1], x), normalize), x

    def finish_frozen(self, last: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """`encode_image`'s frozen features from the activations entering the last image block: the whole block,
        the same ops (so the same bits as the frozen pass of the same rows)."""
        return self._image_head(self._blocks["visual"][-1](last), normalize)

    def encode_image_from(self, activations: torch.Tensor, block: int, tasks: TaskSpec, weights=1.0,
                          normalize: bool = False, pooled: bool = False) -> torch.Tensor:
        """`encode_image` from the activations entering image block `block` (`encode_image_keeping`'s); every task
        named must prompt only blocks at or above it. `pooled`: the last block computes the pooled token only
        (`pools_first_token`), to rounding of the whole pass, also on rows without prompts."""
        below = [t for t in ([tasks] if isinstance(tasks, str) else tasks or ()) if t is not None
                 and self.prompted_layers("visual", self.config(t)).start < block]
        if below:
            raise ValueError(f"task '{below[0]}' prompts image blocks below {block}: it needs the whole pass")
        groups = self._groups(tasks, weights, activations.shape[0], activations.device)
        blocks = self._blocks["visual"][block:]
        with self.routing.use("visual", groups):
            x = activations
            for layer in blocks[:-1] if pooled else blocks:
                x = layer(x)
            if pooled:
                x = _pooled_block(blocks[-1], x)
        return self._image_head(x, normalize)

    def _image_head(self, x: torch.Tensor, normalize: bool) -> torch.Tensor:
        """open_clip VisionTransformer.forward after its blocks: pool, project (CLIP.encode_image's normalize)."""
        visual = self.clip.visual
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    # ---------------------------------------------------------------- internals
    def _slot(self, task: str) -> str:
        try:
            return self._slots[task]
        except KeyError:
            raise UnknownTask(f"unknown task '{task}' (loaded: {sorted(self._slots) or 'none'})") from None

    def _install(self, task: str, config: PromptConfig, make) -> None:
        """Fill a fresh slot in every prompted block with `make(tower, layer) -> (P_K, P_V)`, then publish it."""
        self._ensure_wrapped(config)
        slot = f"s{next(self._slot_ids)}"
        for tower, layer, wrapper in self._prompted_blocks(config):
            wrapper.set_slot(slot, *make(tower, layer))
        old = self._slots.get(task)
        self._slots[task], self._configs[task] = slot, config  # one assignment makes the new prompts visible
        if old is not None:
            for wrapper in self._wrappers():
                wrapper.remove_slot(old)

    def _expected_shapes(self, config: PromptConfig) -> dict[str, tuple[int, int]]:
        shapes = {}
        for tower in TOWERS:
            for layer in self.prompted_layers(tower, config):
                shapes[f"{tower}.{layer}.key"] = shapes[f"{tower}.{layer}.value"] = (config.n_prefix, self.width(tower))
        return shapes

    def _ensure_wrapped(self, config: PromptConfig) -> None:
        """Wrap the attention of the task's blocks in each tower (peft-style setattr on the parent block)."""
        for tower in TOWERS:
            for layer in self.prompted_layers(tower, config):
                block = self._blocks[tower][layer]
                if not isinstance(block.attn, PromptedAttention):
                    block.attn = PromptedAttention(block.attn, tower, self.routing)

    def _wrappers(self) -> list[PromptedAttention]:
        return [m for m in self.clip.modules() if isinstance(m, PromptedAttention)]

    def _prompted_blocks(self, config: PromptConfig):
        for tower in TOWERS:
            for layer in self.prompted_layers(tower, config):
                yield tower, layer, self._blocks[tower][layer].attn

    def _groups(self, tasks: TaskSpec, weights, batch: int, device: torch.device) -> tuple[PromptGroup, ...]:
        if tasks is None:
            return ()
        names = [tasks] * batch if isinstance(tasks, str) else list(tasks)
        if len(names) != batch:
            raise ValueError(f"got {len(names)} task names for a batch of {batch}")
        w = torch.as_tensor(weights, dtype=torch.float32).flatten().cpu()
        if w.numel() == 1:
            w = w.expand(batch)
        if w.numel() != batch:
            raise ValueError(f"got {w.numel()} weights for a batch of {batch}")
        groups = []
        for name in dict.fromkeys(n for n in names if n is not None):
            slot = self._slot(name)
            index = (torch.tensor([n == name for n in names]) & (w != 0)).nonzero().flatten()
            # w = 0 samples, and those of a task whose prompts add nothing, stay out of every group: the wrappers
            # then give them the frozen module's output, bit for bit
            if len(index) and not self._inert(name):
                groups.append(PromptGroup(slot, index.to(device), w[index].to(device)))
        return tuple(groups)

    def _inert(self, task: str) -> bool:
        """True when the task's prompts add exactly 0 and no gradient is wanted from them: every P_V is zero.

        That is an untrained task (P_V starts at zero). The fused math would give its samples the frozen output only
        to rounding (~1e-7), not bit for bit, so they skip it. With gradients wanted they cannot: P_V's gradient
        is not zero.
        """
        slot = self._slots[task]
        values = [wrapper.prefix_values[slot] for _, _, wrapper in self._prompted_blocks(self._configs[task])]
        if torch.is_grad_enabled() and any(v.requires_grad for v in values):
            return False
        return not any(bool(v.any()) for v in values)


def _pooled_block(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock at the first token only: its query attends over every token; the rest of
    the block is per token. (B, L, D) -> (B, 1, D)."""
    y = layer.ln_1(x)
    h = x[:, :1] + layer.ls_1(layer.attention(q_x=y[:, :1], k_x=y, v_x=y))
    return h + layer.ls_2(layer.mlp(layer.ln_2(h)))
