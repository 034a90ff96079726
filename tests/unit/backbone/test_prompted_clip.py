"""Residual attention prompts: exactness at w = 0, per-sample routing, what training may touch, counts, state I/O."""
import copy

import pytest
import torch

from backbone import PromptConfig, PromptedAttention, PromptedCLIP, UnknownTask
from tests.conftest import random_images, randomize_prompts, tiny_backbone


def tokens(backbone, texts=("a photo of a cat.", "a dog", "an airplane in the sky")):
    return backbone.tokenizer(list(texts))


@pytest.fixture
def frozen_and_prompted(tiny_name):
    backbone = tiny_backbone(tiny_name)
    reference = copy.deepcopy(backbone.model)  # a plain open_clip model with the same weights, never wrapped
    return reference, PromptedCLIP(backbone)


@pytest.mark.parametrize("grad", [False, True])
def test_untrained_prompts_and_zero_weight_reproduce_frozen_clip_bit_for_bit(frozen_and_prompted, grad):
    reference, model = frozen_and_prompted
    model.add_task("untrained")
    model.add_task("trained")
    randomize_prompts(model, "trained", seed=1)
    images, text = random_images(model.backbone, 4), tokens(model.backbone)

    with torch.set_grad_enabled(grad):
        want_img, want_txt = reference.encode_image(images), reference.encode_text(text)
        assert torch.equal(model.encode_image(images), want_img)
        assert torch.equal(model.encode_image(images, "untrained"), want_img)
        assert torch.equal(model.encode_image(images, "trained", weights=0.0), want_img)
        assert torch.equal(model.encode_image(images, ["trained", None, "untrained", "trained"], [0, 1, 1, 0]), want_img)
        assert torch.equal(model.encode_text(text), want_txt)
        assert torch.equal(model.encode_text(text, "untrained"), want_txt)
        assert torch.equal(model.encode_text(text, "trained", weight=0.0), want_txt)
        # and a trained task with w > 0 really changes both towers
        assert not torch.allclose(model.encode_image(images, "trained"), want_img)
        assert not torch.allclose(model.encode_text(text, "trained"), want_txt)


def test_mixed_batch_equals_each_group_run_alone(tiny_name):
    model = PromptedCLIP(tiny_backbone(tiny_name))
    for seed, task in enumerate(["a", "b"]):
        model.add_task(task)
        randomize_prompts(model, task, seed)
    images = random_images(model.backbone, 7, seed=5)
    tasks = ["a", "b", None, "a", "b", "a", "b"]
    weights = torch.tensor([1.0, 0.7, 1.0, 0.3, 1.0, 0.0, 0.05])

    with torch.no_grad():
        mixed = model.encode_image(images, tasks, weights)
        for task in ("a", "b", None):
            rows = [i for i, t in enumerate(tasks) if t == task]
            alone = model.encode_image(images[rows], [task] * len(rows), weights[rows])
            torch.testing.assert_close(mixed[rows], alone, rtol=1e-5, atol=1e-5)
        # a weight scales the branch: w = 0.3 lies strictly between frozen and full strength
        frozen, full = model.encode_image(images[[3]]), model.encode_image(images[[3]], "a", 1.0)
        assert 0 < (mixed[3] - frozen[0]).norm() < (full[0] - frozen[0]).norm()


def test_optimiser_steps_change_only_the_trained_tasks_prompts(tiny_name):
    model = PromptedCLIP(tiny_backbone(tiny_name))
    model.add_task("earlier")
    randomize_prompts(model, "earlier", seed=3)
    model.add_task("new")
    model.set_trainable("new")
    before_backbone = model.frozen_state_sha256()
    before_earlier = model.task_state("earlier")
    before_new = model.task_state("new")
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in model.prompt_parameters("new")}

    optimizer = torch.optim.SGD(trainable, lr=5.0)
    images, text = random_images(model.backbone, 6), tokens(model.backbone)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(3):
        img = model.encode_image(images, "new", normalize=True)
        txt = model.encode_text(text, "new", normalize=True)
        loss = torch.nn.functional.cross_entropy(model.logit_scale() * img @ txt.T, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    assert model.frozen_state_sha256() == before_backbone
    for name, param in model.named_parameters():
        if not any(param is p for p in model.prompt_parameters("new")):
            assert param.grad is None, f"{name} received a gradient"
    after_earlier, after_new = model.task_state("earlier"), model.task_state("new")
    assert all(torch.equal(before_earlier[k], after_earlier[k]) for k in before_earlier)
    assert all(not torch.equal(before_new[k], after_new[k]) for k in before_new if k.endswith(".value"))


@pytest.mark.parametrize("depth, n_prefix", [(1, 1), (2, 8), (2, 3)])
def test_prompt_parameter_count(tiny_name, depth, n_prefix):
    backbone = tiny_backbone(tiny_name)
    model = PromptedCLIP(backbone)
    model.add_task("t", PromptConfig(depth=depth, n_prefix=n_prefix))
    width_img = backbone.model.visual.transformer.width
    width_txt = backbone.model.transformer.width
    assert model.num_prompt_parameters("t") == depth * 2 * n_prefix * (width_img + width_txt)


def test_depth_beyond_a_tower_is_capped_per_tower():
    backbone = tiny_backbone("keepclip-tiny-a")  # 3 image blocks, 3 text blocks
    model = PromptedCLIP(backbone)
    model.add_task("deep", PromptConfig(depth=8, n_prefix=2))
    assert model.num_prompt_parameters("deep") == 3 * 2 * 2 * (64 + 48)
    wrapped = [type(b.attn) is PromptedAttention for b in backbone.image_blocks]
    assert wrapped == [True, True, True]


def test_only_the_first_depth_blocks_are_wrapped_and_the_base_layer_is_the_original_module():
    backbone = tiny_backbone("keepclip-tiny-a")
    originals = [b.attn for b in backbone.image_blocks]
    model = PromptedCLIP(backbone)
    model.add_task("t", PromptConfig(depth=2))
    blocks = backbone.image_blocks
    assert [isinstance(b.attn, PromptedAttention) for b in blocks] == [True, True, False]
    assert blocks[0].attn.get_base_layer() is originals[0] and blocks[2].attn is originals[2]


def test_task_state_round_trip_and_replacement(tiny_name):
    model = PromptedCLIP(tiny_backbone(tiny_name))
    config = PromptConfig(depth=2, n_prefix=4)
    model.add_task("t", config)
    randomize_prompts(model, "t", seed=7)
    state = model.task_state("t")
    images = random_images(model.backbone, 3)
    with torch.no_grad():
        want = model.encode_image(images, "t")
        other = PromptedCLIP(tiny_backbone(tiny_name))
        other.load_task("t", state, config)
        assert torch.equal(other.encode_image(images, "t"), want)
        model.load_task("t", {k: torch.zeros_like(v) for k, v in state.items()}, config)  # replace in place
        assert torch.equal(model.encode_image(images, "t"), model.encode_image(images))
    assert len(model.tasks) == 1
    assert all(len(w.prefix_keys) == 1 for w in model.modules() if isinstance(w, PromptedAttention))


def test_delete_task_removes_its_tensors():
    model = PromptedCLIP(tiny_backbone())
    model.add_task("t")
    model.delete_task("t")
    assert model.tasks == []
    assert all(len(w.prefix_keys) == 0 for w in model.modules() if isinstance(w, PromptedAttention))
    with pytest.raises(UnknownTask, match="unknown task 't'"):
        model.encode_image(random_images(model.backbone, 1), "t")


def test_bad_arguments_get_clear_errors():
    model = PromptedCLIP(tiny_backbone())
    config = PromptConfig(depth=1, n_prefix=2)
    model.add_task("t", config)
    images = random_images(model.backbone, 2)
    with pytest.raises(ValueError, match="got 3 task names for a batch of 2"):
        model.encode_image(images, ["t", "t", "t"])
    with pytest.raises(ValueError, match="got 3 weights for a batch of 2"):
        model.encode_image(images, "t", [1.0, 1.0, 1.0])
    state = model.task_state("t")
    with pytest.raises(ValueError, match="missing"):
        model.load_task("u", {k: v for k, v in state.items() if not k.startswith("text")}, config)
    with pytest.raises(ValueError, match="has shape"):
        model.load_task("u", {k: v[:1] for k, v in state.items()}, config)
    with pytest.raises(ValueError, match="must be >= 1"):
        PromptConfig(depth=0)


def test_prompt_config_round_trips_and_refuses_unknown_keys():
    config = PromptConfig(depth=3, n_prefix=5, key_init=0.1)
    assert PromptConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown prompt config keys \\['rank'\\]"):
        PromptConfig.from_dict({**config.to_dict(), "rank": 4})
