"""Kind "image-text-prompts" (the comparison learner, backbone/token_prompts.py): its prompt tokens apply in full or
not at all. Routed like every kind by its fingerprint (gate and zero-shot check); an artifact made before it kept one
is picked by the task-identity head for images no routed task claims."""
from __future__ import annotations

import torch

from backbone import TaskStats
from backbone.token_prompts import KIND, TokenPromptConfig
from prompts_store import TaskArtifact

from . import ServedKind, UnservableTask, check_dim, class_text_pair, cosine_logits, register_kind


def token_prompt_config(artifact: TaskArtifact) -> TokenPromptConfig:
    """recipe["prompts"] of an image-text prompt artifact."""
    recipe = artifact.recipe.get("prompts") if isinstance(artifact.recipe, dict) else None
    if not isinstance(recipe, dict):
        raise UnservableTask(f"a '{KIND}' artifact needs recipe.prompts (visual_tokens, visual_depth, text_context)")
    try:
        return TokenPromptConfig.from_dict(recipe)
    except (TypeError, ValueError) as e:
        raise UnservableTask(f"recipe.prompts is not an image-text prompt config: {e}") from None


def identity_stats(artifact: TaskArtifact) -> dict[str, torch.Tensor]:
    """The class means (C, D) and covariance (D, D) an image-text prompt task is identified by, checked."""
    means, cov = artifact.stats.get("class_means"), artifact.stats.get("covariance")
    n = len(artifact.class_names)
    if means is None or cov is None or means.ndim != 2 or means.shape[0] != n or tuple(cov.shape) != (means.shape[1],) * 2:
        got = {k: tuple(v.shape) for k, v in artifact.stats.items()}
        raise UnservableTask(f"a '{KIND}' artifact needs stats class_means ({n}, D) and covariance (D, D), got {got}")
    if not (torch.isfinite(means).all() and torch.linalg.cholesky_ex(cov.double()).info == 0):
        raise UnservableTask("the class means must be finite and the covariance positive definite (the identity head samples from it)")
    return {"class_means": means.float(), "covariance": cov.float()}


@register_kind(KIND)
def load_image_text_prompts(artifact: TaskArtifact, runtime, slot: str) -> ServedKind:
    config, identity = token_prompt_config(artifact), identity_stats(artifact)
    check_dim(identity["class_means"].shape[-1], runtime)
    runtime.load_task(slot, artifact.prompts, config)
    try:
        text_frozen, text_prompted = class_text_pair(artifact, runtime, slot)
    except Exception:
        runtime.delete_task(slot)
        raise
    fingerprint = TaskStats.from_tensors(artifact.stats) if "mean" in artifact.stats else None
    return ServedKind(text_frozen, text_prompted, cosine_logits(text_prompted, runtime.logit_scale()), slot=slot,
                      stats=fingerprint, identity_stats=None if fingerprint else identity, all_or_nothing=True)
