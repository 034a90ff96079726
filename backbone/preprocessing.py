"""The backbone's eval transform on images: per image for a batch now, or split so the decoded pixels can be cached.

`images_to_batch` runs open_clip's `preprocess` on each image. `PixelPipeline` splits the same transform at its
`ToTensor`: `pixels` (resize, crop, RGB: once per image, kept as uint8, 4x less memory than float tensors) and
`to_batch` (ToTensor's /255 and Normalize, per batch). Both give the same tensor, bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch
from PIL import Image


def images_to_batch(images: Iterable[np.ndarray | Image.Image], preprocess: Callable) -> torch.Tensor:
    """uint8 HWC arrays or PIL images -> (N, 3, H, W) through open_clip's eval transform."""
    pil = (im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images)
    return torch.stack([preprocess(im.convert("RGB")) for im in pil])


class PixelPipeline:
    """open_clip's eval transform split at ToTensor: `pixels` (PIL part, once per image) and `to_batch` (per batch).

    `to_batch(stack of pixels(img))` equals `stack(preprocess(img))` bit for bit. A transform without a ToTensor step
    cannot be split; then `pixels` returns the full float tensor and `to_batch` only stacks.
    """

    def __init__(self, preprocess: Callable):
        from torchvision.transforms import Compose, ToTensor

        steps = list(getattr(preprocess, "transforms", []))
        cut = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
        self.split = cut is not None
        self.pil_part = Compose(steps[:cut]) if self.split else preprocess
        self.tensor_part = Compose(steps[cut + 1 :]) if self.split else None

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) uint8 after resize/crop (or float32 after the whole transform when it cannot be split)."""
        if not self.split:
            return self.pil_part(image.convert("RGB")).numpy()
        out = self.pil_part(image.convert("RGB"))
        if not isinstance(out, Image.Image):
            raise TypeError(f"the transform before ToTensor returned {type(out).__name__}, not a PIL image")
        return np.ascontiguousarray(np.asarray(out.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1))

    def to_batch(self, pixels: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
        """(B, 3, H, W) float model input."""
        if not pixels.flags.writeable:  # a view of Ray's read-only object store: torch wants its own copy
            pixels = pixels.copy()
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(device)
        if not self.split:
            return x
        return self.tensor_part(x.to(torch.get_default_dtype()).div(255))  # exactly what ToTensor does to uint8
