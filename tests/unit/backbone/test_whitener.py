"""TriangularWhitener: a lower triangle held as tiles (exact in the fitted dtype at any d), float16 on a replica."""
import math

import pytest
import torch

from backbone.task_stats import WHITENER_TILE, Gaussian, TriangularWhitener


def inverse_cholesky(d, seed, condition=1e4, dtype=torch.float64):
    """The inverse Cholesky factor of a covariance with eigenvalues spread over `condition`, as a task's is."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    cov = q @ torch.diag(torch.logspace(0, -math.log10(condition), d, dtype=torch.float64)) @ q.T * 1e-2
    chol = torch.linalg.cholesky(cov)
    return torch.linalg.solve_triangular(chol, torch.eye(d, dtype=torch.float64), upper=False).to(dtype), cov


@pytest.mark.parametrize("d", [1, 5, 31, 32, 33, 96, 100, 256, 300])
def test_tiles_hold_the_whole_triangle_and_apply_it_exactly(d):
    w, _ = inverse_cholesky(d, seed=d)
    whitener = TriangularWhitener.from_square(w)
    assert torch.equal(whitener.square(), w)
    x = torch.randn(7, d, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(whitener.apply(x), x @ w.T, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(whitener.norm_sq(x), (x @ w.T).square().sum(-1), rtol=1e-12, atol=0)
    n = math.ceil(d / WHITENER_TILE)
    t = math.ceil(d / n)
    assert whitener.tiles.shape == (n * (n + 1) // 2, t, t)  # never more than the triangle plus its diagonal tiles


def test_the_tiles_take_about_half_the_square():
    for d, share in ((256, 0.5625), (512, 0.53125), (768, 0.5209)):
        assert TriangularWhitener.from_square(torch.eye(d)).tiles.numel() / (d * d) == pytest.approx(share, abs=1e-4)


def test_float16_tiles_keep_the_distance_within_2e3_whatever_the_scale():
    d = 256
    w, cov = inverse_cholesky(d, seed=0)
    x = torch.distributions.MultivariateNormal(torch.zeros(d, dtype=torch.float64), cov).sample((200,))
    x = torch.cat([x, 3 * x[:50], torch.randn(50, d, dtype=torch.float64) * 0.1])  # own, farther, unrelated
    exact = (x @ w.T).square().sum(-1)
    for factor in (1e-6, 1.0, 1e6):  # float16 alone would underflow or overflow (max 65504) at the ends
        held = TriangularWhitener.from_square(w * factor, dtype=torch.float16)
        assert held.tiles.dtype == torch.float16 and torch.isfinite(held.tiles).all()
        assert math.log2(held.scale).is_integer()  # a power of two: rescaling rounds nothing
        d2 = held.norm_sq(x.float()).double() / factor**2
        assert ((d2 - exact) / exact).abs().max() < 2e-3
        assert held.nbytes == held.tiles.numel() * 2


def test_float16_tiles_are_a_fixed_point_of_reloading():
    w, _ = inverse_cholesky(64, seed=2)
    held = TriangularWhitener.from_square(w, dtype=torch.float16)
    again = TriangularWhitener.from_square(held.square(), dtype=torch.float16)
    assert torch.equal(again.tiles, held.tiles) and again.scale == held.scale


def test_a_served_gaussian_keeps_the_fitted_log_determinant_and_float32_mean():
    w, cov = inverse_cholesky(40, seed=3)
    logdet = torch.logdet(cov).item()
    g = Gaussian.served(torch.randn(40, dtype=torch.float64), w, logdet, 0.1)
    assert g.mean.dtype == torch.float32 and g.logdet == logdet and g.whitener.tiles.dtype == torch.float16
    assert g.nbytes == g.mean.nbytes + g.whitener.nbytes
