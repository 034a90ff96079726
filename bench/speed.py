"""Speed and memory of keepclip against plain open_clip zero-shot, in one run (a benchmark, not a test).

    python -m bench.speed --model ../shared/models/proxy-clip/proxy-clip.json \
        --pretrained ../shared/models/proxy-clip/proxy-clip.safetensors --device cpu
    python -m bench.speed --store ./keepclip-store --tasks 10 100 1000 --load-tasks 100 --out speed.json

Everything runs in this process, on one backbone (--model/--pretrained/--device, KEEPCLIP_* like every command;
`--pretrained none` draws a random init once and saves it, so that every load has the same weights), one batch size
and one number of torch threads; the engine runs on torch eager like the baseline unless --runtime says otherwise:

1. **engine vs zero-shot**: the keepclip engine (`Engine.run_batch` on task-agnostic `ClassifyJob`s: frozen pass,
   routing, prompted pass of the routed images, logits) against plain open_clip zero-shot (frozen image tower + logits
   over the union of the tasks' class names). Both decode and preprocess the same PNGs in batches of --batch-size
   (the loops of `bench.service_speed`); --rounds pairs of runs of --seconds each, in ABBA order so that load changes
   hit both alike. images/s, per-batch latency p50/p99 and the ratio engine / zero-shot. The tasks are a copy of
   --store, or, without one, hand-made tasks (real fingerprints, random prompts of the default recipe) in a temporary
   store: one per shared domain found under --data, else noisy colour tasks. Test images are the domains' test
   splits, else noisy colour images (so that this runs without ../shared);
   With head tasks (`--engine-kinds` includes `head`, the default), the same comparison again with real head tasks
   (add-task's default kind, learned here with `HeadLearner` from --head-images training images of each domain, or of
   each colour task): images routed to them are answered from the frozen pass, so the engine should run close to
   zero-shot;
2. **router vs number of tasks**: for each count in --tasks, synthetic fingerprints (random `TaskStats` of the
   backbone's embedding dimension, as a replica holds them: float16 whitener tiles, --classes-per-task class keys,
   a calibration sample) fed to `service.router.Router` with a 1,000-name vocabulary, as the engine builds it: build and calibration
   seconds, µs per image of `route()` at batch 1 and at --batch-size (the median of 5 timing windows; every window's
   figure is kept in the JSON), FAISS index bytes, bytes of the stats' tensors;
3. **memory per task**: one default-recipe task (add-task's prompt shape, a real fingerprint, --classes-per-task
   classes) published to a temporary store: its files' bytes and its prompt parameters; then --load-tasks copies
   loaded into an engine already serving one: resident memory added per task (RSS delta / N, free heap pages given
   back to the OS before and after, so it counts what the tasks keep) and the exact bytes one loaded task holds
   (prompt tensors, cached text features, stats).

4. **bytes per task at 512-d** (--memory-model, default a random-init ViT-B-16): a head task and a prompt task loaded
   into an engine, the exact bytes of each part;
5. **over HTTP** (with --http): `bench.service_speed` on the same tasks (a real Ray Serve app, 1 and 8 clients), in a
   child process so that its Ray cluster leaves nothing behind here; its images/s at 8 clients over plain zero-shot
   and the mean batch the replica formed go into the summary.

Writes --out (JSON with the machine, the command line and a top-level "summary" of the headline numbers) and a Markdown table beside it (.md), and prints the table.
On a shared machine only the ratios within one run mean much.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import logging
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.onnx_speed import PROXY, SHARED, rss_mib
from bench.service_speed import DOMAINS, baseline_images_per_s, engine_images_per_s, load_test_images, percentile

log = logging.getLogger("bench.speed")
COLOR_TASKS = ("red", "green", "blue", "yellow")  # hand-made tasks when --data has no domains


# ----------------------------------------------------------------------------- command line
def _positive(kind):
    """argparse type: a number of `kind` above 0 (the error names the option and what was given)."""
    what = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} > 0, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def local_path(url: str) -> Path | None:
    """The directory of a local store URL; None for an fsspec URL (s3://, gs://, memory://)."""
    if "://" not in url or url.startswith("file://"):
        return Path(url.removeprefix("file://"))
    return None


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    from backbone.settings import BackboneSettings

    defaults = BackboneSettings()
    # like `bench continual`: the proxy CLIP in ../shared unless KEEPCLIP_MODEL names another backbone
    proxy = "KEEPCLIP_MODEL" not in os.environ and (PROXY / "proxy-clip.safetensors").is_file()
    model = str(PROXY / "proxy-clip.json") if proxy else defaults.model
    pretrained = str(PROXY / "proxy-clip.safetensors") if proxy else defaults.pretrained
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", default=model, help="open_clip name or model-config JSON [the proxy CLIP in ../shared, else KEEPCLIP_MODEL]")
    p.add_argument("--pretrained", default=pretrained, help="tag, checkpoint or none [the proxy's weights, else KEEPCLIP_PRETRAINED]")
    p.add_argument("--device", default=defaults.device, choices=("auto", "cpu", "cuda"), help="[KEEPCLIP_DEVICE]")
    p.add_argument("--runtime", default="torch", choices=("torch", "onnx", "auto"),
                   help="engine runtime (torch: the same eager torch as the zero-shot baseline) [torch]")
    p.add_argument("--store", help="a store of learned tasks, copied first (default: hand-made tasks in a temp store)")
    p.add_argument("--engine-kinds", default="prompts,head", help="engine runs: 'prompts' (the tasks of --store, or hand-made "
                   "prompt tasks), 'head' (head tasks learned here) [prompts,head]")
    p.add_argument("--prompt-depth", type=_positive(int), help="hand-made prompt tasks: prompted blocks per tower [add-task's default]")
    p.add_argument("--prompt-placement", choices=("input", "output"),
                   help="hand-made prompt tasks: the first or the last blocks (output: the blocks below run once) [add-task's default]")
    p.add_argument("--head-images", type=_positive(int), default=300, help="training images per head task learned here")
    p.add_argument("--data", type=Path, default=SHARED / "data", help="the shared domains (<domain>/test.npz)")
    p.add_argument("--domains", default=",".join(DOMAINS))
    p.add_argument("--per-domain", type=_positive(int), default=100, help="test images per domain (or colour)")
    p.add_argument("--batch-size", type=_positive(int), default=16)
    p.add_argument("--threads", type=_positive(int), default=len(os.sched_getaffinity(0)), help="torch threads")
    p.add_argument("--seconds", type=_positive(float), default=10.0, help="duration of each engine/zero-shot run")
    p.add_argument("--rounds", type=_positive(int), default=2, help="pairs of engine/zero-shot runs (ABBA order)")
    p.add_argument("--tasks", type=_positive(int), nargs="+", default=[10, 100, 1000], help="router task counts")
    p.add_argument("--classes-per-task", type=_positive(int), default=10)
    p.add_argument("--router-seconds", type=_positive(float), default=1.0, help="seconds per router figure: the median of 5 windows of a fifth each")
    p.add_argument("--load-tasks", type=_positive(int), default=100, help="tasks loaded for the RSS per task")
    p.add_argument("--memory-model", default="ViT-B-16", help="backbone (random init) of the bytes-per-task section: "
                   "ViT-B-16 has the 512-d features the memory target is stated at; 'skip' leaves it out [%(default)s]")
    p.add_argument("--http", action="store_true", help="also measure over HTTP (bench.service_speed: starts Ray Serve; "
                   "about 2 minutes more)")
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "keepclip-bench" / "speed.json")
    args = p.parse_args(argv)
    local = local_path(args.store) if args.store else None
    if local is not None and not local.is_dir():
        p.error(f"--store {args.store}: no such directory")
    args.domains = [d for d in args.domains.split(",") if d]
    return args


# ----------------------------------------------------------------------------- shared pieces
def load_maker(args, work: Path):
    """The backbone that makes tasks, and the checkpoint every later load uses: a random init is saved once, so that
    the engines load the same weights and accept the tasks (same fingerprint)."""
    from backbone import PromptedCLIP, load_backbone
    from backbone.loading import NO_WEIGHTS
    from testkit.tasks import save_checkpoint

    pretrained = args.pretrained
    if pretrained is None or pretrained.lower() in NO_WEIGHTS:
        # a checkpoint file is fingerprinted by its own hash: reload it, so maker and engines agree
        pretrained = save_checkpoint(load_backbone(args.model, None, "cpu"), work / "random-init.safetensors")
    return PromptedCLIP(load_backbone(args.model, pretrained, args.device)), pretrained


def present_domains(args, split: str) -> list[str]:
    return [d for d in args.domains if (args.data / d / f"{split}.npz").is_file()]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def trim_heap() -> None:
    """Give free heap pages back to the OS (glibc), so that memory freed by earlier sections is not silently
    reused by what is measured next and the RSS delta sees every new allocation."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the delta may under-count
        pass


def rss_bytes() -> int:
    try:
        import psutil
    except ImportError:
        return int(rss_mib() * 2**20)
    return psutil.Process().memory_info().rss


# ----------------------------------------------------------------------------- 1. engine vs zero-shot
def engine_store(args, maker, work: Path):
    """The tasks the engine serves: a copy of --store (probe runs must never touch it), or hand-made ones."""
    from prompts_store import open_store

    if args.store:
        local = local_path(args.store)
        if local is None:
            return open_store(args.store)  # remote: the engine only reads it
        shutil.copytree(local, work / "store", ignore=shutil.ignore_patterns(".lock", "tmp"))
        store = open_store(work / "store")
        if not store.list():
            raise SystemExit(f"store {args.store} holds no tasks")
        return store
    store = open_store(work / "store")
    publish_hand_made(args, maker, store)
    return store


def publish_hand_made(args, maker, store) -> None:
    from testkit.tasks import make_color_task, publish_domain_tasks

    domains = [d for d in present_domains(args, "train") if (args.data / d / "classnames.json").is_file()]
    if domains:
        log.info("publishing hand-made tasks for %s", ", ".join(domains))
        publish_domain_tasks(maker, store, args.data, domains, n=300, config=hand_made_config(args, maker))
        return
    log.info("no domains under %s: publishing hand-made colour tasks %s", args.data, ", ".join(COLOR_TASKS))
    for i, name in enumerate(COLOR_TASKS):
        store.publish(make_color_task(maker, name, seed=i, config=hand_made_config(args, maker)))


def hand_made_config(args, maker):
    """The prompts of hand-made tasks: add-task's default shape, unless --prompt-depth/--prompt-placement say otherwise."""
    from testkit.tasks import default_prompt_config

    shape = {"depth": args.prompt_depth, "placement": args.prompt_placement}
    return default_prompt_config(maker, **{k: v for k, v in shape.items() if v is not None})


def sample_pngs(args) -> list[bytes]:
    from testkit.tasks import color_sample

    domains = present_domains(args, "test")
    if domains:
        return load_test_images(args.data, domains, args.per_domain)
    log.warning("no test images under %s: using noisy colour images", args.data)
    images = [im for i, c in enumerate(COLOR_TASKS) for im in color_sample(c, args.per_domain, seed=1000 * i)]
    order = np.random.default_rng(0).permutation(len(images))
    return [png_bytes(images[j]) for j in order]


def summarize(runs: list[tuple[float, list[float]]], batch_size: int) -> dict:
    """Runs of (images/s, per-batch seconds) -> images/s over all of them and the batch latency quantiles."""
    images = sum(batch_size * len(lat) for _, lat in runs)
    seconds = sum(batch_size * len(lat) / rate for rate, lat in runs)
    latencies = [x for _, lat in runs for x in lat]
    return {"images_per_s": images / seconds, "images": images, "batches": len(latencies),
            "batch_latency_ms": {"p50": 1000 * percentile(latencies, 50), "p99": 1000 * percentile(latencies, 99)},
            "per_run_images_per_s": [rate for rate, _ in runs]}


def head_store(args, maker, work: Path):
    """A temporary store of real head tasks: one per shared domain (else per colour task), each learned by add-task's
    default learner from --head-images training images."""
    import json

    from PIL import Image

    from backbone import DEFAULT_TEMPLATES, PixelPipeline
    from prompts_store import open_store
    from testkit.tasks import color_task_data
    from training.data import ImageSet, split_train_val
    from training.head_learner import HeadLearner
    from training.learner import RunContext, TaskData

    store, pipeline = open_store(work / "head-store"), PixelPipeline(maker.backbone.preprocess)
    domains = [d for d in present_domains(args, "train") if (args.data / d / "classnames.json").is_file()]
    for i, name in enumerate(domains or COLOR_TASKS):
        if domains:
            with np.load(args.data / name / "train.npz") as data:
                keep = np.sort(np.random.default_rng(i).permutation(len(data["labels"]))[: args.head_images])
                images, labels = data["images"][keep], data["labels"][keep]
            class_names = json.loads((args.data / name / "classnames.json").read_text())
        else:
            images, labels, class_names = color_task_data(maker, name, n=args.head_images)
        pixels = np.stack([pipeline.pixels(Image.fromarray(im)) for im in images])
        train, val = split_train_val(labels, 0.1, 0)
        task = TaskData(name, class_names, list(DEFAULT_TEMPLATES), ImageSet(pixels[train], labels[train]), ImageSet(pixels[val], labels[val]))
        store.publish(HeadLearner().fit(task, maker.backbone, RunContext(progress=False)))
    log.info("learned %d head tasks", len(domains or COLOR_TASKS))
    return store


def bench_engine(args, settings, maker, work: Path, store=None) -> dict:
    store = store or engine_store(args, maker, work)
    tasks = store.list()
    class_names = [c for t in tasks for c in store.get(t.name).class_names]
    pngs = sample_pngs(args)
    settings = settings.model_copy(update={"store": store.url})
    log.info("%d tasks, %d classes, %d test images, batch %d, %d torch threads",
             len(tasks), len(class_names), len(pngs), args.batch_size, args.threads)
    runs: dict[str, list] = {"zero_shot": [], "engine": []}
    routing: dict = {}
    for k in range(args.rounds):
        for name in ("zero_shot", "engine") if k % 2 == 0 else ("engine", "zero_shot"):
            latencies: list[float] = []
            if name == "zero_shot":
                rate = baseline_images_per_s(settings, pngs, args.batch_size, class_names, args.seconds, latencies)
            else:
                rate, routing = engine_images_per_s(settings, pngs, args.batch_size, args.seconds, latencies)
            runs[name].append((rate, latencies))
            log.info("round %d/%d %s: %.1f images/s", k + 1, args.rounds, name, rate)
    if routing.get("tasks") == 0:
        log.warning("the engine serves none of the store's tasks (made for another backbone?): frozen answers only")
    out = {name: summarize(r, args.batch_size) for name, r in runs.items()}
    out["engine"].update(routing)
    out["ratio_engine_to_zero_shot"] = out["engine"]["images_per_s"] / out["zero_shot"]["images_per_s"]
    out["per_round_ratio"] = [e[0] / z[0] for e, z in zip(runs["engine"], runs["zero_shot"])]
    out.update(tasks=[t.name for t in tasks], classes=len(class_names), test_images=len(pngs))
    return out


# ----------------------------------------------------------------------------- 2. router vs number of tasks
SYNTHETIC_VOCABULARY = 1000  # names of the router's open vocabulary in the router section (ImageNet-1k's count)


def synthetic_stats(dim: int, classes: int, gen):
    """A TaskStats as a replica holds it (`Gaussian.served`: float16 whitener tiles; unit-norm keys, a calibration
    sample) whose own images route to it, and its class text, for the router's zero-shot check."""
    import torch
    import torch.nn.functional as F

    from backbone import Gate, Gaussian, TaskStats

    sigma = 0.3 / math.sqrt(dim)  # per-dimension spread of a task's normalised features
    mean = F.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
    # the inverse Cholesky factor of a fitted covariance is dense lower-triangular
    tril = torch.randn(dim, dim, generator=gen, dtype=torch.float64).tril(-1)
    whitener = (torch.eye(dim, dtype=torch.float64) + 0.1 / math.sqrt(dim) * tril) / sigma
    keys = F.normalize(mean + sigma * torch.randn(classes, dim, generator=gen, dtype=torch.float64), dim=-1).float()
    gaussian = Gaussian.served(mean, whitener, -2 * whitener.diagonal().log().sum().item(), 0.5)
    gate = Gate(center=1.5 * dim, scale=0.1 * dim)  # own images have d² ≈ dim: w ≈ 1
    own = F.normalize(mean + sigma * torch.randn(256, dim, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(keys + 0.5 * torch.randn(classes, dim, generator=gen), dim=-1)
    stats = TaskStats(gaussian=gaussian, keys=keys, gate=gate, n_images=20 * classes, calibration=own.half(),
                      calibration_key_cos=(own.float() @ keys.T).amax(-1))
    return stats, text


def synthetic_vocabulary(dim: int, gen):
    import torch
    import torch.nn.functional as F

    from backbone.gate import Vocabulary

    names = tuple(f"word {i}" for i in range(SYNTHETIC_VOCABULARY))
    return Vocabulary(names, F.normalize(torch.randn(len(names), dim, generator=gen), dim=-1), 100.0)


def queries_for(stats: dict, n: int, seed: int = 0):
    """(n, d) float32 image features, each drawn near a random task's mean (as frozen features arrive)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    names = list(stats)
    picks = torch.randint(len(names), (n,), generator=gen).tolist()
    means = torch.stack([stats[names[i]].gaussian.mean.double() for i in picks])
    sigma = 0.3 / math.sqrt(means.shape[1])
    return (means + sigma * torch.randn(means.shape, generator=gen, dtype=torch.float64)).float()


ROUTER_WINDOWS = 5  # timing windows per router figure; the median is reported (a busy neighbour hits one or two)


def route_us_per_image(router, queries, batch: int, min_s: float) -> tuple[float, list[float]]:
    """(median, every window's) µs per image of `router.route` over `ROUTER_WINDOWS` windows of `min_s` / 5 each."""
    batches = list(queries.split(batch))[: max(1, len(queries) // batch)]
    router.route(batches[0])  # warm-up
    windows, k = [], 0
    for _ in range(ROUTER_WINDOWS):
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_s / ROUTER_WINDOWS:
            router.route(batches[k % len(batches)])
            done += batches[k % len(batches)].shape[0]
            k += 1
        windows.append(1e6 * (time.perf_counter() - start) / done)
    return statistics.median(windows), windows


def bench_router(args, dim: int, top_k: int, threshold: float) -> list[dict]:
    """The router as the engine builds it: FAISS, exact Gaussians, gates and every task's zero-shot check against a
    vocabulary of 1,000 names."""
    import faiss
    import torch
    from tqdm import tqdm

    from service.router import Router

    gen = torch.Generator().manual_seed(0)
    # made once for the largest count; smaller counts take a prefix
    made = {f"task-{i:05d}": synthetic_stats(dim, args.classes_per_task, gen)
            for i in tqdm(range(max(args.tasks)), desc="synthetic fingerprints", leave=False)}
    vocabulary = synthetic_vocabulary(dim, gen)
    names, rows = list(made), []
    for n in args.tasks:
        subset = {name: made[name][0] for name in names[:n]}
        classes = {name: (tuple(f"{name} class {c}" for c in range(args.classes_per_task)), made[name][1]) for name in names[:n]}
        start = time.perf_counter()
        router = Router(subset, top_k, threshold, vocabulary=vocabulary, classes=classes)
        build_s = time.perf_counter() - start
        start = time.perf_counter()
        checked = router.calibrate()  # new tasks only: the checks are memoised on the (shared) fingerprints
        calibrate_s = time.perf_counter() - start
        queries = queries_for(subset, 16 * args.batch_size)
        timed = {str(b): route_us_per_image(router, queries, b, args.router_seconds) for b in (1, args.batch_size)}
        per_image = {b: median for b, (median, _) in timed.items()}
        rows.append({"tasks": n, "router_keys": router.index.ntotal, "build_s": build_s, "calibrate_new_s": calibrate_s,
                     "checked_tasks": checked, "route_us_per_image": per_image,
                     "route_us_per_image_windows": {b: windows for b, (_, windows) in timed.items()},
                     "faiss_index_bytes": int(faiss.serialize_index(router.index).nbytes),
                     "stats_bytes": sum(s.nbytes for s in subset.values())})
        log.info("router, %d tasks: build %.3f s, calibrate %.1f s, route %s µs/image (batch 1, %d)", n, build_s,
                 calibrate_s, " / ".join(f"{v:.0f}" for v in per_image.values()), args.batch_size)
    return rows


# ----------------------------------------------------------------------------- 3. memory per task
def default_task(maker, classes: int):
    """A default-recipe task: the recipe's prompt shape (random prompts), a real fingerprint of noisy images, `classes`
    classes."""
    from testkit.tasks import color_images, default_prompt_config, make_task

    n = max(8, 4 * classes)
    images = color_images((128, 128, 128), n, noise=60.0)
    labels = [i % classes for i in range(n)]
    return make_task(maker, "probe", images, labels, [f"class {i}" for i in range(classes)], config=default_prompt_config(maker),
                     prompt_scale=0.02, metrics={"note": "bench.speed: default recipe, random prompts"})


def artifact_files(root: Path, name: str, version: int) -> dict[str, int]:
    """Bytes of each file of a task version, in the documented layout <store>/tasks/<name>/v000001/ (docs/store.md)."""
    folder = root / "tasks" / name / f"v{version:06d}"
    return {f.name: f.stat().st_size for f in sorted(folder.iterdir()) if f.is_file()}


def loaded_task_bytes(engine, name: str) -> dict[str, int]:
    """Exact bytes one loaded task holds: its prompt parameters, cached class text features, fingerprint (after its
    zero-shot check is calibrated), the check itself and what its kind holds (a head's weights)."""
    runtime, loaded = engine.runtime, engine.state.tasks[name]
    model = getattr(runtime, "torch", runtime).model  # OnnxRuntime keeps the prompts in its torch fallback
    text = loaded.text_frozen.nbytes + (loaded.text_prompted.nbytes if loaded.text_prompted is not loaded.text_frozen else 0)
    check = engine.state.router.check(name) if loaded.stats is not None else None
    out = {"prompts": sum(p.numel() * p.element_size() for p in model.prompt_parameters(loaded.slot)) if loaded.slot else 0,
           "text_features": text, "stats": loaded.stats.nbytes if loaded.stats is not None else 0,
           "zero_shot_check": check.own_nbytes if check is not None else 0, "kind": loaded.served.own_bytes}
    return {**out, "total": sum(out.values())}


def resident_per_task(args, settings, store, artifact) -> dict:
    """RSS added by loading --load-tasks copies of `artifact` into an engine that already serves one task."""
    from tqdm import tqdm

    from service.engine import Engine

    engine = Engine.from_settings(settings)
    engine.sync()  # the store holds "probe": loads one task, so code paths and caches are warm before measuring
    for i in tqdm(range(args.load_tasks), desc="publishing copies", leave=False):
        store.publish(dataclasses.replace(artifact, name=f"copy-{i:04d}", version=None, checksums={}))
    gc.collect()
    trim_heap()
    before = rss_bytes()
    start = time.perf_counter()
    engine.sync()
    load_s = time.perf_counter() - start
    gc.collect()
    trim_heap()  # what loading freed again (artifact bytes, activations) is not what a task keeps
    delta = rss_bytes() - before
    engine.close()
    loaded = len(engine.state.tasks) - 1
    if loaded != args.load_tasks:
        raise SystemExit(f"the engine loaded {loaded} of {args.load_tasks} tasks: {dict(engine.state.errors)}")
    exact = loaded_task_bytes(engine, "copy-0000")
    return {"tasks_loaded": loaded, "load_s": load_s, "rss_delta_bytes": delta, "rss_per_task_bytes": delta / loaded,
            "exact_bytes_per_task": exact}


def bench_memory(args, settings, artifact, work: Path) -> dict:
    from prompts_store import open_store

    store = open_store(work / "memory-store")
    version = store.publish(dataclasses.replace(artifact, version=None, checksums={}))
    files = artifact_files(work / "memory-store", artifact.name, version)
    out = {"prompt_config": artifact.recipe["prompts"], "classes": len(artifact.class_names),
           "prompt_parameters": sum(t.numel() for t in artifact.prompts.values()),
           "artifact_files_bytes": files, "artifact_bytes": sum(files.values())}
    out.update(resident_per_task(args, settings.model_copy(update={"store": store.url}), store, artifact))
    log.info("one task: %d prompt parameters, %d bytes on disk, %.0f bytes resident per loaded task",
             out["prompt_parameters"], out["artifact_bytes"], out["rss_per_task_bytes"])
    return out


def bench_memory_at(args, work: Path) -> dict:
    """Exact bytes per loaded task of each kind on a --memory-model backbone (ViT-B-16: 512-d features, the width the
    issue's memory target is stated at): a head task (the default kind) and a default-recipe prompt task, each of
    --classes-per-task classes, loaded into an engine."""
    from backbone import DEFAULT_TEMPLATES, PixelPipeline
    from prompts_store import open_store
    from service.engine import Engine
    from service.settings import ServiceSettings
    from testkit.tasks import color_task_data, default_prompt_config, make_task
    from training.data import ImageSet, split_train_val
    from training.head_learner import HeadLearner
    from training.learner import RunContext, TaskData

    from PIL import Image

    folder = work / "memory-model"
    folder.mkdir()
    maker, pretrained = load_maker(argparse.Namespace(model=args.memory_model, pretrained="none", device=args.device), folder)
    c = args.classes_per_task
    images, labels, _ = color_task_data(maker, "red", n=8 * c)
    labels = np.arange(len(images)) % c  # c classes of noisy colour images: the bytes depend on the shapes only
    names = [f"class {i}" for i in range(c)]
    pixels = np.stack([PixelPipeline(maker.backbone.preprocess).pixels(Image.fromarray(im)) for im in images])
    store = open_store(folder / "store")
    train, val = split_train_val(labels, 0.25, 0)
    task = TaskData("head", names, list(DEFAULT_TEMPLATES), ImageSet(pixels[train], labels[train]), ImageSet(pixels[val], labels[val]))
    store.publish(HeadLearner().fit(task, maker.backbone, RunContext(progress=False)))
    store.publish(make_task(maker, "prompts", list(images), list(labels), names, config=default_prompt_config(maker), prompt_scale=0.02))
    settings = ServiceSettings(model=args.memory_model, pretrained=pretrained, device=args.device, store=store.url, ui=False)
    engine = Engine.from_settings(settings)
    engine.sync()
    out = {"model": args.memory_model, "dim": engine.runtime.embed_dim, "classes": c,
           "vocabulary": engine.vocabulary_name, "bytes_per_task": {k: loaded_task_bytes(engine, k) for k in ("head", "prompts")}}
    engine.close()
    log.info("memory per task at %d-d: %s", out["dim"], {k: fmt_bytes(v["total"]) for k, v in out["bytes_per_task"].items()})
    return out


# ----------------------------------------------------------------------------- report
def machine(threads: int) -> dict:
    import faiss
    import open_clip
    import torch

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        cpu = ""
    return {"cpu": cpu or platform.processor(), "cores": len(os.sched_getaffinity(0)), "torch_threads": threads,
            "torch": torch.__version__, "open_clip": open_clip.__version__, "faiss": faiss.__version__,
            "python": platform.python_version(), "load_average_at_end": os.getloadavg()[0]}


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def engine_lines(e: dict, b: int, what: str) -> list[str]:
    lines = [f"| batch of {b} | images/s | batch latency p50 | p99 |", "|---|---|---|---|"]
    for key, label in (("zero_shot", "plain open_clip zero-shot"), ("engine", f"keepclip engine ({len(e['tasks'])} {what})")):
        r = e[key]
        lines.append(f"| {label} | {r['images_per_s']:.1f} | {r['batch_latency_ms']['p50']:.1f} ms "
                     f"| {r['batch_latency_ms']['p99']:.1f} ms |")
    return lines + ["", f"engine ({what}) / zero-shot: **{e['ratio_engine_to_zero_shot']:.2f}x** (per round: "
                    f"{', '.join(f'{x:.2f}' for x in e['per_round_ratio'])}); routed to a task: "
                    f"{1 - e['engine'].get('routed_share', {}).get('None', 0):.0%} of the test images", ""]


def markdown(results: dict) -> str:
    m, mach = results["memory_per_task"], results["machine"]
    b = results["batch_size"]
    lines = [f"`{results['command']}`", "",
             f"{mach['cpu']}, {mach['cores']} cores, {mach['torch_threads']} torch threads, torch {mach['torch']}, "
             f"open_clip {mach['open_clip']}, faiss {mach['faiss']}; load average {mach['load_average_at_start']:.1f} at the "
             f"start, {mach['load_average_at_end']:.1f} at the end; backbone {results['model']}", ""]
    for key, what in (("engine_vs_zero_shot", "prompt tasks"), ("engine_vs_zero_shot_head", "head tasks")):
        if key in results:
            lines += engine_lines(results[key], b, what)
    lines += [f"| tasks | router keys | build | route µs/image, batch 1 | batch {b} | FAISS index | stats in memory |",
              "|---|---|---|---|---|---|---|"]
    for r in results["router"]:
        us = r["route_us_per_image"]
        lines.append(f"| {r['tasks']} | {r['router_keys']} | {r['build_s'] * 1000:.1f} ms | {us['1']:.0f} | {us[str(b)]:.0f} "
                     f"| {fmt_bytes(r['faiss_index_bytes'])} | {fmt_bytes(r['stats_bytes'])} |")
    x = m["exact_bytes_per_task"]
    lines += ["", "| one task, default recipe | |", "|---|---|",
              f"| prompt parameters ({m['prompt_config']['depth']} x {m['prompt_config']['n_prefix']}) | {m['prompt_parameters']:,} |",
              f"| artifact on disk ({', '.join(f'{k} {fmt_bytes(v)}' for k, v in m['artifact_files_bytes'].items())}) "
              f"| {fmt_bytes(m['artifact_bytes'])} |",
              f"| loaded: prompts + text features ({m['classes']} classes) + stats + zero-shot check | {fmt_bytes(x['prompts'])} + "
              f"{fmt_bytes(x['text_features'])} + {fmt_bytes(x['stats'])} + {fmt_bytes(x['zero_shot_check'])} = {fmt_bytes(x['total'])} |",
              f"| resident memory per task (RSS delta / {m['tasks_loaded']}) | {fmt_bytes(m['rss_per_task_bytes'])} |"]
    at = results.get("memory_per_task_at")
    if at:
        parts = ("prompts", "text_features", "stats", "zero_shot_check", "kind")
        lines += ["", f"| bytes per loaded task, {at['model']} ({at['dim']}-d), {at['classes']} classes | "
                  + " | ".join(parts) + " | total |", "|---|" + "---|" * (len(parts) + 1)]
        for kind, b in at["bytes_per_task"].items():
            lines.append(f"| {kind} | " + " | ".join(fmt_bytes(b[p]) for p in parts) + f" | **{fmt_bytes(b['total'])}** |")
    http = results.get("http", {}).get("summary")
    if http:
        lines += ["", f"over HTTP (bench.service_speed, 8 clients, 1 image per request): {http['http_images_per_s_8_clients']:.1f} "
                  f"images/s = {http['http_over_zero_shot_8_clients']:.2f}x plain zero-shot in-process "
                  f"({http['zero_shot_images_per_s']:.1f}), mean batch {http['mean_batch_8_clients'] or 0:.2f}"]
    lines += ["", "summary: " + ", ".join(f"{k} {v:.3g}" for k, v in results.get("summary", {}).items())]
    return "\n".join(lines)


def summary(results: dict) -> dict:
    """The headline numbers, under fixed keys (issue 18): absent where their section did not run."""
    out = {}
    http = results.get("http", {}).get("summary", {})
    for key in ("http_over_zero_shot_8_clients", "mean_batch_8_clients"):
        if key in http:
            out[key] = http[key]
    if "engine_vs_zero_shot" in results:
        out["engine_over_zero_shot_prompts"] = results["engine_vs_zero_shot"]["ratio_engine_to_zero_shot"]
    if "engine_vs_zero_shot_head" in results:
        out["engine_over_zero_shot_head"] = results["engine_vs_zero_shot_head"]["ratio_engine_to_zero_shot"]
    thousand = [r for r in results.get("router", []) if r["tasks"] == 1000]
    if thousand:
        out["router_ms_per_image_1000_tasks"] = thousand[0]["route_us_per_image"]["1"] / 1000
    at = results.get("memory_per_task_at")
    if at and at["dim"] == 512:
        out["kib_per_task_512d"] = at["bytes_per_task"]["head"]["total"] / 1024  # the default kind
        out["kib_per_task_512d_prompts"] = at["bytes_per_task"]["prompts"]["total"] / 1024
    return out


def write_outputs(results: dict, out: Path) -> str:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    out.with_suffix(".md").write_text(table + "\n")
    return table


# ----------------------------------------------------------------------------- 5. over HTTP
def bench_http(args, pretrained: str, work: Path) -> dict:
    """bench.service_speed on the engine's tasks (the same store, or the same hand-made ones), in a child process."""
    domains = present_domains(args, "test")
    if not domains:
        raise SystemExit(f"--http needs the shared domains' test images under {args.data}")
    out = work / "http.json"
    store = args.store or str(work / "store")
    command = [sys.executable, "-m", "bench.service_speed", "--model", args.model, "--pretrained", pretrained,
               "--device", args.device, "--store", store, "--data", str(args.data), "--domains", ",".join(domains),
               "--per-domain", str(args.per_domain), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
               "--seconds", str(args.seconds), "--probe-rounds", "0", "--fill-hand-made", "--out", str(out)]
    log.info("over HTTP: %s", shlex.join(command))
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    if done.returncode != 0:
        raise SystemExit(f"bench.service_speed failed (exit {done.returncode}): {shlex.join(command)}")
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None, prog: str = "python -m bench.speed") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")  # open_clip logs on root
    log.setLevel(logging.INFO)
    logging.getLogger("service.engine").setLevel(logging.WARNING)  # a line per loaded task would drown the progress
    import torch

    from service.settings import ServiceSettings

    torch.set_num_threads(args.threads)
    command = f"{prog} {shlex.join(sys.argv[1:] if argv is None else argv)}"
    load_at_start = os.getloadavg()[0]
    results: dict = {"command": command, "model": args.model, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="keepclip-bench-speed-") as tmp:
        work = Path(tmp)
        maker, pretrained = load_maker(args, work)
        settings = ServiceSettings(model=args.model, pretrained=pretrained, device=args.device, runtime=args.runtime,
                                   torch_threads=args.threads, max_batch_size=args.batch_size, ui=False)
        probe = default_task(maker, args.classes_per_task)
        kinds = args.engine_kinds.split(",")
        if "prompts" in kinds:
            results["engine_vs_zero_shot"] = bench_engine(args, settings, maker, work)
        if "head" in kinds:
            results["engine_vs_zero_shot_head"] = bench_engine(args, settings, maker, work, head_store(args, maker, work))
        # memory before the router: its synthetic stats (GBs for big backbones) would blur the RSS deltas
        results["memory_per_task"] = bench_memory(args, settings, probe, work)
        results["router"] = bench_router(args, probe.stats["mean"].shape[0], settings.router_top_k,
                                         settings.gate_threshold)
        if args.memory_model != "skip":
            results["memory_per_task_at"] = bench_memory_at(args, work)
        if args.http:
            results["http"] = bench_http(args, pretrained, work)
    results["summary"] = summary(results)
    results["machine"] = {**machine(args.threads), "load_average_at_start": load_at_start}
    table = write_outputs(results, args.out)
    print(table)
    print(f"\nwritten: {args.out} and {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
