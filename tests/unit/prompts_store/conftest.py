"""Fixtures for the store tests: real stores (a temp directory, or fsspec memory://), artifacts with
real tensors, raw access to stored bytes (to damage them), audit-hook recording, and forked
processes."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import fsspec
import pytest
import torch

from prompts_store import TaskArtifact, TaskStore, open_store

BACKBONE = {"name": "tiny-vit", "sha256": "0" * 64}


def _make_artifact(name: str = "cifar10", *, seed: int = 0, n_classes: int = 3, width: int = 16,
                  big: torch.Tensor | None = None, metrics: dict | None = None) -> TaskArtifact:
    """A small but realistic residual-prompts artifact; ``seed`` makes its tensors distinct."""
    g = torch.Generator().manual_seed(seed)
    prompts = {f"image.{i}.{kv}": torch.randn(4, width, generator=g) for i in range(2) for kv in "kv"}
    prompts["text.0.k"] = torch.randn(4, width, generator=g).half()
    prompts["seed"] = torch.tensor([seed], dtype=torch.int64)
    if big is not None:
        prompts["big"] = big
    stats = {"mean": torch.randn(width, generator=g), "cov_factor": torch.randn(width, width, generator=g),
             "keys": torch.randn(n_classes, width, generator=g), "gate": torch.tensor([0.5, 2.0])}
    return TaskArtifact(
        name=name, class_names=[f"class {i}" for i in range(n_classes)],
        templates=["a photo of a {}."], backbone=dict(BACKBONE),
        recipe={"epochs": 10, "lr": 0.1, "prompt": {"depth": 2, "n": 4}},
        metrics=metrics if metrics is not None else {"seed": seed, "accuracy": 0.75},
        prompts=prompts, stats=stats)


@pytest.fixture
def make_artifact() -> Callable[..., TaskArtifact]:
    """``make_artifact(name, seed=..., big=..., metrics=...)`` builds a fresh artifact."""
    return _make_artifact


@dataclass
class StoreEnv:
    """A store plus raw access to the bytes under it, whatever the backend."""

    kind: str
    url: str
    store: TaskStore
    read_raw: Callable[[str], bytes]
    write_raw: Callable[[str, bytes], None]
    exists: Callable[[str], bool]
    remove_raw: Callable[[str], None]

    def reopen(self, **kwargs) -> TaskStore:
        return open_store(self.url, **kwargs)

    def flip_byte(self, rel: str, offset: int | None = None) -> None:
        data = bytearray(self.read_raw(rel))
        i = len(data) // 2 if offset is None else offset
        data[i] ^= 0x01
        self.write_raw(rel, bytes(data))


def local_env(root: Path) -> StoreEnv:
    def write(rel: str, data: bytes) -> None:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return StoreEnv("local", str(root), open_store(root), lambda rel: (root / rel).read_bytes(),
                    write, lambda rel: (root / rel).exists(), lambda rel: (root / rel).unlink())


def memory_env(url: str) -> StoreEnv:
    fs, root = fsspec.core.url_to_fs(url)
    return StoreEnv("memory", url, open_store(url), lambda rel: fs.cat_file(f"{root}/{rel}"),
                    lambda rel, data: fs.pipe_file(f"{root}/{rel}", data),
                    lambda rel: fs.exists(f"{root}/{rel}"), lambda rel: fs.rm(f"{root}/{rel}"))


@pytest.fixture
def memory_url() -> Iterator[str]:
    url = f"memory://keepclip-test-{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture(params=["local", "memory"])
def env(request, tmp_path: Path, memory_url: str) -> StoreEnv:
    """The same functional tests run on the local backend and on fsspec memory://."""
    return local_env(tmp_path / "store") if request.param == "local" else memory_env(memory_url)


# --- audit hooks: observe real file opens and unpickling without touching the code under test ---

_recorders: list[list[tuple[str, tuple]]] = []
_hook_installed = False


def _audit(event: str, args: tuple) -> None:
    if _recorders and (event in ("open", "os.listdir", "os.scandir") or event.startswith("pickle.")):
        _recorders[-1].append((event, args))


@contextlib.contextmanager
def _record() -> Iterator[list[tuple[str, tuple]]]:
    events: list[tuple[str, tuple]] = []
    _recorders.append(events)
    try:
        yield events
    finally:
        _recorders.remove(events)


@pytest.fixture
def record_audit() -> Callable[[], contextlib.AbstractContextManager[list[tuple[str, tuple]]]]:
    """``with record_audit() as events:`` records this process's open/listdir/pickle events."""
    global _hook_installed
    if not _hook_installed:  # audit hooks cannot be removed: install one, gate it with _recorders
        sys.addaudithook(_audit)
        _hook_installed = True
    return _record


# --- forked processes -------------------------------------------------------------------------

@pytest.fixture
def fork() -> Callable[[Callable[[], None]], int]:
    """``fork(target) -> pid``: run ``target`` in a forked child process."""
    return _fork_child


def _fork_child(target: Callable[[], None]) -> int:
    """Run ``target`` in a forked process (torch already imported, so it starts in microseconds).

    The child never returns into pytest: it exits 0 after ``target``, 1 on an exception.
    """
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            torch.set_num_threads(1)  # no OpenMP pool in a forked child
            target()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    return pid
