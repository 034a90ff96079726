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
from .preprocessing import PixelPipeline, images_to_batch
from .prompted_clip import PromptedCLIP, UnknownTask
from .prompts import PromptConfig, PromptedAttention
from .settings import DEFAULT_TEMPLATES, BackboneSettings
from .task_stats import Gaussian, TaskStats, fit_task_stats
from .zeroshot import image_features, text_classifier, zero_shot_classifier

__all__ = [
    "DEFAULT_TEMPLATES",
    "Backbone",
    "BackboneError",
    "BackboneFingerprint",
    "BackboneSettings",
    "Gate",
    "Gaussian",
    "PixelPipeline",
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
    "zero_shot_classifier",
]
