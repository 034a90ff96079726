"""How long the `keepclip` command takes to answer, start-up included (a benchmark, not a test).

    python -m bench.cli_speed                       # 5 runs of each command
    python -m bench.cli_speed --repeat 9 --out cli_speed.json

Each command runs as a fresh subprocess, the way a user or a script runs it: `keepclip --help`, `classify --help`,
`tasks list --store` on a temporary store of two tasks, and `classify` (two images) and `tasks list` against a
stand-in service started here: a local HTTP server with canned answers, so what is measured is the command itself
(interpreter, imports, one HTTP round trip each), not a model. The figure is the median wall time per command; the
target for --help, classify and tasks against a service is under 1.5 s on two cores. `--store` imports the store
package, which imports torch (safetensors.torch), so that row is expected to be slower.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

TARGET_S = 1.5
REPO = Path(__file__).resolve().parents[1]
# what the service would answer (shapes of clients.client.Classification and TaskList)
CLASSIFIED = {
    "mode": "auto", "task": "cars", "version": 1, "gate": 0.97, "routed": {"task": "cars", "gate": 0.97},
    "scores": [{"label": "van", "score": 0.9, "logit": 3.1}, {"label": "bus", "score": 0.1, "logit": 0.9}], "generation": 2,
}
TASK_LIST = {
    "generation": 2, "served_generation": 2,
    "tasks": [{"name": n, "version": 1, "loaded_version": 1, "kind": "head", "num_classes": 2} for n in ("birds", "cars")],
}


def keepclip_command() -> list[str]:
    """The installed console script beside this interpreter; else the same entry point through -c."""
    script = Path(sys.executable).with_name("keepclip")
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from clients.cli import main; main()"]


def start_stand_in_service() -> tuple[ThreadingHTTPServer, str]:
    routes = {("POST", "/v1/classify"): {"results": [CLASSIFIED, CLASSIFIED]},  # the CLI sends its 2 images in one request
              ("GET", "/v1/tasks"): TASK_LIST}

    class Handler(BaseHTTPRequestHandler):
        def _reply(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answer = routes.get((self.command, self.path))
            body = json.dumps(answer if answer is not None else {"error": {"code": "not_found", "message": self.path}}).encode()
            self.send_response(200 if answer is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _reply

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def make_store(path: Path) -> None:
    from prompts_store import TaskArtifact, open_store

    store = open_store(path)
    backbone = {"name": "bench-cli", "sha256": "0" * 64}
    for name in ("birds", "cars"):
        store.publish(TaskArtifact(name=name, class_names=["a", "b"], backbone=backbone, kind="head"))


def cases(work: Path, url: str) -> list[tuple[str, list[str], bool]]:
    """(name, arguments, whether the 1.5 s target applies)."""
    images = []
    for name in ("a.png", "b.png"):
        images.append(str(work / name))
        Path(images[-1]).write_bytes(b"the stand-in service does not decode images")
    store = str(work / "store")
    return [
        ("keepclip --help", ["--help"], True),
        ("keepclip classify --help", ["classify", "--help"], True),
        ("keepclip classify IMG IMG --url (stand-in service)", ["classify", *images, "--url", url], True),
        ("keepclip tasks list --url (stand-in service)", ["tasks", "list", "--url", url], True),
        ("keepclip tasks list --store DIR (imports torch)", ["tasks", "list", "--store", store], False),
    ]


def time_runs(argv: list[str], repeat: int) -> list[float]:
    runs = []
    for _ in range(repeat):
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        runs.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{shlex.join(argv)} exited {done.returncode}:\n{done.stderr}")
    return runs


def markdown(results: list[dict]) -> str:
    lines = [
        "| command | median s | min s | max s | target |",
        "|---|---:|---:|---:|---|",
    ]
    for r in results:
        target = ("met" if r["median_s"] < TARGET_S else "MISSED") + f" (< {TARGET_S} s)" if r["target"] else "-"
        lines.append(f"| `{r['name']}` | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['max_s']:.2f} | {target} |")
    return "\n".join(lines)


def machine() -> dict:
    return {"python": platform.python_version(), "cpus": len(os.sched_getaffinity(0)), "load_average": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cli_speed", description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=5, help="runs per command (the median is reported)")
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    args = p.parse_args(argv)
    keepclip = keepclip_command()
    server, url = start_stand_in_service()
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="keepclip-cli-speed-") as tmp:
            make_store(Path(tmp) / "store")
            for name, cli_args, target in cases(Path(tmp), url):
                runs = time_runs([*keepclip, *cli_args], args.repeat)
                results.append({"name": name, "argv": cli_args, "target": target, "runs_s": runs,
                                "median_s": statistics.median(runs), "min_s": min(runs), "max_s": max(runs)})
                print(f"{name}: median {results[-1]['median_s']:.2f} s", file=sys.stderr)
    finally:
        server.shutdown()
    table = markdown(results)
    print(f"{args.repeat} runs each; machine: {machine()}\n\n{table}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        report = {"repeat": args.repeat, "target_s": TARGET_S, "machine": machine(), "command": keepclip, "results": results}
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
