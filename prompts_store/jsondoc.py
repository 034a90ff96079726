"""Self-checking JSON documents.

A document carries ``document_sha256``: the SHA-256 of its own canonical serialization with that
key left out. A reader re-serializes what it parsed and requires the same bytes and the same hash,
so any changed byte — in a value, in a key, in the whitespace or in the hash itself — is caught.
JSON is the only thing parsed here; nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

CHECKSUM_KEY = "document_sha256"


class DocumentError(ValueError):
    """The bytes are not an intact document; the message says why (callers add the location)."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _serialize(doc: dict[str, Any], indent: int | None) -> bytes:
    separators = (",", ": ") if indent is not None else (",", ":")
    text = json.dumps(doc, indent=indent, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      separators=separators)
    return (text + "\n").encode("utf-8")


def dump_document(doc: dict[str, Any], *, indent: int | None) -> bytes:
    """Serialize ``doc`` (sorted keys) with its ``document_sha256`` added."""
    body = {k: v for k, v in doc.items() if k != CHECKSUM_KEY}
    return _serialize({**body, CHECKSUM_KEY: sha256_hex(_serialize(body, indent))}, indent)


def load_document(raw: bytes, *, indent: int | None) -> dict[str, Any]:
    """Parse and check bytes written by ``dump_document``; raise ``DocumentError`` if they differ."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DocumentError(f"not valid UTF-8 JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get(CHECKSUM_KEY), str):
        raise DocumentError(f"not a JSON object with a {CHECKSUM_KEY!r} string")
    try:
        canonical = dump_document(doc, indent=indent)
    except ValueError as exc:  # NaN/Infinity never written by us
        raise DocumentError(f"holds values that are not strict JSON ({exc})") from None
    # The hash is part of the bytes, so equal bytes also mean the recorded hash is the right one.
    if canonical != raw:
        raise DocumentError(f"content does not match its {CHECKSUM_KEY} (altered or truncated)")
    del doc[CHECKSUM_KEY]
    return doc
