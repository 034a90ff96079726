"""Continual pretraining of both towers with a compatible momentum model and topology preservation.

Each task's images are paired with captions made from their class names and the task's templates, and both towers
are trained with CLIP's symmetric contrastive loss, plus a KL term that keeps the in-batch image-image, text-text and
image-text similarity distributions close to those of the previous task's model (topology preservation). After each
step a momentum model takes `m <- 0.9 m + 0.05 current + 0.05 previous`: it moves with the current model but stays
compatible with the previous task's embedding space. The momentum model is the one evaluated and served, and the
next task starts from it. The idea follows CTP (Zhu et al., "CTP: Towards Vision-Language Continual Pretraining via
Compatible Momentum Contrast and Topology Preservation", ICCV 2023).

Unlike keepclip this changes the backbone itself: zero-shot ability on unseen tasks is only protected by the KL term.
After each task the momentum model's weights can go through the task store as an artifact of kind
"continual-pretraining" (`artifact`, then `load` to continue from it): checksummed and versioned like any task, but
not servable, since it replaces the backbone rather than plugging into it.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backbone import PixelPipeline
from prompts_store import TaskArtifact

from .errors import InputError
from .learner import TaskData, _progress, tokens_for

KIND = "continual-pretraining"


@dataclass(frozen=True)
class ContinualPretrainingSettings:
    epochs: int = 2
    lr: float = 1e-4
    weight_decay: float = 0.1
    batch_size: int = 64
    warmup_steps: int = 10
    momentum: tuple[float, float, float] = (0.9, 0.05, 0.05)  # momentum model, current model, previous task's model
    topology_weight: float = 1.0
    seed: int = 0


@torch.no_grad()
def compatible_momentum_update(momentum: torch.nn.Module, current: torch.nn.Module, previous: torch.nn.Module,
                               weights: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> None:
    """In place: every floating-point parameter and buffer m <- a m + b current + c previous."""
    a, b, c = weights
    for m, x, p in zip(_tensors(momentum), _tensors(current), _tensors(previous)):
        if m.is_floating_point():
            m.mul_(a).add_(x, alpha=b).add_(p, alpha=c)


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def symmetric_contrastive(images: torch.Tensor, texts: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss over a batch of normalised (image, caption) pairs."""
    logits = scale * images @ texts.T
    target = torch.arange(len(images), device=images.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def topology_kl(images: torch.Tensor, texts: torch.Tensor, old_images: torch.Tensor, old_texts: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """KL(previous || current) of the row-wise in-batch similarity distributions: image-image, text-text, image-text."""
    total = images.new_zeros(())
    for new, old in ((images @ images.T, old_images @ old_images.T), (texts @ texts.T, old_texts @ old_texts.T),
                     (images @ texts.T, old_images @ old_texts.T)):
        total = total + F.kl_div(F.log_softmax(scale * new, -1), F.log_softmax(scale * old, -1), log_target=True,
                                 reduction="batchmean")
    return total


class ContinualPretrainer:
    """Holds the three models (current, previous task's, momentum) of one open_clip CLIP across a task sequence."""

    def __init__(self, backbone, settings: ContinualPretrainingSettings | None = None):
        self.backbone, self.settings = backbone, settings or ContinualPretrainingSettings()
        self.momentum_model = backbone.model  # what is evaluated: starts as the pretrained model
        self.pipeline = PixelPipeline(backbone.preprocess)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.momentum_model.parameters())

    def learn(self, task: TaskData, progress: bool = True) -> float:
        """Train on the task's image-caption pairs; returns seconds. Afterwards `momentum_model` is the new model."""
        s, started = self.settings, time.perf_counter()
        previous = copy.deepcopy(self.momentum_model).eval().requires_grad_(False)
        current = copy.deepcopy(self.momentum_model).eval().requires_grad_(True)
        momentum = self.momentum_model.requires_grad_(False)
        optimizer = torch.optim.AdamW(current.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        n = len(task.train)
        steps = s.epochs * math.ceil(n / s.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / max(1, s.warmup_steps))
                                                     * 0.5 * (1 + math.cos(math.pi * i / steps)))
        captions = tokens_for(self.backbone, task.class_names, task.templates)  # (C, T, L)
        scale = momentum.logit_scale.exp().detach()
        bar = _progress(steps, f"continual pretraining {task.name}", progress)
        for epoch in range(s.epochs):
            rng = np.random.default_rng([s.seed, epoch])
            order = rng.permutation(n)
            for start in range(0, n, s.batch_size):
                batch = order[start : start + s.batch_size]
                labels = torch.as_tensor(task.train.labels[batch])
                tokens = captions[labels, torch.as_tensor(rng.integers(len(task.templates), size=len(batch)))].to(self.backbone.device)
                images = self.pipeline.to_batch(task.train.pixels[batch], self.backbone.device)
                img, txt = current.encode_image(images, normalize=True), current.encode_text(tokens, normalize=True)
                with torch.no_grad():
                    old_img, old_txt = previous.encode_image(images, normalize=True), previous.encode_text(tokens, normalize=True)
                loss = symmetric_contrastive(img, txt, scale) + s.topology_weight * topology_kl(img, txt, old_img, old_txt, scale)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                compatible_momentum_update(momentum, current, previous, s.momentum)
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
        return time.perf_counter() - started

    def artifact(self, task: TaskData, seconds: float) -> TaskArtifact:
        """The momentum model after `task`: every floating-point tensor of its state dict (fp32), with the recipe."""
        weights = {k: v.detach().float().cpu().contiguous() for k, v in self.momentum_model.state_dict().items() if v.is_floating_point()}
        return TaskArtifact(name=task.name, kind=KIND, class_names=list(task.class_names), templates=list(task.templates),
                            backbone=self.backbone.fingerprint.to_dict(), recipe={"learner": KIND, **asdict(self.settings)},
                            metrics={"train_seconds": round(seconds, 3), "n_train": len(task.train)}, prompts=weights, stats={})

    @torch.no_grad()
    def load(self, artifact: TaskArtifact) -> None:
        """Make the momentum model the one `artifact` holds (e.g. read back from the store, to continue the sequence)."""
        state = self.momentum_model.state_dict()
        expected = {k for k, v in state.items() if v.is_floating_point()}
        if artifact.kind != KIND or set(artifact.prompts) != expected:
            raise InputError(f"task '{artifact.name}' is not a {KIND} checkpoint of this backbone "
                             f"(kind '{artifact.kind}', {len(set(artifact.prompts) ^ expected)} tensor names differ)")
        for key, value in artifact.prompts.items():
            if value.shape != state[key].shape:
                raise InputError(f"task '{artifact.name}': '{key}' is {tuple(value.shape)}, expected {tuple(state[key].shape)}")
            state[key].copy_(value)
