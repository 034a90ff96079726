"""add-task as a Ray Train job: 2 data-parallel workers on the session's local Ray cluster checkpoint every epoch,
resume after a stop, publish from rank 0, and learn what one process learns (gradients of the prompts averaged)."""
from pathlib import Path

import pytest

from prompts_store import open_store
from tests.unit.training.helpers import tiny_args, write_npz
from training.add_task import main
from training.checkpoint import latest_local, load_state


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Like the Ray Train workers (one CPU each): the local run then sums in the same order per rank."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_add_task(capsys):
    def run(argv):
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_two_ray_train_workers_stop_resume_and_publish_what_one_process_learns(ray_cluster, tmp_path: Path, run_add_task):
    data = write_npz(tmp_path / "colours.npz", per_class=24, classnames_beside=True)
    store, checkpoints = tmp_path / "store", tmp_path / "checkpoints"
    # a calm lr: float rounding (1 vs 2 ranks) must not be amplified; every block of the tiny tower (the default depth
    # would prompt one of its 3), so that the calm lr still learns the 4 colours
    recipe = ["--momentum", "0.5", "--lr", "1", "--depth", "3"]
    ray_args = ["--workers", "2", *recipe]

    code, _, err = run_add_task(tiny_args("colours", data, store, checkpoints, *ray_args, "--run-name", "job", "--stop-after-epoch", "4", epochs=8))
    assert code == 0, err
    assert "stopped after epoch 4" in err and open_store(store).list() == []
    saved = latest_local(checkpoints / "job")  # Ray Train's storage_path/name/checkpoint_dir_name
    assert saved.name == "epoch-0004" and load_state(saved).epoch == 4

    code, out, err = run_add_task(tiny_args("colours", data, store, checkpoints, *ray_args, "--resume", "job", epochs=8))
    assert code == 0, err
    assert "published task 'colours' version 1" in out
    artifact = open_store(store).get("colours")
    assert artifact.metrics["workers"] == 2 and artifact.metrics["resumed_after_epoch"] == 4
    assert len(artifact.metrics["history"]) == 8
    assert artifact.metrics["val_accuracy"] > 0.5  # 4 classes: chance is 0.25

    # the same run in one process: same split, same global batches, same updates (up to float rounding)
    code, _, err = run_add_task(tiny_args("colours", data, tmp_path / "local-store", checkpoints, *recipe, epochs=8))
    assert code == 0, err
    local = open_store(tmp_path / "local-store").get("colours")
    assert artifact.prompts.keys() == local.prompts.keys()
    for key, value in local.prompts.items():  # float sums differ (1 vs 2 threads, split batches): compare by norm
        assert value.norm() > 0 and (artifact.prompts[key] - value).norm() <= 1e-4 * value.norm(), key
    assert [e["train_loss"] for e in artifact.metrics["history"]] == pytest.approx([e["train_loss"] for e in local.metrics["history"]], abs=1e-3)


def test_a_head_on_two_ray_train_workers_equals_the_local_fit(ray_cluster, tmp_path: Path, run_add_task):
    """Each worker computes the frozen features of its shard; they are gathered and solved once."""
    data = write_npz(tmp_path / "colours.npz", per_class=12, classnames_beside=True)
    checkpoints = tmp_path / "checkpoints"
    stores = {"ray": tmp_path / "ray-store", "local": tmp_path / "local-store"}
    for where, extra in (("ray", ["--workers", "2"]), ("local", [])):
        code, out, err = run_add_task(tiny_args("colours", data, stores[where], checkpoints, "--head-width", "512", *extra, kind="head"))
        assert code == 0, err
        assert "published task 'colours' version 1" in out
    ray, local = (open_store(stores[w]).get("colours", with_update_state=True) for w in ("ray", "local"))
    assert ray.kind == local.kind == "head" and ray.metrics["workers"] == 2
    for key in ("head.weights", "head.center"):
        assert (ray.prompts[key] - local.prompts[key]).abs().max() <= 1e-5, key
    assert (ray.update_state["train.features"] - local.update_state["train.features"]).abs().max() <= 1e-5
    assert ray.recipe["head"]["fusion"] == local.recipe["head"]["fusion"]
