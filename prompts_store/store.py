"""TaskStore: versioned task artifacts with atomic publish, verified reads and a change feed.

Layout under the store root (docs/store.md has the full picture)::

    head.json                      generation, live pointer of every task, last changes (the feed)
    tasks/<name>/v000001/          one immutable directory per version:
        prompts.safetensors          prompts, fingerprint stats and task.json with their SHA-256
        stats.safetensors
        update.safetensors           optional learner update state, read only on request
        task.json
    .lock  tmp/                    writer lock and staging area (local backend)

A mutation takes the writer lock, reads the head, writes what it needs, verifies it, and commits by
replacing head.json. Versions 1..latest of a task are immutable once committed; a version directory
beyond ``latest`` is debris of a killed writer, never read, and replaced by the next publish.
Deleting a task only clears its live pointer: its versions stay on disk and ``rollback`` revives one.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from .artifact import (PROMPTS_FILE, check_file, STATS_FILE, TASK_FILE, UPDATE_FILE, TaskArtifact,
                       artifact_from_parts, check_artifact, check_backbone, decode_task_json,
                       decode_tensors, encode_task_json, encode_tensors)
from .backends import Backend, make_backend
from .errors import ArtifactIntegrityError, BackboneMismatch, StoreError, StoreWriteFailed, TaskNotFound, VersionNotFound
from .feed import HEAD_FILE, ChangeBatch, Head
from .jsondoc import sha256_hex
from .names import validate_task_name, validate_version
from .settings import StoreSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskInfo:
    """A live task, as ``list()`` reports it (from its task.json, checked but tensors not read)."""

    name: str
    version: int  # the live version
    kind: str | None
    num_classes: int | None
    created_at: str | None
    backbone: dict[str, str] | None
    error: str | None = None  # why task.json failed its checks; the fields above are then None


@dataclass(frozen=True)
class VersionInfo:
    """One version of a task, as ``history()`` reports it."""

    name: str
    version: int
    live: bool
    kind: str | None
    num_classes: int | None
    created_at: str | None
    backbone: dict[str, str] | None
    metrics: dict[str, Any] | None
    error: str | None = None  # why task.json failed its checks; the fields above are then None


@dataclass(frozen=True)
class StoreSnapshot:
    """The live tasks at one generation, from a single head read (what a poller resyncs from)."""

    generation: int
    tasks: list[TaskInfo]


def _version_dir(name: str, version: int) -> str:
    return f"tasks/{validate_task_name(name)}/v{validate_version(version):06d}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class TaskStore:
    """Versioned task artifacts on one backend.

    Holds no state besides the backend, so one instance can be shared by threads; writers in any
    threads or processes are serialised by the backend's lock, and readers never need it.
    """

    def __init__(self, backend: Backend) -> None:
        self._backend = backend

    @property
    def url(self) -> str:
        return self._backend.url

    def __repr__(self) -> str:
        return f"TaskStore({self.url!r})"

    # --- change feed: one read of head.json each ----------------------------------------------

    def generation(self) -> int:
        """The store generation: +1 on every publish, delete and rollback; 0 for an empty store."""
        return self._head().generation

    def changes(self, since: int) -> ChangeBatch:
        """``(generation, changes after since)``; ``.resync`` says the caller must use ``snapshot()``."""
        return self._head().changes_since(since)

    # --- reading ------------------------------------------------------------------------------

    def snapshot(self) -> StoreSnapshot:
        head = self._head()
        tasks = [self._task_info(name, p.live) for name, p in sorted(head.tasks.items())
                 if p.live is not None]
        return StoreSnapshot(generation=head.generation, tasks=tasks)

    def list(self) -> list[TaskInfo]:
        """The live tasks, sorted by name."""
        return self.snapshot().tasks

    def get(self, name: str, version: int | None = None, *,
            backbone: dict[str, str] | None = None, fallback: bool = False,
            with_update_state: bool = False) -> TaskArtifact:
        """Load the live (or the given) version, verifying the SHA-256 of every file it reads.

        With ``backbone``, also refuse an artifact made for another backbone. Raises
        ``TaskNotFound``/``VersionNotFound``, ``ArtifactIntegrityError`` or ``BackboneMismatch``;
        a refused version changes nothing in the store. With ``fallback=True`` (live version only),
        a live version that fails verification is logged and the newest earlier version that
        verifies is returned instead (check ``.version``). update.safetensors is read (and
        verified) only with ``with_update_state=True``; otherwise ``.update_state`` stays empty.
        """
        name = validate_task_name(name)
        expected = None if backbone is None else check_backbone(backbone, what="backbone", error=ValueError)
        if fallback and version is not None:
            raise ValueError("fallback applies to the live version only; do not pass a version")
        live = self._resolve(self._head(), name, version)
        load = dict(backbone=expected, with_update_state=with_update_state)
        try:
            return self._load(name, live, **load)
        except ArtifactIntegrityError as refused:
            if not fallback:
                raise
            for older in range(live - 1, 0, -1):
                with contextlib.suppress(ArtifactIntegrityError):
                    artifact = self._load(name, older, **load)
                    log.warning("%s; serving version %d instead", refused, older)
                    artifact.refused_live = str(refused)
                    return artifact
            raise

    def verify(self, name: str, version: int | None = None) -> str | None:
        """Why the live (or given) version would be refused — task.json or any file's checksum — else None.

        Reads the files' bytes but decodes no tensor (no torch): cheap enough for a listing."""
        name = validate_task_name(name)
        version = self._resolve(self._head(), name, version)
        try:
            doc, _ = self._task_doc(name, version)
            for file in doc["files"]:
                check_file(self._read(name, version, file), doc, file=file)
        except StoreError as exc:
            return str(exc)
        return None

    def history(self, name: str) -> list[VersionInfo]:
        """Every version of a task (deleted tasks included), oldest first."""
        name = validate_task_name(name)
        pointer = self._head().tasks.get(name)
        if pointer is None:
            raise TaskNotFound(f"no task {name!r} in store {self.url}", task=name)
        return [self._version_info(name, v, live=v == pointer.live)
                for v in range(1, pointer.latest + 1)]

    # --- writing: each under the writer lock, committed by one head replace ---------------------

    def publish(self, artifact: TaskArtifact) -> int:
        """Store ``artifact`` as the task's next version and make it live; return the version.

        Fills in ``artifact.version``, ``created_at`` and ``checksums``.
        """
        check_artifact(artifact)
        name = validate_task_name(artifact.name)
        tensors = {PROMPTS_FILE: encode_tensors(artifact.prompts, task=name, file=PROMPTS_FILE),
                   STATS_FILE: encode_tensors(artifact.stats, task=name, file=STATS_FILE)}
        if artifact.update_state:  # no update state, no file: the version looks as it always did
            tensors[UPDATE_FILE] = encode_tensors(artifact.update_state, task=name, file=UPDATE_FILE)
        with self._writing(f"publish task {name!r}"), self._backend.lock():
            self._backend.cleanup()
            head = self._head()
            version, created_at = head.next_version(name), _now()
            task_json = encode_task_json(artifact, version=version, created_at=created_at,
                                         tensor_files=tensors)
            self._backend.write_dir(_version_dir(name, version), {**tensors, TASK_FILE: task_json})
            # Read back, update state included: what does not verify never goes live.
            self._load(name, version, with_update_state=True)
            self._write_head(head.published(name, version, created_at))
        artifact.version, artifact.created_at = version, created_at
        artifact.checksums = {f: sha256_hex(b) for f, b in {**tensors, TASK_FILE: task_json}.items()}
        return version

    def check_writable(self) -> None:
        """Raise StoreWriteFailed now if the store cannot be written (read-only, no permission), before a long job
        that ends by publishing. Takes the writer lock once and changes nothing."""
        with self._writing("write to it"), self._backend.lock():
            pass

    def delete(self, name: str) -> None:
        """Take a task out of service. Its versions stay in the store; ``rollback`` revives one."""
        name = validate_task_name(name)
        with self._writing(f"delete task {name!r}"), self._backend.lock():
            head = self._head()
            pointer = head.tasks.get(name)
            if pointer is None or pointer.live is None:
                raise TaskNotFound(f"no live task {name!r} to delete in store {self.url}", task=name)
            self._write_head(head.deleted(name, _now()))

    def rollback(self, name: str, version: int) -> None:
        """Make an existing version live again (also revives a deleted task).

        The version is verified first; if it is damaged nothing changes. Rolling back to the version
        that is already live is a no-op and adds no change to the feed.
        """
        name, version = validate_task_name(name), validate_version(version)
        with self._writing(f"roll task {name!r} back"), self._backend.lock():
            head = self._head()
            version = self._resolve(head, name, version)
            if head.tasks[name].live == version:
                return
            self._load(name, version, with_update_state=True)
            self._write_head(head.rolled_back(name, version, _now()))

    # --- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """The backend's OS errors while writing (a full disk, a read-only store) as StoreWriteFailed, which says that
        nothing changed: a version goes live only by the head's atomic replace, the last step."""
        try:
            yield
        except StoreError:
            raise
        except OSError as e:
            raise StoreWriteFailed(f"store {self.url}: cannot {what}: {e.strerror or e}; nothing changed") from e

    def _head(self) -> Head:
        try:
            raw = self._backend.read(HEAD_FILE)
        except FileNotFoundError:
            return Head()  # nothing published yet
        return Head.from_bytes(raw, where=f"store {self.url}: {HEAD_FILE}")

    def _write_head(self, head: Head) -> None:
        self._backend.replace(HEAD_FILE, head.to_bytes())

    def _resolve(self, head: Head, name: str, version: int | None) -> int:
        pointer = head.tasks.get(name)
        if pointer is None:
            raise TaskNotFound(f"no task {name!r} in store {self.url}", task=name)
        if version is None:
            if pointer.live is None:
                raise TaskNotFound(f"task {name!r} is deleted (versions 1..{pointer.latest} are "
                                   f"kept; rollback makes one live again)", task=name)
            return pointer.live
        version = validate_version(version)
        if version > pointer.latest:
            raise VersionNotFound(f"task {name!r} has no version {version} (latest is "
                                  f"{pointer.latest})", task=name, version=version)
        return version

    def _read(self, name: str, version: int, file: str) -> bytes:
        try:
            return self._backend.read(f"{_version_dir(name, version)}/{file}")
        except FileNotFoundError:
            raise ArtifactIntegrityError(f"task {name!r} version {version}: {file} is missing",
                                         task=name, version=version, file=file) from None

    def _task_doc(self, name: str, version: int) -> tuple[dict[str, Any], bytes]:
        raw = self._read(name, version, TASK_FILE)
        return decode_task_json(raw, task=name, version=version), raw

    def _load(self, name: str, version: int, *, backbone: dict[str, str] | None = None,
              with_update_state: bool = False) -> TaskArtifact:
        doc, raw = self._task_doc(name, version)
        if backbone is not None and doc["backbone"] != backbone:
            raise BackboneMismatch(
                f"task {name!r} version {version} was made for backbone {doc['backbone']}, not "
                f"{backbone}; load the matching backbone or retrain the task",
                task=name, version=version, file=TASK_FILE)
        prompts = decode_tensors(self._read(name, version, PROMPTS_FILE), doc, file=PROMPTS_FILE)
        stats = decode_tensors(self._read(name, version, STATS_FILE), doc, file=STATS_FILE)
        update_state = None
        if with_update_state and UPDATE_FILE in doc["files"]:
            update_state = decode_tensors(self._read(name, version, UPDATE_FILE), doc, file=UPDATE_FILE)
        return artifact_from_parts(doc, prompts, stats, raw, update_state=update_state)

    def _task_info(self, name: str, version: int) -> TaskInfo:
        try:
            doc, _ = self._task_doc(name, version)
        except StoreError as exc:
            return TaskInfo(name, version, None, None, None, None, error=str(exc))
        return TaskInfo(name, version, doc["kind"], len(doc["class_names"]), doc["created_at"],
                        doc["backbone"])

    def _version_info(self, name: str, version: int, *, live: bool) -> VersionInfo:
        try:
            doc, _ = self._task_doc(name, version)
        except StoreError as exc:
            return VersionInfo(name, version, live, None, None, None, None, None, error=str(exc))
        return VersionInfo(name, version, live, doc["kind"], len(doc["class_names"]),
                           doc["created_at"], doc["backbone"], doc["metrics"])


def open_store(url: str | os.PathLike[str] | None = None, *, lock_timeout: float = 60.0) -> TaskStore:
    """Open the store at ``url``: a directory (default ``KEEPCLIP_STORE`` or ``./keepclip-store``)
    or an fsspec URL (``memory://``, ``file://``, ``s3://``, ``gs://``, ...). Nothing is created
    until the first write."""
    if url is None:
        url = StoreSettings().store
    return TaskStore(make_backend(url, lock_timeout=lock_timeout))
