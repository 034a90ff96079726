"""The UI's tasks tab: each served task with its kind, accuracy (or per-class recall) and zero-shot figure; refused
tasks with the reason."""
from service.engine import Engine
from service.runtime import TorchRuntime
from service.ui import TASK_COLUMNS, task_rows
from tests.unit.service.test_kinds import make_head_task


def test_task_rows_show_kind_accuracy_and_zero_shot(settings, store, task_maker):
    artifact = make_head_task(task_maker, "red")
    artifact.metrics = {"test_accuracy": 0.914, "test_zero_shot_accuracy": 0.5}
    store.publish(artifact)
    balanced = make_head_task(task_maker, "blue")
    balanced.metrics = {"val_accuracy": 0.8, "val_zero_shot_accuracy": 0.6, "accuracy_measure": "mean per-class recall"}
    store.publish(balanced)
    bad = make_head_task(task_maker, "green")
    bad.recipe["head"]["fusion"] = -1.0
    store.publish(bad)
    engine = Engine(TorchRuntime.load(settings.model, settings.pretrained, "cpu"), store, settings)
    try:
        engine.sync()
        rows = task_rows(engine.state)
    finally:
        engine.close()
    assert len(TASK_COLUMNS) == len(rows[0])
    [red] = [r for r in rows if r[0] == "red"]
    assert red[1:6] == [1, "head", 2, 91.4, 50.0]
    [blue] = [r for r in rows if r[0] == "blue"]  # --balance-classes: the figure is the mean per-class recall
    assert blue[2:6] == ["head (per-class recall)", 2, 80.0, 60.0]
    [green] = [r for r in rows if r[0] == "green"]
    assert green[6].startswith("not served:") and "fusion" in green[6]
