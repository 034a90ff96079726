"""The RayService's Serve config, deployed with `serve deploy` to a local Ray cluster that this module starts the way
the KubeRay clusters run (Ray token auth on, the admin token in the environment of every Ray process), answers
/healthz on Serve's HTTP port with the task it finds in the store.

Only the values that name the cluster's files and hardware are replaced for the test (args: a tiny backbone
checkpoint, a temporary store, device cpu; http_options: a free local port). The deployments section is deployed
unchanged: the local head declares one logical GPU, so the replica's `num_gpus: 1` is scheduled as on Kubernetes.

The cluster is this module's own: `ray start --head --block` in a new session, with its own ports, worker-port
range and temp dir (so that a later `ray.init()` in this test session never finds it), stopped by signalling that
session only — never `ray stop`, which would stop every Ray on the machine, the session's `ray_cluster` included.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, TINY_CONFIGS, free_port, tiny_backbone
from tests.unit.k8s.helpers import serve_config_v2

pytestmark = pytest.mark.timeout(600)

ADMIN_TOKEN = "k8s-e2e-admin-token"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else (shutil.which(name) or pytest.skip(f"`{name}` (Ray's CLI) not found"))


@dataclass
class LocalRay:
    dashboard: str
    env: dict[str, str]  # what a client needs: RAY_AUTH_MODE=token and the token
    token: str
    root: Path


def _session_members(leader: int) -> list[int]:
    """Processes of the session `leader` started (Ray's workers change their process group, not their session)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != leader:
            with contextlib.suppress(OSError):
                if os.getsid(int(entry.name)) == leader:
                    pids.append(int(entry.name))
    return pids


def _stop(proc: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM to `ray start --block` (it stops what it started), then SIGKILL to whatever of its session is left."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace_s)
    for pid in _session_members(proc.pid) if Path("/proc").is_dir() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def local_ray():
    root = Path(tempfile.mkdtemp(prefix="kc-ray-", dir="/tmp"))  # short: Ray's unix sockets live under it
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO))
    names = ("port", "dashboard-port", "ray-client-server-port", "node-manager-port", "object-manager-port",
             "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port")
    free: set[int] = set()
    while len(free) < len(names):  # distinct free ports, all this cluster's own
        free.add(free_port())
    ports = dict(zip(names, sorted(free)))
    command = [
        _tool("ray"), "start", "--head", "--block", "--temp-dir", str(root), "--node-ip-address", "127.0.0.1",
        "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--disable-usage-stats",
        # the GPU worker of the RayService, on one node: CPUs for the replica, one logical GPU (no device needed)
        "--num-cpus", "4", "--num-gpus", "1", "--object-store-memory", str(150 * 2**20),
        "--min-worker-port", "21000", "--max-worker-port", "21999",
        *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))],
    ]
    log = (root / "ray-start.log").open("wb")
    # KEEPCLIP_ADMIN_TOKEN reaches every Ray process through the environment, as from the Secret on the Pods
    proc = subprocess.Popen(command, env={**env, "KEEPCLIP_ADMIN_TOKEN": ADMIN_TOKEN}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True, cwd=root)
    dashboard = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        deadline = time.monotonic() + 120
        while True:  # the head's readiness probe of the RayService: /api/gcs_healthz (public under token auth)
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{dashboard}/api/gcs_healthz", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the local Ray head did not start:\n{(root / 'ray-start.log').read_text()[-4000:]}")
            time.sleep(0.5)
        yield LocalRay(dashboard=dashboard, env=env, token=token, root=root)
    finally:
        _stop(proc)
        log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_ray_token_auth_is_on(local_ray):
    url = f"{local_ray.dashboard}/api/version"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"Bearer {local_ray.token}"}, timeout=30).status_code == 200
    assert httpx.get(f"{local_ray.dashboard}/api/gcs_healthz", timeout=30).status_code == 200  # probes need no token


def test_serve_deploy_of_the_rayservice_config_answers_healthz(local_ray):
    from prompts_store import open_store
    from backbone import PromptedCLIP, load_backbone
    from testkit.tasks import make_color_task, save_checkpoint

    # the test's stand-ins for /mnt/keepclip/models and /mnt/keepclip/store, with one task in the store
    checkpoint = save_checkpoint(tiny_backbone(), local_ray.root / "tiny-a.safetensors")
    tiny_json = str(TINY_CONFIGS / "keepclip-tiny-a.json")
    store = local_ray.root / "store"
    open_store(store).publish(make_color_task(PromptedCLIP(load_backbone(tiny_json, checkpoint, "cpu")), "red"))

    config = serve_config_v2()
    production = yaml.safe_dump(config["applications"][0]["deployments"])
    serve_port = free_port()
    config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
    config["applications"][0]["args"].update(model=tiny_json, pretrained=checkpoint, store=str(store), device="cpu")
    assert yaml.safe_dump(config["applications"][0]["deployments"]) == production
    path = local_ray.root / "serve-config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    deploy = [_tool("serve"), "deploy", str(path), "--address", local_ray.dashboard]
    without_token = {k: v for k, v in local_ray.env.items() if k != "RAY_AUTH_TOKEN"}
    refused = subprocess.run(deploy, env=without_token, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0, "serve deploy without the Ray token was accepted"
    result = subprocess.run(deploy, env=local_ray.env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr

    url = f"http://127.0.0.1:{serve_port}"
    deadline, health = time.monotonic() + 300, None
    while time.monotonic() < deadline:  # the GPU workers' readiness probe of the RayService
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{url}/healthz", timeout=10)
            if response.status_code == 200 and response.json()["tasks"] >= 1:
                health = response.json()
                break
        time.sleep(1)
    if health is None:
        status = subprocess.run([_tool("serve"), "status", "--address", local_ray.dashboard], env=local_ray.env,
                                capture_output=True, text=True, timeout=60)
        pytest.fail(f"{url}/healthz did not answer with the store's task within 300 s; serve status:\n{status.stdout}")
    assert health["status"] == "ok" and health["polling"] and health["tasks"] == 1
    assert health["backbone"]["name"] == "keepclip-tiny-a" and health["device"] == "cpu"
    assert [t["name"] for t in httpx.get(f"{url}/v1/tasks", timeout=30).json()["tasks"]] == ["red"]

    # the admin token arrived through the environment (the Secret's path), not through the Serve config
    assert httpx.delete(f"{url}/v1/tasks/nope", timeout=30).status_code == 401
    answer = httpx.delete(f"{url}/v1/tasks/nope", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    assert answer.status_code == 404 and answer.json()["error"]["code"] == "task_not_found"
