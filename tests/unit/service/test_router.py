"""Router: FAISS candidates + exact Gaussian choice + calibrated gate, per image (never a batch vote)."""
import math

import pytest
import torch

from backbone import fit_task_stats
from service.router import Router


def cloud(center_dim: int, n: int, d: int = 16, seed: int = 0, spread: float = 0.05) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    center = torch.zeros(d)
    center[center_dim] = 1.0
    return center + spread * torch.randn(n, d, generator=gen)


@pytest.fixture(scope="module")
def router():
    stats = {name: fit_task_stats(cloud(i, 60, seed=i), torch.arange(60) % 3) for i, name in enumerate(["a", "b", "c", "d"])}
    return Router(stats, top_k=2, threshold=0.01)


def test_each_image_goes_to_its_own_task_in_a_mixed_batch(router):
    batch = torch.cat([cloud(2, 3, seed=10), cloud(0, 1, seed=11), cloud(3, 2, seed=12)])
    routes = router.route(batch)
    assert [r.task for r in routes] == ["c"] * 3 + ["a"] + ["d"] * 2
    assert all(r.gate > 0.5 for r in routes)
    assert all(r.candidates[0].task == r.task for r in routes)


def test_an_image_far_from_every_task_gets_no_task_and_no_weight(router):
    far = cloud(9, 2, seed=20)  # a direction no task covers
    routes = router.route(torch.cat([far, cloud(1, 1, seed=21)]))
    assert [r.task for r in routes] == [None, None, "b"]
    assert routes[0].gate == 0.0 and routes[0].best is not None and routes[0].best_gate < 0.01


def test_candidates_are_distinct_tasks_limited_by_top_k(router):
    routes = router.route(cloud(0, 4, seed=30))
    for r in routes:
        names = [c.task for c in r.candidates]
        assert len(names) == len(set(names)) == 2
        assert r.candidates[0].log_likelihood >= r.candidates[1].log_likelihood
    assert all(len(r.candidates) == 4 for r in router.route(cloud(0, 2, seed=31), top_k=10))


def test_threshold_is_a_per_call_knob(router):
    images = cloud(3, 5, seed=40)
    assert all(r.task == "d" for r in router.route(images))
    assert all(r.task is None for r in router.route(images, threshold=1.5))


def test_exact_log_likelihood_picks_the_task_not_the_nearest_key():
    # task "wide" has its key nearest the probe, but the probe is far outside its tight Gaussian; "near" covers it
    d = 8
    tight = torch.zeros(40, d)
    tight[:, 0] = 1.0
    tight[:, 1:] = 0.001 * torch.randn(40, d - 1, generator=torch.Generator().manual_seed(0))
    broad = cloud(0, 200, d=d, seed=1, spread=0.3)
    broad[:, 1] += 0.4
    router = Router({"tight": fit_task_stats(tight), "broad": fit_task_stats(broad)}, top_k=2, threshold=0.0)
    probe = broad[:5]
    assert [r.task for r in router.route(probe)] == ["broad"] * 5
    assert all(math.isfinite(c.log_likelihood) for r in router.route(probe) for c in r.candidates)


def test_empty_router_routes_nothing():
    router = Router({})
    assert len(router) == 0
    assert [r.task for r in router.route(torch.randn(3, 16))] == [None] * 3
