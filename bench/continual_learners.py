"""The learners of the continual benchmark, behind one small interface (DESIGN §6).

    learner.learn(task)              -> Learned(seconds, trainable parameters)
    learner.evaluate(learned, tests) -> {mode: [accuracy on each test task]}, after each task of the sequence

`tests` are the evaluation tasks in sequence order (`EvalTask`: test images, class names, frozen features and
frozen class text, computed once by the harness). `learned` is how many of them have been learned so far.

- keepclip: the residual-prompt learner of `training/` with its defaults; each task is published to a store and
  read back (checksummed) for evaluation. Four routing modes: the task id given (oracle); per-sample routing with
  the service's router (FAISS + Gaussian likelihood + calibrated gate, batch size 1); a majority vote of the
  per-sample routes over each evaluation batch (the reference method's evaluation); task-agnostic, the engine's
  own answer: the routed task's classes, or frozen CLIP over the union of the classes when no task matches.
- zero-shot: the frozen model.
- full fine-tuning: the image tower, trained on each task in turn (cross-entropy against the frozen class text).
- LwF with a replayed vocabulary: the same, plus distillation towards the previous image tower's similarities to
  a fixed set of random token texts, on the current task's images.
- image-text prompts (training/image_text_prompts.py): deep visual prompt tokens and text context per task, routed
  as the service routes every kind (router, gate, zero-shot check; the tokens in full for the images a task claims,
  frozen CLIP for the rest). Modes: task id given, per sample, task-agnostic.
- continual pretraining (training/continual_pretraining.py): both towers on image-caption pairs with the contrastive
  loss, a compatible momentum model and topology-preserving KL; one model, evaluated like full-ft.

The single-model learners have no routing: with the task's classes given they answer the same in every routing
mode ("class-set"); "task-agnostic" is the union of the classes.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from backbone import PixelPipeline, PromptConfig, PromptedCLIP, TaskStats, text_classifier
from prompts_store import StoreError, TaskArtifact, TaskStore
from service.router import Router, Vocabulary
from backbone.token_prompts import TokenPromptConfig, TokenPrompts, class_text
from training.data import ImageSet
from training.continual_pretraining import ContinualPretrainer, ContinualPretrainingSettings
from training.image_text_prompts import ImageTextPromptLearner, ImageTextPromptSettings, prompted_images
from training.errors import InputError
from training.learner import ResidualPromptLearner, RunContext, TaskData
from training.runtime import load_frozen_backbone
from training.settings import ResidualPromptSettings

log = logging.getLogger(__name__)

CLASS_SET, TASK_AGNOSTIC = "class-set", "task-agnostic"
ORACLE, PER_SAMPLE, BATCH_VOTE = "oracle", "per-sample", "batch-vote"


@dataclass
class EvalTask:
    """One task of the sequence as every learner evaluates it; frozen tensors are computed once."""

    name: str
    class_names: list[str]
    templates: list[str]
    test: ImageSet
    frozen: torch.Tensor  # (N, D) normalised frozen image features of the test images
    text_frozen: torch.Tensor  # (C, D) frozen class text (mean over templates)


@dataclass
class Learned:
    seconds: float
    trainable_parameters: int
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class BackboneSpec:
    model: str
    pretrained: str | None
    device: str

    def load(self):
        return load_frozen_backbone(self.model, self.pretrained, self.device)


def accuracy(features: torch.Tensor, text: torch.Tensor, labels: np.ndarray) -> float:
    return float(((features @ text.T).argmax(-1).numpy() == labels).mean())


def union_accuracy(features: torch.Tensor, texts: list[torch.Tensor], own: int, labels: np.ndarray) -> float:
    """Top-1 over the union of several tasks' classes; right only if it is the evaluated task's (`own`) class."""
    offsets = np.cumsum([0] + [t.shape[0] for t in texts])
    predicted = (features @ torch.cat(texts).T).argmax(-1).numpy()
    return float((predicted == labels + offsets[own]).mean())


def union_tasks(learned: int, i: int) -> list[int]:
    """The label space of task-agnostic evaluation of task i: every learned task's classes, and task i's own."""
    return sorted(set(range(learned)) | {i})


# ----------------------------------------------------------------------------------------- zero-shot
class ZeroShot:
    name, modes = "zero-shot", (CLASS_SET, TASK_AGNOSTIC)

    def learn(self, task: TaskData) -> Learned:
        return Learned(0.0, 0)

    def evaluate(self, learned: int, tests: list[EvalTask]) -> dict[str, list[float]]:
        return frozen_answers(learned, tests)

    def embeddings(self, i: int, t: EvalTask) -> tuple[torch.Tensor, torch.Tensor]:
        return t.frozen, t.text_frozen


def frozen_answers(learned: int, tests: list[EvalTask]) -> dict[str, list[float]]:
    out = {CLASS_SET: [], TASK_AGNOSTIC: []}
    for i, t in enumerate(tests):
        out[CLASS_SET].append(accuracy(t.frozen, t.text_frozen, t.test.labels))
        union = union_tasks(learned, i)
        out[TASK_AGNOSTIC].append(union_accuracy(t.frozen, [tests[k].text_frozen for k in union], union.index(i), t.test.labels))
    return out


# ----------------------------------------------------------------------------------------- routed learners
class RoutedLearner:
    """Shared by the learners that pick one task's prompts per image: evaluation within a task's classes, the
    task-agnostic answer, and a cache of prompted features (an image's features under a task never change once the
    task is learned, and its weight depends only on the image and the task)."""

    def __init__(self, eval_batch: int):
        self.eval_batch = eval_batch
        self.text: dict[str, torch.Tensor] = {}  # task -> (C, D) its class text with its own prompts
        self._features: dict[tuple[int, str, bool], dict[int, torch.Tensor]] = {}  # (test, task, oracle?) -> row -> feature
        self.routed: dict[int, list[tuple[str | None, float]]] = {}  # test -> its routing in the last evaluation

    def embeddings(self, i: int, t: EvalTask) -> tuple[torch.Tensor, torch.Tensor]:
        """Retrieval: images embedded as routed (per sample), class queries with the task's own prompts once learned."""
        return self.features(i, t, self.routed[i]), self.text.get(t.name, t.text_frozen)

    def encode(self, task: str, pixels: np.ndarray, weights: list[float]) -> torch.Tensor:
        """(n, D) normalised image features of `pixels` under `task`'s prompts."""
        raise NotImplementedError

    def needs_pass(self, task: str) -> bool:
        """Whether images routed to `task` get their own features (a prompted pass); False: the frozen ones do."""
        return True

    def task_logits(self, task: str, feats: torch.Tensor, frozen: torch.Tensor, weights: list[float]) -> torch.Tensor:
        """(n, C) logits of images routed to `task` (the prompt learners: cosine with its learned class text)."""
        return feats @ self.text[task].T

    def oracle(self, i: int, t: EvalTask, learned_names: list[str]) -> float:
        if t.name not in learned_names:  # the task id of a task not learned yet: frozen CLIP
            return accuracy(t.frozen, t.text_frozen, t.test.labels)
        ones = [1.0] * len(t.test)
        logits = self.task_logits(t.name, self.features(i, t, [(t.name, 1.0)] * len(t.test), oracle=True), t.frozen, ones)
        return float((logits.argmax(-1).numpy() == t.test.labels).mean())

    def within_classes(self, i: int, t: EvalTask, routed: list[tuple[str | None, float]]) -> float:
        """Task i's classes: its own learned answer when routed to it, its frozen class text otherwise."""
        feats = self.features(i, t, routed)
        predicted = (feats @ t.text_frozen.T).argmax(-1)
        mine = [r for r, (task, _) in enumerate(routed) if task == t.name]
        if mine and t.name in self.text:
            logits = self.task_logits(t.name, feats[mine], t.frozen[mine], [routed[r][1] for r in mine])
            predicted[mine] = logits.argmax(-1)
        return float((predicted.numpy() == t.test.labels).mean())

    def task_agnostic(self, i: int, t: EvalTask, routed, tests: list[EvalTask], learned: int) -> float:
        """The engine's answer: the routed task's class (with its prompts); frozen CLIP over the union if unrouted."""
        feats = self.features(i, t, routed)
        union = union_tasks(learned, i)
        offsets = dict(zip(union, np.cumsum([0] + [len(tests[k].class_names) for k in union])))
        frozen_union = torch.cat([tests[k].text_frozen for k in union])
        index = {task.name: k for k, task in enumerate(tests)}
        right = 0
        for row, (task, w) in enumerate(routed):
            if task is None:
                guess = int((feats[row] @ frozen_union.T).argmax())
            else:
                guess = int(offsets[index[task]] + self.task_logits(task, feats[row : row + 1], t.frozen[row : row + 1], [w]).argmax())
            right += guess == offsets[i] + int(t.test.labels[row])
        return right / len(routed)

    def features(self, i: int, t: EvalTask, routed: list[tuple[str | None, float]], oracle: bool = False) -> torch.Tensor:
        """(N, D) image features as routed: frozen rows for no task, prompted rows (cached) for the rest."""
        out = t.frozen.clone()
        weights = [w for _, w in routed]
        for task in {task for task, w in routed if task is not None and w > 0 and self.needs_pass(task)}:
            cache = self._features.setdefault((i, task, oracle), {})
            rows = [r for r, (name, w) in enumerate(routed) if name == task and w > 0]
            missing = [r for r in rows if r not in cache]
            for start in range(0, len(missing), self.eval_batch):
                chunk = missing[start : start + self.eval_batch]
                cache.update(zip(chunk, self.encode(task, t.test.pixels[chunk], [weights[r] for r in chunk])))
            if rows:
                out[rows] = torch.stack([cache[r] for r in rows])
        return out


def service_router(stats: dict, tests: list[EvalTask], vocabulary: Vocabulary | None, top_k: int, threshold: float) -> Router:
    """The router the service builds over these tasks: FAISS, Gaussians, gates and each task's zero-shot check against
    `vocabulary` (its class names and frozen class text are the evaluation task's)."""
    classes = {t.name: (tuple(t.class_names), t.text_frozen) for t in tests if t.name in stats} if vocabulary else None
    router = Router(stats, top_k, threshold, vocabulary=vocabulary, classes=classes)
    router.calibrate()
    return router


class KeepclipLearner(RoutedLearner):
    """Residual prompts per task + the service's per-image routing; tasks go through a real store."""

    name, modes = "keepclip", (ORACLE, PER_SAMPLE, BATCH_VOTE, TASK_AGNOSTIC)

    def __init__(self, spec: BackboneSpec, settings: ResidualPromptSettings, store: TaskStore, vote_batch: int = 64,
                 top_k: int = 3, threshold: float = 0.01, eval_batch: int = 256, progress: bool = True,
                 reuse: TaskStore | None = None, vocabulary: Vocabulary | None = None):
        super().__init__(eval_batch)
        self.vocabulary = vocabulary  # the service's open vocabulary: each task's zero-shot check (None: gate alone)

        self.spec, self.settings, self.store, self.progress = spec, settings, store, progress
        self.reuse = reuse  # a store an earlier run published to: its tasks are evaluated again instead of relearnt
        self.vote_batch, self.top_k, self.threshold = vote_batch, top_k, threshold
        self.backbone = spec.load()  # the evaluation model: every learned task's prompts loaded side by side
        self.model = PromptedCLIP(self.backbone)
        self.pipeline = PixelPipeline(self.backbone.preprocess)
        self.stats: dict[str, TaskStats] = {}

    def learn(self, task: TaskData) -> Learned:
        started = time.perf_counter()
        if self.reuse is not None:
            artifact = self.published_before(task)
            version = self.store.publish(artifact)
            seconds = artifact.metrics["fingerprint_seconds"] + artifact.metrics["train_seconds"]  # the earlier run's
        else:  # a fresh frozen backbone per task, as `add-task` does: the learner sees no earlier task
            artifact = ResidualPromptLearner(self.settings).fit(task, self.spec.load(), RunContext(progress=self.progress))
            version = self.store.publish(artifact)
            seconds = time.perf_counter() - started
        loaded = self.store.get(task.name)  # read back, checksums verified: what a replica would serve
        self.model.load_task(task.name, loaded.prompts, PromptConfig.from_dict(loaded.recipe["prompts"]))
        self.stats[task.name] = TaskStats.from_tensors(loaded.stats)
        self.text[task.name] = text_classifier(self.model, loaded.class_names, loaded.templates, task=task.name)
        params = sum(t.numel() for t in loaded.prompts.values())
        m = loaded.metrics
        return Learned(seconds, params, {"version": version, "best_epoch": m["best_epoch"], "val_accuracy": m["val_accuracy"],
                                          "test_accuracy": m["test_accuracy"], "test_zero_shot_accuracy": m["test_zero_shot_accuracy"]})

    def published_before(self, task: TaskData) -> TaskArtifact:
        """The task as an earlier run published it (checksums verified), if learnt with this very recipe and data."""
        where = f"--keepclip-from {self.reuse.url}"
        try:
            artifact = self.reuse.get(task.name, backbone=self.backbone.fingerprint.to_dict())
        except StoreError as e:
            raise InputError(f"{where}: {e}") from None
        expected = json.loads(json.dumps(ResidualPromptLearner(self.settings.for_tower(len(self.backbone.image_blocks))).recipe(task)))
        differ = sorted(k for k in expected.keys() | artifact.recipe.keys() if expected.get(k) != artifact.recipe.get(k))
        if differ:
            raise InputError(f"{where}: task '{task.name}' was learnt with another recipe or data ({', '.join(differ)} differ)")
        return artifact

    @torch.no_grad()
    def encode(self, task: str, pixels: np.ndarray, weights: list[float]) -> torch.Tensor:
        batch = self.pipeline.to_batch(pixels, self.backbone.device)
        return self.model.encode_image(batch, tasks=task, weights=weights, normalize=True).float().cpu()

    def evaluate(self, learned: int, tests: list[EvalTask]) -> dict[str, list[float]]:
        names = [t.name for t in tests[:learned]]
        router = service_router({n: self.stats[n] for n in names}, tests, self.vocabulary, self.top_k, self.threshold)
        out = {mode: [] for mode in self.modes}
        for i, t in enumerate(tests):
            routes = router.route(t.frozen)
            routed = self.routed[i] = [(r.task, r.gate) for r in routes]
            out[ORACLE].append(self.oracle(i, t, names))
            out[PER_SAMPLE].append(self.within_classes(i, t, routed))
            out[BATCH_VOTE].append(self.within_classes(i, t, self.batch_vote(t, routes)))
            out[TASK_AGNOSTIC].append(self.task_agnostic(i, t, routed, tests, learned))
        return out

    def batch_vote(self, t: EvalTask, routes) -> list[tuple[str | None, float]]:
        """Each evaluation batch goes to the task most of its images were routed to; each image keeps its own gate."""
        out = []
        for start in range(0, len(routes), self.vote_batch):
            chunk = routes[start : start + self.vote_batch]
            voted = Counter(r.task for r in chunk).most_common(1)[0][0]
            if voted is None:
                out += [(None, 0.0)] * len(chunk)
                continue
            w = self.stats[voted].weight(t.frozen[start : start + len(chunk)]).tolist()
            out += [(voted, x) if x >= self.threshold else (None, 0.0) for x in w]
        return out


class KindLearner(KeepclipLearner):
    """keepclip with `add-task --kind` (head, prompts+head, auto): each task is learned by that kind's learner,
    published, read back, and answered through the service's own kind plug-ins (`service/kinds/`) with the same
    router as the prompts; a head task answers from the frozen features, with no second pass."""

    def __init__(self, spec: BackboneSpec, kind: str, settings, store: TaskStore, **kwargs):
        super().__init__(spec, settings.prompts, store, **kwargs)
        from service.runtime import TorchRuntime

        self.kind, self.recipes, self.name = kind, settings, f"keepclip-{kind}"
        self.runtime = TorchRuntime(self.backbone)
        self.served: dict[str, object] = {}

    def learn(self, task: TaskData) -> Learned:
        from service.kinds import load_kind
        from training.learners import make_learner

        started = time.perf_counter()
        artifact = make_learner(self.kind, self.recipes).fit(task, self.spec.load(), RunContext(progress=self.progress))
        version = self.store.publish(artifact)
        seconds = time.perf_counter() - started
        loaded = self.store.get(task.name)  # read back, checksums verified: what a replica would serve
        served = self.served[task.name] = load_kind(loaded, self.runtime, task.name)
        self.stats[task.name] = served.stats
        self.text[task.name] = served.text_prompted
        m = loaded.metrics
        details = {"version": version, "kind": loaded.kind, "val_accuracy": m.get("val_accuracy"),
                   "test_accuracy": m.get("test_accuracy"), "test_zero_shot_accuracy": m.get("test_zero_shot_accuracy"),
                   "candidates": m.get("candidates")}
        return Learned(seconds, sum(t.numel() for t in loaded.prompts.values()), details)

    def needs_pass(self, task: str) -> bool:
        return self.served[task].slot is not None

    @torch.no_grad()
    def encode(self, task: str, pixels: np.ndarray, weights: list[float]) -> torch.Tensor:
        batch = self.pipeline.to_batch(pixels, self.backbone.device)
        return self.runtime.encode_image(batch, tasks=[self.served[task].slot] * len(batch), weights=weights)

    def task_logits(self, task, feats, frozen, weights) -> torch.Tensor:
        return self.served[task].logits(feats, frozen, torch.tensor(weights, dtype=torch.float32))


class ImageTextPromptsLearner(RoutedLearner):
    """Deep visual + text context prompts per task, routed by their fingerprints as the service routes them."""

    name, modes = "image-text-prompts", (ORACLE, PER_SAMPLE, TASK_AGNOSTIC)

    def __init__(self, spec: BackboneSpec, settings: ImageTextPromptSettings, store: TaskStore, eval_batch: int = 256,
                 progress: bool = True, vocabulary: Vocabulary | None = None, top_k: int = 3, threshold: float = 0.01):
        super().__init__(eval_batch)
        self.settings, self.store, self.progress = settings, store, progress
        self.vocabulary, self.top_k, self.threshold = vocabulary, top_k, threshold
        self.fingerprints: dict[str, TaskStats] = {}  # routed as the service routes them (gate and zero-shot check)
        self.backbone = spec.load()  # hooks come and go per call: one backbone serves training and evaluation
        self.prompts: dict[str, TokenPrompts] = {}

    def learn(self, task: TaskData) -> Learned:
        started = time.perf_counter()
        artifact = ImageTextPromptLearner(self.settings).fit(task, self.backbone, RunContext(progress=self.progress))
        version = self.store.publish(artifact)
        loaded = self.store.get(task.name)
        seconds = time.perf_counter() - started
        config = TokenPromptConfig.from_dict(loaded.recipe["prompts"])
        self.prompts[task.name] = TokenPrompts(self.backbone.model, self.backbone.tokenizer, config).load(loaded.prompts).eval()
        self.text[task.name] = class_text(self.backbone, self.prompts[task.name], loaded.class_names).float().cpu()
        self.fingerprints[task.name] = TaskStats.from_tensors(loaded.stats)
        return Learned(seconds, sum(t.numel() for t in loaded.prompts.values()),
                       {"version": version, "best_epoch": loaded.metrics["best_epoch"], "test_accuracy": loaded.metrics["test_accuracy"]})

    def encode(self, task: str, pixels: np.ndarray, weights: list[float]) -> torch.Tensor:
        return prompted_images(self.backbone, self.prompts[task], pixels, self.eval_batch)

    def evaluate(self, learned: int, tests: list[EvalTask]) -> dict[str, list[float]]:
        names = [t.name for t in tests[:learned]]
        out = {mode: [] for mode in self.modes}
        router = service_router({n: self.fingerprints[n] for n in names}, tests, self.vocabulary, self.top_k, self.threshold)
        for i, t in enumerate(tests):
            # the service's routing of this kind: the task that claims the image, its tokens in full
            routed = [(r.task, 1.0) if r.task else (None, 0.0) for r in router.route(t.frozen)]
            self.routed[i] = routed
            out[ORACLE].append(self.oracle(i, t, names))
            out[PER_SAMPLE].append(self.within_classes(i, t, routed))
            out[TASK_AGNOSTIC].append(self.task_agnostic(i, t, routed, tests, learned))
        return out


# ----------------------------------------------------------------------------------------- fine-tuning baselines
@dataclass(frozen=True)
class FineTuneRecipe:
    epochs: int = 2
    lr: float = 1e-4  # measured here: 1e-5 leaves the proxy's tower unchanged in 2 epochs; 1e-4 learns mnist to 74.7 %
    weight_decay: float = 0.1
    batch_size: int = 64
    warmup_steps: int = 10
    distill_weight: float = 1.0  # LwF only
    distill_temperature: float = 2.0  # LwF only
    vocabulary: int = 1000  # LwF only: random token texts replayed
    seed: int = 0


class FullFineTune:
    """Sequential fine-tuning of the whole image tower; the text tower stays frozen (its class text is the head)."""

    name, modes = "full-ft", (CLASS_SET, TASK_AGNOSTIC)

    def __init__(self, spec: BackboneSpec, recipe: FineTuneRecipe, eval_batch: int = 256, progress: bool = True):
        self.recipe, self.eval_batch, self.progress = recipe, eval_batch, progress
        self.backbone = spec.load()
        self.clip = self.backbone.model
        self.prompted = PromptedCLIP(self.backbone)  # no task is ever added: only its text helper is used
        self.pipeline = PixelPipeline(self.backbone.preprocess)
        self.trained = False

    @property
    def visual(self) -> torch.nn.Module:
        return self.clip.visual

    def extra_loss(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        return None

    def before_task(self) -> None: ...

    def learn(self, task: TaskData) -> Learned:
        r, started = self.recipe, time.perf_counter()
        self.before_task()
        text = text_classifier(self.prompted, task.class_names, task.templates)  # frozen text tower: fixed head
        params = list(self.visual.parameters())
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.AdamW(params, lr=r.lr, weight_decay=r.weight_decay)
        scale, n = self.clip.logit_scale.exp().detach(), len(task.train)
        steps = r.epochs * math.ceil(n / r.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, r.warmup_steps))
                                                     * 0.5 * (1 + math.cos(math.pi * s / steps)))
        labels = torch.as_tensor(task.train.labels)
        bar = _progress(steps, f"{self.name} {task.name}", self.progress)
        for epoch in range(r.epochs):
            order = np.random.default_rng([r.seed, epoch]).permutation(n)
            for start in range(0, n, r.batch_size):
                batch = order[start : start + r.batch_size]
                images = self.pipeline.to_batch(task.train.pixels[batch], self.backbone.device)
                features = F.normalize(self.visual(images), dim=-1)
                loss = F.cross_entropy(scale * features @ text.T, labels[batch].to(features.device))
                extra = self.extra_loss(images, features)
                if extra is not None:
                    loss = loss + extra
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        for p in params:
            p.requires_grad_(False)
        self.trained = True
        return Learned(time.perf_counter() - started, sum(p.numel() for p in params))

    @torch.no_grad()
    def evaluate(self, learned: int, tests: list[EvalTask]) -> dict[str, list[float]]:
        self.last_features = {i: t.frozen for i, t in enumerate(tests)}
        if not self.trained:  # still the frozen model: its features are the cached frozen ones
            return frozen_answers(learned, tests)
        out = {CLASS_SET: [], TASK_AGNOSTIC: []}
        for i, t in enumerate(tests):
            feats = self.last_features[i] = prompted_images(self.backbone, None, t.test.pixels, self.eval_batch)  # the tuned tower
            out[CLASS_SET].append(accuracy(feats, self.class_text(t), t.test.labels))
            union = union_tasks(learned, i)
            out[TASK_AGNOSTIC].append(union_accuracy(feats, [self.class_text(tests[k]) for k in union], union.index(i), t.test.labels))
        return out

    def class_text(self, t: EvalTask) -> torch.Tensor:
        return t.text_frozen  # the text tower is frozen

    def embeddings(self, i: int, t: EvalTask) -> tuple[torch.Tensor, torch.Tensor]:
        return self.last_features[i], self.class_text(t)


class ContinualPretraining(FullFineTune):
    """Both towers, contrastive on image-caption pairs, compatible momentum model + topology KL (training/continual_pretraining.py)."""

    name = "continual-pretraining"

    def __init__(self, spec: BackboneSpec, recipe: FineTuneRecipe, store: TaskStore, eval_batch: int = 256, progress: bool = True):
        super().__init__(spec, recipe, eval_batch, progress)
        settings = ContinualPretrainingSettings(epochs=recipe.epochs, lr=recipe.lr, batch_size=recipe.batch_size, seed=recipe.seed)
        self.trainer = ContinualPretrainer(self.backbone, settings)  # trains self.clip in place (the momentum model)
        self.store = store

    def learn(self, task: TaskData) -> Learned:
        seconds = self.trainer.learn(task, self.progress)
        version = self.store.publish(self.trainer.artifact(task, seconds))
        self.trainer.load(self.store.get(task.name))  # evaluated and continued from what the store gives back, checksummed
        self.trained = True
        return Learned(seconds, self.trainer.trainable_parameters(), {"version": version})

    @torch.no_grad()
    def class_text(self, t: EvalTask) -> torch.Tensor:
        return text_classifier(self.prompted, t.class_names, t.templates).float().cpu()  # the text tower moved too


class LwF(FullFineTune):
    """Full fine-tuning + distillation towards the previous image tower over a replayed vocabulary of random texts."""

    name = "lwf"

    def __init__(self, spec: BackboneSpec, recipe: FineTuneRecipe, eval_batch: int = 256, progress: bool = True):
        super().__init__(spec, recipe, eval_batch, progress)
        self.vocabulary = self._vocabulary_text()  # (V, D) frozen text features, fixed for the whole sequence
        self.previous: torch.nn.Module | None = None

    @torch.no_grad()
    def _vocabulary_text(self) -> torch.Tensor:
        """Random token texts (3-8 BPE tokens between start and end of text), through the frozen text tower."""
        r, tokenizer = self.recipe, self.backbone.tokenizer
        probe = tokenizer(["x"])[0]
        sot, eot, length = int(probe[0]), int(probe[(probe != 0).nonzero().max()]), probe.shape[0]
        rng = np.random.default_rng(r.seed)
        tokens = torch.zeros(r.vocabulary, length, dtype=torch.long)
        for row in range(r.vocabulary):
            body = rng.integers(1, min(sot, eot), size=int(rng.integers(3, min(9, length - 1))))
            seq = [sot, *body.tolist(), eot]
            tokens[row, : len(seq)] = torch.tensor(seq)
        return self.clip.encode_text(tokens.to(self.backbone.device), normalize=True)

    def before_task(self) -> None:
        self.previous = copy.deepcopy(self.visual).eval() if self.trained else None  # nothing to keep before task 1

    def extra_loss(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor | None:
        if self.previous is None:
            return None
        r, scale = self.recipe, self.clip.logit_scale.exp().detach()
        with torch.no_grad():
            old = F.normalize(self.previous(images), dim=-1) @ self.vocabulary.T
        new = features @ self.vocabulary.T
        T = r.distill_temperature
        kl = F.kl_div(F.log_softmax(scale * new / T, -1), F.log_softmax(scale * old / T, -1), log_target=True, reduction="batchmean")
        return r.distill_weight * T * T * kl


def _progress(total: int, desc: str, enabled: bool):
    import sys

    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, leave=False,
                mininterval=0.5 if sys.stderr.isatty() else 30)
