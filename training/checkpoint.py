"""Per-epoch training state as safetensors + JSON (never pickle), and where a run keeps it.

A checkpoint is a directory:

    state.safetensors   prompts/<key>   the new task's prompts after the epoch
                        best/<key>      the prompts of the best epoch so far (what gets published)
                        momentum/<key>  SGD momentum buffers (only with --momentum > 0)
                        stats/<key>     the task fingerprint, so a resumed run does not recompute it
    state.json          epoch, best epoch, per-epoch history, seconds spent, the recipe and the task identity
                        (checked on resume), written last: a directory without it is incomplete

Locally a run's checkpoints are `<checkpoint-dir>/<run-name>/epoch-NNNN/`; on Ray Train the same directories are
reported with `ray.train.report(..., checkpoint=...)` into `RunConfig(storage_path=<checkpoint-dir>, name=<run-name>)`.
"""
from __future__ import annotations

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from safetensors.torch import load_file, save_file

from .errors import InputError

STATE_TENSORS = "state.safetensors"
STATE_JSON = "state.json"
FORMAT = 1
GROUPS = ("prompts", "best", "momentum", "stats")


@dataclass
class TrainState:
    epoch: int  # epochs completed (1-based count)
    info: dict[str, Any]  # JSON: best_epoch, best_val_accuracy, history, seconds, recipe, identity, zero-shot metrics
    prompts: dict[str, torch.Tensor] = field(default_factory=dict)
    best: dict[str, torch.Tensor] = field(default_factory=dict)
    momentum: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)


def save_state(directory: str | Path, state: TrainState) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"{group}/{key}": t.detach().cpu().contiguous().clone() for group in GROUPS for key, t in getattr(state, group).items()}
    save_file(tensors, str(directory / STATE_TENSORS), metadata={"format": "pt"})
    doc = {"format": FORMAT, "epoch": state.epoch, **state.info}
    (directory / STATE_JSON).write_text(json.dumps(doc, indent=2, sort_keys=True, allow_nan=False))


def load_state(directory: str | Path) -> TrainState:
    directory = Path(directory)
    try:
        doc = json.loads((directory / STATE_JSON).read_text())
        tensors = load_file(str(directory / STATE_TENSORS))
    except (OSError, ValueError) as e:  # ValueError covers JSON and safetensors header errors
        raise InputError(f"checkpoint {directory} cannot be read ({type(e).__name__}: {e})") from None
    if doc.get("format") != FORMAT:
        raise InputError(f"checkpoint {directory}: format {doc.get('format')!r}, this version reads {FORMAT}")
    groups: dict[str, dict[str, torch.Tensor]] = {g: {} for g in GROUPS}
    for name, tensor in tensors.items():
        group, _, key = name.partition("/")
        if group in groups:
            groups[group][key] = tensor
    epoch = doc.pop("epoch")
    doc.pop("format")
    return TrainState(epoch=epoch, info=doc, **groups)


def check_resumable(info: dict[str, Any], recipe: dict[str, Any], identity: dict[str, Any], where: str) -> None:
    """A run resumes only with the same task, data and recipe; the message names the first field that differs."""
    for section, expected in (("identity", identity), ("recipe", recipe)):
        saved = info.get(section, {})
        for key in sorted(set(saved) | set(expected)):
            if key == "data":
                continue  # paths may move between machines; n_train/n_val/class names still have to match
            if saved.get(key) != expected.get(key):
                raise InputError(
                    f"cannot resume from {where}: {key!r} differs (checkpoint: {_short(saved.get(key))}, now: "
                    f"{_short(expected.get(key))}); resume with the arguments of the original run, or start a new run"
                )


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."


class Checkpoints(Protocol):
    """Where a run's per-epoch state goes. `save` is collective under Ray Train: every rank calls it every epoch."""

    def latest(self) -> TrainState | None: ...

    def save(self, epoch: int, state: Callable[[], TrainState], metrics: dict[str, Any]) -> None: ...


def epoch_dir_name(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def latest_local(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint directory of a local run (None when there is none)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    done = sorted(d for d in run_dir.glob("epoch-*") if (d / STATE_JSON).is_file())
    return done[-1] if done else None


class LocalCheckpoints:
    """`<run_dir>/epoch-NNNN/`, each written aside and renamed into place; the newest `keep` are kept."""

    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.run_dir = Path(run_dir)
        self.keep = keep

    def latest(self) -> TrainState | None:
        found = latest_local(self.run_dir)
        return None if found is None else load_state(found)

    def save(self, epoch: int, state: Callable[[], TrainState], metrics: dict[str, Any]) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        final = self.run_dir / epoch_dir_name(epoch)
        staging = self.run_dir / f".staging-{epoch_dir_name(epoch)}-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        save_state(staging, state())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        done = sorted(d for d in self.run_dir.glob("epoch-*") if d.is_dir())
        for old in done[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def temporary_directory() -> Iterator[Path]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="keepclip-ckpt-") as d:
        yield Path(d)
