"""Image-text prompt tokens over a frozen open_clip CLIP: deep visual prompt tokens and learned text context.

- Image tower (deep prompt tuning, VPT-deep): `n` learnable tokens are appended to the sequence entering each of the
  first `depth` blocks, replacing the previous block's outputs at those positions, and dropped after the last block,
  so pooling (CLS or average) sees only the image's own tokens.
- Text tower (context optimisation, CoOp): class prompts are tokenised as "X X X X {class name}." and the embeddings
  of the `n_context` placeholders are replaced by shared learned vectors (initialised from "a photo of a").

Both act through forward hooks, installed once per model, that do nothing unless a `with applied(clip, prompts):`
block is active in the calling thread (a `ScopedValue`, as the residual prompts' routing): the backbone's weights are
never modified, and outside the block, or in another thread at the same time, it is the frozen CLIP.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .scoped import ScopedValue

KIND = "image-text-prompts"  # the artifact kind of tasks made of these prompts
PLACEHOLDER = "X"
CONTEXT_INIT = "a photo of a"


@dataclass(frozen=True)
class TokenPromptConfig:
    visual_tokens: int = 8  # tokens per prompted image block
    visual_depth: int = 12  # prompted image blocks from the input (capped at the tower's depth)
    text_context: int = 4  # learned context vectors before the class name

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TokenPromptConfig":
        return cls(**{k: int(v) for k, v in data.items() if k in cls.__dataclass_fields__})


def image_blocks(clip) -> nn.ModuleList:
    transformer = clip.visual.transformer
    if not getattr(transformer, "batch_first", True):
        raise ValueError("image-text prompts need open_clip's batch-first transformer (open_clip >= 2.24)")
    return transformer.resblocks


class TokenPrompts(nn.Module):
    """One task's prompt tensors: `visual` (depth, n, width) and `context` (n_context, text width)."""

    def __init__(self, clip, tokenizer, config: TokenPromptConfig = TokenPromptConfig(), seed: int = 0):
        super().__init__()
        self.config = config
        blocks = image_blocks(clip)
        depth = min(config.visual_depth, len(blocks))
        width = blocks[0].ln_1.normalized_shape[0]
        generator = torch.Generator().manual_seed(seed)
        # VPT's init: uniform, at the scale of a token after the patch embedding
        bound = (6.0 / (width + clip.visual.conv1.kernel_size[0] ** 2 * 3)) ** 0.5
        self.visual = nn.Parameter((torch.rand(depth, config.visual_tokens, width, generator=generator) * 2 - 1) * bound)
        with torch.no_grad():  # CoOp's init: the embeddings of "a photo of a" (cycled if n_context differs)
            ids = tokenizer([CONTEXT_INIT])[0]
            words = ids[1 : int((ids != 0).nonzero().max())]
            pick = words[torch.arange(config.text_context) % len(words)]
            self.context = nn.Parameter(clip.token_embedding.weight[pick].detach().clone().float())

    def state(self) -> dict[str, torch.Tensor]:
        return {"visual.tokens": self.visual.detach().cpu().clone().contiguous(),
                "text.context": self.context.detach().cpu().clone().contiguous()}

    def load(self, tensors: dict[str, torch.Tensor]) -> "TokenPrompts":
        for key, param in (("visual.tokens", self.visual), ("text.context", self.context)):
            if key not in tensors or tuple(tensors[key].shape) != tuple(param.shape):
                got = tuple(tensors[key].shape) if key in tensors else "missing"
                raise ValueError(f"image-text prompts: '{key}' is {got}, expected {tuple(param.shape)} for this backbone")
            with torch.no_grad():
                param.copy_(tensors[key])
        return self


def class_tokens(tokenizer, class_names: list[str], config: TokenPromptConfig) -> torch.Tensor:
    """(C, L) tokens of "X X X X {name}." with the placeholders right after the start token."""
    prefix = " ".join([PLACEHOLDER] * config.text_context)
    tokens = tokenizer([f"{prefix} {name}." for name in class_names])
    placeholder = tokenizer([PLACEHOLDER])[0, 1]
    if not (tokens[:, 1 : 1 + config.text_context] == placeholder).all():
        raise ValueError(f"the tokenizer does not map each '{PLACEHOLDER}' to one token")
    return tokens


@torch.no_grad()
def class_text(backbone, prompts: TokenPrompts, class_names: list[str]) -> torch.Tensor:
    """(C, D) normalised class text "<learned context> {name}." of one task, on `backbone` (a `Backbone`)."""
    tokens = class_tokens(backbone.tokenizer, list(class_names), prompts.config).to(backbone.device)
    with applied(backbone.model, prompts):
        return torch.nn.functional.normalize(backbone.model.encode_text(tokens), dim=-1)


@contextmanager
def applied(clip, prompts: TokenPrompts | None):
    """Inside the block, `clip.encode_image` runs with the visual tokens and `clip.encode_text` (on `class_tokens`)
    with the learned context; `prompts=None` is the frozen CLIP. Only the calling thread sees the prompts:
    a pass of the same model in another thread, at the same time, stays frozen."""
    if prompts is not None:
        _install_hooks(clip)
    with _ACTIVE.use((id(clip), prompts) if prompts is not None else None):
        yield


# one carrier for all models, not one per model: the hooks take only their own model's prompts (by id), and a model
# with hooks stays deep-copyable (a carrier on the model would not be: a thread-local cannot be copied)
_ACTIVE: ScopedValue[tuple[int, TokenPrompts] | None] = ScopedValue(None)
_INSTALL_LOCK = threading.Lock()


def _install_hooks(clip) -> None:
    """Hooks on the image blocks and the token embedding, once per model; each does nothing unless `applied` set
    prompts for this model in the calling thread (no change to the model's parameters or its frozen output)."""
    with _INSTALL_LOCK:
        blocks, owner = image_blocks(clip), id(clip)
        if getattr(clip, "_token_prompt_hooks", (None,))[0] == owner:  # (a deep copy carries inert hooks of another id)
            return

        def active() -> TokenPrompts | None:
            entry = _ACTIVE.get()
            return entry[1] if entry is not None and entry[0] == owner else None

        def enter(layer):
            def hook(module, args, kwargs):
                prompts = active()
                if prompts is None or layer >= prompts.visual.shape[0]:
                    return None  # frozen, or past the prompted blocks: the last prompts' outputs travel on
                x, n = args[0], prompts.config.visual_tokens
                tokens = prompts.visual[layer].to(x.dtype).expand(x.shape[0], -1, -1)
                body = x if layer == 0 else x[:, :-n]  # later blocks: replace the previous block's prompt outputs
                return (torch.cat([body, tokens], 1), *args[1:]), kwargs
            return hook

        def leave(module, args, output):
            prompts = active()
            return None if prompts is None else output[:, : -prompts.config.visual_tokens]

        def context(module, args, output):
            prompts = active()
            if prompts is None:
                return None
            k = prompts.context.shape[0]
            ctx = prompts.context.to(output.dtype).expand(output.shape[0], -1, -1)
            return torch.cat([output[:, :1], ctx, output[:, 1 + k :]], 1)

        hooks = [block.register_forward_pre_hook(enter(layer), with_kwargs=True) for layer, block in enumerate(blocks)]
        hooks.append(blocks[len(blocks) - 1].register_forward_hook(leave))
        hooks.append(clip.token_embedding.register_forward_hook(context))
        clip._token_prompt_hooks = (owner, hooks)
