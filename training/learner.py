"""Learning one task: the learner interface and the residual-prompt learner (DESIGN §4).

A learner turns a task's data into a `TaskArtifact`; publishing is the caller's job. The residual-prompt learner
reads top to bottom: fingerprint with the frozen image tower → a fresh set of prompts for the new task, the only
trainable tensors → SGD with a per-step cosine schedule, cross-entropy over the task's class names → keep the best
epoch on the validation split → evaluate → artifact. Earlier tasks are never loaded and the backbone is frozen.

Data parallel (Ray Train): every rank runs `fit` on the same data with its own frozen backbone. Each global batch
of `batch_size` images is split across ranks, and the prompt gradients (nothing else has any) are averaged with one
`all_reduce` per step, weighted by each rank's share of the batch — the same update as one process would make.
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from backbone import Backbone, PixelPipeline, PromptConfig, PromptedCLIP, fit_task_stats, text_classifier
from backbone.zeroshot import mean_over_templates, template_texts
from prompts_store import TaskArtifact

from .augment import crop_boxes, random_resized_crop
from .checkpoint import Checkpoints, TrainState, check_resumable
from .comm import Comm
from .data import ImageSet
from .errors import InputError, TrainingDiverged, TrainingStopped
from .features import eval_batch, frozen_encoder, sharded_features
from .settings import ResidualPromptSettings

log = logging.getLogger(__name__)

KIND = "residual-prompts"


# ---------------------------------------------------------------- settings, data, interface
@dataclass
class TaskData:
    """One task's data, decoded and split: what every learner gets."""

    name: str
    class_names: list[str]
    templates: list[str]
    train: ImageSet
    val: ImageSet | None = None  # picks the best epoch; None: keep the last
    test: ImageSet | None = None  # optional: reported in the metrics, never used for choices
    source: dict[str, Any] = field(default_factory=dict)  # JSON-able provenance (paths, formats, counts, skipped files)


@dataclass
class RunContext:
    """How `fit` runs: which rank of how many, where checkpoints go, when to stop early."""

    comm: Comm = field(default_factory=Comm)
    checkpoints: Checkpoints | None = None  # None: no checkpoints
    resume: bool = False  # a checkpoint must exist and match (else InputError); any found checkpoint is used anyway
    stop_after_epoch: int | None = None  # raise TrainingStopped after this epoch's checkpoint (tests, maintenance)
    progress: bool = True  # tqdm bar on rank 0
    runner: str = "local"  # "local" or "ray-train": a run resumes only under the runner that started it
    extra_metrics: dict[str, Any] = field(default_factory=dict)  # added to the artifact's metrics (workers, device...)


class Learner(Protocol):
    """What `add-task` needs from a learner (the baselines of DESIGN §6 implement the same)."""

    kind: str  # the artifact kind it produces

    def recipe(self, task: TaskData) -> dict[str, Any]:
        """JSON-able settings, recorded in task.json."""

    def fit(self, task: TaskData, backbone: Backbone, run: RunContext | None = None) -> TaskArtifact:
        """Learn the task on the frozen backbone and return its artifact (not yet published)."""


# ---------------------------------------------------------------- the residual-prompt learner
class ResidualPromptLearner:
    kind = KIND

    def __init__(self, settings: ResidualPromptSettings | None = None):
        self.settings = settings or ResidualPromptSettings()

    def prompt_config(self) -> PromptConfig:
        s = self.settings
        shape = s.prompt_shape()
        if s.key_init is None:  # the keys are drawn afterwards, at each block's own scale (see _init_keys)
            return PromptConfig(**shape)
        return PromptConfig(**shape, key_init=s.key_init)

    def recipe(self, task: TaskData) -> dict[str, Any]:
        s = self.settings
        return {
            "learner": self.kind,
            "prompts": self.prompt_config().to_dict(),
            "optimizer": {
                "name": "sgd", "lr": s.lr, "lr_reference_logit_scale": s.lr_reference_logit_scale,
                "momentum": s.momentum, "weight_decay": s.weight_decay,
            },
            "key_init": s.key_init if s.key_init is not None else "uniform, std of each block's own keys",
            "schedule": {"name": "cosine", "per": "step", "warmup_steps": s.warmup_steps, "final_lr_ratio": s.final_lr_ratio},
            "epochs": s.epochs,
            "batch_size": s.batch_size,
            "seed": s.seed,
            "split": {
                "val_fraction": s.val_fraction,
                "seed": s.seed,
                "stratified": True,
                "n_train": len(task.train),
                "n_val": len(task.val) if task.val is not None else 0,
            },
            "loss": "cross-entropy over the task's class names; logits = frozen logit scale x cosine(image, text), both towers prompted",
            "text_templates": {"train": s.text_templates, "eval": "mean of all templates"},
            "selection": "best validation epoch (epoch 0, the untrained prompts = frozen answer, included)" if task.val is not None and len(task.val) else "last epoch",
            "augmentation": {"name": "random-resized-crop", "scale": [s.crop_scale, 1.0], "ratio": [0.75, 4 / 3], "flip": False}
            if s.augment == "random-crop" else "none",
            "data": task.source,
        }

    def identity(self, task: TaskData, backbone: Backbone, runner: str = "local") -> dict[str, Any]:
        """What a checkpoint must match to be resumed, besides the recipe."""
        return {
            "runner": runner,
            "task": task.name,
            "class_names": list(task.class_names),
            "templates": list(task.templates),
            "backbone": backbone.fingerprint.to_dict(),
            "data_sha256": _data_sha256(task.train, task.val),  # same images and labels in the same split
        }

    def fit(self, task: TaskData, backbone: Backbone, run: RunContext | None = None) -> TaskArtifact:
        if self.settings.depth is None:  # the default depth is a share of this backbone's tower
            return ResidualPromptLearner(self.settings.for_tower(len(backbone.image_blocks))).fit(task, backbone, run)
        training = _Training(self, task, backbone, run or RunContext())
        state = training.checkpoint_to_resume()  # None: a fresh run
        frozen = training.frozen_pass() if state is None else _FrozenPass.restore(state)
        prompts = training.new_prompts(fresh=state is None)
        progress = training.resume(prompts, state) if state is not None else training.start(prompts, frozen)
        for epoch in range(progress.epochs_done, self.settings.epochs):
            started = time.perf_counter()
            totals, lr = training.train_epoch(prompts, epoch)
            record = training.validate(progress, epoch, totals, lr, started)
            training.checkpoint(prompts, progress, frozen, record)
        return training.artifact(prompts, progress, frozen, state)

    # ------------------------------------------------------------ pieces of the loop
    def applied_lr(self, model: PromptedCLIP) -> float:
        """The peak step size: lr, referenced to CLIP's logit scale (the gradients scale with the backbone's own)."""
        s = self.settings
        if s.lr_reference_logit_scale is None:
            return s.lr
        return s.lr * s.lr_reference_logit_scale / float(model.logit_scale())

    def _lr(self, step: int, total: int, peak: float) -> float:
        s = self.settings
        if step < s.warmup_steps:
            return peak * (step + 1) / s.warmup_steps
        progress = (step - s.warmup_steps) / max(1, total - s.warmup_steps)  # in [0, 1)
        final = peak * s.final_lr_ratio
        return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * progress))

    @torch.no_grad()
    def _init_keys(self, model: PromptedCLIP, task: TaskData, pipeline: PixelPipeline, tokens: torch.Tensor) -> None:
        """P_K ~ U(-a, a), a = √3 x the std of the block's own keys on a calibration batch (P_V stays 0).

        With keys at the scale of the model's own, the prefix attention depends on the input from the first step and
        the n prefixes are not interchangeable; with tiny keys it is uniform, every P_V gets the same gradient and the
        prompts act as one bias per block until the keys grow (measured: no gain over zero-shot in 60 steps on mnist).
        The batch (64 seeded training images, up to 256 class prompts) is the same on every rank; so is the result.
        """
        backbone, s = model.backbone, self.settings
        spread: dict[str, float] = {}
        hooks = []
        for tower, blocks in (("visual", backbone.image_blocks), ("text", backbone.text_blocks)):
            for layer, block in enumerate(blocks):
                def measure(module, args, kwargs, name=f"{tower}.{layer}.key"):
                    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
                    width = base.in_proj_weight.shape[1]
                    bias = base.in_proj_bias[width : 2 * width] if base.in_proj_bias is not None else None
                    spread[name] = F.linear(args[0], base.in_proj_weight[width : 2 * width], bias).float().std().item()
                hooks.append(block.attn.register_forward_pre_hook(measure, with_kwargs=True))
        try:
            sample = np.sort(np.random.default_rng(s.seed).permutation(len(task.train))[:64])  # every class, not the first
            model.encode_image(pipeline.to_batch(task.train.pixels[sample], backbone.device))
            model.encode_text(tokens.reshape(-1, tokens.shape[-1])[:256].to(backbone.device))
        finally:
            for hook in hooks:
                hook.remove()
        generator = torch.Generator().manual_seed(s.seed)
        state = model.task_state(task.name)
        for name, tensor in state.items():
            if name.endswith(".key"):
                bound = math.sqrt(3.0) * spread[name]
                state[name] = (torch.rand(tensor.shape, generator=generator, dtype=torch.float64) * 2 - 1).mul(bound).to(tensor.dtype)
        model.load_task(task.name, state, model.config(task.name))

    def _augmented(self, pixels: np.ndarray, n_global: int, seed: tuple[int, ...], comm: Comm) -> np.ndarray:
        """This rank's share of the step's training pixels, randomly cropped when the recipe says so; the boxes are
        drawn for the whole global batch, so the crops do not depend on the number of workers."""
        s = self.settings
        if s.augment == "none" or not len(pixels):
            return pixels
        boxes = crop_boxes(n_global, *pixels.shape[-2:], (s.crop_scale, 1.0), np.random.default_rng([*seed, 1]))
        return random_resized_crop(pixels, boxes[comm.rank :: comm.world_size])

    def _text_features(self, model: PromptedCLIP, tokens: torch.Tensor, task: str, seed: tuple[int, ...]) -> torch.Tensor:
        """(C, D) normalised, prompted class text features with gradients: one sampled template per class, or the mean."""
        n_classes, n_templates, length = tokens.shape
        if self.settings.text_templates == "sample" or n_templates == 1:
            pick = torch.from_numpy(np.random.default_rng(list(seed)).integers(n_templates, size=n_classes))
            return model.encode_text(tokens[torch.arange(n_classes), pick.to(tokens.device)], task=task, normalize=True)
        features = model.encode_text(tokens.view(-1, length), task=task, normalize=True)
        return mean_over_templates(features.view(n_classes, n_templates, -1))  # the classifier that is served

    def _average_gradients(self, params, n_local: int, finite: bool, comm: Comm, epoch: int, step: int, lr: float) -> None:
        """One all_reduce: sum over ranks of (gradient x local images), plus image and non-finite counts."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) * n_local for g in grads] + [torch.tensor([n_local, 0.0 if finite else 1.0], device=grads[0].device)])
        flat = comm.all_reduce_sum(flat) if comm.world_size > 1 else flat
        if flat[-1] > 0 or not torch.isfinite(flat).all():
            raise TrainingDiverged(f"the loss became NaN or infinite at epoch {epoch + 1}, step {step + 1} (lr {lr:.3g}); try a lower --lr")
        if comm.world_size > 1:
            total = flat[-2]
            offset = 0
            for p, g in zip(params, grads):
                p.grad = (flat[offset : offset + g.numel()] / total).view_as(p).to(p.dtype)
                offset += g.numel()

    def _features(self, model, pipeline, images: ImageSet, task: str | None, comm: Comm) -> torch.Tensor:
        return sharded_features(model, pipeline, images, self.settings.eval_batch_size, comm, task, self.settings.frozen_runtime)

    def _accuracy(self, model, pipeline, images: ImageSet, classifier: torch.Tensor, task: str | None, comm: Comm) -> float:
        """Top-1 accuracy within the task's classes; ranks split the images and sum their counts."""
        return self._evaluate(model, pipeline, images, classifier, task, comm)[0]

    @torch.no_grad()
    def _evaluate(self, model, pipeline, images: ImageSet, classifier: torch.Tensor, task: str | None,
                  comm: Comm) -> tuple[float, list[float | None]]:
        """(top-1 accuracy, recall of each class: None where it has no image); ranks sum per-class counts."""
        shard = np.arange(len(images))[comm.rank :: comm.world_size]
        num_classes, batch_size = classifier.shape[0], eval_batch(self.settings.eval_batch_size, model.backbone.device)
        correct, total = np.zeros(num_classes), np.zeros(num_classes)
        frozen = frozen_encoder(model, self.settings.frozen_runtime) if task is None else None
        for start in range(0, len(shard), batch_size):
            chunk = shard[start : start + batch_size]
            batch = pipeline.to_batch(images.pixels[chunk], model.backbone.device)
            features = frozen(batch) if frozen is not None else model.encode_image(batch, tasks=task, normalize=True, pooled=True)
            predicted = (features.to(classifier) @ classifier.T).argmax(-1).cpu().numpy()
            right, counts = class_counts(predicted, images.labels[chunk], num_classes)
            correct, total = correct + right, total + counts
        summed = comm.all_reduce_sum(torch.tensor(np.concatenate([correct, total]), dtype=torch.float64)).numpy()
        correct, total = summed[:num_classes], summed[num_classes:]
        return float(correct.sum() / max(total.sum(), 1)), recalls(correct, total)


# ---------------------------------------------------------------- one fit, step by step
@dataclass
class _FrozenPass:
    """The frozen image tower's one pass over the task: its fingerprint and the frozen zero-shot accuracies."""

    stats: dict[str, torch.Tensor]  # fit_task_stats(...).to_tensors()
    zero_shot: dict[str, float | None]  # accuracy on "val" and "test" (None: no such split)
    seconds: float

    @classmethod
    def restore(cls, state: TrainState) -> "_FrozenPass":
        return cls(state.stats, state.info["zero_shot"], state.info["fingerprint_seconds"])


@dataclass
class _Prompts:
    """The new task's prompts, the only tensors with gradients, and their optimizer."""

    keys: list[str]  # task_state's keys, in the order of `params`
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.SGD
    peak_lr: float  # lr as applied on this backbone (see `applied_lr`)

    def momentum(self) -> dict[str, torch.Tensor]:
        state = self.optimizer.state
        return {k: state[p]["momentum_buffer"] for k, p in zip(self.keys, self.params)
                if state.get(p, {}).get("momentum_buffer") is not None}


@dataclass
class _Progress:
    """What carries over from epoch to epoch, and through a checkpoint."""

    epochs_done: int
    best: dict[str, torch.Tensor]  # the prompts of the best epoch so far: what is published
    best_epoch: int
    best_val: float | None
    history: list[dict[str, Any]]  # one record per epoch
    train_seconds: float


class _Training:
    """One `ResidualPromptLearner.fit`: the learner holds the recipe, this the task, the model and the run."""

    def __init__(self, learner: ResidualPromptLearner, task: TaskData, backbone: Backbone, run: RunContext):
        self.learner, self.s = learner, learner.settings
        self.task, self.backbone, self.run, self.comm = task, backbone, run, run.comm
        self.say = log.info if run.comm.is_main else log.debug
        self.has_val = task.val is not None and len(task.val) > 0
        self.recipe, self.identity = learner.recipe(task), learner.identity(task, backbone, run.runner)
        self.pipeline = PixelPipeline(backbone.preprocess)
        self.model = PromptedCLIP(backbone)
        self.tokens = tokens_for(backbone, task.class_names, task.templates).to(backbone.device)  # (C, T, L)
        self.labels = torch.as_tensor(np.array(task.train.labels, dtype=np.int64))  # a copy: Ray hands out read-only arrays

    def checkpoint_to_resume(self) -> TrainState | None:
        """The latest checkpoint of this run, if any; it must describe the same task and recipe."""
        state = self.run.checkpoints.latest() if self.run.checkpoints is not None else None
        if state is None and self.run.resume:
            raise InputError("--resume: the run has no checkpoint to resume from")
        if state is not None:
            check_resumable(state.info, self.recipe, self.identity, f"the checkpoint of epoch {state.epoch}")
            self.say("resuming %s after epoch %d of %d", self.task.name, state.epoch, self.s.epochs)
        return state

    def frozen_pass(self) -> _FrozenPass:
        """Every task image once through the frozen image tower (no prompts): the fingerprint, and zero-shot accuracy."""
        task, model, comm = self.task, self.model, self.comm
        started = time.perf_counter()
        zero_shot = text_classifier(model, task.class_names, task.templates)  # (C, D) frozen, mean over templates
        splits = [s for s in (task.train, task.val) if s is not None and len(s)]  # each as it is: no copy of the pixels
        frozen = torch.cat([self.learner._features(model, self.pipeline, s, None, comm) for s in splits])  # (N, D), all rows on every rank
        labels = torch.from_numpy(np.concatenate([s.labels for s in splits]))
        stats = fit_task_stats(frozen, labels, seed=self.s.seed).to_tensors()
        accuracy = {"val": None, "test": None}
        if self.has_val:
            accuracy["val"] = _accuracy(frozen[len(task.train) :] @ zero_shot.cpu().T, task.val.labels)
        if task.test is not None:
            accuracy["test"] = self.learner._accuracy(model, self.pipeline, task.test, zero_shot, None, comm)
        seconds = time.perf_counter() - started
        self.say("fingerprint of %d images and zero-shot evaluation: %.1f s", len(frozen), seconds)
        return _FrozenPass(stats, accuracy, seconds)

    def new_prompts(self, fresh: bool) -> _Prompts:
        """The task's fresh prompts (P_V = 0: the frozen answer), made trainable, and SGD over them."""
        s, model, name = self.s, self.model, self.task.name
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model.add_task(name, self.learner.prompt_config())
        if s.key_init is None and fresh:
            self.learner._init_keys(model, self.task, self.pipeline, self.tokens)
        model.set_trainable(name)
        keys, params = list(model.task_state(name)), model.prompt_parameters(name)  # the same order
        assert len(keys) == len(params) and all(tuple(p.shape) == model.task_state(name)[k].shape for k, p in zip(keys, params))
        peak_lr = self.learner.applied_lr(model)
        optimizer = torch.optim.SGD(params, lr=peak_lr, momentum=s.momentum, weight_decay=s.weight_decay)
        trainable = sum(p.numel() for p in params)
        self.say(
            "task %s: %s trainable prompt parameters (depth %d, %d prefix tokens), %s frozen; %d train / %d val images, "
            "%d classes; SGD peak lr %.3g (lr %g at logit scale %s; this backbone's is %.1f)",
            name, f"{trainable:,}", s.depth, s.n_prefix, f"{sum(p.numel() for p in model.parameters()) - trainable:,}",
            len(self.task.train), len(self.task.val) if self.has_val else 0, len(self.task.class_names), peak_lr, s.lr,
            s.lr_reference_logit_scale, float(model.logit_scale()),
        )
        return _Prompts(keys, params, optimizer, peak_lr)

    def start(self, prompts: _Prompts, frozen: _FrozenPass) -> _Progress:
        _copy_into(prompts.params, [self.comm.broadcast(p.detach()) for p in prompts.params])  # the same start on every rank
        # epoch 0 (P_V = 0: the frozen answer) is a candidate too, so a task never ships worse than zero-shot on val
        return _Progress(0, self.model.task_state(self.task.name), 0, frozen.zero_shot["val"], [], 0.0)

    def resume(self, prompts: _Prompts, state: TrainState) -> _Progress:
        _copy_into(prompts.params, [state.prompts[k] for k in prompts.keys])
        for key, param in zip(prompts.keys, prompts.params):
            if key in state.momentum:
                prompts.optimizer.state[param]["momentum_buffer"] = state.momentum[key].to(param).clone()
        info = state.info
        return _Progress(state.epoch, {k: v.clone() for k, v in state.best.items()}, info["best_epoch"],
                         info["best_val_accuracy"], list(info["history"]), info["train_seconds"])

    def train_epoch(self, prompts: _Prompts, epoch: int) -> tuple[torch.Tensor, float]:
        """One pass over the training images in global batches -> (loss sum, correct, images over all ranks; last lr)."""
        s, comm, n_train = self.s, self.comm, len(self.task.train)
        steps = math.ceil(n_train / s.batch_size)
        order = np.random.default_rng([s.seed, epoch]).permutation(n_train)
        totals = torch.zeros(3, dtype=torch.float64)  # sum of loss, correct, images
        bar = _progress(steps, f"{self.task.name} epoch {epoch + 1}/{s.epochs}", self.run.progress and comm.is_main)
        for step in range(steps):
            lr = self.learner._lr(epoch * steps + step, s.epochs * steps, prompts.peak_lr)
            for group in prompts.optimizer.param_groups:
                group["lr"] = lr
            global_batch = order[step * s.batch_size : (step + 1) * s.batch_size]
            prompts.optimizer.zero_grad(set_to_none=False)
            loss, correct, n_local = self._loss(global_batch, (s.seed, epoch, step))
            totals += torch.tensor([loss * n_local, correct, n_local], dtype=torch.float64)
            self.learner._average_gradients(prompts.params, n_local, math.isfinite(loss), comm, epoch, step, lr)
            prompts.optimizer.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.3g}", refresh=False)
        bar.close()
        return comm.all_reduce_sum(totals), lr

    def _loss(self, global_batch: np.ndarray, seed: tuple[int, ...]) -> tuple[float, int, int]:
        """Cross-entropy on this rank's share of the batch, backpropagated -> (loss, correct, images)."""
        batch = global_batch[self.comm.rank :: self.comm.world_size]
        pixels = self.learner._augmented(self.task.train.pixels[batch], len(global_batch), seed, self.comm)
        if not len(batch):
            return 0.0, 0, 0
        device = self.backbone.device
        text = self.learner._text_features(self.model, self.tokens, self.task.name, seed)  # (C, D), prompted
        features = self.model.encode_image(self.pipeline.to_batch(pixels, device), tasks=self.task.name, normalize=True,
                                           pooled=True)  # the loss reads the pooled token only
        logits = self.model.logit_scale() * features @ text.T  # (b, C)
        target = self.labels[batch].to(device)
        loss = F.cross_entropy(logits, target)
        loss.backward()
        return loss.item(), (logits.argmax(-1) == target).sum().item(), len(batch)

    def validate(self, progress: _Progress, epoch: int, totals: torch.Tensor, lr: float, started: float) -> dict[str, Any]:
        """Validation accuracy of the prompts after `epoch`; kept when better. -> the epoch's record, logged."""
        progress.train_seconds += time.perf_counter() - started
        val_accuracy = self._prompted_accuracy(self.task.val) if self.has_val else None
        if not self.has_val or progress.best_val is None or val_accuracy > progress.best_val:
            progress.best, progress.best_epoch, progress.best_val = self.model.task_state(self.task.name), epoch + 1, val_accuracy
        progress.epochs_done = epoch + 1
        images = max(totals[2].item(), 1)
        record = {"epoch": epoch + 1, "train_loss": totals[0].item() / images, "train_accuracy": totals[1].item() / images,
                  "val_accuracy": val_accuracy, "lr": lr, "seconds": time.perf_counter() - started}
        progress.history.append(record)
        self.say(
            "%s epoch %d/%d  loss %.4f  train acc %.1f%%  val acc %s  (best %s @ epoch %d)  lr %.3g  %.1f s",
            self.task.name, epoch + 1, self.s.epochs, record["train_loss"], 100 * record["train_accuracy"],
            _pct(val_accuracy), _pct(progress.best_val), progress.best_epoch, lr, record["seconds"],
        )
        return record

    def checkpoint(self, prompts: _Prompts, progress: _Progress, frozen: _FrozenPass, record: dict[str, Any]) -> None:
        """The state after the epoch, if the run keeps checkpoints; then stop there if asked to."""
        epoch, name = progress.epochs_done, self.task.name

        def snapshot() -> TrainState:
            info = {
                "identity": self.identity, "recipe": self.recipe, "history": progress.history,
                "best_epoch": progress.best_epoch, "best_val_accuracy": progress.best_val,
                "train_seconds": progress.train_seconds, "fingerprint_seconds": frozen.seconds, "zero_shot": frozen.zero_shot,
            }
            return TrainState(epoch, info, self.model.task_state(name), progress.best, prompts.momentum(), frozen.stats)

        if self.run.checkpoints is not None:
            self.run.checkpoints.save(epoch, snapshot, record)
        if self.run.stop_after_epoch == epoch and epoch < self.s.epochs:
            raise TrainingStopped(epoch)

    def artifact(self, prompts: _Prompts, progress: _Progress, frozen: _FrozenPass, state: TrainState | None) -> TaskArtifact:
        """The kept epoch's prompts, evaluated on the test split, as the task's artifact."""
        task = self.task
        _copy_into(prompts.params, [progress.best[k] for k in prompts.keys])
        self.model.set_trainable(None)
        test_accuracy, test_recall = self._prompted_evaluation(task.test) if task.test is not None else (None, None)
        val_recall = self._prompted_evaluation(task.val)[1] if self.has_val else None
        last = progress.history[-1]
        metrics = {
            "val_accuracy": progress.best_val,
            "val_zero_shot_accuracy": frozen.zero_shot["val"],
            "test_accuracy": test_accuracy,
            "test_zero_shot_accuracy": frozen.zero_shot["test"],
            "best_epoch": progress.best_epoch,
            "epochs": self.s.epochs,
            "peak_lr_applied": prompts.peak_lr,
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
            "train_seconds": round(progress.train_seconds, 3),
            "fingerprint_seconds": round(frozen.seconds, 3),
            "n_train": len(task.train),
            "n_val": len(task.val) if self.has_val else 0,
            "n_test": len(task.test) if task.test is not None else 0,
            "resumed_after_epoch": state.epoch if state is not None else None,
            "history": progress.history,
            "recall_per_class": {split: dict(zip(task.class_names, recall)) if recall is not None else None
                                 for split, recall in (("val", val_recall), ("test", test_recall))},
            **self.run.extra_metrics,
        }
        self.say(
            "%s: kept epoch %d; val acc %s (frozen zero-shot %s); test acc %s (frozen zero-shot %s)", task.name,
            progress.best_epoch, _pct(progress.best_val), _pct(frozen.zero_shot["val"]), _pct(test_accuracy),
            _pct(frozen.zero_shot["test"]),
        )
        return TaskArtifact(
            name=task.name, kind=self.learner.kind, class_names=list(task.class_names), templates=list(task.templates),
            backbone=self.backbone.fingerprint.to_dict(), recipe=self.recipe, metrics=metrics,
            prompts=self.model.task_state(task.name), stats=frozen.stats,
        )

    def _prompted_accuracy(self, images: ImageSet) -> float:
        return self._prompted_evaluation(images)[0]

    def _prompted_evaluation(self, images: ImageSet) -> tuple[float, list[float | None]]:
        """Top-1 accuracy and per-class recall with the task's prompts in both towers (the classifier the service
        builds)."""
        with torch.no_grad():
            classifier = text_classifier(self.model, self.task.class_names, self.task.templates, task=self.task.name)
        return self.learner._evaluate(self.model, self.pipeline, images, classifier, self.task.name, self.comm)


# ---------------------------------------------------------------- helpers
def tokens_for(backbone: Backbone, names: list[str], templates: list[str]) -> torch.Tensor:
    """(C, T, L) tokens of every class name in every template (tokenised once: the text tower runs every step)."""
    return backbone.tokenizer(template_texts(names, templates)).view(len(names), len(templates), -1)


def _data_sha256(*sets: ImageSet | None) -> str:
    import hashlib

    digest = hashlib.sha256()
    for images in sets:
        if images is not None:
            digest.update(np.ascontiguousarray(images.pixels).tobytes())
            digest.update(np.ascontiguousarray(images.labels, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def _copy_into(params, values) -> None:
    with torch.no_grad():
        for param, value in zip(params, values):
            param.copy_(value.to(param))


def class_counts(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(images predicted right, images) per class."""
    return np.bincount(truth[predicted == truth], minlength=num_classes), np.bincount(truth, minlength=num_classes)


def recalls(right: np.ndarray, counts: np.ndarray) -> list[float | None]:
    """Per class, the share of its images predicted as it (None for a class with no image here)."""
    return [float(r / c) if c else None for r, c in zip(right, counts)]


def recall_per_class(predicted: np.ndarray, truth: np.ndarray, num_classes: int) -> list[float | None]:
    return recalls(*class_counts(predicted, truth, num_classes))


def _accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(-1).numpy() == labels).mean()) if len(labels) else 0.0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, leave=False,
                mininterval=0.5 if tty else 30, dynamic_ncols=True)
