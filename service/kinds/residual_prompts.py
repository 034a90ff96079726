"""Kind "residual-prompts": residual attention prompts in both towers, routed by the task's fingerprint; the routed
images get a prompted pass at the gate's weight."""
from __future__ import annotations

from backbone import PromptConfig, TaskStats
from prompts_store import DEFAULT_KIND, TaskArtifact

from . import ServedKind, UnservableTask, check_dim, class_text_pair, cosine_logits, register_kind


def prompt_config(artifact: TaskArtifact) -> PromptConfig:
    """The artifact's PromptConfig (recipe["prompts"]), else inferred from its tensors' names and shapes."""
    recipe = artifact.recipe.get("prompts") if isinstance(artifact.recipe, dict) else None
    if isinstance(recipe, dict):
        try:
            return PromptConfig.from_dict(recipe)
        except (TypeError, ValueError) as e:
            raise UnservableTask(f"recipe.prompts is not a prompt config: {e}") from None
    tensors = prompt_tensors(artifact)
    layers = [int(k.split(".")[1]) for k in tensors if k.count(".") == 2 and k.split(".")[1].isdigit()]
    if not layers:
        raise UnservableTask("the artifact has no prompt tensors named '{tower}.{layer}.{key|value}'")
    n_prefix = next(iter(tensors.values())).shape[0]
    return PromptConfig(depth=max(layers) + 1, n_prefix=int(n_prefix))


def prompt_tensors(artifact: TaskArtifact) -> dict:
    """The residual prompts among the artifact's tensors (a prompts+head artifact also holds the head's)."""
    return {k: v for k, v in artifact.prompts.items() if not k.startswith("head.")}


def install(artifact: TaskArtifact, runtime, slot: str) -> tuple[TaskStats, object, object]:
    """Load the prompts under `slot` -> (fingerprint, frozen class text, prompted class text)."""
    stats = TaskStats.from_tensors(artifact.stats)
    check_dim(stats.keys.shape[-1], runtime)
    runtime.load_task(slot, prompt_tensors(artifact), prompt_config(artifact))
    try:
        text_frozen, text_prompted = class_text_pair(artifact, runtime, slot)
    except Exception:
        runtime.delete_task(slot)
        raise
    return stats, text_frozen, text_prompted


@register_kind(DEFAULT_KIND)
def load_residual_prompts(artifact: TaskArtifact, runtime, slot: str) -> ServedKind:
    stats, text_frozen, text_prompted = install(artifact, runtime, slot)
    return ServedKind(text_frozen, text_prompted, cosine_logits(text_prompted, runtime.logit_scale()), slot=slot, stats=stats)
