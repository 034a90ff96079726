"""Kinds "head" and "prompts+head": the closed-form head (backbone/analytic_head.py), on the frozen features (answered
from the frozen pass the router already ran) or on the task's prompted features."""
from __future__ import annotations

from backbone import TaskStats
from backbone.analytic_head import AnalyticHead, HeadConfigError
from prompts_store import TaskArtifact

from . import ServedKind, UnservableTask, check_dim, class_text_pair, register_kind
from .residual_prompts import install

HEAD_KIND, PROMPTS_HEAD_KIND = "head", "prompts+head"


def analytic_head(artifact: TaskArtifact, dim: int) -> AnalyticHead:
    config = artifact.recipe.get("head") if isinstance(artifact.recipe, dict) else None
    if not isinstance(config, dict):
        raise UnservableTask(f"a '{artifact.kind}' artifact needs recipe.head (dim, width, seed, fusion, projection_sha256)")
    try:
        head = AnalyticHead.from_parts(artifact.prompts, config, len(artifact.class_names))
    except HeadConfigError as e:
        raise UnservableTask(str(e)) from None
    if head.features.dim != dim:
        raise UnservableTask(f"the head takes {head.features.dim}-d features, the backbone gives {dim}")
    return head


def fused_logits(head: AnalyticHead, text, scale: float):
    """Zero-shot logits of the (frozen or prompted) features plus w x fusion x head scores."""
    return lambda features, frozen, weights: head.logits(features, scale * features @ text.T, weights)


@register_kind(HEAD_KIND)
def load_head(artifact: TaskArtifact, runtime, slot: str) -> ServedKind:
    stats = TaskStats.from_tensors(artifact.stats)
    check_dim(stats.keys.shape[-1], runtime)
    head = analytic_head(artifact, runtime.embed_dim)
    text_frozen, _ = class_text_pair(artifact, runtime, None)
    return ServedKind(text_frozen, text_frozen, fused_logits(head, text_frozen, runtime.logit_scale()), stats=stats,
                      own_bytes=head.nbytes)


@register_kind(PROMPTS_HEAD_KIND)
def load_prompts_head(artifact: TaskArtifact, runtime, slot: str) -> ServedKind:
    head = analytic_head(artifact, runtime.embed_dim)
    stats, text_frozen, text_prompted = install(artifact, runtime, slot)
    return ServedKind(text_frozen, text_prompted, fused_logits(head, text_prompted, runtime.logit_scale()), slot=slot, stats=stats,
                      own_bytes=head.nbytes)
