"""Errors raised by the task store.

Every error is a ``StoreError``. Errors about one artifact carry ``task``, ``version`` and ``file``
attributes (``None`` where they do not apply), and their message names them, so a log line alone
says which artifact to look at.
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by ``prompts_store``."""

    def __init__(self, message: str, *, task: str | None = None, version: int | None = None,
                 file: str | None = None) -> None:
        super().__init__(message)
        self.task = task
        self.version = version
        self.file = file

    def __str__(self) -> str:  # KeyError subclasses would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class InvalidTaskName(StoreError, ValueError):
    """A task name outside 1-64 characters of ``[a-z0-9._-]`` starting with a letter or digit."""


class InvalidVersion(StoreError, ValueError):
    """A version that is not a positive integer."""


class InvalidArtifact(StoreError, ValueError):
    """An artifact handed to ``publish`` that cannot be stored as given."""


class TaskNotFound(StoreError, KeyError):
    """No such task, or the task is not live (deleted) where a live one is needed."""


class VersionNotFound(TaskNotFound):
    """The task exists but has no such version."""


class ArtifactIntegrityError(StoreError):
    """A stored file is missing, truncated, altered or malformed (checksum or format check failed)."""


class UnsupportedFormat(ArtifactIntegrityError):
    """A stored file was written by a newer format version than this library reads."""


class BackboneMismatch(StoreError):
    """The artifact was made for another backbone than the one asked for."""


class StoreCorrupted(StoreError):
    """The store's head document (live pointers and change feed) cannot be read."""


class StoreLockTimeout(StoreError, TimeoutError):
    """Another writer held the store lock for longer than the timeout."""


class StoreWriteFailed(StoreError, OSError):
    """The store could not be written (disk full, read-only, no permission). Nothing changed: the live versions and
    the change feed are as they were, and the partial files are removed."""
