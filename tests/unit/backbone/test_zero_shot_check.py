"""The zero-shot check's parts: the calibration sample a fingerprint keeps, the vocabulary's alternatives, the check."""
import pytest
import torch
import torch.nn.functional as F

from backbone import TaskStats, fit_task_stats
from backbone.gate import Vocabulary, ZeroShotCheck
from backbone.task_stats import CALIBRATION_SAMPLE, cross_fitted_key_cos


def clouds(n, d=16, classes=4, seed=0, noise=0.1):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    centers = torch.eye(d)[:classes] + torch.eye(d)[-1]
    return F.normalize(centers[labels] + noise * torch.randn(n, d, generator=gen), dim=-1), labels


def test_the_fingerprint_keeps_a_seeded_held_out_sample_that_round_trips_exactly():
    features, labels = clouds(200)
    stats = fit_task_stats(features, labels)
    assert stats.calibration.shape == (200, 16) and stats.calibration_key_cos.shape == (200,)
    assert torch.allclose(stats.calibration.float().norm(dim=-1), torch.ones(200), atol=1e-3)
    tensors = stats.to_tensors()
    assert stats.calibration.dtype == tensors["calibration"].dtype == torch.float16  # half the bytes, in memory too
    again = TaskStats.from_tensors(tensors)
    assert torch.equal(again.calibration, stats.calibration) and torch.equal(again.calibration_key_cos, stats.calibration_key_cos)
    assert torch.equal(fit_task_stats(features, labels).calibration, stats.calibration)  # seeded


def test_the_sample_is_capped():
    features, labels = clouds(CALIBRATION_SAMPLE + 300, d=8)
    assert fit_task_stats(features, labels).calibration.shape == (CALIBRATION_SAMPLE, 8)


def test_cross_fitted_similarity_is_that_of_unseen_images():
    features, labels = clouds(60, noise=0.3)
    held_out = cross_fitted_key_cos(features.double(), labels)
    in_sample = (features @ fit_task_stats(features, labels).keys.T).amax(-1)
    assert held_out.mean() < in_sample.mean()
    assert cross_fitted_key_cos(features.double(), None).shape == (60,)  # no labels: one mean


def test_an_artifact_without_the_sample_still_loads_and_is_gated_by_distance_alone():
    features, labels = clouds(100)
    tensors = {k: v for k, v in fit_task_stats(features, labels).to_tensors().items() if not k.startswith("calibration")}
    old = TaskStats.from_tensors(tensors)
    assert old.calibration is None and "calibration" not in old.to_tensors()
    vocabulary = Vocabulary(("x",), F.normalize(torch.ones(1, 16), dim=-1), 20.0)
    assert old.zero_shot_check(["a", "b", "c", "d"], torch.eye(16)[:4], vocabulary) is None
    torch.testing.assert_close(old.weight(features[:5]), fit_task_stats(features, labels).weight(features[:5]))


def test_a_sample_that_does_not_fit_the_statistics_is_refused():
    tensors = fit_task_stats(*clouds(50)).to_tensors()
    with pytest.raises(ValueError, match="calibration sample"):
        TaskStats.from_tensors({**tensors, "calibration": tensors["calibration"][:, :8]})
    with pytest.raises(ValueError, match="calibration sample"):
        TaskStats.from_tensors({**tensors, "calibration_key_cos": tensors["calibration_key_cos"][:3]})


def test_the_vocabulary_offers_every_name_but_the_tasks_own():
    text = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    vocabulary = Vocabulary(("Cat", "dog ", "red  car", "tree"), text, 17.0)
    assert vocabulary.others(["cat", "Red car"]).tolist() == [False, True, False, True]
    torch.testing.assert_close(vocabulary.alternatives_to(["cat", "Red car"]), text[[1, 3]])
    assert Vocabulary(("a",), text[:1].double(), 17.0).text.dtype == torch.float32
    assert vocabulary.alternatives_to(["cat", "dog", "red car", "tree"]).shape == (0, 8)
    with pytest.raises(ValueError, match="needs"):
        Vocabulary(("a", "b"), text, 17.0)


def test_the_check_keeps_the_quantile_of_its_own_held_out_images_and_rejects_what_the_vocabulary_explains():
    d = 16
    features, labels = clouds(400, d=d)
    stats = fit_task_stats(features, labels)
    text = F.normalize(torch.eye(d)[:8] + 0.5 * torch.eye(d)[-2], dim=-1)  # classes 0-3 are the task's, 4-7 others
    names = [f"class {i}" for i in range(8)]
    vocabulary = Vocabulary(tuple(names), text, 20.0)
    check = stats.zero_shot_check(names[:4], text[:4], vocabulary)
    own = check.score(stats.calibration.float(), stats.calibration_key_cos)
    assert check.vocabulary is vocabulary.text  # shared, not copied per task
    assert (own >= check.threshold).float().mean() >= 0.995
    assert check.threshold == pytest.approx(torch.quantile(own.double(), 0.005).item(), abs=1e-5)
    others = F.normalize(torch.eye(d)[4:8][torch.arange(100) % 4] + torch.eye(d)[-1]
                         + 0.1 * torch.randn(100, d, generator=torch.Generator().manual_seed(1)), dim=-1)
    assert not check(others).any()
    assert check(clouds(100, d=d, seed=2)[0]).float().mean() >= 0.95
    with pytest.raises(ValueError, match="one alternative"):
        ZeroShotCheck.calibrate(stats.calibration, stats.calibration_key_cos, stats.keys, text[:4], text,
                                torch.zeros(8, dtype=torch.bool), 20.0)


def test_a_calibration_sample_that_cannot_calibrate_leaves_the_distance_gate_alone_instead_of_failing():
    """A damaged or hand-made artifact must not stop a replica from building its router (every other task with it)."""
    import dataclasses

    features, labels = clouds(80)
    stats = fit_task_stats(features, labels)
    vocabulary = Vocabulary(("zebra", "kettle"), F.normalize(torch.randn(2, features.shape[1]), dim=-1), 10.0)
    text = F.normalize(torch.randn(4, features.shape[1]), dim=-1)
    one_row = dataclasses.replace(stats, calibration=stats.calibration[:1], calibration_key_cos=stats.calibration_key_cos[:1])
    nan = dataclasses.replace(stats, calibration=torch.full_like(stats.calibration, float("nan")))
    for damaged in (one_row, nan):
        assert damaged.zero_shot_check(["a", "b", "c", "d"], text, vocabulary) is None
    assert stats.zero_shot_check(["a", "b", "c", "d"], text, vocabulary) is not None
