"""The frozen CLIP and the per-task residual attention prompts that plug into it."""
from .gate import Gate
from .loading import (
    Backbone,
    BackboneError,
    BackboneFingerprint,
    UnsupportedBackbone,
    WeightsUnavailable,
    load_backbone,
    sha256_file,
    sha256_tensors,
)
from .prompted_clip import PromptedCLIP, UnknownTask
from .prompts import PromptConfig, PromptedAttention
from .settings import BackboneSettings
from .task_stats import Gaussian, TaskStats, fit_task_stats
from .zeroshot import image_features, images_to_batch, text_classifier

__all__ = [
    "Backbone",
    "BackboneError",
    "BackboneFingerprint",
    "BackboneSettings",
    "Gate",
    "Gaussian",
    "PromptConfig",
    "PromptedAttention",
    "PromptedCLIP",
    "TaskStats",
    "UnknownTask",
    "UnsupportedBackbone",
    "WeightsUnavailable",
    "fit_task_stats",
    "image_features",
    "images_to_batch",
    "load_backbone",
    "sha256_file",
    "sha256_tensors",
    "text_classifier",
]
