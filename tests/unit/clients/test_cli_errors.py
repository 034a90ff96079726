"""Every failure of `keepclip classify|tasks` is one `error: ...` line on stderr and exit code 1 (2 for a wrong
command line), whatever the service answers: its JSON error, an HTML error page, non-JSON, or an unexpected shape."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from clients.cli import app
from testkit.net import free_port

runner = CliRunner()


def error_lines(out) -> list[str]:
    lines = out.stderr.splitlines()
    assert lines and all(line.startswith("error: ") for line in lines) and "Traceback" not in out.output, out.output
    return lines


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "cat.png"
    path.write_bytes(b"bytes the fake service never decodes")
    return path


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


@pytest.mark.parametrize(
    "status, code, hint", [(404, "task_not_found", ""), (422, "validation_error", ""), (500, "internal", ""),
                           (503, "store_unavailable", ""),
                           (401, "unauthorized", ": pass the service's admin token with --token or KEEPCLIP_ADMIN_TOKEN")]
)
def test_an_error_answer_to_classify_exits_1_with_the_services_message_once(fake_service, image, status, code, hint):
    fake_service.answer("POST", "/v1/classify", status, error_body(code, "what went\nwrong"))
    out = runner.invoke(app, ["classify", str(image), str(image), "--task", "x", "--url", fake_service.url])
    assert out.exit_code == 1 and out.stdout == ""
    assert error_lines(out) == [f"error: what went wrong ({status} {code}){hint}"]


def test_an_image_the_service_refuses_is_reported_and_the_next_one_still_sent(fake_service, image, tmp_path):
    fake_service.answer("POST", "/v1/classify", 422, error_body("invalid_image", "not an image"))
    other = tmp_path / "dog.png"
    other.write_bytes(b"x")
    out = runner.invoke(app, ["classify", str(image), str(other), "--url", fake_service.url])
    assert out.exit_code == 1
    assert error_lines(out) == [f"error: {path}: not an image (422 invalid_image)" for path in (image, other)]


@pytest.mark.parametrize(
    "answer, expected",
    [
        ((502, b"<html>\n<h1>Bad Gateway</h1>\n</html>", "text/html"), "error: <html> <h1>Bad Gateway</h1> </html> (502 http_error)"),
        ((200, b"<html>hello</html>", "text/html"), "answered with something other than JSON"),
        ((200, b'{"unexpected": true}', "application/json"), "unexpected answer, is --url a keepclip service?"),
    ],
)
def test_answers_that_are_not_the_services_json(fake_service, answer, expected):
    status, body, content_type = answer
    fake_service.answer("GET", "/v1/tasks", status, body, content_type)
    out = runner.invoke(app, ["tasks", "list", "--url", fake_service.url])
    assert out.exit_code == 1
    [line] = error_lines(out)
    assert expected in line


@pytest.mark.parametrize(
    "args",
    [["tasks", "list"], ["tasks", "show", "x"], ["tasks", "delete", "x"], ["tasks", "rollback", "x", "1"], ["classify", "IMAGE"]],
)
def test_nothing_listening_exits_1(image, args):
    args = [str(image) if a == "IMAGE" else a for a in args]
    out = runner.invoke(app, [*args, "--url", f"http://127.0.0.1:{free_port()}"])
    assert out.exit_code == 1
    [line] = error_lines(out)
    assert "cannot reach keepclip at http://127.0.0.1:" in line


def test_admin_refusals_exit_1(fake_service):
    fake_service.answer("DELETE", "/v1/tasks/x", 403, error_body("forbidden", "wrong admin token"))
    out = runner.invoke(app, ["tasks", "delete", "x", "--url", fake_service.url, "--token", "nope"])
    assert out.exit_code == 1 and error_lines(out) == [
        "error: wrong admin token (403 forbidden): --token or KEEPCLIP_ADMIN_TOKEN must be the token the service was started with"]


def test_usage_errors_exit_2(image, tmp_path):
    out = runner.invoke(app, ["classify", str(image), "--task", "a", "--labels", "b,c"])
    assert out.exit_code == 2 and error_lines(out) == ["error: give --task or --labels, not both"]
    out = runner.invoke(app, ["tasks", "list", "--url", "http://127.0.0.1:1", "--store", str(tmp_path)])
    assert out.exit_code == 2 and error_lines(out) == ["error: give --url or --store, not both"]
    out = runner.invoke(app, ["tasks", "delete", "x", "--store", str(tmp_path), "--token", "t"])
    assert out.exit_code == 2 and "--token is for a service" in error_lines(out)[0]
    assert runner.invoke(app, ["classify", str(tmp_path / "missing.png")]).exit_code == 2  # typer's own check


def test_serve_refuses_a_port_in_use_before_starting_ray(tmp_path):
    """A listener already on the port (another service, a stale HAProxy) would get the requests: exit 1, say so. In
    its own process: the check runs where `keepclip serve` would start a cluster, i.e. Ray not yet started."""
    import socket
    import subprocess
    import sys

    port = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        out = subprocess.run([sys.executable, "-c", "from clients.cli import main; main()", "serve", "--port", str(port),
                              "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stdout == "" and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.splitlines()[-1].startswith(f"error: 127.0.0.1:{port} is in use") and "--port" in out.stderr


def test_serve_refuses_a_model_config_or_weights_that_do_not_exist_before_starting_ray(tmp_path):
    """The replicas would find out minutes later, in tracebacks: exit 2 with add-task's one-line message instead."""
    import subprocess
    import sys

    serve = [sys.executable, "-c", "from clients.cli import main; main()", "serve", "--port", str(free_port()),
             "--store", str(tmp_path / "store")]
    for options, message in (
        (["--model", str(tmp_path / "nope.json")], f"error: model config file not found: {tmp_path / 'nope.json'}"),
        (["--model", "ViT-B-32", "--pretrained", str(tmp_path / "nope.safetensors")],
         f"error: pretrained '{tmp_path / 'nope.safetensors'}' is neither a checkpoint file nor a known open_clip tag"),
    ):
        out = subprocess.run(serve + options, capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert out.stderr.splitlines()[-1].startswith(message), out.stderr
