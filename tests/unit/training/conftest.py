"""Fixtures for the training tests: a place for the store and checkpoints, and add-task run in-process."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from training.add_task import main


@dataclass
class Run:
    code: int
    out: str
    err: str


@dataclass
class Paths:
    root: Path
    store: Path
    checkpoints: Path


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from a second thread, and spinning OpenMP threads collapse when other jobs share
    the two cores; the Ray Train workers run with one thread too."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return Paths(tmp_path, tmp_path / "store", tmp_path / "checkpoints")


@pytest.fixture
def add_task(capsys):
    """add_task(argv) -> Run(code, out, err): `training.add_task.main` in this process, output captured."""

    def run(argv: list[str]) -> Run:
        code = main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    return run
