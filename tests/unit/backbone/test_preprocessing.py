"""The cached pixels of `PixelPipeline` are exactly the backbone's preprocess; `to_rgb` reads images as a viewer
shows them (EXIF orientation, 16-bit and float grey, transparency over white)."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from backbone import PixelPipeline
from backbone.preprocessing import Reading, to_rgb
from tests.conftest import tiny_backbone


@pytest.mark.parametrize("name", ["keepclip-tiny-a", "keepclip-tiny-b"])
def test_cached_pixels_give_exactly_the_backbones_preprocess(name):
    backbone = tiny_backbone(name)
    pipeline = PixelPipeline(backbone.preprocess)
    rng = np.random.default_rng(0)
    images = [  # sizes that need resizing and cropping, and every colour mode a user may hand in
        Image.fromarray(rng.integers(0, 256, (50, 37, 3), dtype=np.uint8)),
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8)),  # L
        Image.fromarray(rng.integers(0, 256, (64, 90, 4), dtype=np.uint8), "RGBA"),
    ]
    assert pipeline.split
    cached = np.stack([pipeline.pixels(im) for im in images])
    assert cached.dtype == np.uint8
    want = torch.stack([backbone.preprocess(to_rgb(im)) for im in images])
    assert torch.equal(pipeline.to_batch(cached), want)


def sixteen_bit_gradient(height: int = 40, width: int = 64) -> np.ndarray:
    return np.tile(np.linspace(0, 65535, width), (height, 1)).astype(np.uint16)


def saved(image: Image.Image, fmt: str, **options) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_sixteen_bit_grey_keeps_its_range_instead_of_turning_white():
    grey = sixteen_bit_gradient()
    opened = saved(Image.fromarray(grey), "PNG")
    assert opened.mode == "I;16"
    assert np.asarray(opened.convert("RGB")).mean() > 250  # what Pillow alone gives: clipped at 255
    rgb = np.asarray(to_rgb(opened))
    assert rgb.shape == (40, 64, 3) and (rgb[..., 0] == rgb[..., 2]).all()
    assert np.array_equal(rgb[..., 0], (grey >> 8).astype(np.uint8))  # the top 8 bits, as OpenCV reads it


def test_float_and_32_bit_grey_are_stretched_from_their_own_range():
    values = np.linspace(0.25, 0.75, 64 * 8, dtype=np.float32).reshape(8, 64)
    values[0, 0] = np.nan  # not a number: black, and no effect on the range
    rgb = np.asarray(to_rgb(saved(Image.fromarray(values, "F"), "TIFF")))
    assert rgb[0, 0, 0] == 0 and rgb[0, 1, 0] < 2 and rgb[-1, -1, 0] == 255
    wide = np.asarray(to_rgb(Image.fromarray(np.arange(-500, 524, dtype=np.int32).reshape(16, 64), "I")))
    assert wide.min() == 0 and wide.max() == 255


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo():
    upright = np.zeros((30, 50, 3), np.uint8)
    upright[:10, :, 0] = 255  # a red band on top
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright, 1)))  # a camera stores it turned, 50 x 30
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    photo = saved(stored, "PNG", exif=exif.tobytes())
    assert photo.size == (30, 50)
    shown = np.asarray(to_rgb(photo))
    assert shown.shape == (30, 50, 3) and np.array_equal(shown, upright)
    assert to_rgb(Image.fromarray(upright)).size == (50, 30)  # no tag: as stored


def test_transparency_is_laid_over_white():
    rgba = np.zeros((4, 6, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, but fully transparent on the left half and half transparent on the right
    rgba[:, 3:, 3] = 128
    shown = np.asarray(to_rgb(saved(Image.fromarray(rgba, "RGBA"), "PNG")))
    assert (shown[:, :3] == 255).all()  # white, not the black (or red) the dropped alpha would leave
    assert (shown[:, 3:] == (255, 127, 127)).all()
    palette = Image.new("P", (4, 4))
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(saved(palette, "PNG"))).min() == 255


def test_a_jpeg_decoded_at_reduced_scale_gives_nearly_the_same_model_input():
    """Twice the transform's resize is kept, so the reduced decode moves the model's input pixels by a few grey levels
    at most; PNG and small JPEGs are decoded whole."""
    import open_clip
    from torchvision.transforms import CenterCrop, Compose, Resize

    preprocess = open_clip.image_transform(224, is_train=False)
    assert Reading.for_transform(preprocess) == Reading(draft_size=448, crop_square=True)
    tiny = tiny_backbone().preprocess
    assert Reading.for_transform(tiny) == Reading(2 * tiny.transforms[0].size, True)
    assert Reading.for_transform(Compose([CenterCrop(224)])) == Reading() == Reading.for_transform(lambda im: im)
    assert Reading.for_transform(Compose([Resize((224, 160))])) == Reading(448, False)  # squashed: every pixel counts
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((3200, 2400), Image.BICUBIC)
    data = io.BytesIO()
    smooth.save(data, "JPEG", quality=92)
    pipeline = PixelPipeline(preprocess)
    whole, reduced = Image.open(io.BytesIO(data.getvalue())), Image.open(io.BytesIO(data.getvalue()))
    pipeline.reading.before_load(reduced)
    assert reduced.size == (800, 600) and whole.size == (3200, 2400)  # 1/4: both sides still >= 448
    moved = np.abs(pipeline.pixels(whole).astype(int) - pipeline.pixels(reduced).astype(int))
    assert moved.max() <= 4 and moved.mean() < 0.5, (moved.max(), moved.mean())
    mpo = io.BytesIO()  # a camera's multi-picture JPEG: the first picture is decoded reduced as well
    smooth.save(mpo, "MPO", save_all=True, append_images=[smooth.rotate(180)])
    camera = Image.open(io.BytesIO(mpo.getvalue()))
    pipeline.reading.before_load(camera)
    assert camera.format == "MPO" and camera.size == (800, 600)
    png = io.BytesIO()
    smooth.save(png, "PNG")
    other = Image.open(io.BytesIO(png.getvalue()))
    pipeline.reading.before_load(other)
    assert other.size == (3200, 2400)
