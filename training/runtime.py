"""Small things the driver and the Ray Train workers share: loading the backbone the same way, and logging."""
from __future__ import annotations

import logging
import sys

RANDOM_INIT_SEED = 0  # `--pretrained none` builds the random init of this torch seed, on every process alike


def load_frozen_backbone(model: str, pretrained: str | None, device: str):
    """`backbone.load_backbone`, with a fixed seed around it so that a random init (`--pretrained none`, test configs)
    is the same on the driver and on every worker, and the same as the tests' `tiny_backbone()`."""
    import torch

    from backbone import load_backbone

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        return load_backbone(model, pretrained, device)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (it is replaced under pytest's capture, and by some launchers)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Progress of our packages on stderr as plain lines; libraries stay at WARNING."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    training = logging.getLogger("training")
    training.setLevel(level)
    if not any(getattr(h, "_keepclip_training", False) for h in training.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._keepclip_training = True  # type: ignore[attr-defined]
        training.addHandler(handler)
        training.propagate = False
    for package in ("backbone", "prompts_store"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.WARNING)
