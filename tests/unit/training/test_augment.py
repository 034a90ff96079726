"""Training-time random crops (`--augment random-crop`): boxes inside the image at the asked scale, the same crops
whatever the number of data-parallel workers, and an add-task run that records them in its recipe."""
import numpy as np

from prompts_store import open_store
from tests.unit.training.helpers import tiny_args, write_npz
from training.augment import crop_boxes, random_resized_crop
from training.comm import Comm
from training.learner import ResidualPromptLearner
from training.settings import ResidualPromptSettings


def test_boxes_lie_inside_the_image_at_the_asked_scale():
    boxes = crop_boxes(2000, 64, 48, (0.5, 1.0), np.random.default_rng(0))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 64).all() and (left + w <= 48).all()
    area = h * w / (64 * 48)
    assert area.min() > 0.4 and area.max() <= 1.0 and area.mean() < 0.8  # clipping at the border shrinks a few
    assert np.array_equal(boxes, crop_boxes(2000, 64, 48, (0.5, 1.0), np.random.default_rng(0)))


def test_a_crop_is_resized_back_and_the_full_box_is_the_identity():
    pixels = np.random.default_rng(1).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    whole = np.array([[0, 0, 16, 16]] * 3)
    assert np.array_equal(random_resized_crop(pixels, whole), pixels)
    corner = random_resized_crop(pixels, np.array([[0, 0, 8, 8]] * 3))
    assert corner.shape == pixels.shape and corner.dtype == np.uint8 and not np.array_equal(corner, pixels)


class Rank(Comm):
    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


def test_every_worker_crops_its_share_as_one_process_would():
    learner = ResidualPromptLearner(ResidualPromptSettings(augment="random-crop", batch_size=8))
    pixels = np.random.default_rng(2).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    alone = learner._augmented(pixels, 8, (0, 3, 1), Comm())
    for world in (2, 3):
        for rank in range(world):
            share = learner._augmented(pixels[rank::world], 8, (0, 3, 1), Rank(rank, world))
            assert np.array_equal(share, alone[rank::world])
    assert not np.array_equal(alone, learner._augmented(pixels, 8, (0, 3, 2), Comm()))  # a new step, new crops
    assert ResidualPromptLearner()._augmented(pixels, 8, (0, 3, 1), Comm()) is pixels  # the default: none


def test_add_task_with_random_crops_records_them(paths, add_task):
    data = write_npz(paths.root / "colours.npz", per_class=8, classnames_beside=True)
    run = add_task(tiny_args("crops", data, paths.store, paths.checkpoints, "--augment", "random-crop", "--crop-scale", "0.6"))
    assert run.code == 0, run.err
    recipe = open_store(paths.store).get("crops").recipe
    assert recipe["augmentation"] == {"name": "random-resized-crop", "scale": [0.6, 1.0], "ratio": [0.75, 4 / 3], "flip": False}
    refused = add_task(tiny_args("crops2", data, paths.store, paths.checkpoints, "--crop-scale", "0"))
    assert refused.code == 2 and "--crop-scale must be in (0, 1], got 0.0" in refused.err
