"""Errors of the training package: each message names the file, argument or field to fix."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input found before training starts (data, class names, templates, store, resume): exit code 2."""


class TrainingStopped(Exception):
    """Raised after the checkpoint of `--stop-after-epoch K` is written: the run can be resumed, nothing was published."""

    def __init__(self, epoch: int):
        super().__init__(epoch)  # args = (epoch,): survives pickling between processes
        self.epoch = epoch

    def __str__(self) -> str:
        return f"stopped after epoch {self.epoch} as asked; the checkpoint of that epoch is saved"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; nothing is published."""
