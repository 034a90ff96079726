"""`keepclip --help`, `classify` and `tasks` (against a service) must not import torch & co: that cost 14-38 s of
start-up on two cores. Checked in a fresh interpreter, by the modules loaded rather than by a flaky timing."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO

HEAVY = ("torch", "open_clip", "ray", "safetensors", "backbone", "prompts_store", "training", "service", "numpy", "PIL")

COMMANDS = """
import json, sys
from typer.testing import CliRunner
from clients.cli import app

codes = [CliRunner().invoke(app, args).exit_code for args in (
    ["--help"], ["classify", "--help"], ["tasks", "list", "--help"], ["tasks", "delete", "--help"],
    ["classify", sys.argv[1], "--url", "http://127.0.0.1:1"], ["tasks", "list", "--url", "http://127.0.0.1:1"],
)]
print(json.dumps({"codes": codes, "heavy": sorted(m for m in %r if m in sys.modules)}))
""" % (HEAVY,)


def test_help_classify_and_tasks_import_nothing_heavy(tmp_path):
    image = tmp_path / "cat.png"
    image.write_bytes(b"x")
    run = subprocess.run([sys.executable, "-c", COMMANDS, str(image)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0, 0, 0, 1, 1]  # the last two: nothing listens on port 1
    assert result["heavy"] == []
