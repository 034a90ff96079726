"""Concurrent publishers never corrupt or lose a version; the writer lock behaves."""

from __future__ import annotations

import fcntl
import json
import os
import time

import fsspec
import pytest

from prompts_store import StoreLockTimeout, open_store

PER_WRITER = 20


def test_two_processes_publishing_the_same_task_lose_nothing(tmp_path, make_artifact, fork):
    root = tmp_path / "store"
    gate_r, gate_w = os.pipe()

    def writer(writer_id: int) -> None:
        store = open_store(root)
        artifacts = [make_artifact("shared", seed=writer_id * 100 + seq,
                                   metrics={"writer": writer_id, "seq": seq}) for seq in range(PER_WRITER)]
        assert os.read(gate_r, 1) == b"g"  # both start together
        for artifact in artifacts:
            store.publish(artifact)

    pids = [fork(lambda i=i: writer(i)) for i in range(2)]
    os.write(gate_w, b"gg")
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "a writer failed (its traceback is above)"

    store = open_store(root)
    history = store.history("shared")
    assert [v.version for v in history] == list(range(1, 2 * PER_WRITER + 1))
    assert all(v.error is None for v in history)
    order = []
    for v in history:
        artifact = store.get("shared", v.version)  # every file of every version verifies
        assert artifact.prompts["seed"].item() == 100 * artifact.metrics["writer"] + artifact.metrics["seq"]
        order.append((artifact.metrics["writer"], artifact.metrics["seq"]))
    for writer_id in (0, 1):  # each writer's versions are all there, in its publishing order
        assert [seq for w, seq in order if w == writer_id] == list(range(PER_WRITER))
    assert [v.created_at for v in history] == sorted(v.created_at for v in history)
    assert [t.version for t in store.list()] == [2 * PER_WRITER] and history[-1].live
    generation, changes = store.changes(since=0)
    assert generation == 2 * PER_WRITER
    assert [(c.generation, c.op, c.version) for c in changes] == [
        (v, "publish", v) for v in range(1, 2 * PER_WRITER + 1)]
    assert not os.listdir(root / "tmp")  # no staging debris


def test_local_lock_times_out_while_another_process_holds_it(tmp_path, make_artifact):
    store = open_store(tmp_path / "store", lock_timeout=0.2)
    store.publish(make_artifact("a"))
    fd = os.open(tmp_path / "store" / ".lock", os.O_RDWR)  # another holder (own open file description)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        started = time.monotonic()
        with pytest.raises(StoreLockTimeout, match="another writer held the lock for more than 0.2 s"):
            store.publish(make_artifact("a"))
        assert time.monotonic() - started < 2
        assert store.get("a").version == 1  # reads never need the lock
    finally:
        os.close(fd)
    assert store.publish(make_artifact("a")) == 2


def test_fsspec_lock_object_blocks_writers_and_a_stale_one_is_broken(memory_url, make_artifact):
    fs, root = fsspec.core.url_to_fs(memory_url)
    store = open_store(memory_url, lock_timeout=0.2)
    store.publish(make_artifact("a"))
    assert not fs.exists(f"{root}/.lock")  # released after publishing
    fs.pipe_file(f"{root}/.lock", json.dumps({"token": "other", "time": time.time()}).encode())
    with pytest.raises(StoreLockTimeout, match="lock object .*\\.lock was held"):
        store.publish(make_artifact("a"))
    fs.pipe_file(f"{root}/.lock", json.dumps({"token": "dead", "time": time.time() - 3600}).encode())
    assert store.publish(make_artifact("a")) == 2  # a writer dead for an hour does not block forever
    assert not fs.exists(f"{root}/.lock")


def test_threads_sharing_one_store_lose_nothing(env, make_artifact):
    import threading

    def writer(writer_id: int) -> None:
        for seq in range(10):
            env.store.publish(make_artifact("t", seed=writer_id * 100 + seq))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = env.store.history("t")
    assert [v.version for v in history] == list(range(1, 41)) and all(v.error is None for v in history)
    assert sorted(v.metrics["seed"] for v in history) == sorted(w * 100 + s for w in range(4) for s in range(10))
    assert env.store.generation() == 40
