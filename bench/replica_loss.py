"""Replica loss under load (a benchmark, not a test): how long does the service go silent when a replica dies?

    python -m bench.replica_loss [--clients 4] [--seconds 30] [--kill-after 8] [--replicas 0] [--out FILE]

Starts `keepclip serve` on a free local port (its own local Ray cluster; an empty temporary store) with the proxy
CLIP from ../shared/models/proxy-clip when it is there, else the tiny test config with `--pretrained none`; runs
--clients clients that send POST /v1/classify back to back for --seconds; after --kill-after seconds SIGKILLs the
replica that is serving (the replica process whose CPU time grew most in the last second: with the default primary
routing the standby hardly uses any). Reports the failed requests (by status), the longest gap between two
successful answers (over the run, and from the kill to the first answer after it), p50/p99 latency of the
successful requests, and when a replacement replica process appeared. `--replicas 1` gives the single-replica
baseline; 0 is the service default (auto: 2 when the Ray cluster has the CPUs for two).

Replica processes are found in /proc (Linux): descendants of the `keepclip serve` process whose title is Ray's
`ray::ServeReplica:<app>:<deployment>`; `replica_pids`, `cpu_growth`, `Load` and `summarise` are reused by the e2e test.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from testkit.net import free_port

REPO = Path(__file__).resolve().parents[1]
PROXY = REPO.parent / "shared" / "models" / "proxy-clip"
TINY_JSON = REPO / "tests" / "fixtures" / "model_configs" / "keepclip-tiny-a.json"
REPLICA_TITLE = "ray::ServeReplica:"


# ----------------------------------------------------------------------------- replica processes (/proc)
def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # the name in parentheses may hold spaces


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _descends_from(pid: int, root: int) -> bool:
    for _ in range(64):  # a bounded walk up the process tree
        if pid == root:
            return True
        parent = _parent(pid)
        if not parent:
            return False
        pid = parent
    return False


def replica_pids(root: int, app: str = "keepclip") -> list[int]:
    """PIDs of the Serve replicas of `app` that descend from process `root`."""
    title = f"{REPLICA_TITLE}{app}:"
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    return sorted(p for p in pids if _cmdline(p).startswith(title) and _descends_from(p, root))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_growth(pids: list[int], window_s: float = 1.0) -> dict[int, float]:
    """CPU seconds each process used over `window_s`; the largest is the replica that serves the traffic."""
    before = {p: cpu_seconds(p) for p in pids}
    time.sleep(window_s)
    return {p: round(cpu_seconds(p) - before[p], 2) for p in pids}


# ----------------------------------------------------------------------------- load
@dataclass
class Outcome:
    start: float
    end: float
    status: int | str  # HTTP status, or the exception's type name


@dataclass
class Load:
    """Clients sending POST /v1/classify back to back until stopped; every outcome is kept."""

    url: str
    clients: int
    image: bytes
    timeout_s: float = 60.0
    outcomes: list[Outcome] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for t in threads:
            t.start()
        return threads

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as c:
            while not self.stop.is_set():
                start = time.monotonic()
                try:
                    status: int | str = c.post("/v1/classify", files={"file": ("x.png", self.image, "image/png")}).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                self.outcomes.append(Outcome(start, time.monotonic(), status))
                if status != 200:
                    time.sleep(0.05)  # a failing service is not hammered in a tight loop


def png(size: int = 32) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), (200, 40, 40)).save(buf, "PNG")
    return buf.getvalue()


def summarise(outcomes: list[Outcome], kill_at: float | None, started: float) -> dict:
    """Failed requests, the longest gap between successful answers, latency percentiles (seconds)."""
    ok = sorted(o.end for o in outcomes if o.status == 200)
    latencies = sorted(o.end - o.start for o in outcomes if o.status == 200)
    failed: dict[str, int] = {}
    for o in outcomes:
        if o.status != 200:
            failed[str(o.status)] = failed.get(str(o.status), 0) + 1
    gaps = [b - a for a, b in zip(ok, ok[1:])]
    after = [t for t in ok if kill_at is not None and t > kill_at]
    return {
        "requests": len(outcomes),
        "ok": len(ok),
        "failed": sum(failed.values()),
        "failed_by_status": failed,
        "longest_gap_s": round(max(gaps, default=0.0), 3),
        "kill_to_next_answer_s": round(after[0] - kill_at, 3) if after else None,
        "latency_p50_s": round(_quantile(latencies, 0.50), 4),
        "latency_p99_s": round(_quantile(latencies, 0.99), 4),
        "first_answer_after_start_s": round(ok[0] - started, 3) if ok else None,
    }


def _quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


# ----------------------------------------------------------------------------- the service
def backbone_args() -> tuple[list[str], str]:
    if (PROXY / "proxy-clip.safetensors").is_file():
        return ["--model", str(PROXY / "proxy-clip.json"), "--pretrained", str(PROXY / "proxy-clip.safetensors")], "proxy-clip"
    return ["--model", str(TINY_JSON), "--pretrained", "none"], "keepclip-tiny-a (random weights)"


def start_service(port: int, store: str, replicas: int, log) -> subprocess.Popen:
    args, _ = backbone_args()
    command = [str(Path(sys.executable).parent / "keepclip"), "serve", "--port", str(port), "--store", store,
               "--device", "cpu", "--replicas", str(replicas), *args]
    env = {**os.environ, "KEEPCLIP_UI": "false"}  # the UI is not what this measures; it only slows the start
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO)


def wait_healthy(url: str, service: subprocess.Popen, timeout_s: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if service.poll() is not None:
            raise RuntimeError(f"keepclip serve exited with {service.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not become healthy within {timeout_s:.0f} s")


def stop_service(service: subprocess.Popen) -> None:
    """Ctrl-C (keepclip serve then stops Serve and its Ray), then the whole process group if it lingers."""
    if service.poll() is None:
        service.send_signal(signal.SIGINT)
        try:
            service.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait(10)


def wait_for_replacement(root: int, known: set[int], timeout_s: float) -> float | None:
    """Seconds until a replica process that was not there at the kill appears (None: not within timeout_s)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if set(replica_pids(root)) - known:  # the killed one may linger in /proc for a moment: it is known
            return time.monotonic() - start
        time.sleep(0.2)
    return None


# ----------------------------------------------------------------------------- main
def run(args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="keepclip-replica-loss-") as tmp, open(Path(tmp) / "serve.log", "w+") as log:
        service = start_service(port, str(Path(tmp) / "store"), args.replicas, log)
        try:
            ready_s = wait_healthy(url, service, args.start_timeout)
            return measure(args, url, service, ready_s)
        except Exception:
            log.seek(0)
            print(log.read()[-4000:], file=sys.stderr)
            raise
        finally:
            stop_service(service)


def measure(args, url: str, service: subprocess.Popen, ready_s: float) -> dict:
    pids = replica_pids(service.pid)
    load = Load(url, args.clients, png(), args.request_timeout)
    started = time.monotonic()
    threads = load.start()
    time.sleep(max(0.0, args.kill_after - 1.0))
    growth = cpu_growth(pids)
    victim = max(growth, key=growth.get)
    kill_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replaced_s = wait_for_replacement(service.pid, set(pids), args.seconds)
    time.sleep(max(0.0, started + args.seconds - time.monotonic()))
    load.stop.set()
    for t in threads:
        t.join(timeout=args.request_timeout + 5)
    _, backbone = backbone_args()
    return {
        "backbone": backbone, "clients": args.clients, "seconds": args.seconds, "replicas_setting": args.replicas,
        "replicas": len(pids), "ready_s": round(ready_s, 1), "killed_after_s": round(kill_at - started, 2),
        "cpu_s_last_second": {"killed": growth[victim], "others": [g for p, g in growth.items() if p != victim]},
        "replacement_process_after_s": round(replaced_s, 1) if replaced_s is not None else None,
        **summarise(load.outcomes, kill_at, started),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--seconds", type=float, default=30.0, help="how long the clients run (default 30)")
    p.add_argument("--kill-after", type=float, default=8.0, help="seconds of load before the SIGKILL (default 8)")
    p.add_argument("--replicas", type=int, default=0, help="keepclip serve --replicas; 0 = auto, the default")
    p.add_argument("--request-timeout", type=float, default=60.0, help="client timeout per request (default 60 s)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds to wait for /healthz (default 600)")
    p.add_argument("--out", type=Path, help="write the figures as JSON here")
    args = p.parse_args(argv)
    figures = run(args)
    text = json.dumps(figures, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
