"""The optional update.safetensors: written only when a learner hands over update state, verified on
publish, and read only by callers that ask for it (replicas never do)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from prompts_store import UPDATE_FILE, ArtifactIntegrityError, InvalidArtifact, open_store
from prompts_store.artifact import decode_task_json, encode_task_json

V1 = "tasks/head/v000001"


def _with_update_state(make_artifact, name: str = "head", *, seed: int = 0):
    """An analytic-head artifact with the frozen features and labels its head is refitted from."""
    art = make_artifact(name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    art.update_state = {"features": torch.randn(10, 16, generator=g),
                        "labels": torch.arange(10, dtype=torch.int64) % 3,
                        "gram": torch.eye(16, dtype=torch.float64)}
    return art


def test_update_state_round_trips_only_when_asked_for(env, make_artifact):
    art = _with_update_state(make_artifact)
    env.store.publish(art)
    assert set(art.checksums) == {"prompts.safetensors", "stats.safetensors", UPDATE_FILE, "task.json"}
    doc = json.loads(env.read_raw(f"{V1}/task.json"))
    data = env.read_raw(f"{V1}/{UPDATE_FILE}")
    assert doc["files"][UPDATE_FILE] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}

    plain = env.reopen().get("head")
    assert plain.update_state == {} and plain.checksums == art.checksums  # listed, though not read
    full = env.reopen().get("head", with_update_state=True)
    assert full.checksums == art.checksums and full.update_state.keys() == art.update_state.keys()
    for key, tensor in art.update_state.items():
        assert full.update_state[key].dtype == tensor.dtype and torch.equal(full.update_state[key], tensor)
    assert all(torch.equal(full.prompts[k], plain.prompts[k]) for k in art.prompts)


def test_plain_reads_never_touch_the_update_file(env, make_artifact):
    store = env.store
    store.publish(_with_update_state(make_artifact))
    env.remove_raw(f"{V1}/{UPDATE_FILE}")

    assert store.get("head").version == 1 and store.get("head", fallback=True).version == 1
    assert store.list()[0].error is None and store.history("head")[0].error is None
    with pytest.raises(ArtifactIntegrityError) as info:
        store.get("head", with_update_state=True)
    assert (info.value.task, info.value.version, info.value.file) == ("head", 1, UPDATE_FILE)
    assert f"task 'head' version 1: {UPDATE_FILE} is missing" in str(info.value)


def test_plain_reads_do_not_open_the_update_file_on_local_disk(tmp_path, make_artifact, record_audit):
    open_store(tmp_path / "store").publish(_with_update_state(make_artifact))
    store = open_store(tmp_path / "store")
    with record_audit() as events:
        store.get("head")
        store.list()
        store.history("head")
    opened = [str(args[0]) for event, args in events if event == "open"]
    assert any(p.endswith("prompts.safetensors") for p in opened)  # the recorder does see reads
    assert not [p for p in opened if p.endswith(UPDATE_FILE)]
    with record_audit() as events:
        store.get("head", with_update_state=True)
    assert [str(a[0]) for e, a in events if e == "open" and str(a[0]).endswith(UPDATE_FILE)] == [
        str(tmp_path / "store" / V1 / UPDATE_FILE)]


@pytest.mark.parametrize("offset", [0, 8, None, -1])
def test_a_flipped_byte_in_the_update_file_is_refused_when_asked_for(env, make_artifact, offset):
    store = env.store
    store.publish(_with_update_state(make_artifact, seed=1))
    store.publish(_with_update_state(make_artifact, seed=2))
    env.flip_byte(f"tasks/head/v000002/{UPDATE_FILE}", offset=offset)

    with pytest.raises(ArtifactIntegrityError, match=f"version 2: {UPDATE_FILE} is damaged: sha256") as info:
        store.get("head", with_update_state=True)
    assert (info.value.task, info.value.version, info.value.file) == ("head", 2, UPDATE_FILE)
    assert store.get("head").metrics["seed"] == 2  # replicas keep serving version 2
    older = store.get("head", with_update_state=True, fallback=True)
    assert older.version == 1 and torch.equal(older.update_state["features"],
                                              _with_update_state(make_artifact, seed=1).update_state["features"])
    store.rollback("head", 1)
    with pytest.raises(ArtifactIntegrityError, match=UPDATE_FILE):
        store.rollback("head", 2)  # rollback verifies every file, update state included
    assert store.get("head").version == 1


def test_publish_reads_the_update_file_back_before_going_live(env, make_artifact):
    store = env.store
    store.publish(_with_update_state(make_artifact, seed=1))
    backend = store._backend
    write_dir = backend.write_dir

    def damaging_write_dir(path, files):  # a storage layer that garbles what it was given
        files = dict(files)
        damaged = bytearray(files[UPDATE_FILE])
        damaged[-1] ^= 0x01
        files[UPDATE_FILE] = bytes(damaged)
        write_dir(path, files)

    backend.write_dir = damaging_write_dir
    generation = store.generation()
    with pytest.raises(ArtifactIntegrityError, match=f"version 2: {UPDATE_FILE} is damaged"):
        store.publish(_with_update_state(make_artifact, seed=2))
    assert store.generation() == generation and store.get("head").version == 1


def test_an_artifact_without_update_state_writes_no_update_file(env, make_artifact):
    art = make_artifact("head")
    assert art.update_state == {}
    env.store.publish(art)
    assert not env.exists(f"{V1}/{UPDATE_FILE}")
    assert set(art.checksums) == {"prompts.safetensors", "stats.safetensors", "task.json"}
    doc = json.loads(env.read_raw(f"{V1}/task.json"))
    assert set(doc["files"]) == {"prompts.safetensors", "stats.safetensors"}  # as before update state
    got = env.store.get("head", with_update_state=True)
    assert got.update_state == {} and got.checksums == art.checksums


def test_update_state_that_cannot_be_encoded_is_refused_naming_the_file(env, make_artifact):
    art = make_artifact("head")
    art.update_state = {"sparse": torch.eye(3).to_sparse()}
    with pytest.raises(InvalidArtifact, match=f"cannot publish task 'head': {UPDATE_FILE}") as info:
        env.store.publish(art)
    assert info.value.file == UPDATE_FILE and env.store.generation() == 0


@pytest.mark.parametrize("files", [
    ["prompts.safetensors", "stats.safetensors", "extra.safetensors"],
    ["prompts.safetensors", "stats.safetensors", UPDATE_FILE, "extra.safetensors"],
    ["prompts.safetensors", UPDATE_FILE],
    ["prompts.safetensors"],
])
def test_task_json_listing_other_files_is_refused(env, make_artifact, files):
    def task_json(names):
        return encode_task_json(make_artifact("head"), version=1, created_at="2025-01-01T00:00:00+00:00",
                                tensor_files={f: f.encode() for f in names})

    ok = task_json(["prompts.safetensors", "stats.safetensors", UPDATE_FILE])
    assert set(decode_task_json(ok, task="head", version=1)["files"]) == {
        "prompts.safetensors", "stats.safetensors", UPDATE_FILE}
    with pytest.raises(ArtifactIntegrityError, match=r"task.json lists files \[") as info:
        decode_task_json(task_json(files), task="head", version=1)
    assert str(sorted(files)) in str(info.value) and info.value.file == "task.json"

    # The same on a real store: a version whose task.json names an unknown file is refused.
    env.store.publish(make_artifact("head"))
    env.write_raw(f"{V1}/task.json", task_json(files))
    with pytest.raises(ArtifactIntegrityError, match="task 'head' version 1: task.json lists files"):
        env.store.get("head")
    assert "lists files" in env.store.list()[0].error
