"""Untrusted image bytes: every failure is a 4xx ApiError, extreme aspect ratios are cropped before resizing."""
import io

import pytest
from PIL import Image

from service.errors import ApiError
from backbone.preprocessing import Reading
from service.images import decode_base64, decode_image


def encode(im: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def test_decodes_common_formats_to_rgb():
    for fmt, mode in (("PNG", "RGBA"), ("JPEG", "L"), ("GIF", "P"), ("BMP", "RGB"), ("WEBP", "RGB")):
        im = decode_image(encode(Image.new(mode, (20, 10)), fmt), max_pixels=1000)
        assert im.mode == "RGB" and im.size == (20, 10)


def test_sixteen_bit_and_rotated_uploads_decode_as_training_reads_them(tmp_path):
    """The service and add-task read a file through the same `to_rgb`: a 16-bit scan keeps its range (not white), a
    phone photo comes out upright."""
    import numpy as np

    from training.data import LabeledSource  # how add-task opens a file (a test may import both sides)

    grey = Image.fromarray(np.tile(np.linspace(0, 65535, 48), (16, 1)).astype(np.uint16))
    exif = Image.Exif()
    exif[0x0112] = 8  # rotate 90° counter-clockwise to view
    for name, image, options, size in (("grey.png", grey, {}, (48, 16)), ("photo.png", Image.new("RGB", (30, 20)), {"exif": exif.tobytes()}, (20, 30))):
        (tmp_path / name).write_bytes(encode_with(image, "PNG", **options))
        served = decode_image((tmp_path / name).read_bytes(), max_pixels=10_000)
        source = LabeledSource(tmp_path, "folder", ["x"], np.zeros(1, np.int64), ["x"], "test", files=[tmp_path / name])
        learned = source.open(0)
        assert served.size == learned.size == size and served.tobytes() == learned.tobytes(), name
    assert 100 < np.asarray(decode_image((tmp_path / "grey.png").read_bytes(), 10_000)).mean() < 150  # not white


def test_a_large_jpeg_is_decoded_reduced_and_as_training_reads_it(tmp_path):
    """A phone-sized JPEG upload decodes at a reduced scale (both sides still >= the draft size), through the same
    function add-task reads files with: the service and add-task give the same bytes, and a budget holds only the
    reduced pixels."""
    import numpy as np

    from service.images import PixelBudget
    from training.data import LabeledSource

    ramp = np.linspace(0, 255, 2000, dtype=np.float32)
    photo = np.stack([np.add.outer(ramp[:1500] / 2, ramp / 2), np.tile(ramp, (1500, 1)), np.tile(ramp[:1500, None], (1, 2000))], -1)
    (tmp_path / "photo.jpg").write_bytes(encode_with(Image.fromarray(photo.astype(np.uint8)), "JPEG", quality=90))
    budget = PixelBudget(10_000_000)
    served = decode_image((tmp_path / "photo.jpg").read_bytes(), max_pixels=10_000_000, budget=budget, reading=Reading(draft_size=448))
    assert served.size == (1000, 750) and budget.peak == 1000 * 750  # 1/2 scale: at 1/4, 375 < 448
    source = LabeledSource(tmp_path, "folder", ["x"], np.zeros(1, np.int64), ["x"], "test", files=[tmp_path / "photo.jpg"])
    assert source.open(0, reading=Reading(draft_size=448)).tobytes() == served.tobytes()
    assert decode_image((tmp_path / "photo.jpg").read_bytes(), max_pixels=10_000_000).size == (2000, 1500)  # no reading: whole
    with pytest.raises(ApiError) as e:  # the pixel limit is the header's, whatever the reduced decode would hold
        decode_image((tmp_path / "photo.jpg").read_bytes(), max_pixels=1_000_000, reading=Reading(draft_size=448))
    assert e.value.status_code == 413


def test_wide_pixel_formats_hold_more_of_the_decoding_budget():
    """Float grey widens to about 11 bytes a pixel on its way to RGB (4 RGB images' worth), images with alpha and
    16-bit grey 3, plain RGB 1: a request of small compressed float TIFFs cannot take 4x what the budget says."""
    import numpy as np

    from service.images import PixelBudget

    float_tiff = encode_with(Image.fromarray(np.zeros((10, 20), np.float32), "F"), "TIFF", compression="tiff_deflate")
    for data, cost in ((float_tiff, 4), (encode_with(Image.new("RGBA", (20, 10)), "PNG"), 3), (encode(Image.new("RGB", (20, 10))), 1)):
        budget = PixelBudget(10_000)
        assert decode_image(data, max_pixels=10_000, budget=budget).mode == "RGB"
        assert budget.peak == 200 * cost


def encode_with(im: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **options)
    return buf.getvalue()


@pytest.mark.parametrize(
    "data, status",
    [(b"", 422), (b"GIF89a", 422), (b"\x89PNG\r\n\x1a\n" + b"\0" * 30, 422), (b"hello", 422)],
)
def test_refusals(data, status):
    with pytest.raises(ApiError) as e:
        decode_image(data, max_pixels=1000)
    assert e.value.status_code == status


def test_a_readable_format_with_a_header_over_pillows_limits_says_so():
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("comment", "A" * 50_000_000, zip=True)  # 50 MB of text in a 50 KB file: over Pillow's MAX_TEXT_CHUNK
    with pytest.raises(ApiError) as e:
        decode_image(encode_with(Image.new("RGB", (8, 8)), "PNG", pnginfo=text), max_pixels=1000)
    assert e.value.status_code == 422
    assert "'image' has a header that cannot be read (Decompressed data too large for PngImagePlugin.MAX_TEXT_CHUNK)" in str(e.value)


def test_pixel_limit_is_checked_from_the_header():
    with pytest.raises(ApiError) as e:
        decode_image(encode(Image.new("RGB", (40, 30))), max_pixels=40 * 30 - 1)
    assert e.value.status_code == 413 and e.value.code == "image_too_large"


def test_base64_and_data_urls():
    assert decode_base64("data:image/png;base64,aGVs\nbG8=") == b"hello"
    for bad in ("", "   ", "a", "@@@@"):
        with pytest.raises(ApiError):
            decode_base64(bad)


def test_an_extreme_strip_is_cut_to_its_central_square_by_service_and_training_alike(tmp_path):
    """For a resize-then-centre-crop transform only the central square reaches the model: a 60000x2 strip is cut to
    it before resizing (resized whole it would be 6.7 million x 224 pixels), in the service and in add-task."""
    import numpy as np

    from training.data import LabeledSource

    square = Reading(draft_size=448, crop_square=True)
    strip = np.zeros((2, 60000, 3), np.uint8)
    strip[:, 29999:30001] = 255  # the central square is white
    (tmp_path / "strip.png").write_bytes(encode(Image.fromarray(strip)))
    served = decode_image((tmp_path / "strip.png").read_bytes(), max_pixels=10**6, reading=square)
    source = LabeledSource(tmp_path, "folder", ["x"], np.zeros(1, np.int64), ["x"], "test", files=[tmp_path / "strip.png"])
    arrays = LabeledSource(tmp_path, "npz", ["x"], np.zeros(1, np.int64), ["x"], "test", arrays=strip[None])
    assert served.size == source.open(0, reading=square).size == arrays.open(0, reading=square).size == (2, 2)
    assert np.asarray(served).min() == 255 and served.tobytes() == source.open(0, reading=square).tobytes()
    assert decode_image(encode(Image.new("RGB", (30, 10))), 1000, reading=square).size == (30, 10)  # 3:1 is kept whole
    assert decode_image(encode(Image.new("RGB", (1000, 10))), 10**4).size == (1000, 10)  # a transform that needs it all


def test_decoders_share_a_pixel_budget():
    """Eight 400x300 images decoded on eight threads with a budget of two images: never more than two at once, each
    held until `then` (the preprocessing) has finished with it."""
    import threading
    import time

    from service.images import PixelBudget

    budget, data, held = PixelBudget(2 * 400 * 300), encode(Image.new("RGB", (400, 300))), []

    def then(im):
        held.append(budget.used)
        time.sleep(0.05)  # while preprocessing, the image's pixels are still held
        return im.size

    results = []
    threads = [threading.Thread(target=lambda: results.append(decode_image(data, 10**6, "image", budget, then))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [(400, 300)] * 8
    assert budget.peak == 2 * 400 * 300 and max(held) <= budget.limit and budget.used == 0


def test_an_image_larger_than_the_budget_is_decoded_alone():
    from service.images import PixelBudget

    budget = PixelBudget(100)
    assert decode_image(encode(Image.new("RGB", (40, 30))), 10**6, "image", budget).size == (40, 30)
    assert budget.peak == 100 and budget.used == 0
