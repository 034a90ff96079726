"""Router with the service's vocabulary (issue 16): a task claims an image only if it explains it better than the open
vocabulary does, so a diffuse task no longer claims a distribution nobody learned."""
import pytest
import torch
import torch.nn.functional as F

from backbone import TaskStats, fit_task_stats
from backbone.gate import Vocabulary
from service.router import Router

D = 32
E = torch.eye(D)
IMAGE, TEXT = E[31], E[30]  # the modality gap: image features and class text sit in different cones
COMPACT = [E[0], E[1]]
DIFFUSE = [E[i] for i in range(2, 10)]
THIRD = [F.normalize(E[2] + E[3], dim=0), F.normalize(E[4] + E[5], dim=0), F.normalize(E[6] + E[7], dim=0)]  # inside the diffuse span
OTHERS = [E[i] for i in range(10, 28)]


def images(directions, n, noise, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(directions)
    return F.normalize(IMAGE + torch.stack(directions)[labels] + noise * torch.randn(n, D, generator=gen), dim=-1), labels


def text(directions):
    return F.normalize(TEXT + 0.6 * torch.stack(directions), dim=-1)


def names(prefix, directions):
    return [f"{prefix} {i}" for i in range(len(directions))]


@pytest.fixture(scope="module")
def world():
    compact = fit_task_stats(*images(COMPACT, 300, 0.03, seed=0))
    diffuse = fit_task_stats(*images(DIFFUSE, 600, 0.12, seed=1))
    vocab_names = names("compact", COMPACT) + names("diffuse", DIFFUSE) + names("third", THIRD) + names("other", OTHERS)
    vocabulary = Vocabulary(tuple(vocab_names), text(COMPACT + DIFFUSE + THIRD + OTHERS), logit_scale=20.0)
    classes = {"compact": (names("compact", COMPACT), text(COMPACT)), "diffuse": (names("diffuse", DIFFUSE), text(DIFFUSE))}
    stats = {"compact": compact, "diffuse": diffuse}
    return stats, vocabulary, classes


def test_a_diffuse_task_next_to_a_compact_one_does_not_claim_a_third_unlearned_distribution(world):
    stats, vocabulary, classes = world
    third, _ = images(THIRD, 300, 0.12, seed=2)
    # the problem: by distance alone the diffuse task claims nearly all of it
    assert (stats["diffuse"].weight(third) >= 0.5).float().mean() > 0.9
    assert all(r.task == "diffuse" for r in Router(stats, top_k=2).route(third))
    # the decision: checked against the vocabulary, neither task gives it w >= 0.5, and it gets the frozen answer
    router = Router(stats, top_k=2, vocabulary=vocabulary, classes=classes)
    assert router.checking
    for name in stats:
        assert (router.gate(name, third) < 0.5).all(), name
    routes = router.route(third)
    assert all(r.task is None and r.gate == 0.0 for r in routes)
    assert all(r.best in stats for r in routes)  # the most likely task is still reported


def test_each_task_still_claims_its_own_unseen_images(world):
    stats, vocabulary, classes = world
    router = Router(stats, top_k=2, vocabulary=vocabulary, classes=classes)
    own_compact, _ = images(COMPACT, 300, 0.03, seed=3)
    own_diffuse, _ = images(DIFFUSE, 600, 0.12, seed=4)
    assert sum(r.task == "compact" for r in router.route(own_compact)) / 300 >= 0.97
    assert sum(r.task == "diffuse" for r in router.route(own_diffuse)) / 600 >= 0.97
    routed = [r for r in router.route(own_diffuse) if r.task]
    assert all(r.gate >= 0.5 for r in routed)  # a claim is inside the distance gate's midpoint


def test_without_vocabulary_or_class_text_the_distance_gate_alone_decides(world):
    stats, vocabulary, classes = world
    probe, _ = images(THIRD, 20, 0.12, seed=5)
    plain = Router(stats, top_k=2)
    for router in (Router(stats, top_k=2, classes=classes), Router(stats, top_k=2, vocabulary=vocabulary),
                   Router(stats, top_k=2, vocabulary=Vocabulary((), torch.zeros(0, D), 20.0), classes=classes)):
        assert not router.checking
        assert [(r.task, r.gate) for r in router.route(probe)] == [(r.task, r.gate) for r in plain.route(probe)]
    torch.testing.assert_close(Router(stats, vocabulary=vocabulary).gate("diffuse", probe), stats["diffuse"].weight(probe))


def test_an_image_the_most_likely_task_rejects_goes_to_the_next_candidate_that_claims_it(world, monkeypatch):
    stats, vocabulary, classes = world
    own_diffuse, _ = images(DIFFUSE, 40, 0.12, seed=6)
    for checking in (True, False):
        router = Router(stats, top_k=2, **(dict(vocabulary=vocabulary, classes=classes) if checking else {}))
        assert all(r.candidates[0].task == "diffuse" and len(r.candidates) == 2 for r in router.route(own_diffuse))
        # stub the gates: the most likely task (diffuse) rejects every image, the other one claims it at 0.7
        real = TaskStats.likelihood_and_weight

        def gate_of(self, f, normalized=False):
            ll, w = real(self, f, normalized)
            return ll, torch.full_like(w, 0.7 if self is stats["compact"] else 0.0)

        monkeypatch.setattr(TaskStats, "likelihood_and_weight", gate_of)
        if checking:  # both checks pass: the gates decide
            monkeypatch.setattr(router, "_check", lambda t: (lambda f, cos=None: torch.ones(f.shape[0], dtype=torch.bool)))
        routes = router.route(own_diffuse)
        if checking:  # with checks, the next candidate is asked
            assert all(r.task == "compact" and r.gate == pytest.approx(0.7) for r in routes)
        else:  # by distance alone, only the most likely task's gate counts, as before
            assert all(r.task is None and r.best == "diffuse" for r in routes)
        monkeypatch.undo()


def test_the_check_is_calibrated_once_per_task_and_vocabulary(world):
    stats, vocabulary, classes = world
    assert Router(stats, vocabulary=vocabulary, classes=classes).calibrate() == 2
    assert Router(stats, vocabulary=vocabulary).calibrate() == 0
    first = Router(stats, vocabulary=vocabulary, classes=classes).check("diffuse")
    again = Router(stats, vocabulary=vocabulary, classes=classes).check("diffuse")  # a rebuilt router (hot swap)
    assert first is not None and again is first
    other = Vocabulary(vocabulary.names, vocabulary.text.clone(), vocabulary.logit_scale)
    assert Router(stats, vocabulary=other, classes=classes).check("diffuse") is not first
