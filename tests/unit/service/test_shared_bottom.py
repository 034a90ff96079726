"""Prompt tasks placed in the last blocks: the engine runs the blocks below them once per image, for the frozen pass
(routing, frozen answers) and the prompted pass alike, and answers as the whole prompted pass would."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from backbone import PromptConfig
from service.engine import EmbedJob
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
    exact = engine.runtime.encode_image(torch.stack(images))
    assert resume.provisional and torch.allclose(frozen, exact, atol=1e-6)  # the last block at the pooled token only
    assert torch.equal(engine.runtime.finish_frozen(resume), exact)  # finished: the frozen pass, bit for bit
    assert resume.block == 2 and resume.activations.shape[0] == 3
    results = engine.classify(images)  # task-agnostic: routed per image, one prompted pass from block 2
    assert [r.task for r in results] == ["red", "green", "red"] and engine.runtime.resumed_at[-1] == 2


def test_a_task_prompting_the_first_blocks_turns_the_shared_bottom_off(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", config=TOP, prompt_scale=0.5))
    store.publish(make_color_task(task_maker, "blue", prompt_scale=0.5))  # the reference placement: blocks 0 and 1
    engine.sync()
    _, resume = engine.runtime.encode_frozen(torch.stack(batch(engine, "red")))
    assert resume.block == 0  # every block reruns; only the last block's pooled token is still computed once
    engine.embed_images(batch(engine, "red", "blue"), task="red")
    assert engine.runtime.resumed_at == [0]


def test_images_answered_from_the_frozen_pass_get_its_exact_bits(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", config=TOP, prompt_scale=0.5))
    engine.sync()
    images = batch(engine, "red", "blue", "red", "green")
    jobs = [EmbedJob(images[0], task="red"), EmbedJob(images[1]), EmbedJob(images[2], task="red", weight=0.0),
            EmbedJob(images[3])]
    out = engine.run_batch(jobs)
    exact = engine.runtime.encode_image(torch.stack(images))
    for i in (1, 2, 3):  # no task, or w = 0: frozen CLIP, bit for bit, although the batch's frozen pass was provisional
        assert out[i].weight == 0.0 and torch.equal(out[i].embedding, exact[i])
    assert not torch.allclose(out[0].embedding, exact[0], atol=1e-3)
    frozen_only = [EmbedJob(image) for image in images]  # no image routed: the frozen pass of the batch, bit for bit
    assert torch.equal(torch.stack([r.embedding for r in engine.run_batch(frozen_only)]), exact)
    [alone] = engine.run_batch([EmbedJob(images[1], task="red", weight=0.0)])
    assert torch.equal(alone.embedding, engine.runtime.encode_image(images[1][None])[0])
