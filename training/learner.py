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

from backbone import Backbone, PromptConfig, PromptedCLIP, fit_task_stats, text_classifier
from prompts_store import TaskArtifact

from .augment import crop_boxes, random_resized_crop
from .checkpoint import Checkpoints, TrainState, check_resumable
from .comm import Comm
from .data import ImageSet, PixelPipeline
from .errors import InputError, TrainingDiverged, TrainingStopped
from .features import sharded_features
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
        if s.key_init is None:  # the keys are drawn afterwards, at each block's own scale (see _init_keys)
            return PromptConfig(depth=s.depth, n_prefix=s.n_prefix)
        return PromptConfig(depth=s.depth, n_prefix=s.n_prefix, key_init=s.key_init)

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
        s, run = self.settings, run or RunContext()
        comm, device = run.comm, backbone.device
        say = log.info if comm.is_main else log.debug
        has_val = task.val is not None and len(task.val) > 0
        recipe, identity = self.recipe(task), self.identity(task, backbone, run.runner)
        pipeline = PixelPipeline(backbone.preprocess)
        model = PromptedCLIP(backbone)
        names, templates = task.class_names, task.templates

        # -- resume? (a checkpoint of this run, if any, must describe the same task and recipe)
        state = run.checkpoints.latest() if run.checkpoints is not None else None
        if state is None and run.resume:
            raise InputError("--resume: the run has no checkpoint to resume from")
        if state is not None:
            check_resumable(state.info, recipe, identity, f"the checkpoint of epoch {state.epoch}")
            say("resuming %s after epoch %d of %d", task.name, state.epoch, s.epochs)

        # -- fingerprint (frozen image tower, no prompts, every task image once) and frozen zero-shot accuracy
        if state is not None:
            stats, info = state.stats, state.info
            zero_shot_metrics, fingerprint_seconds = info["zero_shot"], info["fingerprint_seconds"]
        else:
            started = time.perf_counter()
            zero_shot = text_classifier(model, names, templates)  # (C, D) frozen text features, mean over templates
            everything = ImageSet.concat(task.train, task.val)
            frozen = self._features(model, pipeline, everything, None, comm)  # (N, D), every rank gets all rows
            stats = fit_task_stats(frozen, torch.from_numpy(everything.labels), seed=s.seed).to_tensors()
            zero_shot_metrics = {"val": None, "test": None}
            if has_val:
                val_rows = frozen[len(task.train) :]
                zero_shot_metrics["val"] = _accuracy(val_rows @ zero_shot.cpu().T, task.val.labels)
            if task.test is not None:
                zero_shot_metrics["test"] = self._accuracy(model, pipeline, task.test, zero_shot, None, comm)
            fingerprint_seconds = time.perf_counter() - started
            say("fingerprint of %d images and zero-shot evaluation: %.1f s", len(everything), fingerprint_seconds)

        # -- the new task's prompts: the only trainable tensors
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s.seed)
            model.add_task(task.name, self.prompt_config())
        if s.key_init is None and state is None:
            self._init_keys(model, task, pipeline, tokens_for(backbone, names, templates))
        model.set_trainable(task.name)
        keys = list(model.task_state(task.name))
        params = model.prompt_parameters(task.name)  # same order as task_state's keys
        assert len(keys) == len(params) and all(tuple(p.shape) == model.task_state(task.name)[k].shape for k, p in zip(keys, params))
        base_lr = self.applied_lr(model)
        optimizer = torch.optim.SGD(params, lr=base_lr, momentum=s.momentum, weight_decay=s.weight_decay)
        say(
            "task %s: %s trainable prompt parameters (depth %d, %d prefix tokens), %s frozen; %d train / %d val images, "
            "%d classes; SGD peak lr %.3g (lr %g at logit scale %s; this backbone's is %.1f)",
            task.name, f"{sum(p.numel() for p in params):,}", s.depth, s.n_prefix,
            f"{sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params):,}",
            len(task.train), len(task.val) if has_val else 0, len(names), base_lr, s.lr,
            s.lr_reference_logit_scale, float(model.logit_scale()),
        )

        if state is not None:
            _copy_into(params, [state.prompts[k] for k in keys])
            for key, param in zip(keys, params):
                if key in state.momentum:
                    optimizer.state[param]["momentum_buffer"] = state.momentum[key].to(param).clone()
            best = {k: v.clone() for k, v in state.best.items()}
            start_epoch, info = state.epoch, state.info
            history, train_seconds = list(info["history"]), info["train_seconds"]
            best_epoch, best_val = info["best_epoch"], info["best_val_accuracy"]
        else:
            _copy_into(params, [comm.broadcast(p.detach()) for p in params])  # identical start on every rank
            # epoch 0 (P_V = 0: the frozen answer) is a candidate too, so a task never ships worse than zero-shot on val
            best, start_epoch, history, train_seconds = model.task_state(task.name), 0, [], 0.0
            best_epoch, best_val = 0, zero_shot_metrics["val"]

        # -- the loop
        n_train = len(task.train)
        steps_per_epoch = math.ceil(n_train / s.batch_size)
        total_steps = s.epochs * steps_per_epoch
        tokens = tokens_for(backbone, names, templates).to(device)  # (C, T, L)
        scale = model.logit_scale()
        labels = torch.as_tensor(np.array(task.train.labels, dtype=np.int64))  # a copy: Ray hands out read-only arrays
        for epoch in range(start_epoch, s.epochs):
            started = time.perf_counter()
            order = np.random.default_rng([s.seed, epoch]).permutation(n_train)
            totals = torch.zeros(3, dtype=torch.float64)  # sum of loss, correct, images
            bar = _progress(steps_per_epoch, f"{task.name} epoch {epoch + 1}/{s.epochs}", run.progress and comm.is_main)
            for step in range(steps_per_epoch):
                global_step = epoch * steps_per_epoch + step
                lr = self._lr(global_step, total_steps, base_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                global_batch = order[step * s.batch_size : (step + 1) * s.batch_size]
                batch = global_batch[comm.rank :: comm.world_size]
                pixels = self._augmented(task.train.pixels[batch], len(global_batch), (s.seed, epoch, step), comm)
                optimizer.zero_grad(set_to_none=False)
                loss_value = 0.0
                if len(batch):
                    text = self._text_features(model, tokens, task.name, (s.seed, epoch, step))  # (C, D), prompted
                    images = pipeline.to_batch(pixels, device)
                    features = model.encode_image(images, tasks=task.name, normalize=True)  # (b, D), prompted
                    logits = scale * features @ text.T  # (b, C)
                    target = labels[batch].to(device)
                    loss = F.cross_entropy(logits, target)
                    loss.backward()
                    loss_value = loss.item()
                    correct = (logits.argmax(-1) == target).sum().item()
                    totals += torch.tensor([loss_value * len(batch), correct, len(batch)], dtype=torch.float64)
                self._average_gradients(params, len(batch), math.isfinite(loss_value), comm, epoch, step, lr)
                optimizer.step()
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.3g}", refresh=False)
            bar.close()
            totals = comm.all_reduce_sum(totals)
            train_seconds += time.perf_counter() - started
            val_accuracy = None
            if has_val:
                with torch.no_grad():
                    classifier = text_classifier(model, names, templates, task=task.name)
                val_accuracy = self._accuracy(model, pipeline, task.val, classifier, task.name, comm)
            if not has_val or best_val is None or val_accuracy > best_val:
                best, best_epoch, best_val = model.task_state(task.name), epoch + 1, val_accuracy
            record = {
                "epoch": epoch + 1,
                "train_loss": totals[0].item() / max(totals[2].item(), 1),
                "train_accuracy": totals[1].item() / max(totals[2].item(), 1),
                "val_accuracy": val_accuracy,
                "lr": lr,
                "seconds": time.perf_counter() - started,
            }
            history.append(record)
            say(
                "%s epoch %d/%d  loss %.4f  train acc %.1f%%  val acc %s  (best %s @ epoch %d)  lr %.3g  %.1f s",
                task.name, epoch + 1, s.epochs, record["train_loss"], 100 * record["train_accuracy"], _pct(val_accuracy),
                _pct(best_val), best_epoch, lr, record["seconds"],
            )

            def snapshot(epoch=epoch) -> TrainState:
                info = {
                    "identity": identity, "recipe": recipe, "history": history, "best_epoch": best_epoch,
                    "best_val_accuracy": best_val, "train_seconds": train_seconds,
                    "fingerprint_seconds": fingerprint_seconds, "zero_shot": zero_shot_metrics,
                }
                momentum = {k: optimizer.state[p]["momentum_buffer"] for k, p in zip(keys, params)
                            if optimizer.state.get(p, {}).get("momentum_buffer") is not None}
                return TrainState(epoch + 1, info, model.task_state(task.name), best, momentum, stats)

            if run.checkpoints is not None:
                run.checkpoints.save(epoch + 1, snapshot, record)
            if run.stop_after_epoch == epoch + 1 and epoch + 1 < s.epochs:
                raise TrainingStopped(epoch + 1)

        # -- evaluate the kept epoch
        _copy_into(params, [best[k] for k in keys])
        model.set_trainable(None)
        with torch.no_grad():
            classifier = text_classifier(model, names, templates, task=task.name)
        test_accuracy = self._accuracy(model, pipeline, task.test, classifier, task.name, comm) if task.test is not None else None
        last = history[-1]
        metrics = {
            "val_accuracy": best_val,
            "val_zero_shot_accuracy": zero_shot_metrics["val"],
            "test_accuracy": test_accuracy,
            "test_zero_shot_accuracy": zero_shot_metrics["test"],
            "best_epoch": best_epoch,
            "epochs": s.epochs,
            "peak_lr_applied": base_lr,
            "train_loss": last["train_loss"],
            "train_accuracy": last["train_accuracy"],
            "train_seconds": round(train_seconds, 3),
            "fingerprint_seconds": round(fingerprint_seconds, 3),
            "n_train": len(task.train),
            "n_val": len(task.val) if has_val else 0,
            "n_test": len(task.test) if task.test is not None else 0,
            "resumed_after_epoch": state.epoch if state is not None else None,
            "history": history,
            **run.extra_metrics,
        }
        say(
            "%s: kept epoch %d; val acc %s (frozen zero-shot %s); test acc %s (frozen zero-shot %s)",
            task.name, best_epoch, _pct(best_val), _pct(zero_shot_metrics["val"]), _pct(test_accuracy), _pct(zero_shot_metrics["test"]),
        )
        return TaskArtifact(
            name=task.name,
            kind=self.kind,
            class_names=list(names),
            templates=list(templates),
            backbone=backbone.fingerprint.to_dict(),
            recipe=recipe,
            metrics=metrics,
            prompts=model.task_state(task.name),
            stats=stats,
        )

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
        return F.normalize(features.view(n_classes, n_templates, -1).mean(1), dim=-1)

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
        return sharded_features(model, pipeline, images, self.settings.eval_batch_size, comm, task)

    @torch.no_grad()
    def _accuracy(self, model, pipeline, images: ImageSet, classifier: torch.Tensor, task: str | None, comm: Comm) -> float:
        """Top-1 accuracy within the task's classes; ranks split the images and sum their counts."""
        shard = np.arange(len(images))[comm.rank :: comm.world_size]
        correct = 0
        for start in range(0, len(shard), self.settings.eval_batch_size):
            chunk = shard[start : start + self.settings.eval_batch_size]
            batch = pipeline.to_batch(images.pixels[chunk], model.backbone.device)
            features = model.encode_image(batch, tasks=task, normalize=True)
            predicted = (features @ classifier.T).argmax(-1).cpu().numpy()
            correct += int((predicted == images.labels[chunk]).sum())
        counts = comm.all_reduce_sum(torch.tensor([correct, len(shard)], dtype=torch.float64))
        return counts[0].item() / max(counts[1].item(), 1)


# ---------------------------------------------------------------- helpers
def tokens_for(backbone: Backbone, names: list[str], templates: list[str]) -> torch.Tensor:
    """(C, T, L) tokens of every class name in every template."""
    return backbone.tokenizer([t.format(n) for n in names for t in templates]).view(len(names), len(templates), -1)


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


def _accuracy(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float((logits.argmax(-1).numpy() == labels).mean()) if len(labels) else 0.0


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, disable=not enabled, leave=False,
                mininterval=0.5 if tty else 30, dynamic_ncols=True)
