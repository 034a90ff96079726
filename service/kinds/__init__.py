"""Task kinds as plug-ins: how one kind of task artifact is loaded, checked and answered (DESIGN §2 "Task kinds").

    @register_kind("head")
    def load_head(artifact, runtime, slot) -> ServedKind: ...

The engine keeps state, leases, swaps and batching; it asks the registry for the artifact's kind and works only with
the `ServedKind` the loader returns:

- `slot`: the runtime prompt slot for a prompted pass, or None when the frozen pass is all the kind needs;
- `stats` (the router's fingerprint) or `identity_stats` (picked by the task-identity head when no routed task
  claims an image): how images reach the task;
- `all_or_nothing`: its prompts apply at weight 0 or 1 only;
- `text_prompted` / `text_frozen`: its class text;
- `logits(features, frozen, weights)`: its class logits for the images routed to it.

A new kind is a module with one decorated loader; nothing in the engine, the runtimes or the API changes.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from backbone import TaskStats
from prompts_store import TaskArtifact


class UnservableTask(ValueError):
    """An artifact this engine cannot serve (an unknown kind, wrong shapes, a bad config)."""


@dataclass(frozen=True, eq=False)
class ServedKind:
    """What the engine needs of one loaded task version, whatever its kind."""

    text_frozen: torch.Tensor  # (C, D) class text of the frozen text tower
    text_prompted: torch.Tensor  # (C, D) class text with the task's text prompts (the frozen text if it has none)
    logits: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (features, frozen, weights) -> (B, C)
    slot: str | None = None  # runtime prompt slot: images routed here get a prompted pass; None: the frozen one
    stats: TaskStats | None = None  # router fingerprint (FAISS keys, Gaussian, gate)
    identity_stats: Mapping[str, torch.Tensor] | None = None  # class means + covariance for the task-identity head
    all_or_nothing: bool = False  # prompts apply at weight 0 or 1 only
    own_bytes: int = 0  # bytes of the tensors the kind holds itself (a head's weights), for memory accounting


Loader = Callable[[TaskArtifact, object, str], ServedKind]  # (artifact, runtime, slot name) -> ServedKind
_LOADERS: dict[str, Loader] = {}


def register_kind(name: str) -> Callable[[Loader], Loader]:
    """Decorator: `loader(artifact, runtime, slot)` serves artifacts of kind `name` (a later registration replaces)."""

    def add(loader: Loader) -> Loader:
        _LOADERS[name] = loader
        return loader

    return add


def servable_kinds() -> list[str]:
    return sorted(_LOADERS)


def load_kind(artifact: TaskArtifact, runtime, slot: str) -> ServedKind:
    """Load `artifact` with its kind's loader; UnservableTask if no loader serves that kind."""
    loader = _LOADERS.get(artifact.kind)
    if loader is None:
        raise UnservableTask(f"artifact kind '{artifact.kind}' is not servable (this engine serves {', '.join(servable_kinds())})")
    return loader(artifact, runtime, slot)


def check_dim(dim: int, runtime) -> None:
    if dim != runtime.embed_dim:
        raise UnservableTask(f"the task's statistics have dimension {dim}, the backbone's features {runtime.embed_dim}")


def class_text_pair(artifact: TaskArtifact, runtime, slot: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(frozen, prompted) class text over the artifact's templates; prompted = frozen when `slot` is None."""
    from .templates import templates_of

    templates = templates_of(artifact)
    frozen = runtime.class_text(artifact.class_names, templates)
    prompted = frozen if slot is None else runtime.class_text(artifact.class_names, templates, task=slot, weight=1.0)
    return frozen, prompted


def cosine_logits(text: torch.Tensor, scale: float) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The prompt kinds' logits: scale x cosine between the (prompted) image features and the class text."""
    return lambda features, frozen, weights: scale * features @ text.T


from . import head, image_text_prompts, residual_prompts  # noqa: E402,F401  (register the built-in kinds)
