"""Damaged artifacts are refused with an error naming task, version and file; the previous version
keeps being served."""

from __future__ import annotations

import logging

import pytest

from prompts_store import ArtifactIntegrityError, StoreCorrupted, UnsupportedFormat
from prompts_store.artifact import decode_task_json, encode_task_json
from prompts_store.feed import Head

FILES = ["prompts.safetensors", "stats.safetensors", "task.json"]


@pytest.mark.parametrize("file", FILES)
def test_one_flipped_byte_is_refused_and_the_previous_version_keeps_serving(env, make_artifact, file):
    store = env.store
    store.publish(make_artifact("cars", seed=1))
    follower = store.get("cars")  # a reader (like the service) with version 1 loaded
    seen = store.generation()
    store.publish(make_artifact("cars", seed=2))
    env.flip_byte(f"tasks/cars/v000002/{file}")

    with pytest.raises(ArtifactIntegrityError) as info:
        store.get("cars")
    err = info.value
    assert (err.task, err.version, err.file) == ("cars", 2, file)
    assert f"task 'cars' version 2: {file} is damaged" in str(err)

    # The reader follows the feed, is refused version 2, and keeps serving version 1.
    generation, changes = store.changes(since=seen)
    for change in changes:
        try:
            follower = store.get(change.name, change.version)
        except ArtifactIntegrityError:
            pass
    assert follower.version == 1 and follower.metrics["seed"] == 1

    # The store itself serves version 1 too: explicitly, via fallback, and after a rollback.
    assert store.get("cars", 1).metrics["seed"] == 1
    assert store.get("cars", fallback=True).version == 1
    store.rollback("cars", 1)
    assert store.get("cars").version == 1
    with pytest.raises(ArtifactIntegrityError):
        store.rollback("cars", 2)  # a damaged version is never made live
    assert store.get("cars").version == 1 and store.generation() == generation + 1
    assert store.publish(make_artifact("cars", seed=3)) == 3  # the store stays writable


def test_fallback_is_logged_and_damage_is_visible_in_list_and_history(env, make_artifact, caplog):
    store = env.store
    store.publish(make_artifact("dogs", seed=1))
    store.publish(make_artifact("dogs", seed=2))
    env.flip_byte("tasks/dogs/v000002/task.json", offset=40)
    with caplog.at_level(logging.WARNING, logger="prompts_store"):
        assert store.get("dogs", fallback=True).version == 1
    assert "task 'dogs' version 2: task.json is damaged" in caplog.text
    assert "serving version 1 instead" in caplog.text
    [info] = store.list()
    assert info.version == 2 and info.kind is None and "task.json is damaged" in info.error
    assert [(v.version, v.error is None) for v in store.history("dogs")] == [(1, True), (2, False)]


def test_fallback_gives_up_when_no_version_verifies(env, make_artifact):
    env.store.publish(make_artifact("x"))
    env.flip_byte("tasks/x/v000001/stats.safetensors", offset=-1)
    with pytest.raises(ArtifactIntegrityError, match="version 1: stats.safetensors"):
        env.store.get("x", fallback=True)


@pytest.mark.parametrize("offset", [0, 8, 100, -1])
def test_any_byte_of_a_tensor_file_is_covered(env, make_artifact, offset):
    env.store.publish(make_artifact("x"))
    env.flip_byte("tasks/x/v000001/prompts.safetensors", offset=offset)
    with pytest.raises(ArtifactIntegrityError, match="prompts.safetensors is damaged: sha256"):
        env.store.get("x")


def test_every_single_byte_of_task_json_is_covered(make_artifact):
    raw = encode_task_json(make_artifact("x"), version=1, created_at="2025-01-01T00:00:00+00:00",
                           tensor_files={"prompts.safetensors": b"p", "stats.safetensors": b"s"})
    assert decode_task_json(raw, task="x", version=1)["name"] == "x"
    for i in range(len(raw)):
        for delta in (0x01, 0x20):
            damaged = bytearray(raw)
            damaged[i] ^= delta
            with pytest.raises(ArtifactIntegrityError, match="task 'x' version 1: task.json"):
                decode_task_json(bytes(damaged), task="x", version=1)


def test_missing_truncated_and_misplaced_files_are_refused(env, make_artifact):
    store = env.store
    store.publish(make_artifact("a"))
    store.publish(make_artifact("b"))
    good = env.read_raw("tasks/a/v000001/stats.safetensors")
    env.write_raw("tasks/a/v000001/stats.safetensors", good[:-10])
    with pytest.raises(ArtifactIntegrityError, match="stats.safetensors is damaged"):
        store.get("a")
    # A task.json copied from another task is refused: it says it is someone else.
    env.write_raw("tasks/a/v000001/task.json", env.read_raw("tasks/b/v000001/task.json"))
    with pytest.raises(ArtifactIntegrityError, match="describes task 'b' version 1"):
        store.get("a")


def test_newer_task_format_is_refused_as_unsupported(make_artifact):
    from prompts_store.jsondoc import dump_document, load_document

    raw = encode_task_json(make_artifact("x"), version=1, created_at="t",
                           tensor_files={"prompts.safetensors": b"", "stats.safetensors": b""})
    doc = load_document(raw, indent=2)
    doc["format_version"] = 99
    with pytest.raises(UnsupportedFormat, match="format version 99; this library reads up to 1"):
        decode_task_json(dump_document(doc, indent=2), task="x", version=1)


def test_a_damaged_head_is_reported_not_guessed(env, make_artifact):
    env.store.publish(make_artifact("a"))
    env.flip_byte("head.json", offset=30)
    for call in (env.store.generation, env.store.list, lambda: env.store.get("a")):
        with pytest.raises(StoreCorrupted, match="head.json is damaged"):
            call()


def test_head_with_hostile_task_names_is_refused():
    from prompts_store.jsondoc import dump_document

    raw = dump_document({"format_version": 1, "generation": 1, "events": [],
                         "tasks": {"../../etc": {"live": 1, "latest": 1}}}, indent=None)
    with pytest.raises(StoreCorrupted, match="invalid task name"):
        Head.from_bytes(raw, where="head.json")
