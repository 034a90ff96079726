"""Engine without HTTP or Ray: per-image routing, prompted pass only where the gate is not negligible,
text features at load time, and hot swap that never pulls prompts from under a request."""
import threading

import pytest
import torch
from PIL import Image

from service.engine import ClassifyJob, Engine, TaskNotLoaded
from service.runtime import TorchRuntime
from testkit.tasks import color_sample, make_color_task


class RecordingRuntime(TorchRuntime):
    """The real torch runtime, recording how many images each prompted pass carried."""

    def __init__(self, backbone):
        super().__init__(backbone)
        self.prompted_passes: list[list[str]] = []

    def encode_image(self, images, tasks=None, weights=None, resume=None):
        if tasks is not None:
            self.prompted_passes.append(list(tasks))
        return super().encode_image(images, tasks, weights, resume)


@pytest.fixture
def engine(settings, store):
    runtime = RecordingRuntime(TorchRuntime.load(settings.model, settings.pretrained, "cpu").backbone)
    engine = Engine(runtime, store, settings)
    yield engine
    engine.close()


def images(engine, *names, seed=7):
    return [engine.preprocess(Image.fromarray(color_sample(n, 1, seed=seed + 2 * i)[0])) for i, n in enumerate(names)]


def test_each_image_is_routed_on_its_own_and_unmatched_images_skip_the_prompted_pass(engine, store, task_maker):
    for name in ("red", "green"):
        store.publish(make_color_task(task_maker, name))
    assert engine.sync() and set(engine.state.tasks) == {"red", "green"}
    batch = images(engine, "red", "blue", "green", "red")
    results = engine.classify(batch)
    assert [r.task for r in results] == ["red", None, "green", "red"]
    # the unmatched image gets the frozen CLIP answer over the default open vocabulary (ImageNet-1k names)
    assert results[1].gate == 0.0 and len(results[1].scores) == 5 and "no learned task" in results[1].message
    assert "imagenet-1k (1000 names)" in results[1].message
    assert all(s.label in engine._vocabulary for s in results[1].scores)
    assert all(r.gate > 0.5 and r.scores[0].label.endswith(r.task) for r in results if r.task)
    # one prompted pass, for the three matched images only, grouped by task inside the wrappers
    assert len(engine.runtime.prompted_passes) == 1
    assert sorted(engine.runtime.prompted_passes[0]) == sorted([engine.state.tasks[n].slot for n in ("red", "green", "red")])
    engine.runtime.prompted_passes.clear()
    assert engine.classify(images(engine, "blue", "yellow"))[0].task is None
    assert engine.runtime.prompted_passes == []


def test_modes_task_labels_and_frozen_embeddings(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red"))
    engine.sync()
    red, blue = images(engine, "red", "blue")
    [by_task] = engine.classify([blue], task="red", top_k=1)
    assert by_task.mode == "task" and by_task.task == "red" and by_task.gate == 1.0 and len(by_task.scores) == 1
    assert by_task.route.task is None  # what the router thought is reported alongside
    [labels] = engine.classify([red], labels=["cat", "dog", "fish"], top_k=3)
    assert labels.mode == "labels" and labels.task == "red" and 0 < labels.gate <= 1
    assert sorted(s.label for s in labels.scores) == ["cat", "dog", "fish"]
    assert abs(sum(s.score for s in labels.scores) - 1) < 1e-5
    frozen = engine.embed_images([red])[0]
    prompted = engine.embed_images([red], task="red")[0]
    assert frozen.task is None and prompted.version == 1
    assert torch.allclose(frozen.embedding, engine.runtime.encode_image(red[None])[0])
    assert not torch.allclose(frozen.embedding, prompted.embedding)
    with pytest.raises(TaskNotLoaded, match="not served"):
        engine.classify([red], task="nope")
    # a bad job fails alone, not the batch
    out = engine.run_batch([ClassifyJob(red, task="nope"), ClassifyJob(red)])
    assert isinstance(out[0], TaskNotLoaded) and out[1].task == "red"


def test_text_features_are_computed_at_load_time(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "green"))
    engine.sync()
    task = engine.state.tasks["green"]
    assert task.text_prompted.shape == task.text_frozen.shape == (2, engine.runtime.embed_dim)
    assert not torch.allclose(task.text_prompted, task.text_frozen)
    assert torch.allclose(task.text_frozen, engine.runtime.class_text(task.class_names, task.templates))


def test_a_new_version_never_pulls_prompts_from_under_a_request(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", seed=0))
    engine.sync()
    red = images(engine, "red")
    with engine.lease() as old:  # a request in flight on version 1
        old_slot = old.tasks["red"].slot
        store.publish(make_color_task(task_maker, "red", seed=1))
        assert engine.sync()
        new_slot = engine.state.tasks["red"].slot
        assert new_slot != old_slot and engine.state.tasks["red"].version == 2
        assert {old_slot, new_slot} <= set(engine.runtime.model.tasks)  # both live while the old lease is held
        feats = engine.runtime.encode_image(torch.stack(red), tasks=[old_slot], weights=[1.0])  # still works
        assert torch.isfinite(feats).all()
    assert old_slot not in engine.runtime.model.tasks and new_slot in engine.runtime.model.tasks
    assert engine.loaded_slots() == {new_slot}
    assert engine.classify(red)[0].version == 2


def test_concurrent_requests_during_swaps_all_succeed(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", seed=0))
    engine.sync()
    batch = images(engine, "red", "green", "red")
    errors, done = [], threading.Event()

    def hammer():
        while not done.is_set():
            try:
                assert len(engine.classify(batch)) == 3
            except Exception as e:  # noqa: BLE001 - collected for the assert below
                errors.append(e)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for seed in range(1, 6):
            store.publish(make_color_task(task_maker, "red", seed=seed))
            engine.sync()
        store.delete("red")
        engine.sync()
    finally:
        done.set()
        for t in threads:
            t.join()
    assert errors == []
    assert engine.state.tasks == {} and engine.loaded_slots() == set()
    assert engine.runtime.model.tasks == []


def test_delete_and_rollback_are_followed(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red", seed=0))
    store.publish(make_color_task(task_maker, "red", seed=1))
    engine.sync()
    assert engine.state.tasks["red"].version == 2
    store.rollback("red", 1)
    engine.sync()
    assert engine.state.tasks["red"].version == 1
    store.delete("red")
    engine.sync()
    assert "red" not in engine.state.tasks


def _corrupt(store_root, name, version):
    path = store_root / "tasks" / name / f"v{version:06d}" / "prompts.safetensors"
    path.write_bytes(path.read_bytes()[:-8] + b"garbage!")


def test_damaged_or_mismatched_artifacts_are_skipped_and_the_old_version_stays(engine, store, task_maker, tmp_path, caplog):
    store.publish(make_color_task(task_maker, "red", seed=0))
    engine.sync()
    store.publish(make_color_task(task_maker, "red", seed=1))
    _corrupt(tmp_path / "store", "red", 2)
    other = make_color_task(task_maker, "green")
    other.backbone = {"name": "another-clip", "sha256": "0" * 64}
    store.publish(other)
    weird = make_color_task(task_maker, "blue")
    weird.kind = "analytic-head"
    store.publish(weird)
    with caplog.at_level("WARNING", logger="service.engine"):
        engine.sync()
    state = engine.state
    assert state.tasks["red"].version == 1  # v2 is damaged: the loaded v1 stays live
    assert set(state.tasks) == {"red"}
    assert "another-clip" in state.errors["green"] and "not servable" in state.errors["blue"]
    assert any("green" in r.getMessage() for r in caplog.records)
    # a fresh engine falls back to the newest version that verifies
    fresh = Engine(TorchRuntime(engine.runtime.backbone), store, engine.settings)
    fresh.sync()
    assert fresh.state.tasks["red"].version == 1


def test_runtime_knobs(engine, store, task_maker):
    store.publish(make_color_task(task_maker, "red"))
    engine.sync()
    red = images(engine, "red")
    assert engine.classify(red)[0].task == "red"
    engine.reconfigure(gate_threshold=1.5)  # every gate is below it: frozen answers
    assert engine.classify(red)[0].task is None
    engine.reconfigure(gate_threshold=0.01, router_top_k=1)
    assert len(engine.classify(red)[0].route.candidates) == 1


def test_the_poller_follows_the_store_in_the_background(engine, store, task_maker):
    import time

    engine.start()
    assert engine.polling
    start = time.monotonic()
    store.publish(make_color_task(task_maker, "yellow"))
    while "yellow" not in engine.state.tasks:
        assert time.monotonic() - start < 5, "the poller did not pick the task up"
        time.sleep(0.01)
    engine.close()
    assert not engine.polling
