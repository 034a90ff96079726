"""Untrusted image bytes -> a checked RGB PIL image; every failure is an `ApiError` with a 4xx status.

Checks, in order: empty body; base64 (for JSON bodies); the format is one of `FORMATS` (Pillow's other decoders,
some of which run external programs such as Ghostscript for EPS, are never reached); width and height > 0;
width x height <= the pixel limit, judged from the header before any pixel is decoded (decompression bombs);
the pixel data decodes completely (truncated files); conversion to RGB. The pixels being decoded at once in a process
are bounded (`PixelBudget`): a 116 KB PNG may claim 40 M pixels, and 40 such requests at once took a replica from
3.9 to 10.3 GiB (an outside trial); past the budget, decoders wait their turn.
"""
from __future__ import annotations

import base64
import binascii
import functools
import io
import re
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

from PIL import Image, UnidentifiedImageError

from backbone.preprocessing import Reading, conversion_cost, to_rgb

from .errors import ApiError

# Our own pixel limit (checked from the header) replaces Pillow's warning; Pillow's hard error (above twice
# Image.MAX_IMAGE_PIXELS) is still caught below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

_DATA_URL = re.compile(r"^data:[\w.+-]+/[\w.+-]+;base64,", re.I)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF", "PPM")  # JPEG includes multi-picture JPEGs (MPO)


def decode_base64(data: str, field: str = "image") -> bytes:
    if not isinstance(data, str) or not data.strip():
        raise ApiError(422, "invalid_image", f"'{field}' must be a non-empty base64 string")
    text = _DATA_URL.sub("", data.strip(), count=1)
    try:
        return base64.b64decode(re.sub(r"\s+", "", text), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", f"'{field}' is not valid base64") from None


class PixelBudget:
    """At most `limit` pixels held by decoders at once; `hold(n)` blocks until n more fit (an image over the whole
    budget waits until it is alone). `peak` is the most held at once."""

    def __init__(self, limit: int):
        self.limit, self.used, self.peak = int(limit), 0, 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        pixels = min(int(pixels), self.limit)
        with self._changed:
            self._changed.wait_for(lambda: self.used + pixels <= self.limit)
            self.used += pixels
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._changed:
                self.used -= pixels
                self._changed.notify_all()


def decoding_budget(settings) -> PixelBudget:
    """The replica's bound on pixels being decoded at once (ServiceSettings.max_decoding_pixels, else twice the
    per-image limit), shared by every request and the UI."""
    return _pixel_budget(settings.max_decoding_pixels or 2 * settings.max_image_pixels)


@functools.lru_cache(maxsize=8)
def _pixel_budget(limit: int) -> PixelBudget:
    return PixelBudget(limit)  # one per setting value in a process


def decode_image(data: bytes, max_pixels: int, field: str = "image", budget: PixelBudget | None = None,
                 then: Callable[[Image.Image], Any] = lambda im: im, reading: Reading = Reading()) -> Any:
    """The checked RGB image, passed to `then` (e.g. the model's preprocessing) while its pixels are held from `budget`;
    read for the model as add-task reads files (`reading`: the engine's)."""
    if not data:
        raise ApiError(422, "empty_image", f"'{field}' is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"'{field}' has more than {max_pixels} pixels") from None
    except UnidentifiedImageError:
        raise ApiError(422, "invalid_image", f"'{field}' is not an image in a format this service reads ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # a known format whose header is damaged or too large
        raise ApiError(422, "invalid_image", f"'{field}' has a header that cannot be read ({_reason(e)})") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ApiError(422, "empty_image", f"'{field}' has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ApiError(
            413, "image_too_large", f"'{field}' is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    reading.before_load(im)
    width, height = im.size  # what is decoded: a reduced JPEG holds 1/4 to 1/64 of the header's pixels
    with budget.hold(width * height * conversion_cost(im)) if budget is not None else nullcontext():
        return then(reading.after_rgb(_rgb(im, max_pixels, field)))


def _rgb(im: Image.Image, max_pixels: int, field: str) -> Image.Image:
    try:
        im.load()
        return to_rgb(im)
    except Image.DecompressionBombError:
        raise ApiError(413, "image_too_large", f"'{field}' has more than {max_pixels} pixels") from None
    except Exception as e:  # truncated or damaged data: Pillow raises OSError, SyntaxError, ValueError, ...
        raise ApiError(422, "invalid_image", f"'{field}' is truncated or damaged ({type(e).__name__})") from None


def _reason(error: Exception) -> str:
    """Pillow's own words (e.g. a compressed text chunk over its limit), cut short; they name no file or path."""
    text = " ".join(str(error).split())[:160]
    return text or type(error).__name__
