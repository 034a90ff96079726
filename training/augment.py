"""Training-time augmentation of the preprocessed uint8 pixels: a random resized crop, seeded per step.

No flips: a mirrored digit, letter or traffic sign can be another class. The crop parameters of a global batch are
drawn from one generator seeded with (seed, epoch, step), so every data-parallel rank crops its share of the batch as
one process would, and a resumed run repeats the same crops.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF


def crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], rng: np.random.Generator,
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> np.ndarray:
    """(n, 4) int boxes (top, left, h, w): area a uniform `scale` fraction of the image, log-uniform aspect `ratio`,
    clipped to fit (torchvision's RandomResizedCrop draws the same, with retries instead of clipping)."""
    area = rng.uniform(*scale, size=n) * height * width
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=n))
    h = np.clip(np.round(np.sqrt(area / aspect)), 1, height).astype(int)
    w = np.clip(np.round(np.sqrt(area * aspect)), 1, width).astype(int)
    top = (rng.random(n) * (height - h + 1)).astype(int)
    left = (rng.random(n) * (width - w + 1)).astype(int)
    return np.stack([top, left, h, w], 1)


def random_resized_crop(pixels: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) uint8 -> the same shape: each image's box resized back to H x W (bilinear, antialiased)."""
    height, width = pixels.shape[-2:]
    out = np.empty_like(pixels)
    for i, (top, left, h, w) in enumerate(boxes):
        crop = TF.resized_crop(torch.from_numpy(np.ascontiguousarray(pixels[i])), int(top), int(left), int(h), int(w),
                               [height, width], antialias=True)
        out[i] = crop.numpy()
    return out
