"""The cached pixels of `PixelPipeline` are exactly the backbone's preprocess."""
import numpy as np
import pytest
import torch
from PIL import Image

from backbone import PixelPipeline
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
    want = torch.stack([backbone.preprocess(im.convert("RGB")) for im in images])
    assert torch.equal(pipeline.to_batch(cached), want)
