"""`bench.leak` on two shared domains, small: the claimed shares, accuracy changes and the heatmap are written, and
the own domain is claimed. Needs ../shared."""
import json

import pytest

from tests.conftest import SHARED

pytestmark = [pytest.mark.shared, pytest.mark.skipif(not (SHARED / "data" / "mnist").is_dir(), reason=f"needs the shared data in {SHARED}")]


def test_leak_benchmark_reports_claims_per_task_and_domain(tmp_path):
    from bench.leak import main

    out = tmp_path / "leak"
    assert main(["--domains", "mnist", "eurosat", "--limit-train", "60", "--limit-test", "40", "--out", str(out)]) == 0
    report = json.loads((out / "leak.json").read_text())
    assert list(report["rows"]) == ["mnist", "eurosat"]
    for task, row in report["rows"].items():
        assert [c["domain"] for c in row] == ["mnist", "eurosat"]
        assert all(0.0 <= c["claimed"] <= c["routed_any_weight"] + 1e-9 <= 1.0 + 1e-9 for c in row)
    own = {t: next(c for c in row if c["domain"] == t) for t, row in report["rows"].items()}
    assert all(c["claimed"] >= 0.5 for c in own.values())  # its own images: claimed
    assert report["summary"]["min_claimed_own"] == min(c["claimed"] for c in own.values())
    assert (out / "leak-heatmap.png").stat().st_size > 1000 and "task learned" in (out / "leak.md").read_text()
    frontier = report["frontier"]
    assert set(frontier) == {"mnist", "eurosat"}
    for task, f in frontier.items():  # the check's price for the 1-point target, against the claims measured above
        assert f["own_claimed_now"] == pytest.approx(own[task]["claimed"])
        assert f["threshold_needed"] >= f["threshold"] and f["quantile_needed"] >= f["quantile_now"]
        assert f["own_claimed_then"] <= f["own_claimed_now"]
