"""The store head: generation, live pointers and the change feed, in one small JSON document.

Every mutation (publish, delete, rollback) makes a new head with ``generation + 1`` and one more
event, and replaces ``head.json`` atomically: that single replace is the commit point, so the live
pointers and the feed can never disagree. A poller reads only this file — one small read gives the
generation and what changed since the generation it last saw. The event tail is bounded
(``FEED_LENGTH``); a poller that fell further behind is told to resync from ``list()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import StoreCorrupted, UnsupportedFormat
from .jsondoc import DocumentError, dump_document, load_document
from .names import validate_task_name

HEAD_FILE = "head.json"
HEAD_FORMAT_VERSION = 1
FEED_LENGTH = 128  # events kept in the head: bounds the poll size (~100 bytes each)


@dataclass(frozen=True)
class Change:
    """One event of the feed."""

    generation: int  # the store generation this change produced
    op: Literal["publish", "delete", "rollback"]
    name: str
    version: int | None  # publish/rollback: the version made live; delete: the one that was live
    at: str  # ISO-8601 UTC


class ChangeBatch(tuple):
    """What one poll returns: unpacks as ``(generation, changes)``.

    ``resync`` is True when events between the caller's generation and ``generation`` are no longer
    in the feed (the caller fell more than ``FEED_LENGTH`` changes behind, or its generation is
    ahead of this store's): the caller must rebuild its state from ``snapshot()``/``list()``.
    """

    resync: bool

    def __new__(cls, generation: int, changes: list[Change], resync: bool = False) -> ChangeBatch:
        batch = super().__new__(cls, (generation, changes))
        batch.resync = resync
        return batch

    def __getnewargs__(self) -> tuple[int, list[Change], bool]:  # pickling (e.g. through Ray)
        return self[0], self[1], self.resync

    @property
    def generation(self) -> int:
        return self[0]

    @property
    def changes(self) -> list[Change]:
        return self[1]

    def __repr__(self) -> str:
        return f"ChangeBatch(generation={self[0]}, changes={self[1]!r}, resync={self.resync})"


@dataclass(frozen=True)
class Pointer:
    """A task's entry in the head."""

    live: int | None  # the live version, None once deleted
    latest: int  # the highest committed version; versions 1..latest all exist


@dataclass(frozen=True)
class Head:
    generation: int = 0
    tasks: dict[str, Pointer] = field(default_factory=dict)
    events: tuple[Change, ...] = ()

    def next_version(self, name: str) -> int:
        pointer = self.tasks.get(name)
        return pointer.latest + 1 if pointer else 1

    def published(self, name: str, version: int, at: str) -> Head:
        return self._commit(name, Pointer(live=version, latest=version), "publish", version, at)

    def deleted(self, name: str, at: str) -> Head:
        old = self.tasks[name]
        return self._commit(name, replace(old, live=None), "delete", old.live, at)

    def rolled_back(self, name: str, version: int, at: str) -> Head:
        pointer = replace(self.tasks[name], live=version)
        return self._commit(name, pointer, "rollback", version, at)

    def _commit(self, name: str, pointer: Pointer, op: str, version: int | None, at: str) -> Head:
        generation = self.generation + 1
        event = Change(generation=generation, op=op, name=name, version=version, at=at)  # type: ignore[arg-type]
        return Head(generation=generation, tasks={**self.tasks, name: pointer},
                    events=(*self.events, event)[-FEED_LENGTH:])

    def changes_since(self, since: int) -> ChangeBatch:
        if isinstance(since, bool) or not isinstance(since, int) or since < 0:
            raise ValueError(f"since must be a store generation (an int >= 0), not {since!r}")
        if since == self.generation:
            return ChangeBatch(self.generation, [])
        oldest = self.events[0].generation if self.events else self.generation + 1
        if since > self.generation or since + 1 < oldest:
            return ChangeBatch(self.generation, [], resync=True)
        return ChangeBatch(self.generation, [e for e in self.events if e.generation > since])

    # --- serialisation -----------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        doc = {
            "format_version": HEAD_FORMAT_VERSION,
            "generation": self.generation,
            "tasks": {n: {"live": p.live, "latest": p.latest} for n, p in self.tasks.items()},
            "events": [e.__dict__ for e in self.events],
        }
        return dump_document(doc, indent=None)  # compact: every poll reads it

    @classmethod
    def from_bytes(cls, raw: bytes, *, where: str) -> Head:
        try:
            raw_doc = load_document(raw, indent=None)
        except DocumentError as exc:
            raise StoreCorrupted(f"{where} is damaged: {exc}", file=HEAD_FILE) from None
        fmt = raw_doc.get("format_version")
        if isinstance(fmt, int) and fmt > HEAD_FORMAT_VERSION:
            raise UnsupportedFormat(f"{where} has format version {fmt}; this library reads up to "
                                    f"{HEAD_FORMAT_VERSION} (upgrade keepclip)", file=HEAD_FILE)
        try:
            doc = _HeadDocument.model_validate(raw_doc)
            head = cls(generation=doc.generation,
                       tasks={validate_task_name(n): Pointer(p.live, p.latest)
                              for n, p in doc.tasks.items()},
                       events=tuple(Change(**e.model_dump()) for e in doc.events))
            head._check()
        except ValueError as exc:  # pydantic ValidationError and InvalidTaskName are ValueErrors
            raise StoreCorrupted(f"{where} is damaged: {exc}", file=HEAD_FILE) from None
        return head

    def _check(self) -> None:
        gens = [e.generation for e in self.events]
        if gens and (gens != list(range(gens[0], gens[0] + len(gens))) or gens[-1] != self.generation):
            raise ValueError("feed generations are not consecutive up to the head generation")
        for name, p in self.tasks.items():
            if p.live is not None and not 1 <= p.live <= p.latest:
                raise ValueError(f"task {name!r} live version {p.live} is not in 1..{p.latest}")
        for e in self.events:
            validate_task_name(e.name)


class _PointerDoc(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    live: int | None
    latest: int = Field(ge=1)


class _ChangeDoc(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    generation: int = Field(ge=1)
    op: Literal["publish", "delete", "rollback"]
    name: str
    version: int | None
    at: str


class _HeadDocument(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    format_version: Literal[1]
    generation: int = Field(ge=0)
    tasks: dict[str, _PointerDoc]
    events: list[_ChangeDoc]

