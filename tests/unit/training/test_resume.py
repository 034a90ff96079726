"""Per-epoch checkpoints (safetensors + JSON): a stopped or killed run resumes from its last epoch and ends exactly
where an uninterrupted run ends; a resume with other data or another recipe is refused."""
import json
import os
import signal
import subprocess
import sys
import time

import torch

from prompts_store import open_store
from tests.conftest import REPO
from tests.unit.training.helpers import tiny_args, write_npz
from training.checkpoint import STATE_JSON, STATE_TENSORS, latest_local, load_state


def test_stop_then_resume_ends_exactly_like_an_uninterrupted_run(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=12, classnames_beside=True)
    momentum = ("--momentum", "0.9")  # so that the optimiser state has to travel through the checkpoint too
    stopped = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--run-name", "r1", "--stop-after-epoch", "2", *momentum, epochs=4))
    assert stopped.code == 0 and "stopped after epoch 2" in stopped.err and "--resume r1" in stopped.err
    assert open_store(paths.store).list() == []  # nothing published
    checkpoint = latest_local(paths.checkpoints / "r1")
    assert checkpoint.name == "epoch-0002" and {p.name for p in checkpoint.iterdir()} == {STATE_JSON, STATE_TENSORS}
    state = load_state(checkpoint)
    assert state.epoch == 2 and set(state.momentum) == set(state.prompts) and state.stats

    resumed = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--resume", "r1", *momentum, epochs=4))
    assert resumed.code == 0, resumed.err
    assert "resuming run r1 after epoch 2 of 4" in resumed.err

    other = paths.root / "other-store"
    straight = add_task(tiny_args("t", data, other, paths.checkpoints, "--run-name", "r2", *momentum, epochs=4))
    assert straight.code == 0, straight.err
    a, b = open_store(paths.store).get("t"), open_store(other).get("t")
    assert a.prompts.keys() == b.prompts.keys()
    assert all(torch.equal(a.prompts[k], b.prompts[k]) for k in a.prompts)
    strip = lambda history: [{k: v for k, v in e.items() if k != "seconds"} for e in history]  # noqa: E731
    assert strip(a.metrics["history"]) == strip(b.metrics["history"])
    assert a.metrics["resumed_after_epoch"] == 2 and b.metrics["resumed_after_epoch"] is None


def test_resume_is_refused_with_another_recipe_or_data_and_new_runs_do_not_reuse_checkpoints(paths, add_task):
    data = write_npz(paths.root / "d.npz", per_class=6, classnames_beside=True)
    assert add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--run-name", "r", "--stop-after-epoch", "1", epochs=3)).code == 0

    changed = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--resume", "r", "--lr", "1", epochs=3))
    assert changed.code == 2 and "cannot resume" in changed.err and "'optimizer' differs" in changed.err
    other_data = write_npz(paths.root / "e.npz", per_class=6, seed=3, classnames_beside=True)
    changed = add_task(tiny_args("t", other_data, paths.store, paths.checkpoints, "--resume", "r", epochs=3))
    assert changed.code == 2 and "'data_sha256' differs" in changed.err
    reused = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--run-name", "r", epochs=3))
    assert reused.code == 2 and "already holds checkpoints" in reused.err and "--resume r" in reused.err
    unknown = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--resume", "nope", epochs=3))
    assert unknown.code == 2 and "--resume nope: no checkpoint" in unknown.err
    assert open_store(paths.store).list() == []


def test_a_killed_run_resumes_from_its_last_checkpoint(paths, add_task):
    """SIGKILL a real `python -m training.add_task` process once it has written a checkpoint, then resume it."""
    data = write_npz(paths.root / "d.npz", per_class=12, classnames_beside=True)
    args = tiny_args("t", data, paths.store, paths.checkpoints, "--run-name", "killed", epochs=8)
    process = subprocess.Popen([sys.executable, "-m", "training.add_task", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while latest_local(paths.checkpoints / "killed") is None:
            assert process.poll() is None, "add-task ended before writing a checkpoint"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert open_store(paths.store).list() == []
    saved = load_state(latest_local(paths.checkpoints / "killed")).epoch
    assert 1 <= saved < 8

    resumed = add_task(tiny_args("t", data, paths.store, paths.checkpoints, "--resume", "killed", epochs=8))
    assert resumed.code == 0, resumed.err
    artifact = open_store(paths.store).get("t")
    assert artifact.metrics["resumed_after_epoch"] >= saved and len(artifact.metrics["history"]) == 8
    json.dumps(artifact.metrics)  # strict JSON all the way
