"""The task-identity head of the image-text prompt learner: which task an image belongs to, from its frozen feature.

A linear softmax over tasks, trained only on features sampled from each task's stored class Gaussians (class means
and one shared covariance per task, `training.image_text_prompts.class_statistics`), never on images: HiDe-Prompt's
task-identity inference (Wang et al., NeurIPS 2023). The benchmark and the service both use it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class TaskIdentityHead:
    """Linear softmax over tasks, trained on features sampled from each task's class Gaussians (no stored images)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor):
        self.weight, self.bias = weight, bias

    @classmethod
    def fit(cls, stats: list[dict[str, torch.Tensor]], samples_per_class: int = 64, steps: int = 300, lr: float = 0.05,
            seed: int = 0) -> "TaskIdentityHead":
        generator = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        for t, s in enumerate(stats):
            means, cov = s["class_means"].double(), s["covariance"].double()
            chol = torch.linalg.cholesky(cov + 1e-8 * torch.eye(cov.shape[0], dtype=cov.dtype))
            z = torch.randn(means.shape[0], samples_per_class, means.shape[1], generator=generator, dtype=torch.float64)
            xs.append(F.normalize((means[:, None, :] + z @ chol.T).reshape(-1, means.shape[1]), dim=-1).float())
            ys.append(torch.full((xs[-1].shape[0],), t))
        x, y = torch.cat(xs), torch.cat(ys)
        weight = torch.zeros(len(stats), x.shape[1], requires_grad=True)
        bias = torch.zeros(len(stats), requires_grad=True)
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        counts = torch.bincount(y).float()
        balance = counts.sum() / (len(stats) * counts)  # every task counts alike, whatever its number of classes
        for _ in range(steps):
            optimizer.zero_grad()
            F.cross_entropy(x @ (20 * weight).T + bias, y, weight=balance).backward()
            optimizer.step()
        return cls((20 * weight).detach(), bias.detach())

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(N,) task index per L2-normalised frozen image feature."""
        return (F.normalize(features.float(), dim=-1) @ self.weight.T + self.bias).argmax(-1)
