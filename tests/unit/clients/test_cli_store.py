"""`keepclip tasks ... --store DIR`: the store itself, without a service or a token."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clients.cli import app
from prompts_store import TaskArtifact, open_store

runner = CliRunner()
BACKBONE = {"name": "keepclip-tiny-a", "sha256": "ab" * 32}


@pytest.fixture
def store(tmp_path):
    """cars v1 (2 classes), cars v2 (3 classes, live), and birds whose task.json is damaged."""
    path = tmp_path / "store"
    tasks = open_store(path)
    tasks.publish(TaskArtifact(name="cars", class_names=["sedan", "van"], backbone=BACKBONE, metrics={"val_acc": 0.8}))
    tasks.publish(TaskArtifact(name="cars", class_names=["sedan", "van", "bus"], backbone=BACKBONE, kind="head",
                               templates=["a photo of a {}."], metrics={"val_acc": 0.9}))
    tasks.publish(TaskArtifact(name="birds", class_names=["owl"], backbone=BACKBONE))
    (path / "tasks" / "birds" / "v000001" / "task.json").write_text("{}")
    return path


def tasks(*args: str):
    return runner.invoke(app, ["tasks", *args])


def test_list_shows_each_live_task_and_why_one_is_damaged(store):
    out = tasks("list", "--store", str(store))
    assert out.exit_code == 1, out.output  # a damaged task is an error: the table, then a line on stderr
    assert "error: task birds:" in out.stderr and "task.json is damaged" in out.stderr
    title, header, birds, cars = out.stdout.splitlines()
    assert title == "store generation 3"
    assert header.split() == ["task", "version", "kind", "classes", "created", "error"]
    assert cars.split()[:4] == ["cars", "2", "head", "3"] and cars.split()[4].startswith("20")
    assert birds.split()[:5] == ["birds", "1", "-", "-", "-"] and "task.json is damaged" in birds
    listing = json.loads(tasks("list", "--store", str(store), "--json").stdout)
    assert listing["served_generation"] is None and [t["name"] for t in listing["tasks"]] == ["birds", "cars"]


def test_no_error_column_when_every_task_is_sound(store):
    tasks("delete", "birds", "--store", str(store))
    header = tasks("list", "--store", str(store)).stdout.splitlines()[1]
    assert header.split() == ["task", "version", "kind", "classes", "created"]


def test_show_gives_every_version_with_its_metrics(store):
    out = tasks("show", "cars", "--store", str(store))
    assert out.exit_code == 0, out.output
    detail = json.loads(out.stdout)
    assert detail["version"] == 2 and detail["class_names"] == ["sedan", "van", "bus"] and detail["templates"] == ["a photo of a {}."]
    assert [(v["version"], v["live"], v["metrics"]) for v in detail["versions"]] == [(1, False, {"val_acc": 0.8}), (2, True, {"val_acc": 0.9})]
    damaged = json.loads(tasks("show", "birds", "--store", str(store)).stdout)
    assert "task.json is damaged" in damaged["error"] and damaged["class_names"] is None


def test_delete_and_rollback_change_the_store_without_a_token(store, monkeypatch):
    monkeypatch.delenv("KEEPCLIP_ADMIN_TOKEN", raising=False)
    out = tasks("delete", "cars", "--store", str(store))
    assert out.exit_code == 0 and out.stdout.strip() == "deleted cars (was v2); store generation 4"
    assert [t.name for t in open_store(store).list()] == ["birds"]
    out = tasks("rollback", "cars", "1", "--store", str(store))
    assert out.exit_code == 0 and out.stdout.strip() == "cars v1 is live; store generation 5"
    assert open_store(store).get("cars").class_names == ["sedan", "van"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["show", "nope"], "no task 'nope' in store"),
        (["delete", "nope"], "no task 'nope' in store"),
        (["rollback", "cars", "7"], "task 'cars' has no version 7 (latest is 2)"),
        (["rollback", "Bad/Name", "1"], "invalid task name 'Bad/Name'"),
    ],
)
def test_store_refusals_exit_1_with_one_line(store, args, message):
    out = tasks(*args, "--store", str(store))
    assert out.exit_code == 1
    [line] = out.stderr.splitlines()
    assert line.startswith("error: ") and message in line, out.output


def test_a_missing_store_directory_is_not_an_empty_store(tmp_path):
    out = tasks("list", "--store", str(tmp_path / "typo"))
    assert out.exit_code == 1 and out.stderr.strip() == f"error: store {tmp_path / 'typo'}: no such directory"


def test_without_store_the_service_is_asked_even_if_keepclip_store_is_set(store, monkeypatch):
    from testkit.net import free_port

    monkeypatch.setenv("KEEPCLIP_STORE", str(store))
    monkeypatch.setenv("KEEPCLIP_URL", f"http://127.0.0.1:{free_port()}")
    out = tasks("list")
    assert out.exit_code == 1 and "cannot reach keepclip" in out.stderr


def test_show_checks_every_file_as_the_listing_does(tmp_path):
    """A damaged update state (read only on request by `get`) is named by `show` too, not only by `list`."""
    import torch

    path = tmp_path / "store"
    open_store(path).publish(TaskArtifact(name="cars", class_names=["sedan", "van"], backbone=BACKBONE,
                                          update_state={"gram": torch.eye(4)}))
    update = path / "tasks" / "cars" / "v000001" / "update.safetensors"
    data = bytearray(update.read_bytes())
    data[-1] ^= 0xFF
    update.write_bytes(bytes(data))
    detail = json.loads(tasks("show", "cars", "--store", str(path)).stdout)
    assert "update.safetensors is damaged" in detail["error"] and detail["class_names"] is None
