"""The store's Python API, on the local backend and on fsspec memory:// alike."""

from __future__ import annotations

import hashlib
import json
import math
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch

from prompts_store import (BackboneMismatch, InvalidArtifact, InvalidVersion, StoreError,
                           StoreSettings, TaskNotFound, TaskStore, VersionNotFound, open_store)
from prompts_store.backends import FsspecBackend, LocalBackend

PACKAGE_DIR = Path(__file__).resolve().parents[3] / "prompts_store"


def test_publish_then_get_round_trips_everything(env, make_artifact):
    art = make_artifact("cifar10", seed=7)
    art.prompts["mask"] = torch.tensor([True, False])
    art.stats["count"] = torch.arange(5, dtype=torch.int32)
    t0 = datetime.now(timezone.utc)

    assert env.store.publish(art) == 1
    assert art.version == 1 and set(art.checksums) == {"prompts.safetensors", "stats.safetensors", "task.json"}
    created = datetime.fromisoformat(art.created_at)
    assert created.utcoffset() == timedelta(0) and abs(created - t0) < timedelta(seconds=30)

    got = env.reopen().get("cifar10")
    assert (got.name, got.version, got.kind, got.created_at) == ("cifar10", 1, "residual-prompts", art.created_at)
    assert (got.class_names, got.templates, got.backbone) == (art.class_names, art.templates, art.backbone)
    assert (got.recipe, got.metrics, got.checksums) == (art.recipe, art.metrics, art.checksums)
    for published, loaded in ((art.prompts, got.prompts), (art.stats, got.stats)):
        assert published.keys() == loaded.keys()
        for key, tensor in published.items():
            assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key


def test_versions_count_up_per_task_and_the_newest_is_live(env, make_artifact):
    store = env.store
    assert [store.publish(make_artifact("a", seed=s)) for s in range(3)] == [1, 2, 3]
    assert store.publish(make_artifact("b", seed=9)) == 1
    assert store.get("a").metrics["seed"] == 2
    assert store.get("a", 1).metrics["seed"] == 0
    assert [(t.name, t.version, t.kind, t.num_classes, t.backbone, t.error) for t in store.list()] == [
        ("a", 3, "residual-prompts", 3, make_artifact().backbone, None),
        ("b", 1, "residual-prompts", 3, make_artifact().backbone, None)]
    history = store.history("a")
    assert [(v.version, v.live, v.metrics["seed"], v.error) for v in history] == [
        (1, False, 0, None), (2, False, 1, None), (3, True, 2, None)]
    assert [v.created_at for v in history] == sorted(v.created_at for v in history)


def test_task_json_is_canonical_and_records_checksums_and_versions(env, make_artifact):
    env.store.publish(make_artifact("eurosat"))
    raw = env.read_raw("tasks/eurosat/v000001/task.json")
    doc = json.loads(raw)
    assert raw.decode() == json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert doc["format_version"] == 1 and doc["name"] == "eurosat" and doc["version"] == 1
    assert {"torch", "safetensors", "python"} <= doc["libraries"].keys()
    for file in ("prompts.safetensors", "stats.safetensors"):
        data = env.read_raw(f"tasks/eurosat/v000001/{file}")
        assert doc["files"][file] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert len(doc["document_sha256"]) == 64


def test_delete_hides_the_task_and_keeps_its_versions(env, make_artifact):
    store = env.store
    store.publish(make_artifact("a", seed=0))
    store.publish(make_artifact("a", seed=1))
    store.publish(make_artifact("b"))
    store.delete("a")
    assert [t.name for t in store.list()] == ["b"]
    with pytest.raises(TaskNotFound, match="task 'a' is deleted"):
        store.get("a")
    assert store.get("a", 2).metrics["seed"] == 1  # versions are kept
    assert [v.live for v in store.history("a")] == [False, False]
    with pytest.raises(TaskNotFound, match="no live task 'a' to delete"):
        store.delete("a")
    assert store.publish(make_artifact("a", seed=5)) == 3  # numbering never restarts
    assert store.get("a").metrics["seed"] == 5


def test_rollback_makes_an_old_version_live_and_revives_deleted_tasks(env, make_artifact):
    store = env.store
    for seed in range(3):
        store.publish(make_artifact("a", seed=seed))
    store.rollback("a", 1)
    assert store.get("a").version == 1 and store.list()[0].version == 1
    generation = store.generation()
    store.rollback("a", 1)  # already live: no-op, no feed entry
    assert store.generation() == generation
    store.delete("a")
    store.rollback("a", 3)
    assert store.get("a").metrics["seed"] == 2
    with pytest.raises(VersionNotFound, match="task 'a' has no version 4 \\(latest is 3\\)"):
        store.rollback("a", 4)
    with pytest.raises(InvalidVersion):
        store.rollback("a", 0)
    with pytest.raises(TaskNotFound, match="no task 'nope'"):
        store.rollback("nope", 1)


def test_missing_tasks_and_versions_raise_key_errors_that_name_them(env, make_artifact):
    store = env.store
    with pytest.raises(TaskNotFound) as info:
        store.get("ghost")
    assert isinstance(info.value, KeyError) and str(info.value).startswith("no task 'ghost' in store")
    assert info.value.task == "ghost"
    with pytest.raises(TaskNotFound):
        store.history("ghost")
    store.publish(make_artifact("real"))
    with pytest.raises(VersionNotFound) as info:
        store.get("real", 2)
    assert (info.value.task, info.value.version) == ("real", 2)
    for bad in (True, 1.0, "1", -1):
        with pytest.raises(InvalidVersion):
            store.get("real", bad)


def test_backbone_fingerprint_is_checked_on_get(env, make_artifact):
    store = env.store
    store.publish(make_artifact("a"))
    fingerprint = make_artifact().backbone
    assert store.get("a", backbone=fingerprint).version == 1
    other = {"name": "tiny-vit", "sha256": "1" * 64}
    with pytest.raises(BackboneMismatch) as info:
        store.get("a", backbone=other)
    assert (info.value.task, info.value.version) == ("a", 1)
    assert "task 'a' version 1 was made for backbone" in str(info.value) and "1111" in str(info.value)
    with pytest.raises(ValueError, match="exactly"):
        store.get("a", backbone={"name": "tiny-vit"})


@pytest.mark.parametrize(("change", "message"), [
    (lambda a: a.backbone.update(extra="x"), "backbone must be exactly"),
    (lambda a: setattr(a, "backbone", {"name": "vit", "sha256": 5}), "backbone must be exactly"),
    (lambda a: setattr(a, "class_names", []), "class_names must be a non-empty list"),
    (lambda a: setattr(a, "class_names", ["a", 1]), "class_names must be a non-empty list"),
    (lambda a: setattr(a, "templates", "a photo of {}"), "templates must be a list"),
    (lambda a: a.metrics.update(loss=math.nan), "metrics is not strict JSON"),
    (lambda a: a.recipe.update(fn=print), "recipe is not strict JSON"),
    (lambda a: a.prompts.update(w=[1.0]), "prompts must be a dict"),
    (lambda a: a.stats.update({"": torch.zeros(1)}), "stats must be a dict"),
    (lambda a: a.update_state.update(x=[1.0]), "update_state must be a dict"),
    (lambda a: setattr(a, "update_state", [torch.zeros(1)]), "update_state must be a dict"),
    (lambda a: a.update_state.update({1: torch.zeros(1)}), "update_state must be a dict"),
    (lambda a: setattr(a, "kind", "../x"), "kind '../x' must be"),
])
def test_invalid_artifacts_are_refused_and_nothing_is_written(env, make_artifact, change, message):
    art = make_artifact("a")
    change(art)
    with pytest.raises(InvalidArtifact, match=message) as info:
        env.store.publish(art)
    assert "cannot publish task 'a'" in str(info.value)
    assert env.store.generation() == 0 and not env.exists("tasks/a")


def test_other_learner_kinds_and_aliased_tensors_are_stored(env, make_artifact):
    art = make_artifact("head-only")
    art.kind = "analytic-head"
    weight = torch.randn(6, 4)
    art.prompts = {"weight": weight, "weight_view": weight[:3], "t": weight.t()}  # shared, non-contiguous
    env.store.publish(art)
    got = env.store.get("head-only")
    assert got.kind == "analytic-head" and env.store.list()[0].kind == "analytic-head"
    assert torch.equal(got.prompts["t"], weight.t()) and torch.equal(got.prompts["weight_view"], weight[:3])


def test_open_store_picks_the_backend_from_the_url(tmp_path, monkeypatch):
    assert isinstance(open_store(tmp_path / "s")._backend, LocalBackend)
    assert isinstance(open_store(f"file://{tmp_path}/s")._backend, LocalBackend)
    assert open_store(f"file://{tmp_path}/s").url == str(tmp_path / "s")
    assert isinstance(open_store("memory://somewhere")._backend, FsspecBackend)
    with pytest.raises(StoreError, match="cannot open store 'nosuchproto://x'"):
        open_store("nosuchproto://x")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEEPCLIP_STORE", raising=False)
    assert StoreSettings().store == "./keepclip-store"
    assert open_store().url == str(tmp_path / "keepclip-store")
    monkeypatch.setenv("KEEPCLIP_STORE", str(tmp_path / "from-env"))
    store = open_store()
    assert isinstance(store, TaskStore) and store.url == str(tmp_path / "from-env")
    assert not (tmp_path / "from-env").exists()  # nothing is created until the first write


def test_no_pickle_anywhere(env, make_artifact, record_audit):
    source = "\n".join(p.read_text() for p in PACKAGE_DIR.glob("*.py"))
    for forbidden in (r"\bpickle\b", r"(?<!safetensors\.)\btorch\.load\b", r"\bnp\.load\b",
                      r"\bnumpy\.load\b", r"\bmarshal\b", r"\bshelve\b", r"\bdill\b"):
        assert not re.search(forbidden, source), forbidden
    env.store.publish(make_artifact("a"))
    with record_audit() as events:
        env.store.get("a")
        env.store.list()
        env.store.history("a")
    assert not [e for e, _ in events if e.startswith("pickle.")]
