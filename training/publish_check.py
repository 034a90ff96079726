"""The check before a new version goes live: it must not be worse than the live version or than zero-shot.

A rerun that kept a poor result (say, epoch 0 of the prompts: no better than zero-shot) must not silently replace a
better live version. Both `add-task` paths (here and on Ray Train's rank 0) call `check_publishable` just before
`store.publish`; `--force` skips it. A refusal publishes nothing, so the live version stays as it was.
"""
from __future__ import annotations

from typing import Any

from .errors import InputError


def live_metrics(store, name: str) -> dict[str, Any] | None:
    """The live version's number and metrics (from its task.json only), or None if the task has no live version."""
    from prompts_store import TaskNotFound

    try:
        history = store.history(name)
    except TaskNotFound:
        return None
    live = next((v for v in history if v.live), None)
    return None if live is None or live.metrics is None else {"version": live.version, **live.metrics}


def check_publishable(new: dict[str, Any], live: dict[str, Any] | None, force: bool) -> None:
    """Refuse (InputError naming both figures) a version whose validation accuracy is below zero-shot's on the same
    images, or below the live version's; nothing to compare (no validation split): allowed."""
    if force:
        return
    mine, zero_shot = new.get("val_accuracy"), new.get("val_zero_shot_accuracy")
    measure = new.get("accuracy_measure", "accuracy")
    if mine is not None and zero_shot is not None and mine < zero_shot:
        raise InputError(f"not published: validation {measure} {100 * mine:.1f}% is below frozen zero-shot's {100 * zero_shot:.1f}% "
                         "on the same images; pass --force to publish it anyway")
    # the live version's figure counts only where it measured the same thing (accuracy, or the mean per-class recall)
    same_measure = live is not None and live.get("accuracy_measure", "accuracy") == measure
    theirs = live.get("val_accuracy") if same_measure else None
    if mine is not None and theirs is not None and mine < theirs:
        raise InputError(f"not published: validation {measure} {100 * mine:.1f}% is below the live version {live['version']}'s "
                         f"{100 * theirs:.1f}%; the live version stays. Pass --force to replace it anyway")
