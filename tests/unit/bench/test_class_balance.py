"""`bench.class_balance` on one shared domain, small: every other class is cut, the head is solved both ways and
scored on the even and the skewed test set. Needs ../shared."""
import json

import numpy as np
import pytest

from tests.conftest import SHARED

pytestmark = [pytest.mark.shared, pytest.mark.skipif(not (SHARED / "data" / "mnist").is_dir(), reason=f"needs the shared data in {SHARED}")]


def test_skew_keeps_the_even_classes_and_cuts_the_odd_ones():
    from bench.class_balance import skew

    labels = np.repeat(np.arange(4), [40, 40, 10, 10])
    kept = labels[skew(labels, 10, np.random.default_rng(0))]
    assert np.bincount(kept).tolist() == [40, 4, 10, 3]  # odd classes: one in 10, at least 3


def test_class_balance_benchmark_scores_both_heads(tmp_path):
    from bench.class_balance import main

    out = tmp_path / "cb"
    assert main(["--domains", "mnist", "--limit-train", "300", "--limit-test", "100", "--out", str(out)]) == 0
    [row] = json.loads((out / "class-balance.json").read_text())["rows"]
    assert row["domain"] == "mnist" and row["n_train"] + row["n_val"] < 300 and row["n_test"] == 100
    for head in ("proportional", "balanced"):
        assert set(row[head]) == {"even_mean_recall", "rare_classes_recall", "skewed_accuracy", "lambda", "fusion"}
        assert all(0.0 <= row[head][k] <= 1.0 for k in ("even_mean_recall", "rare_classes_recall", "skewed_accuracy"))
    assert "`--balance-classes`" in (out / "class-balance.md").read_text()
