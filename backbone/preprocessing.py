"""The backbone's eval transform on images: per image for a batch now, or split so the decoded pixels can be cached.

`images_to_batch` runs open_clip's `preprocess` on each image. `PixelPipeline` splits the same transform at its
`ToTensor`: `pixels` (resize, crop, RGB: once per image, kept as uint8, 4x less memory than float tensors) and
`to_batch` (ToTensor's /255 and Normalize, per batch). Both give the same tensor, bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112
SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa"})
WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image as 8-bit RGB, the way a viewer shows it; training and serving both read files through it.

    - EXIF orientation applied (a phone's portrait photo is stored sideways with a tag saying so; browsers turn it).
    - 16-bit grey scaled from its full range (the top 8 bits, as OpenCV and torchvision read such files): Pillow's
      `convert("RGB")` clips it at 255 instead, so a 16-bit sensor image comes out almost all white.
    - 32-bit integer and float grey (TIFF) have no fixed range: stretched from their own minimum to maximum.
    - Transparency laid over white, as Hugging Face's CLIP processors do (dropping the alpha channel would show
      whatever colour the transparent pixels happen to hold, often black).
    """
    if image.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
        image = ImageOps.exif_transpose(image)
    if image.mode in SIXTEEN_BIT_GREY:
        image = Image.fromarray((np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8), "L")
    elif image.mode in ("I", "F"):
        image = Image.fromarray(_stretched(np.array(image, dtype=np.float32)), "L")
    if has_alpha(image):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        shown = Image.new("RGB", image.size, WHITE)
        shown.paste(rgba, mask=rgba.getchannel("A"))  # blends by alpha, in place: no second RGBA image
        return shown
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image whole


MAX_ASPECT = 4.0  # a strip longer than this is cut to its central square before resizing


@dataclass(frozen=True)
class Reading:
    """How a file is read for one eval transform, the same in add-task and in the service.

    - `draft_size`: a JPEG may be decoded at 1/2, 1/4 or 1/8 scale by libjpeg (Pillow's `draft`) while both sides stay
      at least this (twice what the transform's leading Resize makes of the short side). A 12-megapixel photo reaches
      a 224-pixel input 2.7x faster (92-96 -> 34-35 ms here, `python -m bench.image_decode`), and the input moves by at
      most 2 grey levels (0.23 on average).
    - `crop_square`: the transform resizes the short side and centre-crops a square, so only an image's central square
      reaches the model. A strip longer than MAX_ASPECT times its width is cut to that square first: resized whole, a
      60000x2 strip would become 6.7 million x 224 pixels (4.5 GB).
    """

    draft_size: int | None = None
    crop_square: bool = False

    @classmethod
    def for_transform(cls, preprocess: Callable) -> "Reading":
        from torchvision.transforms import CenterCrop, Resize

        steps = list(getattr(preprocess, "transforms", []))
        if not steps or not isinstance(steps[0], Resize):
            return cls()
        size = steps[0].size
        size = [size] if isinstance(size, int) else list(size)
        if not size or not all(isinstance(x, int) and x > 0 for x in size):
            return cls()
        short_side_then_crop = len(size) == 1 and len(steps) > 1 and isinstance(steps[1], CenterCrop)
        return cls(2 * max(size), short_side_then_crop)

    def before_load(self, image: Image.Image) -> None:
        """An opened, not yet decoded file: a JPEG (MPO, the multi-picture JPEG of many cameras, too) decodes reduced."""
        from PIL.JpegImagePlugin import JpegImageFile

        if self.draft_size and isinstance(image, JpegImageFile):
            image.draft(None, (self.draft_size, self.draft_size))

    def after_rgb(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if not self.crop_square or max(w, h) <= MAX_ASPECT * min(w, h):
            return image
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        return image.crop((left, top, left + side, top + side))


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ALPHA_MODES or "transparency" in image.info


def conversion_cost(image: Image.Image) -> int:
    """How many decoded RGB images' worth of memory (3 bytes a pixel) decoding and `to_rgb` hold at most, judged from
    an opened image's header. Measured peaks over a 16-megapixel image: float grey 11.2 bytes a pixel, RGBA 9.0,
    16-bit grey 7.5, RGB 3.6."""
    if image.mode in ("I", "F"):
        return 4
    return 3 if image.mode in SIXTEEN_BIT_GREY or has_alpha(image) else 1


def _stretched(values: np.ndarray) -> np.ndarray:
    """float32 grey (this array is changed) -> uint8, its finite minimum to maximum onto 0..255, the rest 0."""
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(values.shape, np.uint8)
    low, high = values.min(where=finite, initial=np.inf), values.max(where=finite, initial=-np.inf)
    values -= low
    values *= 255 / (high - low) if high > low else 0.0
    values[~finite] = 0
    return np.rint(np.clip(values, 0, 255, out=values), out=values).astype(np.uint8)


def images_to_batch(images: Iterable[np.ndarray | Image.Image], preprocess: Callable) -> torch.Tensor:
    """uint8 HWC arrays or PIL images -> (N, 3, H, W) through open_clip's eval transform."""
    pil = (im if isinstance(im, Image.Image) else Image.fromarray(np.asarray(im, dtype=np.uint8)) for im in images)
    return torch.stack([preprocess(to_rgb(im)) for im in pil])


class PixelPipeline:
    """open_clip's eval transform split at ToTensor: `pixels` (PIL part, once per image) and `to_batch` (per batch).

    `to_batch(stack of pixels(img))` equals `stack(preprocess(img))` bit for bit. A transform without a ToTensor step
    cannot be split; then `pixels` returns the full float tensor and `to_batch` only stacks.
    """

    def __init__(self, preprocess: Callable):
        from torchvision.transforms import Compose, ToTensor

        self.reading = Reading.for_transform(preprocess)  # how a file is read for it (add-task and the service alike)

        steps = list(getattr(preprocess, "transforms", []))
        cut = next((i for i, step in enumerate(steps) if isinstance(step, ToTensor)), None)
        self.split = cut is not None
        self.pil_part = Compose(steps[:cut]) if self.split else preprocess
        self.tensor_part = Compose(steps[cut + 1 :]) if self.split else None

    def pixels(self, image: Image.Image) -> np.ndarray:
        """(3, H, W) uint8 after resize/crop (or float32 after the whole transform when it cannot be split)."""
        if not self.split:
            return self.pil_part(to_rgb(image)).numpy()
        out = self.pil_part(to_rgb(image))
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
