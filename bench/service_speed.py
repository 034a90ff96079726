"""Speed of the service path against plain open_clip zero-shot, in one run (a benchmark, not a test).

    python -m bench.service_speed --store ./keepclip-store \
        --model ../shared/models/proxy-clip/proxy-clip.json --pretrained ../shared/models/proxy-clip/proxy-clip.safetensors

The store must already hold learned tasks (the six shared domains for the reference run). Measured, all with the
same backbone, batch size and torch threads:

1. baseline: plain open_clip zero-shot in this process — decode + preprocess + image tower + logits against the union
   of every task's class names, in batches of --batch-size;
2. engine: the keepclip engine in this process, no HTTP (frozen pass, routing, prompted pass, logits) — task-agnostic;
3. service: task-agnostic POST /v1/classify on a local Ray Serve deployment, with enough concurrent clients to fill
   the dynamic batches; images/s and the ratio to (1);
4. latency p50/p99 of /v1/classify with 1 and with 8 concurrent clients;
5. publish-to-live: a copy of a learned task is published under a new name while 8 clients keep the service busy;
   seconds until the replica lists it as served and until a request for it succeeds.

A local store is copied to a temporary directory first, so the probe publishes never touch it. Test images are the
domains' test splits (`--data`, ../shared/data by default). `--fill-hand-made` first publishes hand-made tasks
(real fingerprints, random prompts) for the domains into an empty store — only to check that this script runs.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("mnist", "fashion_mnist", "cifar10", "eurosat", "gtsrb", "caltech101")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def load_test_images(data_dir: Path, domains, per_domain: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    out = []
    for i, name in enumerate(domains):
        path = data_dir / name / "test.npz"
        if not path.is_file():
            continue
        images = np.load(path)["images"]
        keep = np.random.default_rng(seed + i).permutation(len(images))[:per_domain]
        for k in keep:
            buf = io.BytesIO()
            Image.fromarray(images[k]).save(buf, "PNG")
            out.append(buf.getvalue())
    if not out:
        raise SystemExit(f"no test images found under {data_dir} for {domains}")
    rng = np.random.default_rng(seed)
    return [out[j] for j in rng.permutation(len(out))]


# ----------------------------------------------------------------------------- in-process measurements
def baseline_images_per_s(settings, pngs: list[bytes], batch_size: int, class_names: list[str], min_s: float,
                          latencies: list[float] | None = None) -> float:
    """Plain open_clip zero-shot: decode + preprocess + frozen image tower + logits over `class_names`."""
    import torch
    from PIL import Image

    from backbone import load_backbone

    backbone = load_backbone(settings.model, settings.pretrained, settings.device)
    model, device = backbone.model, backbone.device
    with torch.no_grad():
        text = model.encode_text(backbone.tokenizer([f"a photo of a {c}." for c in class_names]).to(device), normalize=True)
    scale = model.logit_scale.exp()

    def run(batch: list[bytes]):
        x = torch.stack([backbone.preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch]).to(device)
        with torch.no_grad():
            f = model.encode_image(x, normalize=True)
            return (scale * f @ text.T).softmax(-1).topk(5)

    return _loop_images_per_s(run, pngs, batch_size, min_s, latencies)


def engine_images_per_s(settings, pngs: list[bytes], batch_size: int, min_s: float,
                        latencies: list[float] | None = None) -> tuple[float, dict]:
    """The keepclip engine without HTTP or Ray: decode + preprocess + run_batch (task-agnostic)."""
    from collections import Counter

    from service.engine import ClassifyJob, Engine
    from service.images import decode_image

    engine = Engine.from_settings(settings)
    engine.sync()
    routed = Counter()

    def run(batch: list[bytes]):
        jobs = [ClassifyJob(engine.preprocess(decode_image(b, settings.max_image_pixels)), top_k=5) for b in batch]
        for r in engine.run_batch(jobs):
            routed[r.task] += 1

    rate = _loop_images_per_s(run, pngs, batch_size, min_s, latencies)
    return rate, {"routed_share": {str(k): v / sum(routed.values()) for k, v in routed.most_common()}, "tasks": len(engine.state.tasks)}


def _loop_images_per_s(run, pngs, batch_size: int, min_s: float, latencies: list[float] | None = None) -> float:
    """images/s of `run` over batches of `pngs` for at least `min_s`; appends each batch's seconds to `latencies`."""
    run(pngs[:batch_size])  # warm-up
    done, start, i = 0, time.perf_counter(), 0
    while time.perf_counter() - start < min_s:
        batch = [pngs[(i + j) % len(pngs)] for j in range(batch_size)]
        i += batch_size
        t = time.perf_counter()
        run(batch)
        if latencies is not None:
            latencies.append(time.perf_counter() - t)
        done += len(batch)
    return done / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- over HTTP
def http_load(url: str, pngs: list[bytes], clients: int, seconds: float, stop: threading.Event | None = None):
    """`clients` threads posting task-agnostic /v1/classify for `seconds` -> (images/s, latencies, failures)."""
    import httpx

    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(w: int):
        mine, bad = [], []
        with httpx.Client(base_url=url, timeout=60) as c:
            i = w
            while time.perf_counter() < deadline and not (stop and stop.is_set()):
                t = time.perf_counter()
                try:
                    r = c.post("/v1/classify", files={"file": ("x.png", pngs[i % len(pngs)], "image/png")})
                    if r.status_code == 200:
                        mine.append(time.perf_counter() - t)
                    else:
                        bad.append(f"{r.status_code}: {r.text[:120]}")
                except httpx.HTTPError as e:
                    bad.append(repr(e))
                i += clients
        with lock:
            latencies.extend(mine)
            failures.extend(bad)

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return len(latencies) / (time.perf_counter() - start), latencies, failures


def publish_to_live(url: str, store, pngs: list[bytes], rounds: int, clients: int = 8) -> list[dict]:
    """Publish a copy of a learned task under a new name while `clients` keep the service busy."""
    import httpx

    source = store.list()[0].name
    results = []
    stop = threading.Event()
    load = threading.Thread(target=http_load, args=(url, pngs, clients, 3600, stop), daemon=True)
    load.start()
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            for n in range(rounds):
                artifact = store.get(source)
                artifact.name, artifact.version = f"bench-probe-{n}", None
                start = time.monotonic()
                version = store.publish(artifact)
                published = time.monotonic() - start
                listed = answered = None
                while time.monotonic() - start < 60:
                    elapsed = time.monotonic() - start
                    if listed is None:
                        served = {t["name"]: t["loaded_version"] for t in c.get("/v1/tasks").json()["tasks"]}
                        if served.get(artifact.name) == version:
                            listed = elapsed
                    if listed is not None and answered is None:
                        r = c.post("/v1/classify", files={"file": ("x.png", pngs[0], "image/png")}, data={"task": artifact.name})
                        if r.status_code == 200:
                            answered = time.monotonic() - start
                            break
                    time.sleep(0.01)
                results.append({"task": artifact.name, "publish_call_s": published, "listed_s": listed, "answering_s": answered})
                store.delete(artifact.name)
                time.sleep(0.5)
    finally:
        stop.set()
        load.join(timeout=120)
    return results


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from service.settings import ServiceSettings

    defaults = ServiceSettings()
    p = argparse.ArgumentParser(description="keepclip service speed vs plain open_clip zero-shot", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--store", default=defaults.store, help="store URL holding learned tasks [KEEPCLIP_STORE]")
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--pretrained", default=defaults.pretrained)
    p.add_argument("--device", default=defaults.device)
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="domains' test images")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--per-domain", type=int, default=100, help="test images per domain")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, baseline and replica alike")
    p.add_argument("--seconds", type=float, default=15.0, help="duration of each measurement")
    p.add_argument("--clients", type=int, default=0, help="clients for the throughput run (default 2 x batch size)")
    p.add_argument("--probe-rounds", type=int, default=3, help="publish-to-live rounds (0: skip)")
    p.add_argument("--fill-hand-made", action="store_true", help="empty store: publish hand-made tasks first (dry runs only)")
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    domains = [d for d in args.domains.split(",") if d]
    tmp = Path(tempfile.mkdtemp(prefix="keepclip-bench-"))
    store_url = args.store
    if "://" not in store_url or store_url.startswith("file://"):
        local = Path(store_url.removeprefix("file://"))
        if local.is_dir():
            shutil.copytree(local, tmp / "store", ignore=shutil.ignore_patterns(".lock", "tmp"))
        store_url = str(tmp / "store")
    from prompts_store import open_store

    store = open_store(store_url)
    settings = ServiceSettings(
        model=args.model, pretrained=args.pretrained, device=args.device, store=store_url,
        max_batch_size=args.batch_size, torch_threads=args.threads, replica_cpus=1, ui=False, poll_interval_s=0.1,
    )
    if args.fill_hand_made and not store.list():
        from backbone import PromptedCLIP, load_backbone
        from service.testing import publish_domain_tasks

        maker = PromptedCLIP(load_backbone(settings.model, settings.pretrained, "cpu"))
        publish_domain_tasks(maker, store, args.data, domains, n=300)
        del maker
    tasks = store.list()
    if not tasks:
        raise SystemExit(f"store {args.store} holds no tasks (use --fill-hand-made for a dry run)")
    class_names = [c for t in tasks for c in store.get(t.name).class_names]
    pngs = load_test_images(args.data, domains, args.per_domain)
    print(f"{len(tasks)} tasks ({', '.join(t.name for t in tasks)}), {len(class_names)} classes, {len(pngs)} test images, "
          f"batch {args.batch_size}, {args.threads} torch threads", flush=True)

    results: dict = {"tasks": [t.name for t in tasks], "classes": len(class_names), "batch_size": args.batch_size,
                     "threads": args.threads, "images": len(pngs), "model": args.model}
    results["baseline_images_per_s"] = baseline_images_per_s(settings, pngs, args.batch_size, class_names, args.seconds)
    print(f"baseline open_clip zero-shot: {results['baseline_images_per_s']:.1f} images/s", flush=True)
    results["engine_images_per_s"], results["engine_routing"] = engine_images_per_s(settings, pngs, args.batch_size, args.seconds)
    print(f"keepclip engine (no HTTP):    {results['engine_images_per_s']:.1f} images/s", flush=True)

    import ray
    from ray import serve

    from service.app import build_app
    from service.testing import free_port

    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        serve.run(build_app(settings), name="keepclip-bench", route_prefix="/")
        http_load(url, pngs, 4, 3.0)  # warm-up
        clients = args.clients or 2 * args.batch_size
        rate, lat, failed = http_load(url, pngs, clients, args.seconds)
        results["service_images_per_s"], results["service_clients"], results["service_failures"] = rate, clients, len(failed)
        results["ratio_service_to_baseline"] = rate / results["baseline_images_per_s"]
        results["ratio_engine_to_baseline"] = results["engine_images_per_s"] / results["baseline_images_per_s"]
        print(f"service /v1/classify, {clients} clients: {rate:.1f} images/s = {results['ratio_service_to_baseline']:.2f} x baseline", flush=True)
        for n in (1, 8):
            _, lat, failed = http_load(url, pngs, n, args.seconds)
            results[f"latency_{n}_clients_ms"] = {"p50": 1000 * percentile(lat, 50), "p99": 1000 * percentile(lat, 99), "requests": len(lat), "failures": len(failed)}
            print(f"latency with {n} client(s): p50 {results[f'latency_{n}_clients_ms']['p50']:.1f} ms, p99 {results[f'latency_{n}_clients_ms']['p99']:.1f} ms", flush=True)
        import httpx

        metrics = httpx.get(f"{url}/metrics").text
        count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("keepclip_batch_size_count")))
        total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("keepclip_batch_size_sum")))
        results["mean_dynamic_batch"] = total / count if count else None
        if args.probe_rounds:
            probes = publish_to_live(url, store, pngs, args.probe_rounds)
            results["publish_to_live"] = probes
            listed = [p["listed_s"] for p in probes if p["listed_s"] is not None]
            answered = [p["answering_s"] for p in probes if p["answering_s"] is not None]
            if listed and answered:
                print(f"publish to live under 8 clients: listed {statistics.median(listed):.2f} s (max {max(listed):.2f}), "
                      f"answering {statistics.median(answered):.2f} s (max {max(answered):.2f})", flush=True)
        serve.delete("keepclip-bench")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
