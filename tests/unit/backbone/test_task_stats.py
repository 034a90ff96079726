"""Task fingerprint: shrinkage covariance, cross-fitted gate calibration, serialisation."""
import math

import pytest
import torch
import torch.nn.functional as F

from backbone import Gate, TaskStats, fit_task_stats
from backbone.task_stats import ledoit_wolf


def gaussian_cloud(n, d, seed, shift=0.0, anisotropy=1.0):
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, -math.log10(anisotropy), d) if anisotropy != 1.0 else torch.ones(d)
    center = torch.zeros(d)
    center[0] = 1.0
    center[1] = shift
    return center + 0.05 * torch.randn(n, d, generator=gen) * scales


def test_fewer_images_than_dimensions_stays_well_conditioned():
    features = gaussian_cloud(n=12, d=64, seed=0)
    stats = fit_task_stats(features)
    cov, shrinkage = ledoit_wolf(F.normalize(features.double(), dim=-1) - F.normalize(features.double(), dim=-1).mean(0))
    eigenvalues = torch.linalg.eigvalsh(cov)
    assert shrinkage > 0.1 and eigenvalues.min() > 0
    assert eigenvalues.max() / eigenvalues.min() < 1e3
    assert torch.isfinite(stats.log_likelihood(gaussian_cloud(5, 64, seed=1))).all()


def test_shrinkage_follows_the_data():
    isotropic = gaussian_cloud(n=2000, d=16, seed=0)
    skewed = gaussian_cloud(n=2000, d=16, seed=0, anisotropy=100.0)
    _, s_iso = ledoit_wolf(isotropic.double() - isotropic.double().mean(0))
    _, s_skew = ledoit_wolf(skewed.double() - skewed.double().mean(0))
    assert s_iso > 0.5 and s_skew < 0.05


def test_gate_is_near_one_on_own_unseen_images_and_near_zero_far_away():
    d = 32
    stats = fit_task_stats(gaussian_cloud(400, d, seed=0), torch.arange(400) % 4)
    own = stats.weight(gaussian_cloud(500, d, seed=1))
    far = stats.weight(gaussian_cloud(500, d, seed=2, shift=0.5))
    assert (own > 0.9).float().mean() >= 0.95
    assert (far < 0.1).float().mean() >= 0.99
    assert stats.keys.shape == (4, d) and torch.allclose(stats.keys.norm(dim=-1), torch.ones(4))


def test_gate_calibration_anchors():
    distances = torch.linspace(0, 100, 10001)
    gate = Gate.calibrate(distances, inside_quantile=0.99, w_inside=0.9, w_far=0.1, falloff=0.25)
    inside, median = 99.0, 50.0
    assert gate(torch.tensor(inside)).item() == pytest.approx(0.9, abs=1e-6)
    assert gate(torch.tensor(inside + 0.25 * (inside - median))).item() == pytest.approx(0.1, abs=1e-6)
    assert Gate.from_tensor(gate.to_tensor()) == gate


def test_stats_round_trip_through_tensors_exactly():
    stats = fit_task_stats(gaussian_cloud(50, 16, seed=0), torch.arange(50) % 5)
    tensors = stats.to_tensors()
    assert all(t.is_contiguous() for t in tensors.values())
    again = TaskStats.from_tensors(tensors)
    probe = gaussian_cloud(8, 16, seed=3)
    assert torch.equal(TaskStats.from_tensors(again.to_tensors()).weight(probe), again.weight(probe))  # served: a fixed point
    # served in float16: d² within the stated 3e-3 relative, the log-determinant as fitted
    torch.testing.assert_close(again.mahalanobis_sq(probe).double(), stats.mahalanobis_sq(probe), rtol=3e-3, atol=0)
    assert again.gaussian.logdet == stats.gaussian.logdet
    assert again.n_images == 50 and again.gate == stats.gate


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="at least 4 feature rows"):
        fit_task_stats(torch.randn(3, 8))
    with pytest.raises(ValueError, match="at least 4 feature rows"):
        fit_task_stats(torch.randn(8))
    with pytest.raises(ValueError, match="5 labels for 6 feature rows"):
        fit_task_stats(torch.randn(6, 8), torch.arange(5))


def test_a_replica_holds_the_whitener_in_float16_tiles_and_measures_the_same_distances():
    d = 96
    stats = fit_task_stats(gaussian_cloud(400, d, seed=4, anisotropy=30.0), torch.arange(400) % 4)
    served = TaskStats.from_tensors(stats.to_tensors())
    fitted = stats.gaussian.whitener.square()
    held = served.gaussian.whitener.square().double()
    assert served.gaussian.whitener.tiles.dtype == torch.float16
    assert (held - fitted).abs().le(2.0**-11 * fitted.abs()).all()  # each value rounded once to float16's 11 bits
    assert held.triu(1).eq(0).all()
    assert served.gaussian.whitener.nbytes == (d * d // 2 + d * 32 // 2) * 2  # lower triangle of 32x32 tiles, 2 bytes
    probe = torch.cat([gaussian_cloud(16, d, seed=5), gaussian_cloud(16, d, seed=6, shift=0.3)])
    f = F.normalize(probe.double(), dim=-1)
    exact = ((f - stats.gaussian.mean) @ fitted.T).square().sum(-1)  # float64, the whole square
    torch.testing.assert_close(served.mahalanobis_sq(probe).double(), exact, rtol=3e-3, atol=0)
    ll, w = served.likelihood_and_weight(probe)  # one distance for both
    torch.testing.assert_close(ll, served.log_likelihood(probe))
    torch.testing.assert_close(w, served.weight(probe))
    torch.testing.assert_close(w, stats.weight(probe), rtol=0, atol=5e-3)


def test_an_artifact_with_the_whole_square_still_loads():
    stats = fit_task_stats(gaussian_cloud(60, 16, seed=7))
    tensors = stats.to_tensors()
    old = {k: v for k, v in tensors.items() if k != "whitener_tril"}
    old["whitener"] = stats.gaussian.whitener.square().float()
    probe = gaussian_cloud(8, 16, seed=8)
    assert torch.equal(TaskStats.from_tensors(old).mahalanobis_sq(probe), TaskStats.from_tensors(tensors).mahalanobis_sq(probe))
