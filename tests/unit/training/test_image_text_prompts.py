"""The image-text prompt learner: it trains only its prompt tokens (the backbone is untouched and, outside an
`applied` block, bit for bit the frozen CLIP), its artifact round-trips through the store, and the task-identity head
finds an image's task from stored class statistics alone."""
import threading

import numpy as np
import pytest
import torch

from backbone import DEFAULT_TEMPLATES, PixelPipeline
from backbone.task_identity import TaskIdentityHead
from backbone.token_prompts import TokenPromptConfig, TokenPrompts, applied, class_tokens
from prompts_store import open_store
from tests.conftest import tiny_backbone
from training.data import ImageSet, split_train_val
from training.image_text_prompts import KIND, ImageTextPromptLearner, ImageTextPromptSettings, classify
from training.learner import RunContext, TaskData

from .helpers import CLASS_NAMES, colour_images

SETTINGS = ImageTextPromptSettings(visual_tokens=2, text_context=2, epochs=8, batch_size=16, lr=0.01)


def colour_task(backbone, name="colours"):
    pipeline = PixelPipeline(backbone.preprocess)
    images, labels = colour_images(per_class=12)
    pixels = np.stack([pipeline.pixels(__import__("PIL.Image").Image.fromarray(im)) for im in images])
    train, val = split_train_val(labels, 0.25, seed=0)
    test_images, test_labels = colour_images(per_class=6, seed=5)
    test = np.stack([pipeline.pixels(__import__("PIL.Image").Image.fromarray(im)) for im in test_images])
    return TaskData(name, CLASS_NAMES, list(DEFAULT_TEMPLATES), ImageSet(pixels[train], labels[train]),
                    ImageSet(pixels[val], labels[val]), ImageSet(test, test_labels))


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    torch.set_num_threads(1)
    backbone = tiny_backbone()
    before = backbone.fingerprint.sha256, {k: v.clone() for k, v in backbone.model.state_dict().items()}
    task = colour_task(backbone)
    artifact = ImageTextPromptLearner(SETTINGS).fit(task, backbone, RunContext(progress=False))
    return backbone, before, task, artifact, tmp_path_factory.mktemp("itp")


def test_only_the_prompt_tokens_change_and_the_frozen_model_is_restored(learned):
    backbone, (sha, state), task, artifact, _ = learned
    after = backbone.model.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)  # weights untouched
    images = PixelPipeline(backbone.preprocess).to_batch(task.test.pixels[:4])
    frozen = backbone.model.encode_image(images)
    prompts = TokenPrompts(backbone.model, backbone.tokenizer, SETTINGS.prompt_config()).load(artifact.prompts)
    with torch.no_grad(), applied(backbone.model, prompts):
        prompted = backbone.model.encode_image(images)
    assert not torch.allclose(prompted, frozen)
    assert torch.equal(backbone.model.encode_image(images), frozen)  # hooks gone: frozen CLIP, bit for bit
    depth = min(SETTINGS.visual_depth, len(backbone.model.visual.transformer.resblocks))
    assert artifact.prompts["visual.tokens"].shape == (depth, 2, backbone.model.visual.transformer.width)
    assert artifact.prompts["text.context"].shape == (2, backbone.model.token_embedding.weight.shape[1])


def test_prompts_apply_only_in_the_thread_that_applies_them(learned):
    """The service runs frozen passes in one thread while another is inside `applied`: those must stay frozen."""
    backbone, _, task, artifact, _ = learned
    images = PixelPipeline(backbone.preprocess).to_batch(task.test.pixels[:4])
    with torch.no_grad():
        frozen = backbone.model.encode_image(images)
    prompts = TokenPrompts(backbone.model, backbone.tokenizer, SETTINGS.prompt_config()).load(artifact.prompts)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def prompted_pass():
        with torch.no_grad(), applied(backbone.model, prompts):
            inside.set()
            release.wait(30)
            seen["prompted"] = backbone.model.encode_image(images)

    worker = threading.Thread(target=prompted_pass)
    worker.start()
    try:
        assert inside.wait(30)
        with torch.no_grad():
            assert torch.equal(backbone.model.encode_image(images), frozen)
    finally:
        release.set()
        worker.join(30)
    assert not torch.allclose(seen["prompted"], frozen)


def test_it_learns_the_task(learned):
    backbone, _, task, artifact, _ = learned
    assert artifact.kind == KIND and artifact.metrics["test_accuracy"] > 0.5  # four classes: chance is 0.25


def test_artifact_round_trips_through_the_store(learned):
    backbone, _, task, artifact, tmp = learned
    store = open_store(str(tmp / "store"))
    version = store.publish(artifact)
    loaded = store.get(task.name)
    assert loaded.kind == KIND and loaded.version == version == 1
    assert all(torch.equal(loaded.prompts[k], artifact.prompts[k]) for k in artifact.prompts)
    assert all(torch.equal(loaded.stats[k], artifact.stats[k]) for k in artifact.stats)
    prompts = TokenPrompts(backbone.model, backbone.tokenizer, SETTINGS.prompt_config()).load(loaded.prompts)
    predicted = classify(backbone, prompts, task.test.pixels, task.class_names)
    assert (predicted == task.test.labels).mean() == pytest.approx(artifact.metrics["test_accuracy"])


def test_task_identity_head_from_statistics_alone():
    rng = torch.Generator().manual_seed(0)
    dim, tasks = 16, []
    for t in range(3):
        centre = torch.zeros(dim)
        centre[t] = 1.0
        means = torch.nn.functional.normalize(centre + 0.1 * torch.randn(4, dim, generator=rng), dim=-1)
        tasks.append({"class_means": means, "covariance": 0.002 * torch.eye(dim)})
    head = TaskIdentityHead.fit(tasks, samples_per_class=32, steps=200)
    queries = torch.cat([s["class_means"] + 0.03 * torch.randn(4, dim, generator=rng) for s in tasks])
    assert head.predict(queries).tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_class_tokens_place_the_context_after_the_start_token():
    backbone = tiny_backbone()
    config = TokenPromptConfig(text_context=3)
    tokens = class_tokens(backbone.tokenizer, ["red", "dark blue"], config)
    placeholder = backbone.tokenizer(["X"])[0, 1]
    assert (tokens[:, 1:4] == placeholder).all() and (tokens[:, 4] != placeholder).all()
    with pytest.raises(ValueError, match="expected"):
        TokenPrompts(backbone.model, backbone.tokenizer, config).load({"visual.tokens": torch.zeros(1), "text.context": torch.zeros(1)})
