"""The learners `add-task --kind` chooses from, by name, and the two that combine others.

    learner = make_learner("head", RecipeSettings())       # head | prompts | prompts+head | auto
    artifact = learner.fit(task, backbone, run)

- head: the closed-form head on the frozen features (training/head_learner.py): seconds.
- prompts: residual attention prompts (training/learner.py): the deep tier, minutes.
- prompts+head: the prompts, then the same head fitted on the prompted features.
- auto: fits all three (the prompts are trained once) and keeps the best on validation; every candidate's validation
  figure goes into task.json (`metrics.candidates`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from backbone import Backbone, PixelPipeline, PromptConfig, PromptedCLIP, text_classifier
from prompts_store import TaskArtifact

from .head_learner import HeadLearner
from .learner import ResidualPromptLearner, RunContext, TaskData
from .settings import HeadSettings, ResidualPromptSettings

KINDS = ("head", "prompts", "prompts+head", "auto")
PROMPTS_HEAD_KIND = "prompts+head"


@dataclass(frozen=True)
class RecipeSettings:
    """Both recipes; each learner reads the one(s) it needs."""

    prompts: ResidualPromptSettings = field(default_factory=ResidualPromptSettings)
    head: HeadSettings = field(default_factory=HeadSettings)

    def for_backbone(self, backbone: Backbone) -> "RecipeSettings":
        """With what depends on the backbone resolved (the prompts' default depth)."""
        return RecipeSettings(self.prompts.for_tower(len(backbone.image_blocks)), self.head)

    def to_dict(self) -> dict[str, Any]:
        return {"prompts": self.prompts.to_dict(), "head": self.head.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RecipeSettings":
        return cls(ResidualPromptSettings.from_dict(data["prompts"]), HeadSettings.from_dict(data["head"]))


class PromptsHeadLearner:
    """Residual prompts, then the closed-form head fitted on the prompted image features and prompted class text."""

    kind = PROMPTS_HEAD_KIND

    def __init__(self, settings: RecipeSettings):
        self.prompts, self.head = ResidualPromptLearner(settings.prompts), HeadLearner(settings.head)

    def recipe(self, task: TaskData) -> dict[str, Any]:
        return {**self.prompts.recipe(task), "learner": self.kind, "head_settings": self.head.settings.to_dict()}

    def identity(self, task: TaskData, backbone: Backbone, runner: str = "local") -> dict[str, Any]:
        return self.prompts.identity(task, backbone, runner)

    def fit(self, task: TaskData, backbone: Backbone, run: RunContext | None = None) -> TaskArtifact:
        return self.on_prompts(task, backbone, self.prompts.fit(task, backbone, run), run or RunContext())

    def on_prompts(self, task: TaskData, backbone: Backbone, prompted: TaskArtifact, run: RunContext) -> TaskArtifact:
        """The head on the features of an already trained prompts artifact (its fingerprint stays the frozen one)."""
        started = time.perf_counter()
        model, pipeline = PromptedCLIP(backbone), PixelPipeline(backbone.preprocess)
        slot = f"{task.name}#prompts+head"
        model.load_task(slot, prompted.prompts, PromptConfig.from_dict(prompted.recipe["prompts"]))
        try:
            train, val = (self.head.features(model, pipeline, s, run, task=slot) for s in (task.train, task.val))
            test = self.head.features(model, pipeline, task.test, run, task=slot) if task.test is not None else None
            text = text_classifier(model, task.class_names, task.templates, task=slot).float().cpu()
            seconds = time.perf_counter() - started + prompted.metrics.get("fingerprint_seconds", 0.0)
            prompt_metrics = {k: v for k, v in prompted.metrics.items() if k not in ("test_accuracy", "val_accuracy")}
            artifact = self.head.artifact(
                task, backbone, model, list(task.class_names), list(task.templates), train, val, test, seconds, run,
                prompts=prompted.prompts, text=text, stats=prompted.stats, kind=self.kind,
                extra_recipe={"prompts": prompted.recipe["prompts"], "prompt_recipe": prompted.recipe},
            )
        finally:
            model.delete_task(slot)
        artifact.metrics["prompts"] = {"val_accuracy": prompted.metrics.get("val_accuracy"),
                                       "test_accuracy": prompted.metrics.get("test_accuracy"), **prompt_metrics}
        artifact.metrics["train_seconds"] = round(artifact.metrics["train_seconds"] + prompted.metrics.get("train_seconds", 0.0), 3)
        return artifact


class AutoLearner:
    """Head, prompts and prompts+head; keeps the best validation accuracy (ties: the cheaper kind to serve)."""

    kind = "auto"

    def __init__(self, settings: RecipeSettings):
        self.settings = settings
        self.head, self.both = HeadLearner(settings.head), PromptsHeadLearner(settings)

    def recipe(self, task: TaskData) -> dict[str, Any]:
        return self.both.recipe(task)

    def identity(self, task: TaskData, backbone: Backbone, runner: str = "local") -> dict[str, Any]:
        return self.both.identity(task, backbone, runner)

    def fit(self, task: TaskData, backbone: Backbone, run: RunContext | None = None) -> TaskArtifact:
        run = run or RunContext()
        head = self.head.fit(task, backbone, run)
        prompts = self.both.prompts.fit(task, backbone, run)
        both = self.both.on_prompts(task, backbone, prompts, run)
        candidates = [head, prompts, both]  # in order of serving cost: a tie keeps the cheaper
        figures = {a.kind: {"val_accuracy": a.metrics.get("val_accuracy"), "test_accuracy": a.metrics.get("test_accuracy")}
                   for a in candidates}
        best = max(candidates, key=lambda a: -1.0 if a.metrics.get("val_accuracy") is None else a.metrics["val_accuracy"])
        best.metrics["candidates"] = figures
        best.metrics["chosen_by"] = "auto: best validation accuracy"
        best.recipe["auto"] = {"candidates": list(figures), "chosen": best.kind}
        return best


def make_learner(kind: str, settings: RecipeSettings | None = None):
    """The learner for `add-task --kind KIND`."""
    settings = settings or RecipeSettings()
    if kind == "head":
        return HeadLearner(settings.head)
    if kind == "prompts":
        return ResidualPromptLearner(settings.prompts)
    if kind == PROMPTS_HEAD_KIND:
        return PromptsHeadLearner(settings)
    if kind == "auto":
        return AutoLearner(settings)
    raise ValueError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
