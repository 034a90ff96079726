"""Prompt tasks placed in the last blocks: the engine runs the blocks below them once per image, for the frozen pass
(routing, frozen answers) and the prompted pass alike, and answers as the whole prompted pass would."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from backbone import PromptConfig
from testkit.tasks import color_sample, make_color_task

TOP = PromptConfig(depth=1, n_prefix=4, placement="output")  # the tiny image tower has 3 blocks: prompts in block 2


@pytest.fixture
def engine(recording_engine):
    return recording_engine  # its runtime records the tower passes (conftest.RecordingRuntime)


def batch(engine, *names, seed=11):
    return [engine.preprocess(Image.fromarray(color_sample(n, 1, seed=seed + i)[0])) for i, n in enumerate(names)]


def test_prompted_pass_resumes_above_the_shared_blocks_and_answers_like_the_whole_pass(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", config=TOP, prompt_scale=0.5))
    store.publish(make_color_task(task_maker, "green", config=TOP, prompt_scale=0.5, seed=1))
    engine.sync()
    images = batch(engine, "red", "green", "red")
    embedded = engine.embed_images(images, task="red")
    assert engine.runtime.resumed_at == [2]
    slot = engine.state.tasks["red"].slot
    whole = engine.runtime.encode_image(torch.stack(images), tasks=[slot] * 3, weights=[1.0] * 3)  # no resume point
    assert torch.allclose(torch.stack([e.embedding for e in embedded]), whole, atol=1e-6)
    frozen, resume = engine.runtime.encode_frozen(torch.stack(images))
    assert torch.equal(frozen, engine.runtime.encode_image(torch.stack(images)))  # the frozen pass, bit for bit
    assert resume.block == 2 and resume.activations.shape[0] == 3
    results = engine.classify(images)  # task-agnostic: routed per image, one prompted pass from block 2
    assert [r.task for r in results] == ["red", "green", "red"] and engine.runtime.resumed_at[-1] == 2


def test_a_task_prompting_the_first_blocks_turns_the_shared_bottom_off(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", config=TOP, prompt_scale=0.5))
    store.publish(make_color_task(task_maker, "blue", prompt_scale=0.5))  # the reference placement: blocks 0 and 1
    engine.sync()
    _, resume = engine.runtime.encode_frozen(torch.stack(batch(engine, "red")))
    assert resume is None
    engine.embed_images(batch(engine, "red", "blue"), task="red")
    assert engine.runtime.resumed_at == [None]
