"""The task artifact: what one task version holds, and its three (or four) files.

    prompts.safetensors  the learner's tensors (residual prompts: prefix K/V per layer and tower)
    stats.safetensors    the task fingerprint (mean, covariance factor, router keys, gate calibration)
    update.safetensors   optional: the learner's update state (what a refit starts from); only
                         written when non-empty, and only read when asked for
    task.json            everything else, plus the SHA-256 and size of every tensor file

task.json is written with ``indent=2, sort_keys=True`` and is self-checking (see ``jsondoc``), so
every byte of every file is covered by a checksum. Tensors are read only with
``safetensors.torch.load`` on bytes whose hash was checked first.
"""

from __future__ import annotations

import importlib.metadata
import json
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from typing import TYPE_CHECKING
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ArtifactIntegrityError, InvalidArtifact, UnsupportedFormat
from .jsondoc import DocumentError, dump_document, load_document, sha256_hex
from .names import validate_task_name

if TYPE_CHECKING:  # torch and safetensors load on first use: reading task.json (list, history) needs neither
    import torch

FORMAT_VERSION = 1  # bump when a reader of the previous format could misread a new file
PROMPTS_FILE = "prompts.safetensors"
STATS_FILE = "stats.safetensors"
UPDATE_FILE = "update.safetensors"
TASK_FILE = "task.json"
TENSOR_FILES = (PROMPTS_FILE, STATS_FILE)  # always present
# The tensor files a task.json may list. A version without update state lists exactly the two it
# always did, so stores written before update.safetensors existed read unchanged.
_FILE_SETS = (frozenset(TENSOR_FILES), frozenset({*TENSOR_FILES, UPDATE_FILE}))
DEFAULT_KIND = "residual-prompts"
_KIND_RE = re.compile(r"[a-z0-9][a-z0-9._+-]{0,63}")


@dataclass(kw_only=True, eq=False)  # eq=False: tensor == is elementwise
class TaskArtifact:
    """One task version, as a learner hands it to ``publish`` and as ``get`` returns it."""

    name: str
    class_names: list[str]
    backbone: dict[str, str]  # the backbone fingerprint: exactly {"name": ..., "sha256": ...}
    kind: str = DEFAULT_KIND  # which learner made it; selects how ``prompts`` is used
    templates: list[str] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)  # JSON-able training settings
    metrics: dict[str, Any] = field(default_factory=dict)  # JSON-able evaluation results
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)  # -> prompts.safetensors
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # -> stats.safetensors
    # -> update.safetensors when non-empty; replicas never need it, so ``get`` leaves it empty
    # unless called with ``with_update_state=True``
    update_state: dict[str, torch.Tensor] = field(default_factory=dict)
    # Filled in by the store on publish and get:
    version: int | None = None
    created_at: str | None = None  # ISO-8601, UTC
    checksums: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 hex
    refused_live: str | None = None  # get(fallback=True) served an older version: why the live one was refused

    def __repr__(self) -> str:
        return (f"TaskArtifact(name={self.name!r}, version={self.version}, kind={self.kind!r}, "
                f"classes={len(self.class_names)}, prompts={sorted(self.prompts)}, "
                f"stats={sorted(self.stats)}, update_state={sorted(self.update_state)})")


# --- task.json schema (what a reader accepts) -------------------------------------------------

class _FileRecord(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0)


class _TaskDocument(BaseModel):
    # Unknown keys are ignored so that additive changes need no format bump.
    model_config = ConfigDict(strict=True, extra="ignore")
    format_version: int
    name: str
    version: int = Field(ge=1)
    kind: str
    created_at: str
    class_names: list[str] = Field(min_length=1)
    templates: list[str]
    backbone: dict[str, str]
    recipe: dict[str, Any]
    metrics: dict[str, Any]
    files: dict[str, _FileRecord]
    libraries: dict[str, str]


# --- writing ----------------------------------------------------------------------------------

def check_artifact(artifact: TaskArtifact) -> None:
    """Refuse, with a message naming the field, anything ``publish`` could not store faithfully."""
    name = validate_task_name(artifact.name)

    def bad(msg: str) -> InvalidArtifact:
        return InvalidArtifact(f"cannot publish task {name!r}: {msg}", task=name)

    if not isinstance(artifact.kind, str) or not _KIND_RE.fullmatch(artifact.kind):
        raise bad(f"kind {artifact.kind!r} must be 1-64 characters of [a-z0-9._+-]")
    if not _is_str_list(artifact.class_names) or not artifact.class_names:
        raise bad("class_names must be a non-empty list of strings")
    if not _is_str_list(artifact.templates):
        raise bad("templates must be a list of strings")
    check_backbone(artifact.backbone, what=f"cannot publish task {name!r}: backbone",
                   error=lambda msg: InvalidArtifact(msg, task=name))
    for field_name in ("recipe", "metrics"):
        value = getattr(artifact, field_name)
        if not isinstance(value, dict):
            raise bad(f"{field_name} must be a dict")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise bad(f"{field_name} is not strict JSON ({exc})") from None
    import torch

    for field_name in ("prompts", "stats", "update_state"):
        tensors = getattr(artifact, field_name)
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and k and isinstance(v, torch.Tensor) for k, v in tensors.items()):
            raise bad(f"{field_name} must be a dict of non-empty string keys to torch tensors")


def check_backbone(backbone: object, *, what: str,
                   error: Callable[[str], Exception]) -> dict[str, str]:
    """A backbone fingerprint is exactly ``{"name": str, "sha256": str}``, both non-empty."""
    if (not isinstance(backbone, dict) or set(backbone) != {"name", "sha256"}
            or not all(isinstance(v, str) and v for v in backbone.values())):
        raise error(f"{what} must be exactly {{'name': str, 'sha256': str}}, got {backbone!r}")
    return dict(backbone)


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def encode_tensors(tensors: dict[str, torch.Tensor], *, task: str, file: str) -> bytes:
    """safetensors bytes of CPU, contiguous, un-aliased copies (safetensors refuses shared storage)."""
    import safetensors.torch

    try:
        plain = {k: t.detach().to("cpu").contiguous().clone() for k, t in tensors.items()}
        return safetensors.torch.save(plain, metadata={"format": "pt"})
    except Exception as exc:  # e.g. sparse, meta or an unsupported dtype
        raise InvalidArtifact(f"cannot publish task {task!r}: {file}: {exc}", task=task, file=file) from exc


def encode_task_json(artifact: TaskArtifact, *, version: int, created_at: str,
                     tensor_files: dict[str, bytes]) -> bytes:
    """task.json for ``artifact`` as version ``version``, recording the tensor files' checksums."""
    doc = {
        "format_version": FORMAT_VERSION,
        "name": artifact.name,
        "version": version,
        "kind": artifact.kind,
        "created_at": created_at,
        "class_names": list(artifact.class_names),
        "templates": list(artifact.templates),
        "backbone": dict(artifact.backbone),
        "recipe": artifact.recipe,
        "metrics": artifact.metrics,
        "files": {f: {"sha256": sha256_hex(b), "size": len(b)} for f, b in tensor_files.items()},
        "libraries": library_versions(),
    }
    return dump_document(doc, indent=2)


def library_versions() -> dict[str, str]:
    import safetensors
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "safetensors": safetensors.__version__}
    try:
        versions["keepclip"] = importlib.metadata.version("keepclip")
    except importlib.metadata.PackageNotFoundError:
        pass  # running from a source tree
    return versions


# --- reading ----------------------------------------------------------------------------------

def decode_task_json(raw: bytes, *, task: str, version: int) -> dict[str, Any]:
    """Parse and check task.json of ``task`` version ``version``; return the document."""
    where = dict(task=task, version=version, file=TASK_FILE)
    prefix = f"task {task!r} version {version}: {TASK_FILE}"
    try:
        doc = load_document(raw, indent=2)
    except DocumentError as exc:
        raise ArtifactIntegrityError(f"{prefix} is damaged: {exc}", **where) from None
    fmt = doc.get("format_version")
    if isinstance(fmt, int) and fmt > FORMAT_VERSION:
        raise UnsupportedFormat(f"{prefix} has format version {fmt}; this library reads up to "
                                f"{FORMAT_VERSION} (upgrade keepclip)", **where)
    try:
        parsed = _TaskDocument.model_validate(doc)
    except ValidationError as exc:
        raise ArtifactIntegrityError(f"{prefix} is malformed: {_short(exc)}", **where) from None
    if parsed.name != task or parsed.version != version:
        raise ArtifactIntegrityError(
            f"{prefix} describes task {parsed.name!r} version {parsed.version}, not what its "
            f"location says", **where)
    if set(parsed.files) not in _FILE_SETS:
        raise ArtifactIntegrityError(
            f"{prefix} lists files {sorted(parsed.files)}; expected {PROMPTS_FILE} and "
            f"{STATS_FILE}, optionally with {UPDATE_FILE}", **where)
    return doc


def _short(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])


def check_file(raw: bytes, doc: dict[str, Any], *, file: str) -> None:
    """ArtifactIntegrityError unless ``raw`` has the SHA-256 and size task.json records for ``file``."""
    task, version = doc["name"], doc["version"]
    expected = doc["files"][file]
    actual = sha256_hex(raw)
    if actual != expected["sha256"] or len(raw) != expected["size"]:
        raise ArtifactIntegrityError(
            f"task {task!r} version {version}: {file} is damaged: sha256 {actual[:16]}... "
            f"({len(raw)} bytes) does not match {expected['sha256'][:16]}... "
            f"({expected['size']} bytes) recorded in {TASK_FILE}", task=task, version=version, file=file)


def decode_tensors(raw: bytes, doc: dict[str, Any], *, file: str) -> dict[str, torch.Tensor]:
    """Check ``raw`` against the checksum task.json records for ``file``, then load it."""
    task, version = doc["name"], doc["version"]
    where = dict(task=task, version=version, file=file)
    check_file(raw, doc, file=file)
    import safetensors.torch

    try:
        return safetensors.torch.load(raw)
    except Exception as exc:  # checksum matched, so the writer produced a bad file
        raise ArtifactIntegrityError(f"task {task!r} version {version}: {file} is not a "
                                     f"readable safetensors file ({exc})", **where) from exc


def artifact_from_parts(doc: dict[str, Any], prompts: dict[str, torch.Tensor],
                        stats: dict[str, torch.Tensor], task_json: bytes, *,
                        update_state: dict[str, torch.Tensor] | None = None) -> TaskArtifact:
    # Every file task.json lists is in ``checksums``, update.safetensors even when it was not read.
    checksums = {f: rec["sha256"] for f, rec in doc["files"].items()}
    checksums[TASK_FILE] = sha256_hex(task_json)
    return TaskArtifact(
        name=doc["name"], kind=doc["kind"], class_names=doc["class_names"],
        templates=doc["templates"], backbone=doc["backbone"], recipe=doc["recipe"],
        metrics=doc["metrics"], prompts=prompts, stats=stats, update_state=update_state or {},
        version=doc["version"], created_at=doc["created_at"], checksums=checksums)
