"""Prompts placed in the last blocks of each tower, and the image tower resumed from the blocks below them."""
from __future__ import annotations

import pytest
import torch

from backbone import PromptConfig, PromptedCLIP
from tests.conftest import randomize_prompts, tiny_backbone

IMAGES = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture
def model() -> PromptedCLIP:
    return PromptedCLIP(tiny_backbone())


def test_output_placement_prompts_the_last_blocks_of_each_tower(model):
    model.add_task("top", PromptConfig(depth=2, n_prefix=4, placement="output"))
    assert sorted(model.task_state("top")) == sorted(f"{t}.{l}.{k}" for t in ("visual", "text") for l in (1, 2) for k in ("key", "value"))
    model.add_task("bottom", PromptConfig(depth=2, n_prefix=4))
    assert {k.split(".")[1] for k in model.task_state("bottom")} == {"0", "1"}


def test_the_placement_is_part_of_the_recipe_and_old_recipes_mean_input():
    config = PromptConfig(depth=3, placement="output")
    assert PromptConfig.from_dict(config.to_dict()) == config
    assert PromptConfig.from_dict({"depth": 3, "n_prefix": 8, "key_init": 0.02}).placement == "input"
    with pytest.raises(ValueError, match="placement must be one of input, output"):
        PromptConfig(placement="middle")


def test_the_lowest_prompted_block_is_what_every_loaded_task_leaves_frozen(model):
    assert model.first_prompted_block() == 3  # no task: the whole tower is shared
    model.add_task("top", PromptConfig(depth=1, placement="output"))
    assert model.first_prompted_block() == 2
    model.add_task("bottom", PromptConfig(depth=1))
    assert model.first_prompted_block() == 0
    model.delete_task("bottom")
    assert model.first_prompted_block() == 2


@torch.no_grad()
def test_resuming_from_the_shared_blocks_gives_the_whole_pass(model):
    model.add_task("a", PromptConfig(depth=2, n_prefix=4, placement="output"))
    model.add_task("b", PromptConfig(depth=1, n_prefix=4, placement="output"))
    randomize_prompts(model, "a", seed=1)
    randomize_prompts(model, "b", seed=2)
    block = model.first_prompted_block()
    assert model.can_resume() and block == 1
    frozen, kept = model.encode_image_keeping(IMAGES, block, normalize=True)
    assert torch.equal(frozen, model.encode_image(IMAGES, normalize=True))  # the same ops: bit for bit
    tasks, weights = ["a", None, "b", "a", "b"], [1.0, 1.0, 0.5, 0.0, 1.0]
    resumed = model.encode_image_from(kept, block, tasks, weights, normalize=True)
    whole = model.encode_image(IMAGES, tasks=tasks, weights=weights, normalize=True)
    assert torch.allclose(resumed, whole, atol=1e-6)
    assert torch.equal(resumed[1], frozen[1]) and torch.equal(resumed[3], frozen[3])  # no task, w = 0: frozen bits


@torch.no_grad()
@pytest.mark.parametrize("depths", [(2, 1), (3, 3)], ids=["shared-bottom", "whole-tower"])
def test_the_last_block_at_the_pooled_token_alone_gives_the_whole_pass(model, depths):
    for name, depth, seed in zip("ab", depths, (1, 2)):
        model.add_task(name, PromptConfig(depth=depth, n_prefix=4, placement="output"))
        randomize_prompts(model, name, seed=seed)
    block = model.first_prompted_block()
    assert model.pools_first_token()
    provisional, kept, last = model.encode_image_pooled(IMAGES, block, normalize=True)
    frozen = model.encode_image(IMAGES, normalize=True)
    assert torch.allclose(provisional, frozen, atol=1e-6)
    assert torch.equal(model.finish_frozen(last, normalize=True), frozen)  # the whole last block: the same bits
    for tasks in (["a", None, "b", "a", "b"], ["b"] * 5):  # a mixed batch (frozen module + delta); all fused
        weights = [1.0, 1.0, 0.5, 0.0, 1.0]
        pooled = model.encode_image_from(kept, block, tasks, weights, normalize=True, pooled=True)
        assert torch.allclose(pooled, model.encode_image(IMAGES, tasks=tasks, weights=weights, normalize=True), atol=1e-6)


def test_a_task_prompting_below_the_resume_point_is_refused(model):
    model.add_task("bottom", PromptConfig(depth=1))
    _, kept = model.encode_image_keeping(IMAGES, 1)
    with pytest.raises(ValueError, match="task 'bottom' prompts image blocks below 1"):
        model.encode_image_from(kept, 1, ["bottom"] * len(IMAGES))


def test_training_through_the_pooled_last_block_gets_the_same_gradients(model):
    model.add_task("a", PromptConfig(depth=2, n_prefix=4, placement="output"))
    randomize_prompts(model, "a", seed=1)
    model.set_trainable("a")
    target = torch.randn(len(IMAGES), model.clip.visual.output_dim, generator=torch.Generator().manual_seed(4))

    def grads(pooled: bool) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        features = model.encode_image(IMAGES, tasks="a", normalize=True, pooled=pooled)
        (features * target).sum().backward()
        return [p.grad.clone() for p in model.prompt_parameters("a") if p.grad is not None]

    whole, pooled = grads(False), grads(True)
    assert len(pooled) == len(whole) == 4  # keys and values of both prompted image blocks
    for got, want in zip(pooled, whole):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
