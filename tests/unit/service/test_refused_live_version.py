"""A damaged live version is reported, not hidden: the replica serves the previous version, and the API, the metric
and the CLI say which version is live, which is served, and why the live one was refused."""
from pathlib import Path

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from clients.cli import app as cli
from service.api import create_app
from testkit.tasks import make_color_task


def flip_byte(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_refused_live_version_is_reported_by_the_api_the_metric_and_the_cli(settings, store, task_maker):
    store.publish(make_color_task(task_maker, "red", seed=1))
    store.publish(make_color_task(task_maker, "red", seed=2))
    flip_byte(Path(store.url) / "tasks" / "red" / "v000002" / "stats.safetensors")
    with TestClient(create_app(settings)) as client:
        [task] = client.get("/v1/tasks").json()["tasks"]
        assert task["version"] == 2 and task["loaded_version"] == 1
        assert "live version refused" in task["error"] and "version 2: stats.safetensors is damaged" in task["error"]
        assert "serving version 1" in task["error"]
        detail = client.get("/v1/tasks/red").json()
        assert detail["class_names"] == ["light red", "dark red"] and detail["loaded_version"] == 1 and detail["error"] == task["error"]
        assert "keepclip_refused_tasks 1.0" in client.get("/metrics").text
        assert client.post("/v1/classify", json={"image": "", "task": "red"}).status_code != 404  # still served
    runner = CliRunner()
    for argv in (["tasks", "show", "red"], ["tasks", "list"]):
        out = runner.invoke(cli, [*argv, "--store", store.url])
        assert out.exit_code == 1, out.output
    out = runner.invoke(cli, ["tasks", "list", "--store", store.url])
    assert "error: task red:" in out.stderr and "stats.safetensors is damaged" in out.stderr
