"""Validation of task names and version numbers.

Store paths are built only from names and versions that passed these checks, so hostile input
(``../x``, ``/etc``, NUL, look-alike Unicode, ...) never reaches the filesystem.
"""

from __future__ import annotations

import operator
import re
import unicodedata

from .errors import InvalidTaskName, InvalidVersion

MAX_NAME_LENGTH = 64
_ALLOWED = "[a-z0-9._-]"
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RULE = f"task names are 1-{MAX_NAME_LENGTH} characters of {_ALLOWED}, starting with a letter or digit"


def validate_task_name(name: object) -> str:
    """Return ``name`` as a plain ``str`` if it is a valid task name, else raise ``InvalidTaskName``."""
    if not isinstance(name, str):
        raise InvalidTaskName(f"task name must be a string, not {type(name).__name__}; {_RULE}")
    name = str.__str__(name)  # a plain str, whatever subclass came in
    problem = _first_problem(name)
    if problem is not None:
        raise InvalidTaskName(f"invalid task name {_show(name)}: {problem}; {_RULE}")
    return name


def _first_problem(name: str) -> str | None:
    """Say what is wrong with ``name`` in words, or ``None`` when it is valid."""
    if _NAME_RE.fullmatch(name):
        return None
    if not name:
        return "it is empty"
    if len(name) > MAX_NAME_LENGTH:
        return f"it is {len(name)} characters long (at most {MAX_NAME_LENGTH})"
    if "\x00" in name:
        return "it contains a NUL character"
    if "/" in name or "\\" in name:
        return "it contains a path separator"
    for ch in name:
        if ord(ch) > 127:
            label = unicodedata.name(ch, "unnamed character")
            return f"it contains the non-ASCII character U+{ord(ch):04X} {label} (only ASCII is allowed)"
    for ch in name:
        if not re.fullmatch(_ALLOWED, ch):
            hint = " (use lowercase)" if ch.isupper() else ""
            return f"it contains the character {ch!r}{hint}"
    return f"it starts with {name[0]!r}"


def _show(name: str) -> str:
    """An ASCII-only, bounded rendering of untrusted input for error messages."""
    shown = ascii(name[:80])
    return shown + f"... ({len(name)} characters)" if len(name) > 80 else shown


def validate_version(version: object) -> int:
    """Return ``version`` as an ``int`` if it is a positive integer, else raise ``InvalidVersion``."""
    if isinstance(version, bool):
        raise InvalidVersion(f"version must be a positive integer, not {version!r}")
    try:
        value = operator.index(version)  # accepts numpy integers, refuses floats and strings
    except TypeError:
        raise InvalidVersion(f"version must be a positive integer, not {version!r}") from None
    if value < 1:
        raise InvalidVersion(f"version must be a positive integer, not {value}")
    return value
