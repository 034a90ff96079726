"""The change feed: publish, delete and rollback in order; one poll is one small read."""

from __future__ import annotations

import uuid

import fsspec
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from prompts_store import FEED_LENGTH, Change, open_store


def test_feed_reports_publish_delete_and_rollback_in_order(env, make_artifact):
    store = env.store
    assert store.generation() == 0 and store.changes(0) == (0, [])
    store.publish(make_artifact("a", seed=1))
    store.publish(make_artifact("b"))
    store.publish(make_artifact("a", seed=2))
    store.delete("b")
    store.rollback("a", 1)
    store.publish(make_artifact("b"))

    generation, changes = store.changes(since=0)
    assert generation == store.generation() == 6
    assert [(c.generation, c.op, c.name, c.version) for c in changes] == [
        (1, "publish", "a", 1), (2, "publish", "b", 1), (3, "publish", "a", 2),
        (4, "delete", "b", 1), (5, "rollback", "a", 1), (6, "publish", "b", 2)]
    assert all(isinstance(c, Change) for c in changes)
    assert [c.at for c in changes] == sorted(c.at for c in changes)
    assert [c.generation for c in store.changes(since=3).changes] == [4, 5, 6]
    batch = store.changes(since=6)
    assert batch == (6, []) and not batch.resync


def test_a_poller_that_applies_the_feed_ends_up_with_list(env, make_artifact):
    store = env.store
    live: dict[str, int] = {}
    seen = 0
    for step in range(12):
        name = "abc"[step % 3]
        if step % 4 == 3:
            store.delete(name) if name in live else store.publish(make_artifact(name))
        elif step % 5 == 4:
            store.rollback(name, 1)
        else:
            store.publish(make_artifact(name, seed=step))
        batch = store.changes(since=seen)
        assert not batch.resync
        for change in batch.changes:
            if change.op == "delete":
                live.pop(change.name)
            else:
                live[change.name] = change.version
        seen = batch.generation
        assert live == {t.name: t.version for t in store.list()}


def test_one_poll_is_one_small_read_on_local_disk(tmp_path, make_artifact, record_audit):
    store = open_store(tmp_path / "store")
    for seed in range(3):
        store.publish(make_artifact(f"task-{seed}", seed=seed))
    poller = open_store(tmp_path / "store")
    with record_audit() as events:
        generation, changes = poller.changes(since=1)
    touched = [args for event, args in events if str(args[0]).startswith(str(tmp_path))]
    assert [str(a[0]) for a in touched] == [str(tmp_path / "store" / "head.json")]
    assert not set(touched[0][1]) & set("wax+")  # opened for reading only
    assert (generation, len(changes)) == (3, 2)
    assert (tmp_path / "store" / "head.json").stat().st_size < 2_000


class CountingMemoryFS(MemoryFileSystem):
    """A real fsspec filesystem (memory) that counts every call a backend could make."""

    protocol = ("countingmem",)
    calls: list[str] = []

    def __getattribute__(self, item):
        if item in {"cat_file", "cat", "open", "_open", "exists", "info", "ls", "find", "glob",
                    "pipe_file", "rm", "isfile", "isdir", "read_bytes", "read_text", "walk"}:
            type(self).calls.append(item)
        return super().__getattribute__(item)


def test_one_poll_is_one_small_read_on_fsspec(make_artifact):
    fsspec.register_implementation("countingmem", CountingMemoryFS, clobber=True)
    url = f"countingmem://feed-{uuid.uuid4().hex}"
    store = open_store(url)
    for seed in range(3):
        store.publish(make_artifact("a", seed=seed))
    CountingMemoryFS.calls.clear()
    generation, changes = store.changes(since=2)
    assert CountingMemoryFS.calls == ["cat_file"]
    assert (generation, [c.version for c in changes]) == (3, [3])
    CountingMemoryFS.calls.clear()
    assert store.generation() == 3 and CountingMemoryFS.calls == ["cat_file"]
    fsspec.filesystem("countingmem").rm(url, recursive=True)


def test_the_feed_is_bounded_and_says_when_to_resync(memory_url, make_artifact):
    store = open_store(memory_url)
    store.publish(make_artifact("a", seed=0))
    store.publish(make_artifact("a", seed=1))
    for i in range(FEED_LENGTH + 20):  # cheap mutations: flip-flop the live version
        store.rollback("a", 1 + i % 2)
    generation = store.generation()
    assert generation == FEED_LENGTH + 22
    head_size = len(fsspec.filesystem("memory").cat_file(memory_url + "/head.json"))
    assert head_size < 100 * FEED_LENGTH + 500  # about 100 bytes an event, whatever the history

    oldest_kept = generation - FEED_LENGTH + 1
    batch = store.changes(since=oldest_kept - 1)
    assert not batch.resync and len(batch.changes) == FEED_LENGTH
    assert [c.generation for c in batch.changes] == list(range(oldest_kept, generation + 1))
    for since in (0, oldest_kept - 2):  # events after `since` are gone: resync
        batch = store.changes(since=since)
        assert batch.resync and batch.generation == generation and batch.changes == []
    ahead = store.changes(since=generation + 5)  # a poller from another (or reset) store
    assert ahead.resync
    snapshot = store.snapshot()
    assert snapshot.generation == generation and [t.version for t in snapshot.tasks] == [2]
    with pytest.raises(ValueError, match="since must be a store generation"):
        store.changes(since=-1)
