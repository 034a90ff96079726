"""Speed of the service path against plain open_clip zero-shot, in one run (a benchmark, not a test).

    python -m bench.service_speed --store ./keepclip-store \
        --model ../shared/models/proxy-clip/proxy-clip.json --pretrained ../shared/models/proxy-clip/proxy-clip.safetensors

The store must already hold learned tasks (the six shared domains for the reference run). Measured, all with the
same backbone and batch size:

1. baseline: plain open_clip zero-shot in this process — decode + preprocess + image tower + logits against the
   union of every task's class names, in batches of --batch-size; with 1 and with --threads torch threads, before
   and after the HTTP runs. The HTTP figures are divided by the faster thread count's mean of before and after (other
   jobs on a shared machine drift, and two threads on two busy cores can run at a third of one thread's speed);
2. engine: the keepclip engine in this process, no HTTP (frozen pass, routing, prompted pass, logits) — task-agnostic,
   with the replica's torch threads;
3. service: task-agnostic POST /v1/classify on a local Ray Serve deployment (the replica with --replica-threads,
   default the service's own default: 1 on CPU), with 1, 8 and --clients concurrent clients sending one image per
   request, and 8 clients sending --images-per-request images per request: images/s, the ratio to (1), latency
   p50/p99 per request, and the mean dynamic batch of each run (from the replica's keepclip_batch_size metric);
4. publish-to-live: a copy of a learned task is published under a new name while 8 clients keep the service busy;
   seconds until the replica lists it as served and until a request for it succeeds.

The JSON output has a top-level "summary" (mean_batch_8_clients, http_over_zero_shot_8_clients, ...) for other
benchmarks to pick up.

A local store is copied to a temporary directory first, so the probe publishes never touch it. Test images are the
domains' test splits (`--data`, ../shared/data by default). `--fill-hand-made` first publishes hand-made tasks
(real fingerprints, random prompts of add-task's default shape) for the domains into an empty store: a dry run of the
script, or the speed of prompt tasks (the learned ones' accuracy does not matter to it).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import math
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
BOUNDARY = "keepclip-bench-boundary"


def multipart_images(images: list[bytes]) -> bytes:
    """A multipart/form-data body (boundary BOUNDARY) with each image as a `file` part, as `curl -F file=@x.png` sends."""
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'.encode()
    return b"".join(head + image + b"\r\n" for image in images) + f"--{BOUNDARY}--\r\n".encode()


def http_load(url: str, pngs: list[bytes], clients: int, seconds: float, stop: threading.Event | None = None,
              per_request: int = 1):
    """`clients` threads posting task-agnostic /v1/classify for `seconds`, `per_request` images in each request
    (several: repeated `file` parts) -> (images/s, per-request latencies, failures). Each client holds one keep-alive
    connection (http.client, the body built from bytes): the load generator shares the machine's cores with the
    service, and this costs it about a third of the CPU httpx did (0.05 against 0.16 cores at ~180 requests/s)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker(w: int):
        mine, bad = [], []
        connection = http.client.HTTPConnection(where.hostname, where.port, timeout=60)
        i = w * per_request
        while time.perf_counter() < deadline and not (stop and stop.is_set()):
            body = multipart_images([pngs[(i + j) % len(pngs)] for j in range(per_request)])
            t = time.perf_counter()
            try:
                connection.request("POST", f"{where.path.rstrip('/')}/v1/classify", body=body, headers=headers)
                response = connection.getresponse()
                text = response.read()
                if response.status == 200:
                    mine.append(time.perf_counter() - t)
                else:
                    bad.append(f"{response.status}: {text[:120].decode(errors='replace')}")
            except (OSError, http.client.HTTPException) as e:
                bad.append(repr(e))
                connection.close()  # the next request opens a new connection
            i += clients * per_request
        connection.close()
        with lock:
            latencies.extend(mine)
            failures.extend(bad)

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return per_request * len(latencies) / (time.perf_counter() - start), latencies, failures


def replica_totals(url: str) -> dict[str, float]:
    """Counters of the replica's /metrics so far: engine batches and their images (keepclip_batch_size), and the
    classify requests and their seconds inside the replica's app (keepclip_request_latency_seconds)."""
    import httpx

    lines = httpx.get(f"{url}/metrics", timeout=60).text.splitlines()

    def total(prefix: str) -> float:
        return sum(float(line.split()[-1]) for line in lines if line.startswith(prefix) and
                   ("{" not in prefix or 'status="200"' in line))

    classify = 'keepclip_request_latency_seconds_{}{{endpoint="/v1/classify",method="POST"'
    return {"batches": total("keepclip_batch_size_count"), "images": total("keepclip_batch_size_sum"),
            "requests": total(classify.format("count")), "seconds": total(classify.format("sum")),
            "wait_s": total("keepclip_batch_wait_seconds ")}


def http_run(url: str, pngs: list[bytes], clients: int, seconds: float, per_request: int = 1) -> dict:
    """One load run: images/s, latency per request (at the client, and inside the replica's app), failures and the
    mean dynamic batch the engine ran meanwhile."""
    before = replica_totals(url)
    rate, lat, failed = http_load(url, pngs, clients, seconds, per_request=per_request)
    after = replica_totals(url)
    ran = {k: after[k] - before[k] for k in after}
    return {
        "clients": clients, "images_per_request": per_request, "images_per_s": rate, "requests": len(lat),
        "failures": len(failed), "first_failures": failed[:3],
        "latency_ms": {"p50": 1000 * percentile(lat, 50), "p99": 1000 * percentile(lat, 99)} if lat else None,
        "in_replica_mean_ms": 1000 * ran["seconds"] / ran["requests"] if ran["requests"] else None,
        "batches": int(ran["batches"]), "mean_batch": ran["images"] / ran["batches"] if ran["batches"] else None,
        "batch_wait_ms_after": 1000 * after["wait_s"],
    }


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


def baselines(settings, pngs: list[bytes], batch_size: int, class_names: list[str], min_s: float, threads: list[int]) -> dict[int, float]:
    """Plain zero-shot images/s per torch thread count (this process's count is restored afterwards)."""
    import torch

    before, rates = torch.get_num_threads(), {}
    try:
        for n in threads:
            torch.set_num_threads(n)
            rates[n] = baseline_images_per_s(settings, pngs, batch_size, class_names, min_s)
            print(f"baseline open_clip zero-shot, {n} torch thread(s): {rates[n]:.1f} images/s", flush=True)
    finally:
        torch.set_num_threads(before)
    return rates


def summarise(results: dict) -> dict:
    """The figures other benchmarks pick up: 8 clients, one image per request (and several, when measured), against
    plain zero-shot in-process (the faster thread count, mean of its measurements before and after the HTTP runs)."""
    zero_shot = results["baseline_images_per_s"]
    one = next(r for r in results["http"] if r["clients"] == 8 and r["images_per_request"] == 1)
    summary = {
        "zero_shot_images_per_s": zero_shot,
        "zero_shot_threads": results["baseline_threads"],
        "engine_over_zero_shot": results["engine_images_per_s"] / zero_shot,
        "http_images_per_s_8_clients": one["images_per_s"],
        "http_over_zero_shot_8_clients": one["images_per_s"] / zero_shot,
        "mean_batch_8_clients": one["mean_batch"],
        "replica_threads": results["replica_threads"],
        "ingress": results.get("ingress"),
    }
    multi = next((r for r in results["http"] if r["clients"] == 8 and r["images_per_request"] > 1), None)
    if multi is not None:
        summary.update({
            "images_per_request_multi": multi["images_per_request"],
            "http_over_zero_shot_8_clients_multi": multi["images_per_s"] / zero_shot,
            "mean_batch_8_clients_multi": multi["mean_batch"],
        })
    return summary


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
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads of the in-process baseline (measured with 1 and with this many; the faster counts)")
    p.add_argument("--replica-threads", type=int, default=None,
                   help="torch threads of the replica (default: the service's default, KEEPCLIP_TORCH_THREADS or 1 on CPU)")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default=defaults.ingress,
                   help="what takes HTTP in front of the replica (the service's setting `ingress`)")
    p.add_argument("--engine-batches", type=int, default=None,
                   help="batches the replica runs at once (default: the service's auto: 2 on CPU while images run in torch eager, else 1)")
    p.add_argument("--batch-wait-s", type=float, default=None,
                   help="the replica's batch_wait_timeout_s (default: the service's default, auto)")
    p.add_argument("--seconds", type=float, default=15.0, help="duration of each measurement")
    p.add_argument("--clients", type=int, default=8, help="clients of an extra throughput run (besides 1 and 8)")
    p.add_argument("--images-per-request", type=int, default=8, help="images per request of the multi-image run at 8 clients (1: skip it)")
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
        max_batch_size=args.batch_size, replica_cpus=1, ui=False, poll_interval_s=0.1, ingress=args.ingress,
        **({"torch_threads": args.replica_threads} if args.replica_threads else {}),
        **({"batch_wait_timeout_s": args.batch_wait_s} if args.batch_wait_s is not None else {}),
        **({"engine_batches": args.engine_batches} if args.engine_batches else {}),
    )
    if args.fill_hand_made and not store.list():
        from backbone import PromptedCLIP, load_backbone
        from testkit.tasks import default_prompt_config, publish_domain_tasks

        maker = PromptedCLIP(load_backbone(settings.model, settings.pretrained, "cpu"))
        publish_domain_tasks(maker, store, args.data, domains, n=300, config=default_prompt_config(maker))
        del maker
    tasks = store.list()
    if not tasks:
        raise SystemExit(f"store {args.store} holds no tasks (use --fill-hand-made for a dry run)")
    class_names = [c for t in tasks for c in store.get(t.name).class_names]
    pngs = load_test_images(args.data, domains, args.per_domain)
    from service.app import replica_torch_threads

    replica_threads = replica_torch_threads(settings)
    print(f"{len(tasks)} tasks ({', '.join(t.name for t in tasks)}), {len(class_names)} classes, {len(pngs)} test images, "
          f"batch {args.batch_size}, {args.threads} torch threads in-process, {replica_threads or 'default'} in the replica", flush=True)

    results: dict = {"tasks": [t.name for t in tasks], "classes": len(class_names), "batch_size": args.batch_size,
                     "threads": args.threads, "replica_threads": replica_threads, "batch_wait_s": settings.batch_wait_timeout_s, "engine_batches": settings.engine_batches,
                     "images": len(pngs), "model": args.model}
    thread_counts = sorted({1, args.threads})
    first = baselines(settings, pngs, args.batch_size, class_names, args.seconds, thread_counts)
    torch.set_num_threads(replica_threads or args.threads)  # the engine as a replica runs it, without HTTP
    results["engine_images_per_s"], results["engine_routing"] = engine_images_per_s(settings, pngs, args.batch_size, args.seconds)
    torch.set_num_threads(args.threads)
    print(f"keepclip engine (no HTTP), {replica_threads or args.threads} torch thread(s): {results['engine_images_per_s']:.1f} images/s", flush=True)

    import ray
    from ray import serve

    from service.app import build_app
    from service.ingress import haproxy_on, http_options, prepare_local_cluster
    from testkit.net import free_port

    prepare_local_cluster(settings)
    results["ingress"] = "haproxy" if haproxy_on() else "proxy"
    print(f"ingress: {results['ingress']}", flush=True)
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options=http_options(settings, host="127.0.0.1", port=port))
        url = f"http://127.0.0.1:{port}"
        serve.run(build_app(settings), name="keepclip-bench", route_prefix="/")
        http_load(url, pngs, 4, 3.0)  # warm-up
        runs = [(n, 1) for n in sorted({1, 8, args.clients})]
        if args.images_per_request > 1:
            runs.append((8, args.images_per_request))
        results["http"] = []
        for clients, per_request in runs:
            run = http_run(url, pngs, clients, args.seconds, per_request)
            results["http"].append(run)
            lat = run["latency_ms"] or {"p50": math.nan, "p99": math.nan}
            print(f"service /v1/classify, {clients} client(s), {per_request} image(s) per request: {run['images_per_s']:.1f} "
                  f"images/s, mean batch {run['mean_batch'] or 0:.2f}, latency p50 {lat['p50']:.1f} ms, p99 {lat['p99']:.1f} ms, "
                  f"{run['failures']} failures", flush=True)
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
    again = baselines(settings, pngs, args.batch_size, class_names, args.seconds, thread_counts)
    results["baseline_by_threads"] = {str(n): {"before": first[n], "after": again[n]} for n in thread_counts}
    mean = {n: (first[n] + again[n]) / 2 for n in thread_counts}
    results["baseline_threads"] = max(mean, key=mean.get)
    results["baseline_images_per_s"] = mean[results["baseline_threads"]]
    results["summary"] = summarise(results)
    print("summary: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in results["summary"].items()), flush=True)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
