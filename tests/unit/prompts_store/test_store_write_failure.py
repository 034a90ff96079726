"""A store that cannot be written: a full disk (here a file-size limit, a real EFBIG from the kernel) or a path that
cannot be a directory. The writer gets StoreWriteFailed naming the cause, nothing changes, and no partial file is
left to keep the disk full."""

from __future__ import annotations

import os
import resource
import signal

import pytest
import torch

from prompts_store import StoreError, StoreWriteFailed, open_store


def test_a_publish_that_runs_out_of_space_changes_nothing_and_leaves_no_files(tmp_path, make_artifact, fork):
    root = tmp_path / "store"
    store = open_store(root)
    store.publish(make_artifact("kept", seed=1))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    outcome = tmp_path / "outcome.txt"

    def publish_big() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # over the limit, write() fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))
        try:
            open_store(root).publish(make_artifact("big", seed=2, big=torch.randn(256, 1024)))  # 1 MiB of prompts
        except StoreWriteFailed as e:
            outcome.write_text(f"{type(e).__name__}: {e}")

    _, status = os.waitpid(fork(publish_big), 0)
    assert os.waitstatus_to_exitcode(status) == 0
    message = outcome.read_text()
    assert message.startswith(f"StoreWriteFailed: store {root}: cannot publish task 'big': File too large; nothing changed"), message
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before  # no staging debris, no task folder
    reopened = open_store(root)
    assert [t.name for t in reopened.list()] == ["kept"] and reopened.generation() == 1
    assert reopened.publish(make_artifact("big", seed=3)) == 1  # with room again, the same publish goes through


def test_a_store_that_cannot_be_a_directory_is_refused_before_any_work(tmp_path, make_artifact):
    (tmp_path / "file").write_text("not a directory")
    store = open_store(tmp_path / "file" / "store")
    with pytest.raises(StoreWriteFailed, match=r"cannot write to it: Not a directory; nothing changed") as e:
        store.check_writable()
    assert isinstance(e.value, StoreError)
    with pytest.raises(StoreWriteFailed, match=r"cannot publish task 'a': Not a directory"):
        store.publish(make_artifact("a"))
    open_store(tmp_path / "fine").check_writable()  # a writable store passes and stays empty
    assert open_store(tmp_path / "fine").list() == []
