"""The open vocabulary for images no task claims: the frozen CLIP answer over it, a file of one's own, or none."""
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from backbone import DEFAULT_TEMPLATES
from service.engine import Engine
from service.runtime import TorchRuntime
from service.settings import ServiceSettings
from testkit.tasks import color_sample
from service.vocabulary import VocabularyError, load_vocabulary


def engine_with(settings, store, vocabulary):
    runtime = TorchRuntime.load(settings.model, settings.pretrained, "cpu")
    return Engine(runtime, store, settings.model_copy(update={"vocabulary": vocabulary}))


def blue(engine):
    return [engine.preprocess(Image.fromarray(color_sample("blue", 1, seed=3)[0]))]


def test_a_vocabulary_file_answers_unclaimed_images_with_the_frozen_model(settings, store, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("sky\nocean\n\nsky\nblue paint\n")
    engine = engine_with(settings, store, str(words))
    [result] = engine.classify(blue(engine), top_k=10)
    assert result.task is None and result.gate == 0.0
    assert sorted(s.label for s in result.scores) == ["blue paint", "ocean", "sky"]  # blank and repeated lines dropped
    assert "words.txt (3 names)" in result.message
    text = engine.runtime.class_text(["sky", "ocean", "blue paint"], DEFAULT_TEMPLATES)
    logits = engine.runtime.logit_scale() * engine.runtime.encode_image(torch.stack(blue(engine)))[0] @ text.T
    assert result.scores[0].logit == pytest.approx(float(logits.max()), abs=1e-5)  # the frozen answer


def test_without_a_vocabulary_unclaimed_images_get_empty_scores_and_say_so(settings, store):
    engine = engine_with(settings, store, "none")
    [result] = engine.classify(blue(engine))
    assert result.scores == [] and "no vocabulary is set" in result.message


def test_bad_vocabularies_are_refused_at_settings_time(tmp_path):
    assert len(load_vocabulary("imagenet-1k")[1]) == 1000
    (tmp_path / "bad.json").write_text('["a", 3]')
    for spec, why in ((str(tmp_path / "missing.txt"), "not a readable"), (str(tmp_path / "bad.json"), "list of strings")):
        with pytest.raises(VocabularyError, match=why):
            load_vocabulary(spec)
        with pytest.raises(ValidationError, match=why):
            ServiceSettings(vocabulary=spec)
