"""The image-text prompt learner with task-identity inference (an alternative to keepclip's residual prompts).

Per task: deep visual prompt tokens and learned text context (backbone/token_prompts.py), trained with cross-entropy
over the task's classes, the backbone frozen; plus class-wise statistics of the task's frozen image features (class
means and one shrunk covariance per task; no images are kept). At inference a task-identity head, trained only on
features sampled from every learned task's statistics, predicts each image's task from its frozen feature; that
task's prompts are then applied. The idea combines S-Prompts (Wang et al., NeurIPS 2022: per-domain image and text
prompts, domain picked per image) with HiDe-Prompt's task-identity head trained on class-wise feature statistics
(Wang et al., NeurIPS 2023).

    learner = ImageTextPromptLearner()
    artifact = learner.fit(task, backbone)          # kind "image-text-prompts"; publish it like any artifact
    head = TaskIdentityHead.fit([stats_a, stats_b]) # backbone/task_identity.py: after each new task, from every
                                                    # task's stored statistics (artifact.stats)
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from backbone import Backbone, PixelPipeline
from backbone.task_stats import fit_task_stats, ledoit_wolf
from backbone.token_prompts import KIND, TokenPromptConfig, TokenPrompts, applied, class_text, class_tokens
from prompts_store import TaskArtifact

from .features import eval_batch
from .learner import RunContext, TaskData, _progress, _pct

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageTextPromptSettings:
    visual_tokens: int = 8
    visual_depth: int = 12
    text_context: int = 4
    epochs: int = 10
    lr: float = 0.01  # AdamW, cosine per step
    batch_size: int = 128
    seed: int = 0
    eval_batch_size: int | None = None  # training.features.eval_batch: by device

    def prompt_config(self) -> TokenPromptConfig:
        return TokenPromptConfig(self.visual_tokens, self.visual_depth, self.text_context)


class ImageTextPromptLearner:
    kind = KIND

    def __init__(self, settings: ImageTextPromptSettings | None = None):
        self.settings = settings or ImageTextPromptSettings()

    def recipe(self, task: TaskData) -> dict:
        return {"learner": self.kind, **asdict(self.settings), "prompts": self.settings.prompt_config().to_dict(),
                "selection": "best validation epoch" if task.val is not None else "last epoch",
                "stats": "class means and one Ledoit-Wolf covariance of the L2-normalised frozen image features, and the router's fingerprint"}

    def fit(self, task: TaskData, backbone: Backbone, run: RunContext | None = None) -> TaskArtifact:
        s, run = self.settings, run or RunContext()
        clip, pipeline = backbone.model, PixelPipeline(backbone.preprocess)
        stats = class_statistics(self._frozen(backbone, task), task)
        prompts = TokenPrompts(clip, backbone.tokenizer, s.prompt_config(), seed=s.seed).to(backbone.device)
        tokens = class_tokens(backbone.tokenizer, task.class_names, s.prompt_config()).to(backbone.device)
        optimizer = torch.optim.AdamW(prompts.parameters(), lr=s.lr, weight_decay=0.0)  # the two kinds of tokens get gradients of very different scales
        n, scale = len(task.train), clip.logit_scale.exp().detach()
        steps = s.epochs * math.ceil(n / s.batch_size)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
        labels = torch.as_tensor(np.array(task.train.labels, dtype=np.int64))
        best, best_val, best_epoch, history, started = prompts.state(), -1.0, 0, [], time.perf_counter()
        bar = _progress(steps, f"{task.name} image-text prompts", run.progress)
        for epoch in range(s.epochs):
            order = np.random.default_rng([s.seed, epoch]).permutation(n)
            for start in range(0, n, s.batch_size):
                batch = order[start : start + s.batch_size]
                with applied(clip, prompts):
                    text = F.normalize(clip.encode_text(tokens), dim=-1)
                    feats = F.normalize(clip.encode_image(pipeline.to_batch(task.train.pixels[batch], backbone.device)), dim=-1)
                loss = F.cross_entropy(scale * feats @ text.T, labels[batch].to(feats.device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update(1)
            val = self.accuracy(backbone, prompts, task.val, task.class_names) if task.val is not None else None
            history.append({"epoch": epoch + 1, "loss": loss.item(), "val_accuracy": val})
            if val is None or val > best_val:
                best, best_val, best_epoch = prompts.state(), (val if val is not None else best_val), epoch + 1
            log.info("%s epoch %d/%d  loss %.4f  val acc %s", task.name, epoch + 1, s.epochs, loss.item(), _pct(val))
        bar.close()
        prompts.load(best)
        test = self.accuracy(backbone, prompts, task.test, task.class_names) if task.test is not None else None
        metrics = {"val_accuracy": best_val if task.val is not None else None, "test_accuracy": test, "best_epoch": best_epoch,
                   "train_seconds": round(time.perf_counter() - started, 3), "n_train": n, "history": history}
        return TaskArtifact(name=task.name, kind=self.kind, class_names=list(task.class_names), templates=list(task.templates),
                            backbone=backbone.fingerprint.to_dict(), recipe=self.recipe(task), metrics=metrics,
                            prompts=best, stats=stats)

    @torch.no_grad()
    def accuracy(self, backbone: Backbone, prompts: TokenPrompts, images, class_names: list[str]) -> float:
        predicted = classify(backbone, prompts, images.pixels, class_names, eval_batch(self.settings.eval_batch_size, backbone.device))
        return float((predicted == images.labels).mean())

    def _frozen(self, backbone: Backbone, task: TaskData) -> tuple[torch.Tensor, np.ndarray]:
        splits, batch = [s for s in (task.train, task.val) if s is not None and len(s)], eval_batch(self.settings.eval_batch_size, backbone.device)
        return torch.cat([prompted_images(backbone, None, s.pixels, batch) for s in splits]), np.concatenate([s.labels for s in splits])


@torch.no_grad()
def prompted_images(backbone: Backbone, prompts: TokenPrompts | None, pixels: np.ndarray, batch: int = 256) -> torch.Tensor:
    """(N, D) normalised image features with the task's visual tokens, or frozen with `prompts=None` (pixels as
    PixelPipeline.pixels gives them)."""
    pipeline = PixelPipeline(backbone.preprocess)
    with applied(backbone.model, prompts):
        return torch.cat([F.normalize(backbone.model.encode_image(pipeline.to_batch(pixels[i : i + batch], backbone.device)), dim=-1).float().cpu()
                          for i in range(0, len(pixels), batch)]) if len(pixels) else torch.zeros(0, backbone.model.visual.output_dim)


def classify(backbone, prompts, pixels, class_names, batch=256) -> np.ndarray:
    text = class_text(backbone, prompts, class_names).float().cpu()
    return (prompted_images(backbone, prompts, pixels, batch) @ text.T).argmax(-1).numpy()


# ----------------------------------------------------------------------------------------- task identity
def class_statistics(frozen: tuple[torch.Tensor, np.ndarray], task: TaskData) -> dict[str, torch.Tensor]:
    """Class means (C, D) and one shrunk covariance (D, D) of the centred, L2-normalised frozen features."""
    feats, labels = frozen
    f = F.normalize(feats.double(), dim=-1)
    y = torch.as_tensor(labels)
    means = torch.stack([f[y == c].mean(0) for c in range(len(task.class_names))])
    covariance, _ = ledoit_wolf(f - means[y])
    # plus the router's fingerprint: the service routes such a task like any other, gate and zero-shot check included
    return {"class_means": means.float().contiguous(), "covariance": covariance.float().contiguous(),
            "class_counts": torch.bincount(y, minlength=len(task.class_names)), **fit_task_stats(f, y).to_tensors()}
