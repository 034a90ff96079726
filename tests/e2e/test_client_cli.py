"""The typed client and the `keepclip classify|tasks` commands against a real local Ray Serve."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from clients.cli import app
from clients.client import KeepclipClient, KeepclipError, ServiceUnreachable
from testkit.tasks import color_sample, make_color_task
from tests.conftest import free_port
from tests.e2e.test_service_hotswap import color_png

runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    paths = {}
    for name in ("red", "green", "gray"):
        paths[name] = root / f"{name}.png"
        paths[name].write_bytes(color_png(name))
    return paths


def test_client_every_call(keepclip_service, images):
    svc = keepclip_service
    with KeepclipClient(svc.url) as kc:
        auto = kc.classify(images["red"])
        assert auto.task == "red" and auto.gate > 0.5 and auto.scores[0].label.endswith("red")
        assert kc.classify(color_png("green"), task="red", top_k=1).task == "red"
        assert [s.label for s in kc.classify(color_sample("green", 1)[0], labels=["a, b"]).scores] == ["a, b"]
        assert len(kc.classify(images["green"], labels=["leaf", "sky"]).scores) == 2
        assert kc.classify(images["gray"]).task is None
        assert len(kc.embed_image(images["red"]).embeddings[0]) == 32
        assert kc.embed_text(["x", "y"], task="red").version >= 1
        assert kc.gallery_add({"c-red": images["red"], "c-green": images["green"]}).added == ["c-red", "c-green"]
        assert kc.search(image=color_png("red", seed=9), top_k=1).results[0].id in {"c-red"} | {f"red-{i}" for i in range(3)}
        assert kc.search(text="red", top_k=2).query == "text"
        assert {"red", "green"} <= {t.name for t in kc.tasks().tasks}
        assert kc.task("green").class_names == ["light green", "dark green"]
        assert kc.health().status == "ok" and "keepclip_requests_total" in kc.metrics()
        with pytest.raises(KeepclipError) as e:
            kc.classify(images["red"], task="nope")
        assert e.value.status == 404 and e.value.code == "task_not_found"
        with pytest.raises(KeepclipError) as e:
            kc.delete_task("red")
        assert e.value.status == 401
    with pytest.raises(ServiceUnreachable, match="keepclip serve"):
        KeepclipClient(f"http://127.0.0.1:{free_port()}").health()


def test_cli_classify(keepclip_service, images):
    url = keepclip_service.url
    out = runner.invoke(app, ["classify", str(images["red"]), str(images["gray"]), "--url", url])
    assert out.exit_code == 0, out.output
    red_line, gray_line = out.stdout.strip().splitlines()
    assert "task red v" in red_line and "gate" in red_line and "red" in red_line.split(":")[-1]
    assert "no learned task" in gray_line
    out = runner.invoke(app, ["classify", str(images["green"]), "--labels", "leaf,sky", "--url", url, "--json"])
    assert out.exit_code == 0 and {s["label"] for s in json.loads(out.stdout)["scores"]} == {"leaf", "sky"}
    out = runner.invoke(app, ["classify", str(images["green"]), "--task", "red", "--top-k", "1", "--url", url])
    assert out.exit_code == 0 and "task red" in out.stdout
    out = runner.invoke(app, ["classify", str(images["red"]), "--url", f"http://127.0.0.1:{free_port()}"])
    assert out.exit_code == 1 and "cannot reach keepclip" in out.output


def classify_requests(url: str) -> float:
    """/v1/classify requests the replica answered so far (every status)."""
    import httpx

    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith('keepclip_requests_total{endpoint="/v1/classify"'))


def test_client_and_cli_send_several_images_in_one_request(keepclip_service, images):
    url = keepclip_service.url
    with KeepclipClient(url) as kc:
        results = kc.classify_many([images["red"], color_png("green"), images["gray"]])
        assert [r.task for r in results] == ["red", "green", None]
        assert [len(r.scores) for r in kc.classify_many([images["red"], images["green"]], labels=["a, b"])] == [1, 1]
        assert [r.task for r in kc.classify_many([images["green"]], task="red", top_k=1)] == ["red"]
        assert kc.classify_many([]) == []
    before = classify_requests(url)
    out = runner.invoke(app, ["classify", str(images["green"]), str(images["red"]), str(images["gray"]), "--url", url, "--json"])
    assert out.exit_code == 0, out.output
    assert [json.loads(line)["task"] for line in out.stdout.splitlines()] == ["green", "red", None]
    assert classify_requests(url) == before + 1  # three images, one request


def one_error_line(out) -> str:
    [line] = out.stderr.splitlines()
    assert line.startswith("error: ") and "Traceback" not in out.output, out.output
    return line


def test_cli_classify_refusals_exit_1_with_the_services_message(keepclip_service, images, tmp_path):
    url = keepclip_service.url
    out = runner.invoke(app, ["classify", str(images["green"]), str(images["red"]), "--task", "nope", "--url", url])
    assert out.exit_code == 1 and out.stdout == ""  # refused once for the whole request, not once per image
    assert "(404 task_not_found)" in one_error_line(out)
    out = runner.invoke(app, ["classify", str(images["green"]), "--top-k", "1000", "--url", url])  # over max_top_k
    assert out.exit_code == 1 and "(422 validation_error)" in one_error_line(out)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    out = runner.invoke(app, ["classify", str(not_an_image), str(images["red"]), "--url", url])
    assert out.exit_code == 1 and "task red" in out.stdout  # the other images are still classified
    assert one_error_line(out).startswith(f"error: {not_an_image}: ") and "invalid_image" in out.stderr
    out = runner.invoke(app, ["classify", str(images["red"]), "--task", "red", "--labels", "a,b", "--url", url])
    assert out.exit_code == 2 and "--task or --labels" in one_error_line(out)


def test_cli_tasks(keepclip_service, monkeypatch):
    svc = keepclip_service
    url = svc.url
    svc.store.publish(make_color_task(svc.maker, "teal", (0, 128, 128)))
    out = runner.invoke(app, ["tasks", "list", "--url", url])
    assert out.exit_code == 0 and "teal" in out.stdout and "store generation" in out.stdout
    out = runner.invoke(app, ["tasks", "show", "red", "--url", url])
    assert out.exit_code == 0 and json.loads(out.stdout)["class_names"] == ["light red", "dark red"]
    out = runner.invoke(app, ["tasks", "show", "nope", "--url", url])
    assert out.exit_code == 1 and "(404 task_not_found)" in one_error_line(out)
    out = runner.invoke(app, ["tasks", "delete", "teal", "--url", url])
    assert out.exit_code == 1 and "(401 unauthorized): pass the service's admin token with --token or KEEPCLIP_ADMIN_TOKEN" in one_error_line(out)
    out = runner.invoke(app, ["tasks", "delete", "teal", "--url", url, "--token", "wrong"])
    assert out.exit_code == 1 and "(403 forbidden)" in one_error_line(out)
    out = runner.invoke(app, ["tasks", "delete", "teal", "--url", url, "--token", svc.token])
    assert out.exit_code == 0 and "deleted teal" in out.stdout
    monkeypatch.setenv("KEEPCLIP_ADMIN_TOKEN", svc.token)  # the token from the environment
    out = runner.invoke(app, ["tasks", "rollback", "teal", "1", "--url", url])
    assert out.exit_code == 0 and "teal v1 is live" in out.stdout
    out = runner.invoke(app, ["tasks", "delete", "teal", "--url", url])
    assert out.exit_code == 0
    out = runner.invoke(app, ["tasks", "list", "--url", f"http://127.0.0.1:{free_port()}"])
    assert out.exit_code == 1 and "cannot reach keepclip" in one_error_line(out)


def test_cli_tasks_on_the_store_of_a_running_service(keepclip_service):
    """--store works on the store itself, without a token; the service reads the same store."""
    svc = keepclip_service
    store = svc.settings.store
    svc.store.publish(make_color_task(svc.maker, "olive", (128, 128, 0)))
    out = runner.invoke(app, ["tasks", "list", "--store", store])
    assert out.exit_code == 0 and "olive" in out.stdout and "served" not in out.stdout
    out = runner.invoke(app, ["tasks", "delete", "olive", "--store", store])
    assert out.exit_code == 0 and "deleted olive (was v1)" in out.stdout
    with KeepclipClient(svc.url) as kc:
        assert "olive" not in {t.name for t in kc.tasks().tasks}
    out = runner.invoke(app, ["tasks", "rollback", "olive", "1", "--store", store])
    assert out.exit_code == 0 and "olive v1 is live" in out.stdout
    out = runner.invoke(app, ["tasks", "list", "--url", svc.url])
    assert out.exit_code == 0 and "olive" in out.stdout
    assert runner.invoke(app, ["tasks", "delete", "olive", "--store", store]).exit_code == 0  # leave the service as found


def test_cli_serve_help_shows_settings_defaults():
    out = runner.invoke(app, ["serve", "--help"])
    assert out.exit_code == 0 and "--port" in out.output and "8000" in out.output and "--address" in out.output
