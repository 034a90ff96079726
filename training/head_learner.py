"""The closed-form head learner (kind "head"): one frozen pass, a ridge solve, a task learned in seconds.

Reads top to bottom: frozen features of every image (one pass, split across ranks with Ray Train) → fingerprint
(the router's Gaussian, as for every kind) → ridge regression of the random features (backbone/analytic_head.py) to
one-hot targets on every image, for every λ of the grid → λ and the fusion weight with the zero-shot logits
picked by exact leave-one-out accuracy over all images (one eigendecomposition for the whole grid) → evaluation →
artifact.

**Update.** The artifact keeps the frozen features and labels of its images in `update.safetensors` (the store never
hands it to replicas): n × d float32, 2 MB for 2,000 images at 256-d, against 128 MB for a 4096² Gram matrix. They are
the head's sufficient statistics: `update` appends the new images' features (new classes get new columns), re-picks λ
and the fusion weight and solves again: exactly a fit on all the images at once, without the old images. An image the
live version already learned with the same class (the same frozen features) is counted once, so a folder sent again
with a few images added adds just those.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from backbone import Backbone, PixelPipeline, PromptedCLIP, fit_task_stats, text_classifier
from backbone.analytic_head import AnalyticHead, RandomFeatures
from prompts_store import TaskArtifact

from .data import ImageSet, name_key, spoken
from .errors import InputError
from .features import sharded_features
from .learner import RunContext, TaskData, _pct, recall_per_class
from .settings import HeadSettings

log = logging.getLogger(__name__)

KIND = "head"
UPDATE_KEYS = ("train.features", "train.labels", "val.features", "val.labels")


@dataclass(frozen=True)
class Features:
    """Frozen (or prompted) features of one split, with labels."""

    features: torch.Tensor  # (n, D) float32, L2-normalised
    labels: torch.Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def concat(*parts: "Features") -> "Features":
        return Features(torch.cat([p.features for p in parts]), torch.cat([p.labels for p in parts]))


@dataclass(frozen=True)
class HeadFit:
    head: AnalyticHead
    lam: float
    val_accuracy: float
    val_zero_shot_accuracy: float
    loo_accuracy_by_lambda: dict[str, float]  # leave-one-out accuracy over all images, best fusion weight, per λ
    val_recall: list[float | None]  # per class, leave-one-out on the validation rows (None: no image of it there)


# ---------------------------------------------------------------- the solve
def ridge_path(phi: torch.Tensor, targets: torch.Tensor, lambdas: tuple[float, ...]):
    """Per λ: (leave-one-out scores (n, C), weights (width, C)) of min ‖ΦW − Y‖² + λ·s‖W‖², s = mean ‖φ‖².

    One eigendecomposition serves every λ: of ΦΦᵀ (n × n) when there are fewer images than random features, else of
    ΦᵀΦ (width × width). The leave-one-out scores are exact: (ŷᵢ − hᵢ yᵢ) / (1 − hᵢ), h the diagonal of the hat
    matrix, so every image is scored by a head that never saw it. float64 throughout.
    """
    phi, targets = phi.double(), targets.double()
    n, width = phi.shape
    s = phi.square().sum().item() / max(n, 1)
    if n <= width:  # dual: W = Φᵀ (ΦΦᵀ + λI)⁻¹ Y
        e, u = torch.linalg.eigh(phi @ phi.T)
        uy, u2 = u.T @ targets, u.square()
        for lam in lambdas:
            shrink = e / (e + lam * s)
            fitted, h = u @ (uy * shrink[:, None]), u2 @ shrink
            yield (fitted - h[:, None] * targets) / (1 - h[:, None]), phi.T @ (u @ (uy / (e + lam * s)[:, None]))
        return
    e, v = torch.linalg.eigh(phi.T @ phi)  # primal: W = (ΦᵀΦ + λI)⁻¹ Φᵀ Y
    vb = v.T @ (phi.T @ targets)
    inverses = torch.stack([1 / (e + lam * s) for lam in lambdas], 1)  # (width, λs)
    # the hat diagonals of every λ, by rows: Φ itself is the one (n × width) array held (1.4 GB at 40,000 images)
    h = torch.cat([(rows @ v).square() @ inverses for rows in phi.split(max(1, (1 << 24) // width))])
    for k in range(len(lambdas)):
        weights = v @ (vb * inverses[:, k, None])
        yield (phi @ weights - h[:, k, None] * targets) / (1 - h[:, k, None]), weights


def fit_head(train: Features, val: Features, text: torch.Tensor, logit_scale: float, settings: HeadSettings,
             num_classes: int) -> HeadFit:
    """Fit on every image; pick λ and the fusion weight by exact leave-one-out accuracy over all of them.

    Leave-one-out uses every image for both fitting and choosing, where a 10 % split leaves a tenth out and chooses on
    a tenth (measured on the proxy's six domains, random features alone: mean test 70.3 against 69.9 %). The validation split is still
    reported: `val_accuracy` is the leave-one-out accuracy on its rows, held out from the head each is scored by, and
    so comparable with the other kinds' validation figures.
    """
    if len(val) == 0:
        raise InputError("the head reports its accuracy on a validation split, and the split is empty: give each "
                         "class at least 2 images, or a larger --val-fraction")
    everything = Features.concat(train, val)
    center = everything.features.double().mean(0)
    expansion = RandomFeatures(int(train.features.shape[1]), settings.width, settings.projection_seed)
    phi = expansion.by_rows(everything.features.double() - center)
    zero_shot = logit_scale * everything.features.double() @ text.double().T  # (n, C)
    truth = everything.labels.numpy()
    score = Scorer(num_classes, settings.balance_classes)
    targets = F.one_hot(everything.labels, num_classes).double()
    root = score.row_weights(everything.labels).sqrt()[:, None]  # weighted least squares: rows scaled by √weight
    phi.mul_(root)  # in place: Φ is the one (n × width) array the solve holds
    on_val = np.arange(len(everything)) >= len(train)
    best, by_lambda = (-1.0, None, None, None, None), {}
    # ties keep the more regularised λ and the smaller fusion weight (closer to the frozen answer)
    lambdas = tuple(sorted(settings.lambdas, reverse=True))
    for lam, (held_out, weights) in zip(lambdas, ridge_path(phi, targets * root, lambdas)):
        held_out /= root  # the leave-one-out scores of the weighted fit, back in the targets' units
        for fusion in sorted(settings.fusions):
            predicted = (zero_shot + fusion * held_out).argmax(-1).numpy()
            accuracy = score(predicted, truth)
            by_lambda[f"{lam:g}"] = max(by_lambda.get(f"{lam:g}", 0.0), accuracy)
            if accuracy > best[0]:
                best = (accuracy, lam, fusion, predicted[on_val], weights)
    _, lam, fusion, val_predicted, weights = best
    val_zero_shot = score(zero_shot.argmax(-1).numpy()[on_val], truth[on_val])
    head = AnalyticHead(expansion, center.float(), weights.float(), float(fusion))
    return HeadFit(head, lam, score(val_predicted, truth[on_val]), val_zero_shot, by_lambda,
                   recall_per_class(val_predicted, truth[on_val], num_classes))


class Scorer:
    """Accuracy, or with `balanced` the mean per-class recall (each class counts the same, whatever its image count),
    and the least-squares row weights that go with it."""

    def __init__(self, num_classes: int, balanced: bool):
        self.num_classes, self.balanced = num_classes, balanced

    def __call__(self, predicted: np.ndarray, truth: np.ndarray) -> float:
        if not self.balanced:
            return float((predicted == truth).mean())
        return float(np.mean([r for r in recall_per_class(predicted, truth, self.num_classes) if r is not None]))

    def row_weights(self, labels: torch.Tensor) -> torch.Tensor:
        """(n,) float64: 1 each, or n / (C·n_c) so that every class weighs what an even split would give it."""
        if not self.balanced:
            return torch.ones(len(labels), dtype=torch.float64)
        counts = torch.bincount(labels, minlength=self.num_classes).double()
        present = int((counts > 0).sum())
        return (len(labels) / (present * counts))[labels]

    @property
    def measure(self) -> str:
        return "mean per-class recall" if self.balanced else "accuracy"

    @property
    def short(self) -> str:
        return "per-class recall" if self.balanced else "acc"


def accuracy_of(head: AnalyticHead, split: Features, text: torch.Tensor, logit_scale: float,
                score: Scorer) -> tuple[float, float, list[float | None]]:
    """(head accuracy at w = 1, frozen zero-shot accuracy, the head's recall per class) within the task's classes,
    as `score` measures them."""
    zero_shot = logit_scale * split.features @ text.float().T
    predicted = head.logits(split.features, zero_shot, torch.ones(len(split))).argmax(-1).numpy()
    truth = split.labels.numpy()
    return score(predicted, truth), score(zero_shot.argmax(-1).numpy(), truth), recall_per_class(predicted, truth, score.num_classes)


def check_features(split: Features, where: str) -> None:
    bad = (~torch.isfinite(split.features).all(-1)).nonzero().flatten()
    if len(bad):
        raise InputError(f"{where}: the frozen features of {len(bad)} images are not finite (e.g. image {int(bad[0])}); "
                         "check those images and the backbone's weights")


# ---------------------------------------------------------------- the learner
class HeadLearner:
    kind = KIND

    def __init__(self, settings: HeadSettings | None = None):
        self.settings = settings or HeadSettings()

    def recipe(self, task: TaskData) -> dict[str, Any]:
        s = self.settings
        return {
            "learner": self.kind,
            "head_settings": s.to_dict(),
            "loss": "ridge regression of ReLU random features of the centred frozen feature to one-hot targets",
            "selection": "λ and fusion weight with the zero-shot logits: best exact leave-one-out accuracy over all images",
            "split": {"val_fraction": s.val_fraction, "seed": s.seed, "stratified": True,
                      "n_train": len(task.train), "n_val": len(task.val) if task.val is not None else 0},
            "data": task.source,
        }

    def identity(self, task: TaskData, backbone: Backbone, runner: str = "local") -> dict[str, Any]:
        return {"runner": runner, "task": task.name, "backbone": backbone.fingerprint.to_dict()}

    def fit(self, task: TaskData, backbone: Backbone, run: RunContext | None = None,
            previous: TaskArtifact | None = None) -> TaskArtifact:
        """Learn the task; with `previous` (a head artifact read with its update state), add to what it learned."""
        run = run or RunContext()
        model, pipeline = PromptedCLIP(backbone), PixelPipeline(backbone.preprocess)
        started = time.perf_counter()
        train, val = self.features(model, pipeline, task.train, run), self.features(model, pipeline, task.val, run)
        test = self.features(model, pipeline, task.test, run) if task.test is not None else None
        for split, where in ((train, "--data (train split)"), (val, "--data (validation split)"), (test, "--test")):
            if split is not None:
                check_features(split, where)
        class_names, templates = list(task.class_names), list(task.templates)
        if previous is not None:
            old_train, old_val = stored(previous, "train"), stored(previous, "val")
            train, val = drop_known(train, val, Features.concat(old_train, old_val), previous, run)
            train, val = Features.concat(old_train, train), Features.concat(old_val, val)
        fingerprint_seconds = time.perf_counter() - started
        return self.artifact(task, backbone, model, class_names, templates, train, val, test, fingerprint_seconds,
                             run, previous)

    def features(self, model: PromptedCLIP, pipeline: PixelPipeline, images: ImageSet | None, run: RunContext,
                 task: str | None = None) -> Features:
        if images is None or len(images) == 0:
            return Features(torch.zeros(0, model.clip.visual.output_dim), torch.zeros(0, dtype=torch.int64))
        feats = sharded_features(model, pipeline, images, self.settings.eval_batch_size, run.comm, task, self.settings.frozen_runtime)
        return Features(feats, torch.as_tensor(np.array(images.labels, dtype=np.int64)))

    def artifact(self, task, backbone, model, class_names, templates, train, val, test, fingerprint_seconds, run,
                 previous=None, prompts: dict[str, torch.Tensor] | None = None, text: torch.Tensor | None = None,
                 stats: dict[str, torch.Tensor] | None = None, kind: str | None = None,
                 extra_recipe: dict | None = None) -> TaskArtifact:
        """Fit the head on the given features and package the artifact (shared with the prompts+head learner)."""
        say = log.info if run.comm.is_main else log.debug
        started = time.perf_counter()
        scale = float(model.logit_scale())
        if text is None:
            text = text_classifier(model, class_names, templates).float().cpu()  # (C, D) frozen class text
        everything = Features.concat(train, val)
        if stats is None:  # the router's fingerprint, from the frozen features
            stats = fit_task_stats(everything.features, everything.labels, seed=self.settings.seed).to_tensors()
        fit = fit_head(train, val, text, scale, self.settings, len(class_names))
        train_seconds = time.perf_counter() - started
        score = Scorer(len(class_names), self.settings.balance_classes)
        tested = test is not None and len(test)
        test_accuracy, test_zero_shot, test_recall = accuracy_of(fit.head, test, text, scale, score) if tested else (None, None, None)
        metrics = {
            "accuracy_measure": score.measure,
            "val_accuracy": fit.val_accuracy,
            "val_zero_shot_accuracy": fit.val_zero_shot_accuracy,
            "test_accuracy": test_accuracy,
            "test_zero_shot_accuracy": test_zero_shot,
            "lambda": fit.lam,
            "fusion": fit.head.fusion,
            "loo_accuracy_by_lambda": fit.loo_accuracy_by_lambda,
            "recall_per_class": {split: dict(zip(class_names, recall)) if recall is not None else None
                                 for split, recall in (("val", fit.val_recall), ("test", test_recall))},
            "train_seconds": round(train_seconds, 3),
            "fingerprint_seconds": round(fingerprint_seconds, 3),
            "n_train": len(train),
            "n_val": len(val),
            "n_test": len(test) if test is not None else 0,
            "updated_from_version": previous.version if previous is not None else None,
            **run.extra_metrics,
        }
        say("%s: head λ %g, fusion %g; val %s %s (frozen zero-shot %s); test %s %s (frozen zero-shot %s); solve %.1f s",
            task.name, fit.lam, fit.head.fusion, score.short, _pct(fit.val_accuracy), _pct(fit.val_zero_shot_accuracy),
            score.short, _pct(test_accuracy), _pct(test_zero_shot), train_seconds)
        recipe = {**self.recipe(task), "head": fit.head.config(), **(extra_recipe or {})}
        update_state = {"train.features": train.features, "train.labels": train.labels,
                        "val.features": val.features, "val.labels": val.labels}
        return TaskArtifact(
            name=task.name, kind=kind or self.kind, class_names=class_names, templates=templates,
            backbone=backbone.fingerprint.to_dict(), recipe=recipe, metrics=metrics,
            prompts={**(prompts or {}), **fit.head.to_tensors()}, stats=stats, update_state=update_state,
        )


def stored(previous: TaskArtifact, split: str) -> Features:
    """The features and labels an earlier version kept for `split` ("train" or "val")."""
    state = previous.update_state
    return Features(state[f"{split}.features"].float(), state[f"{split}.labels"].long())


# ---------------------------------------------------------------- updates
SAME_IMAGE_COSINE = 1 - 1e-5  # frozen features this close are one image (run to run they differ by ~1e-7)


def drop_known(train: Features, val: Features, known: Features, previous: TaskArtifact,
               run: RunContext) -> tuple[Features, Features]:
    """An update's images that the live version already learned, with the same class, are counted once: a folder
    re-sent with a few images added must not weigh its old images twice. The same image under another class is kept
    (as within one --data) and reported."""
    seen = [nearest_known(split.features, known.features) for split in (train, val)]
    same = [(hit >= 0) & (known.labels[hit.clamp(min=0)] == split.labels) for split, hit in zip((train, val), seen)]
    relabelled = sum(int(((hit >= 0) & ~dup).sum()) for hit, dup in zip(seen, same))
    dropped = sum(int(dup.sum()) for dup in same)
    if dropped == len(train) + len(val):
        raise InputError(f"--data: all {dropped} images are already in version {previous.version} of task "
                         f"'{previous.name}' with the same classes: nothing to add")
    say = log.info if run.comm.is_main else log.debug
    if dropped:
        say("--update: %d of %d images are already in version %d with the same class; counted once",
            dropped, len(train) + len(val), previous.version)
    if relabelled:
        say("--update: %d images are already in version %d under another class; kept under both", relabelled, previous.version)
    return tuple(Features(split.features[~dup], split.labels[~dup]) for split, dup in zip((train, val), same))


def nearest_known(features: torch.Tensor, known: torch.Tensor, cells: int = 1 << 24) -> torch.Tensor:
    """(n,) index of the known image each feature equals (cosine >= SAME_IMAGE_COSINE; both L2-normalised), or -1.
    In chunks of at most `cells` similarities (64 MiB)."""
    hits = torch.full((len(features),), -1, dtype=torch.int64)
    if len(known) == 0:
        return hits
    chunk = max(1, cells // len(known))
    for start in range(0, len(features), chunk):
        cosine, index = (features[start:start + chunk].float() @ known.float().T).max(dim=1)
        hits[start:start + chunk] = torch.where(cosine >= SAME_IMAGE_COSINE, index, -1)
    return hits


def check_updatable(previous: TaskArtifact, embed_dim: int, where: str) -> None:
    """A live version `--update` can add to: a head, with its update state, for features of this width."""
    if previous.kind != KIND:
        raise InputError(f"{where}: task '{previous.name}' is of kind '{previous.kind}'; only '{KIND}' tasks are updated "
                         "in closed form (learn it again, or add a new task)")
    missing = [k for k in UPDATE_KEYS if k not in previous.update_state]
    if missing:
        raise InputError(f"{where}: task '{previous.name}' version {previous.version} keeps no update state ({', '.join(missing)} missing)")
    width = previous.update_state["train.features"].shape[-1]
    if width != embed_dim:
        raise InputError(f"{where}: task '{previous.name}' version {previous.version} kept {width}-d features; this backbone "
                         f"gives {embed_dim}-d (a feature-width mismatch: use the task's backbone)")


def merge_class_names(previous: list[str], new: list[str], where: str) -> tuple[list[str], list[int]]:
    """(all class names, new label -> merged label): known names keep their label, new names are appended.

    A name that differs from a known one only by `_` for spaces is that class (a task learnt from a manifest before
    labels were read like folder names keeps `golden_retriever`). One that differs by case or spaces is a conflict
    (it would split one class in two)."""
    by_spoken = {spoken(n): n for n in previous}
    known = {name_key(n): n for n in previous}
    merged, resolved = list(previous), []
    for name in new:
        same = name if name in merged else by_spoken.get(spoken(name))
        if same is None:
            twin = known.get(name_key(name))
            if twin is not None:
                raise InputError(f"{where}: class name {name!r} conflicts with the task's class {twin!r} (same but for "
                                 "case or spaces): use the task's spelling")
            merged.append(same := name)
        resolved.append(same)
    return merged, [merged.index(n) for n in resolved]
