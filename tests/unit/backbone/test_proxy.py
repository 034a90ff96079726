"""On the proxy CLIP from ../shared: zero-shot as its MODEL.md reports it, and the calibrated gate on real domains."""
import re

import pytest

from backbone import fit_task_stats, text_classifier
from tests.conftest import PROXY_DIR

pytestmark = pytest.mark.shared


def model_card_row(first_cell: str, header_has: str) -> tuple[list[str], list[str]]:
    """(header cells, row cells) of the MODEL.md table whose header contains `header_has`."""
    lines = [line.strip() for line in (PROXY_DIR / "MODEL.md").read_text().splitlines()]
    cells = lambda line: [c.strip() for c in line.strip("|").split("|")]  # noqa: E731
    for i, line in enumerate(lines):
        if line.startswith("|") and header_has in line:
            for row in lines[i + 2 :]:
                if not row.startswith("|"):
                    break
                if cells(row)[0] == first_cell:
                    return cells(line), cells(row)
    raise AssertionError(f"MODEL.md has no '{first_cell}' row in a table with '{header_has}'")


def test_proxy_zero_shot_on_cifar10_matches_its_model_card(proxy, domain):
    _, template_row = model_card_row("cifar10, caltech101", "templates")
    templates = re.findall(r"`([^`]*\{\}[^`]*)`", template_row[1])
    header, row = model_card_row("cifar10", "unseen classes")
    reported = float(row[header.index("all")].strip("*"))

    features, labels, names = domain("cifar10", "test")
    classifier = text_classifier(proxy, names, templates)
    accuracy = 100 * (features @ classifier.T).argmax(1).eq(labels).float().mean().item()

    assert len(templates) == 3
    assert accuracy == pytest.approx(reported, abs=1.0), f"measured {accuracy:.1f}, MODEL.md says {reported}"


def test_gate_separates_two_domains(domain):
    stats, held_out = {}, {}
    for name in ("mnist", "cifar10"):
        features, labels, _ = domain(name, "train", limit=1000)
        stats[name] = fit_task_stats(features, labels)
        held_out[name] = domain(name, "test")[0]

    for own, other in (("mnist", "cifar10"), ("cifar10", "mnist")):
        on_own = (stats[own].weight(held_out[own]) > 0.9).float().mean().item()
        on_other = (stats[own].weight(held_out[other]) < 0.1).float().mean().item()
        assert on_own >= 0.95, f"{own}'s gate is > 0.9 on only {on_own:.1%} of its own held-out images"
        assert on_other >= 0.95, f"{own}'s gate is < 0.1 on only {on_other:.1%} of {other}'s images"
