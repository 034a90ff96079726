"""The class-text templates a task is served with."""
from __future__ import annotations

from backbone import DEFAULT_TEMPLATES
from prompts_store import TaskArtifact


def templates_of(artifact: TaskArtifact) -> tuple[str, ...]:
    return tuple(artifact.templates) or DEFAULT_TEMPLATES
