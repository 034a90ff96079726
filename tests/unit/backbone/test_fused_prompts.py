"""The prompted paths (`fused_attention` when every sample has prompts, frozen module + `prompt_delta` in a mixed
batch) against the wrapper they replaced, kept here as the reference.

The reference is the pre-fusion `PromptedAttention.forward`: the frozen module called unchanged, then per task group
a second q projection, softmax(q P_Kᵀ/√h) P_V, a second output projection, added with `index_add`. The new wrapper
must equal it to 1e-5 (image tower, and text tower with its causal mask), for a batch of one task and in mixed
batches of two tasks (of different n, so padding is exercised) plus rows without a task, leave those rows bit for bit
frozen, and pass the same gradients to the prompts.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import Attention
from torch import nn

from backbone import PromptConfig, PromptedAttention, PromptedCLIP
from backbone.prompts import PromptGroup, RoutingState, fused_attention, prompt_delta
from bench.prompt_branch import old_branch as reference_branch, old_forward as reference_forward, old_wrappers as reference_wrappers
from tests.conftest import random_images, randomize_prompts, tiny_backbone

CLOSE = dict(rtol=1e-5, atol=1e-5)
TASKS = ["a", "b", None, "a", "b", None, "a", "b"]  # a mixed batch: two tasks and rows without one
WEIGHTS = [1.0, 0.7, 1.0, 0.3, 0.0, 1.0, 1.0, 1.0]  # row 4: a task at w = 0 (frozen as well)
FROZEN_ROWS = [2, 4, 5]


# ----------------------------------------------------------------------------- the reference (pre-fusion wrapper)


# the reference lives in bench/prompt_branch.py, which times it against the fused paths: `reference_branch`,
# `reference_forward` (the pre-fusion PromptedAttention.forward) and `reference_wrappers` (installs it while inside)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def two_tasks(tiny_name):
    """(plain open_clip copy, PromptedCLIP with tasks a (depth 1, n 3) and b (depth 8, n 8), random prompts)."""
    backbone = tiny_backbone(tiny_name)
    reference = copy.deepcopy(backbone.model)
    model = PromptedCLIP(backbone)
    model.add_task("a", PromptConfig(depth=1, n_prefix=3))
    model.add_task("b", PromptConfig(depth=8, n_prefix=8))
    randomize_prompts(model, "a", seed=1)
    randomize_prompts(model, "b", seed=2)
    return reference, model


def texts(model: PromptedCLIP) -> torch.Tensor:
    words = ["a photo of a cat.", "a dog", "an airplane in the sky", "red", "a bird on a branch", "x", "two", "ok"]
    return model.backbone.tokenizer(words)


def encode_text_mixed(model: PromptedCLIP, tokens: torch.Tensor, tasks=TASKS, weights=WEIGHTS) -> torch.Tensor:
    """The text tower with per-sample routing (PromptedCLIP's API takes one task per text call)."""
    groups = model._groups(tasks, weights, len(tokens), tokens.device)
    with model.routing.use("text", groups):
        return model.clip.encode_text(tokens)


# ----------------------------------------------------------------------------- tests


def test_fused_equals_the_reference_wrapper_on_both_towers_in_a_mixed_batch(two_tasks):
    reference, model = two_tasks
    images, tokens = random_images(model.backbone, len(TASKS), seed=3), texts(model)
    with torch.no_grad():
        fused_img, fused_txt = model.encode_image(images, TASKS, WEIGHTS), encode_text_mixed(model, tokens)
        with reference_wrappers():
            want_img, want_txt = model.encode_image(images, TASKS, WEIGHTS), encode_text_mixed(model, tokens)
        frozen_img, frozen_txt = reference.encode_image(images), reference.encode_text(tokens)
    torch.testing.assert_close(fused_img, want_img, **CLOSE)
    torch.testing.assert_close(fused_txt, want_txt, **CLOSE)
    # rows without a task (or at w = 0) are the frozen model's, bit for bit; the others really changed
    assert torch.equal(fused_img[FROZEN_ROWS], frozen_img[FROZEN_ROWS])
    assert torch.equal(fused_txt[FROZEN_ROWS], frozen_txt[FROZEN_ROWS])
    prompted = [i for i in range(len(TASKS)) if i not in FROZEN_ROWS]
    assert (fused_img[prompted] - frozen_img[prompted]).abs().amax(dim=-1).gt(1e-3).all()
    assert (fused_txt[prompted] - frozen_txt[prompted]).abs().amax(dim=-1).gt(1e-3).all()


@pytest.mark.parametrize("tasks", [["a"] * 4, ["b"] * 4, ["a", "b", "b", "a"]])
def test_fused_equals_the_reference_wrapper_when_every_sample_has_prompts(two_tasks, tasks):
    _, model = two_tasks
    images, tokens = random_images(model.backbone, 4, seed=4), texts(model)[:4]
    with torch.no_grad():
        fused = model.encode_image(images, tasks, 0.6), encode_text_mixed(model, tokens, tasks, 0.6)
        with reference_wrappers():
            want = model.encode_image(images, tasks, 0.6), encode_text_mixed(model, tokens, tasks, 0.6)
    for got, expected in zip(fused, want):
        torch.testing.assert_close(got, expected, **CLOSE)


def test_gradients_reach_the_prompts_and_equal_the_reference_wrappers(two_tasks):
    _, model = two_tasks
    model.set_trainable("b")
    images, tokens = random_images(model.backbone, len(TASKS), seed=5), texts(model)

    def grads():
        model.zero_grad(set_to_none=True)
        img = F.normalize(model.encode_image(images, TASKS, WEIGHTS), dim=-1)
        txt = F.normalize(model.encode_text(tokens, "b"), dim=-1)
        F.cross_entropy(10 * img @ txt.T, torch.arange(len(TASKS))).backward()
        return [p.grad.clone() for p in model.prompt_parameters("b")]

    fused = grads()
    with reference_wrappers():
        want = grads()
    assert all(g.abs().amax() > 0 for g in fused)  # keys and values of every prompted block, both towers
    for got, expected in zip(fused, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in model.prompt_parameters("a"))


def test_the_pure_function_takes_per_sample_prompts_and_padding_changes_nothing():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.randn(3, 5, 32)
    causal = torch.full((5, 5), float("-inf")).triu(1)
    keys, values = torch.randn(3, 4, 32), torch.randn(3, 4, 32)
    weight = torch.tensor([1.0, 0.5, 0.0])
    with torch.no_grad():
        proj = (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj, 4)
        got = fused_attention(x, *proj, causal, keys, values, None, weight)
        frozen = mha(x, x, x, need_weights=False, attn_mask=causal)[0]
        for i in range(3):
            want = frozen[i] + weight[i] * reference_branch(mha, x[i : i + 1], keys[i], values[i])[0]
            torch.testing.assert_close(got[i], want, **CLOSE)
        # the mixed-batch form: the frozen output plus the prompt term through W_o
        delta = prompt_delta(x, *proj, keys, values, None, weight)
        torch.testing.assert_close(frozen + delta, got, **CLOSE)
        assert torch.equal(delta[2], torch.zeros_like(delta[2]))  # w = 0
        # two padded slots of garbage, masked: the same bits
        pad = torch.randn(3, 2, 32) * 5
        mask = torch.cat([torch.ones(3, 4), torch.zeros(3, 2)], dim=1)
        padded = fused_attention(x, *proj, causal, torch.cat([keys, pad], 1), torch.cat([values, pad], 1), mask, weight)
        assert torch.equal(padded, fused_attention(x, *proj, causal, keys, values, torch.ones(3, 4), weight))
        # queries for the first position only (a tower's pooled token), attending over every position
        first = fused_attention(x, *proj, None, keys, values, None, weight, queries=x[:, :1])
        assert first.shape == (3, 1, 32)
        torch.testing.assert_close(first, fused_attention(x, *proj, None, keys, values, None, weight)[:, :1], **CLOSE)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_a_sequence_first_module_with_a_per_sample_mask(batch_first, mixed):
    """What open_clip's CLIPs do not use here but nn.MultiheadAttention allows: (L, B, D) input, (B·H, L, L) masks."""
    torch.manual_seed(0)
    base = nn.MultiheadAttention(32, 4, batch_first=batch_first).eval()
    routing = RoutingState()
    wrapper = PromptedAttention(base, "visual", routing)
    wrapper.set_slot("s0", torch.randn(3, 32), torch.randn(3, 32))
    wrapper.set_slot("s1", torch.randn(5, 32), torch.randn(5, 32))
    x = torch.randn(4, 6, 32) if batch_first else torch.randn(6, 4, 32)
    mask = torch.rand(4 * 4, 6, 6) < 0.3  # True: may not attend
    mask[:, :, 0] = False  # every query keeps one key
    s1_rows = [1] if mixed else [1, 2]  # mixed: row 2 has no task
    groups = (PromptGroup("s0", torch.tensor([0, 3]), torch.tensor([1.0, 0.5])),
              PromptGroup("s1", torch.tensor(s1_rows), torch.full((len(s1_rows),), 2.0)))
    with torch.no_grad(), routing.use("visual", groups):
        got = wrapper(x, x, x, need_weights=False, attn_mask=mask)
        want = reference_forward(wrapper, x, x, x, need_weights=False, attn_mask=mask)
        frozen = base(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert isinstance(got, tuple) and got[1] is None
    torch.testing.assert_close(got[0], want[0], **CLOSE)
    row2 = (lambda t: t[2]) if batch_first else (lambda t: t[:, 2])
    assert torch.equal(row2(got[0]), row2(frozen)) == mixed  # bit for bit without a task; changed with one


def test_attention_variants_the_fused_math_does_not_cover_are_refused():
    with pytest.raises(ValueError, match="ln_q"):
        PromptedAttention(Attention(32, 4, qk_norm=True), "visual", RoutingState())
    with pytest.raises(ValueError, match="bias_k"):
        PromptedAttention(nn.MultiheadAttention(32, 4, add_bias_kv=True), "visual", RoutingState())
