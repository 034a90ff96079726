"""`keepclip tasks ... --store URL`: the task answers of the service, read from (and written to) the store itself.

`StoreTasks` has the task methods of `KeepclipClient` and returns the same models, so the CLI prints both alike.
No admin token: whoever may write the store's files may change it. A running service follows the change within a
poll interval. `prompts_store` imports torch (safetensors.torch), so the CLI imports this module only for --store.
"""
from __future__ import annotations

from pathlib import Path

from clients.client import KeepclipError, TaskChange, TaskDetail, TaskList, TaskSummary, TaskVersion
from prompts_store import StoreError, TaskStore, VersionInfo, open_store


class StoreTasks:
    def __init__(self, url: str):
        self.url = url
        self.store = _open(url)

    def __enter__(self) -> "StoreTasks":  # used like KeepclipClient; a store holds nothing open between calls
        return self

    def __exit__(self, *exc) -> None:
        pass

    def tasks(self) -> TaskList:
        snapshot = _checked(self.store.snapshot)
        tasks = [
            TaskSummary(
                name=t.name, version=t.version, loaded_version=None, kind=t.kind, num_classes=t.num_classes,
                created_at=t.created_at, error=t.error or _checked(self.store.verify, t.name, t.version),
            )
            for t in snapshot.tasks
        ]
        return TaskList(generation=snapshot.generation, served_generation=None, tasks=tasks)

    def task(self, name: str) -> TaskDetail:
        history = _checked(self.store.history, name)
        live = next((v for v in history if v.live), None)
        class_names = templates = error = None
        if live is not None:  # every file's checksum, as the listing checks them (get() reads update state only on request)
            error = live.error or _checked(self.store.verify, name, live.version)
        if live is not None and error is None:
            artifact = _checked(self.store.get, name)
            class_names, templates = artifact.class_names, artifact.templates
        return TaskDetail(
            name=name, version=live.version if live else None, loaded_version=None,
            kind=live.kind if live else None, num_classes=live.num_classes if live else None,
            created_at=live.created_at if live else None, error=error,
            class_names=class_names, templates=templates, metrics=live.metrics if live else None,
            versions=[_version(v) for v in history],
        )

    def delete_task(self, name: str) -> TaskChange:
        was_live = next((v.version for v in _checked(self.store.history, name) if v.live), None)
        _checked(self.store.delete, name)
        return TaskChange(name=name, op="delete", version=was_live, generation=_checked(self.store.generation))

    def rollback_task(self, name: str, version: int) -> TaskChange:
        _checked(self.store.rollback, name, version)
        return TaskChange(name=name, op="rollback", version=version, generation=_checked(self.store.generation))


def _open(url: str) -> TaskStore:
    # a mistyped directory would otherwise read as an empty store
    if "://" not in url and not Path(url).is_dir():
        raise KeepclipError(0, "store_not_found", f"store {url}: no such directory")
    return _checked(open_store, url)


def _checked(call, *args):
    """`call(*args)`, with the store's refusals (and file-system errors such as a read-only store) as KeepclipError."""
    try:
        return call(*args)
    except (StoreError, OSError) as e:
        raise KeepclipError(0, type(e).__name__, str(e)) from None


def _version(v: VersionInfo) -> TaskVersion:
    return TaskVersion(
        version=v.version, live=v.live, kind=v.kind, num_classes=v.num_classes, created_at=v.created_at,
        metrics=v.metrics, error=v.error,
    )
