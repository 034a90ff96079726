"""`bench.continual` on a tiny random backbone and two colour tasks (no ../shared): the metrics' definitions, the
report's shape and invariants that hold whatever the numbers, and bad input refused with a message."""
import json

import numpy as np
import pytest
import torch

from bench.continual import main
from bench.continual_report import continual_metrics, retrieval_scores
from testkit.tasks import color_images, shades
from tests.conftest import TINY_CONFIGS

TINY = TINY_CONFIGS / "keepclip-tiny-a.json"
TASKS = {"reds": (200, 40, 40), "blues": (40, 40, 200)}


def test_metrics_follow_the_definitions():
    a = [[0.9, 0.2, 0.3],
         [0.8, 0.7, 0.4],
         [0.6, 0.5, 0.9]]
    m = continual_metrics(a)
    assert m["transfer"] == pytest.approx(np.mean([0.2, np.mean([0.3, 0.4])]))  # above the diagonal, per task
    assert m["avg"] == pytest.approx(np.mean([np.mean([0.9, 0.8, 0.6]), np.mean([0.2, 0.7, 0.5]), np.mean([0.3, 0.4, 0.9])]))
    assert m["last"] == pytest.approx(np.mean([0.6, 0.5, 0.9]))
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[0.1, 0.2]])


def test_retrieval_scores_by_hand():
    images = np.array([[1.0, 0.0], [0.8, 0.6], [0.6, 0.8], [0.0, 1.0]])
    labels = np.array([1, 0, 0, 1])
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])  # class 0 ranks: 0 (wrong), 1, 2, 3; class 1 ranks: 3, 2 (wrong), 1, 0
    r = retrieval_scores(images, queries, labels)
    assert r["recall@1"] == 0.5 and r["recall@5"] == 1.0
    ap0 = np.mean([1 / 2, 2 / 3])  # relevant at ranks 2 and 3
    ap1 = np.mean([1 / 1, 2 / 4])  # relevant at ranks 1 and 4
    assert r["map"] == pytest.approx(np.mean([ap0, ap1]))


def write_task(root, name, rgb, n_train=24, n_test=12):
    folder = root / name
    folder.mkdir(parents=True)
    light, dark = shades(rgb)
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 50)):
        images = np.concatenate([color_images(light, n // 2, seed=seed), color_images(dark, n - n // 2, seed=seed + 1)])
        labels = np.array([0] * (n // 2) + [1] * (n - n // 2))
        np.savez(folder / f"{split}.npz", images=images, labels=labels)
    (folder / "classnames.json").write_text(json.dumps([f"light {name}", f"dark {name}"]))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("continual")
    for name, rgb in TASKS.items():
        write_task(root / "data", name, rgb)
    out = root / "out"
    argv = ["--tasks", *TASKS, "--data-root", str(root / "data"), "--model", str(TINY), "--pretrained", "none",
            "--device", "cpu", "--epochs", "1", "--ft-epochs", "1", "--retrieval", "--out", str(out), "--no-progress",
            "--learners", "keepclip", "zero-shot", "full-ft", "lwf", "image-text-prompts", "continual-pretraining"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only contends with whatever else runs
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / "continual.json").read_text()), out


def test_every_learner_and_mode_has_a_square_matrix_and_metrics(report):
    data, out = report
    assert data["tasks"] == list(TASKS)
    modes = {x["name"]: set(x["modes"]) for x in data["learners"]}
    assert modes == {"keepclip": {"oracle", "per-sample", "batch-vote", "task-agnostic"}, "zero-shot": {"class-set", "task-agnostic"},
                     "full-ft": {"class-set", "task-agnostic"}, "lwf": {"class-set", "task-agnostic"},
                     "image-text-prompts": {"oracle", "per-sample", "task-agnostic"},
                     "continual-pretraining": {"class-set", "task-agnostic"}}
    for learner in data["learners"]:
        assert [t["task"] for t in learner["tasks"]] == list(TASKS)
        for result in learner["modes"].values():
            a = np.array(result["matrix"])
            assert a.shape == (2, 2) and ((0 <= a) & (a <= 1)).all()
            assert result["metrics"] == pytest.approx(continual_metrics(result["matrix"]))
    assert (out / "continual.md").read_text().count("| keepclip |") == 4 + 1  # four modes, one retrieval row
    for learner in data["learners"]:
        assert set(learner["retrieval"]) == {"recall@1", "recall@5", "map"}
        assert all(np.array(r["matrix"]).shape == (2, 2) for r in learner["retrieval"].values())
    assert (out / "continual-heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_invariants(report):
    data, out = report
    by = {x["name"]: x for x in data["learners"]}
    frozen = by["zero-shot"]["modes"]["class-set"]
    assert all(row == frozen["before"] for row in frozen["matrix"])  # the frozen model never changes
    oracle = by["keepclip"]["modes"]["oracle"]
    assert oracle["before"] == frozen["before"]  # nothing learned: frozen CLIP, bit for bit the same features
    assert oracle["matrix"][0][1] == frozen["before"][1]  # task id given, task not learned yet: zero-shot
    assert oracle["matrix"][0][0] == oracle["matrix"][1][0]  # learning a later task never touches an earlier one
    params = {x["name"]: x["tasks"][0]["trainable_parameters"] for x in data["learners"]}
    assert params["zero-shot"] == 0 and 0 < params["keepclip"] < params["full-ft"] == params["lwf"] < params["continual-pretraining"]
    assert 0 < params["image-text-prompts"] < params["full-ft"]
    for learner in ("keepclip", "image-text-prompts", "continual-pretraining"):  # published, read back
        assert sorted(p.name for p in (out / f"store-{learner}" / "tasks").iterdir()) == sorted(TASKS)
    assert [t["version"] for t in by["keepclip"]["tasks"]] == [1, 1]
    assert [t["version"] for t in by["image-text-prompts"]["tasks"]] == [1, 1]  # the same store, its own kind
    assert [t["version"] for t in by["continual-pretraining"]["tasks"]] == [1, 1]
    itp = by["image-text-prompts"]["modes"]["oracle"]
    assert itp["before"] == frozen["before"] and itp["matrix"][0][1] == frozen["before"][1]


def test_bad_input_is_refused_with_a_message(tmp_path, capsys):
    assert main(["--tasks", "nowhere", "--data-root", str(tmp_path), "--model", str(TINY), "--pretrained", "none",
                 "--device", "cpu", "--learners", "zero-shot", "--out", str(tmp_path / "out")]) == 2
    assert "nowhere is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--tasks", "empty", "--data-root", str(tmp_path), "--model", str(TINY), "--pretrained", "none",
                 "--device", "cpu", "--learners", "zero-shot", "--out", str(tmp_path / "out")]) == 2
    assert "no train data" in capsys.readouterr().err
    for argv, message in ((["--tasks", "a", "a"], "names a task twice"), (["--ft-epochs", "0"], "--ft-epochs must be >= 1"),
                          (["--learners", "magic"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_keepclip_from_an_earlier_runs_store_gives_the_same_matrices(report, tmp_path, capsys):
    data, out = report
    root = out.parent
    argv = ["--tasks", *TASKS, "--data-root", str(root / "data"), "--model", str(TINY), "--pretrained", "none",
            "--device", "cpu", "--epochs", "1", "--no-progress", "--learners", "keepclip", "--keepclip-from", str(out / "store-keepclip")]
    assert main([*argv, "--out", str(tmp_path / "again")]) == 0
    again = json.loads((tmp_path / "again" / "continual.json").read_text())
    before = next(x for x in data["learners"] if x["name"] == "keepclip")
    assert again["learners"][0]["modes"] == before["modes"]  # the same artifacts, evaluated the same way
    assert "not learnt again" in (tmp_path / "again" / "continual.md").read_text()
    assert main([*argv, "--epochs", "2", "--out", str(tmp_path / "other")]) == 2  # another recipe
    assert "was learnt with another recipe or data (epochs differ)" in capsys.readouterr().err
