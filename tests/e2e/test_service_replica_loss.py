"""Replica loss (issue 17 item 4): the session's service runs the default `num_replicas` (auto: 2 on the session's
4-CPU Ray cluster) with primary routing. SIGKILL of the replica that serves, under 4 clients: only requests in flight
on it fail, answers keep coming from the standby (no gap over 3 s), and Serve brings the deployment back to 2
replicas. `python -m bench.replica_loss` measures the same on `keepclip serve` (docs/service.md, Operations)."""
from __future__ import annotations

import os
import signal
import time

from bench.replica_loss import Load, cpu_growth, replica_pids, summarise
from tests.e2e.test_service_hotswap import color_png

CLIENTS = 4
MAX_GAP_S = 3.0


def running_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["keepclip"].deployments["KeepclipDeployment"]
    return deployment.replica_states.get("RUNNING", 0)


def wait_for(condition, timeout_s: float) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.5)
    return time.monotonic() - start


def test_killing_the_serving_replica_keeps_answers_coming(keepclip_service):
    wait_for(lambda: running_replicas() == 2, 120)  # the default, auto, on the session's 4 logical CPUs
    pids = replica_pids(os.getpid())
    assert len(pids) == 2, pids
    load = Load(keepclip_service.url, CLIENTS, color_png("red"), timeout_s=30)
    started = time.monotonic()
    threads = load.start()
    try:
        growth = cpu_growth(pids, window_s=1.5)
        victim = max(growth, key=growth.get)
        kill_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        time.sleep(6.0)
    finally:
        load.stop.set()
        for t in threads:
            t.join(timeout=35)
    figures = summarise(load.outcomes, kill_at, started)
    print(f"\nreplica loss: killed {victim} (CPU s over 1.5 s: {growth}); {figures}")
    assert figures["ok"] > 20 and figures["kill_to_next_answer_s"] is not None
    assert figures["failed"] <= CLIENTS  # at most the requests in flight on the killed replica
    assert figures["longest_gap_s"] < MAX_GAP_S and figures["kill_to_next_answer_s"] < MAX_GAP_S
    back = wait_for(lambda: running_replicas() == 2 and len(replica_pids(os.getpid())) == 2, 180)
    print(f"deployment back to 2 running replicas {back:.1f} s after the 6 s of load")
