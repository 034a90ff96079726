"""The service engine on ONNX Runtime vs torch eager, in one run (a benchmark, not a test).

    python -m bench.onnx_speed                                   # proxy and random-init ViT-B-16, batch 1/8/32
    python -m bench.onnx_speed --backbones proxy --batch-sizes 1,8,32 --rounds 5 --json out.json

Per backbone (`proxy` = ../shared/models/proxy-clip; any other name is an open_clip model, random init unless
`--pretrained` is given — never downloaded):

1. **export**: a child process exports the graphs into an empty cache directory: wall seconds per graph and the
   child's peak RSS (the exporter holds a traced copy of the weights while it works);
2. **extra memory**: in this process, RSS before and after building `OnnxRuntime` from that cache (the frozen
   graphs' onnxruntime sessions; the torch weights are there in both cases), and after its engine has loaded the
   tasks (which open the sessions of the prompted graphs they use);
3. **speed**: two engines over the same store of hand-made tasks (`testkit.tasks.make_task`: real fingerprints of
   `--fit-images` training images per domain, random prompts of add-task's default shape, in the last blocks, or with
   `--placement input` the reference's 8 x 8 in the first blocks), one on `TorchRuntime`, one
   on `OnnxRuntime`, each on its own copy of the same weights. Jobs are task-agnostic `ClassifyJob`s of domain test
   images (already preprocessed: decoding is the same for both and not measured): frozen pass, routing, prompted
   pass for the routed images, logits — the real engine path. Per batch size, pairs of adjacent `run_batch` calls on
   the same images, one per engine, the order alternating from pair to pair (so load changes hit both alike):
   max(`--rounds`, `--images` / batch) pairs after one warm-up call each. images/s = images / total seconds per
   engine, the ratio onnx / torch, and the median and quartiles of the per-pair ratios show the spread. torch and
   onnxruntime get the same `--threads`.

The machine is printed with the table; on a shared machine only the ratios within one run mean much.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KEEPCLIP_SHARED", REPO.parent / "shared"))
PROXY = SHARED / "models" / "proxy-clip"
DOMAINS = ("mnist", "cifar10", "eurosat", "gtsrb")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def resolve(name: str, pretrained: str | None, workdir: Path) -> tuple[str, str]:
    """-> (model, checkpoint): the proxy, or a model whose random init is saved once so every load has the same weights."""
    if name == "proxy":
        return str(PROXY / "proxy-clip.json"), str(PROXY / "proxy-clip.safetensors")
    if pretrained and pretrained.lower() not in ("none", "random"):
        return name, pretrained
    import torch

    from backbone import load_backbone
    from testkit.tasks import save_checkpoint

    torch.manual_seed(0)
    path = workdir / f"{name}-random.safetensors"
    save_checkpoint(load_backbone(name, None, "cpu"), path)
    return name, str(path)


def export_in_child(model: str, checkpoint: str, cache: Path, threads: int) -> dict:
    """Cold export in a fresh process: seconds per graph and the child's peak RSS."""
    code = (
        "import json, resource, sys, time, torch\n"
        f"torch.set_num_threads({threads})\n"
        "from backbone import load_backbone\n"
        "from backbone.onnx_export import GraphSpec, OnnxCache\n"
        f"b = load_backbone({model!r}, {checkpoint!r}, 'cpu')\n"
        "rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        f"c = OnnxCache({str(cache)!r}).ensure(b, GraphSpec.for_backbone(b))\n"
        "m = json.loads((c.directory / 'manifest.json').read_text())\n"
        "sizes = {g: (c.directory / f'{g}.onnx').stat().st_size / 2**20 for g in m['sha256']}\n"
        "print(json.dumps({'seconds': c.export_seconds, 'per_graph': m['export_seconds'], 'sizes_mib': sizes,\n"
        "  'peak_rss_mib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'rss_before_mib': rss0}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    if out.returncode != 0:
        raise SystemExit(f"export failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def domain_images(data: Path, split: str, n: int, seed: int):
    """{domain: (images uint8 (n, H, W, 3), labels, class names)} for the domains present."""
    out = {}
    for i, name in enumerate(DOMAINS):
        path = data / name / f"{split}.npz"
        if not path.is_file():
            continue
        arrays = np.load(path)
        keep = np.sort(np.random.default_rng(seed + i).permutation(len(arrays["labels"]))[:n])
        images = arrays["images"][keep]
        if images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        out[name] = (images, arrays["labels"][keep], json.loads((data / name / "classnames.json").read_text()))
    if not out:
        raise SystemExit(f"no domain data under {data}")
    return out


def bench_backbone(spec: str, args, workdir: Path) -> dict:
    import torch
    from PIL import Image

    from backbone import PromptConfig, load_backbone
    from prompts_store import open_store
    from service.engine import ClassifyJob, Engine
    from service.runtime import TorchRuntime
    from service.runtime_onnx import OnnxRuntime
    from service.settings import ServiceSettings
    from testkit.tasks import default_prompt_config, make_task

    model, checkpoint = resolve(spec, args.pretrained, workdir)
    cache = workdir / f"onnx-cache-{spec}"
    print(f"[{spec}] exporting in a child process ...", flush=True)
    export = export_in_child(model, checkpoint, cache, args.threads)

    torch_rt = TorchRuntime(load_backbone(model, checkpoint, "cpu"))
    onnx_backbone = load_backbone(model, checkpoint, "cpu")
    rss0 = rss_mib()
    onnx_rt = OnnxRuntime(onnx_backbone, cache_dir=cache, threads=args.threads)
    extra_mib = rss_mib() - rss0

    print(f"[{spec}] fingerprinting hand-made tasks ...", flush=True)
    store = open_store(workdir / f"store-{spec}")
    config = default_prompt_config(torch_rt.model) if args.placement == "output" else PromptConfig()
    for i, (name, (images, labels, classes)) in enumerate(domain_images(args.data, "train", args.fit_images, 0).items()):
        store.publish(make_task(torch_rt.model, name, images, labels.tolist(), classes, config=config,
                                prompt_scale=0.02, seed=i))
    settings = ServiceSettings(model=model, pretrained=checkpoint, device="cpu", store=store.url, ui=False)
    engines = {"torch": Engine(torch_rt, store, settings), "onnx": Engine(onnx_rt, store, settings)}
    engines["torch"].sync()
    rss1 = rss_mib()
    engines["onnx"].sync()
    extra_with_tasks_mib = extra_mib + rss_mib() - rss1
    test = domain_images(args.data, "test", args.images, 1)
    pool = [im for images, _, _ in test.values() for im in images]
    order = np.random.default_rng(0).permutation(len(pool))
    tensors = [onnx_rt.preprocess(Image.fromarray(pool[j])) for j in order]

    def one_batch(engine, batch_size: int, k: int) -> tuple[float, int]:
        jobs = [ClassifyJob(tensors[(k * batch_size + j) % len(tensors)]) for j in range(batch_size)]
        start = time.perf_counter()
        results = engine.run_batch(jobs)
        return time.perf_counter() - start, sum(r.task is not None for r in results)

    # same answers? (first images, task-agnostic)
    probe = [ClassifyJob(t) for t in tensors[:8]]
    answers = {k: [(r.task, r.scores[0].label if r.scores else None) for r in e.run_batch(probe)] for k, e in engines.items()}
    rows = []
    for batch_size in args.batch_sizes:
        for engine in engines.values():  # warm-up at this batch size
            one_batch(engine, batch_size, 0)
        # pairs of adjacent calls on the same images, order alternating: load changes hit both engines alike
        pairs = max(args.rounds, -(-args.images // batch_size))
        seconds = {"torch": [], "onnx": []}
        routed = 0
        for k in range(pairs):
            for name in (("torch", "onnx") if k % 2 == 0 else ("onnx", "torch")):
                t, n_routed = one_batch(engines[name], batch_size, k)
                seconds[name].append(t)
                routed += n_routed if name == "onnx" else 0
        rate = {k: pairs * batch_size / sum(v) for k, v in seconds.items()}
        ratios = sorted(t / o for t, o in zip(seconds["torch"], seconds["onnx"]))
        q1, q3 = ratios[len(ratios) // 4], ratios[(3 * len(ratios)) // 4]
        rows.append({"batch": batch_size, "pairs": pairs, "torch": rate["torch"], "onnx": rate["onnx"],
                     "ratio": rate["onnx"] / rate["torch"], "ratio_median": statistics.median(ratios),
                     "ratio_q1": q1, "ratio_q3": q3, "routed": routed / (pairs * batch_size)})
        print(f"[{spec}] batch {batch_size} x {pairs} pairs: torch {rate['torch']:.2f} img/s, onnx {rate['onnx']:.2f} "
              f"img/s, ratio {rows[-1]['ratio']:.2f} (per pair: median {rows[-1]['ratio_median']:.2f}, "
              f"quartiles {q1:.2f}-{q3:.2f}), routed {rows[-1]['routed']:.0%}", flush=True)
    for engine in engines.values():
        engine.close()
    return {"backbone": spec, "model": model, "export": export, "extra_rss_mib": extra_mib,
            "extra_rss_with_tasks_mib": extra_with_tasks_mib, "config": config.to_dict(),
            "open_graphs": onnx_rt.open_graphs(),
            "same_answers": answers["onnx"] == answers["torch"], "rows": rows,
            "tasks": sorted(engines["onnx"].state.tasks)}


def machine() -> str:
    import onnxruntime
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores available, load average {os.getloadavg()[0]:.1f} at the end; "
            f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}")


def markdown(results: list[dict], args) -> str:
    lines = ["| backbone | batch | pairs | torch images/s | onnx images/s | onnx / torch | per-pair ratio: median (quartiles) "
             "| images routed to a task |", "|---|---|---|---|---|---|---|---|"]
    for res in results:
        for row in res["rows"]:
            lines.append(f"| {res['backbone']} | {row['batch']} | {row['pairs']} | {row['torch']:.2f} | {row['onnx']:.2f} | "
                         f"**{row['ratio']:.2f}x** | {row['ratio_median']:.2f} ({row['ratio_q1']:.2f}–{row['ratio_q3']:.2f}) "
                         f"| {row['routed']:.0%} |")
    lines += ["", "| backbone | export (cold cache) | graph files | peak RSS of the exporting process | "
              "extra RSS of the ONNX sessions: at start, with the tasks | same answers as torch (8 images) |",
              "|---|---|---|---|---|---|"]
    for res in results:
        e = res["export"]
        per = ", ".join(f"{g.replace('_', ' ')} {s:.1f}" for g, s in e["per_graph"].items())
        lines.append(f"| {res['backbone']} | {e['seconds']:.1f} s ({per}) | {sum(e['sizes_mib'].values()):.0f} MiB | "
                     f"{e['peak_rss_mib']:.0f} MiB (after loading: {e['rss_before_mib']:.0f}) | "
                     f"{res['extra_rss_mib']:.0f} MiB, {res['extra_rss_with_tasks_mib']:.0f} MiB "
                     f"({len(res['open_graphs'])} graphs open) | {'yes' if res['same_answers'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", default="proxy,ViT-B-16", help="comma-separated: proxy and/or open_clip model names")
    p.add_argument("--pretrained", default="none", help="weights for non-proxy backbones: a local checkpoint or none")
    p.add_argument("--batch-sizes", default="1,8,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--rounds", type=int, default=4, help="at least this many interleaved pairs of calls per batch size")
    p.add_argument("--images", type=int, default=32, help="images per engine per batch size (at least --rounds calls)")
    p.add_argument("--fit-images", type=int, default=64, help="training images per domain for each task's fingerprint")
    p.add_argument("--placement", choices=("output", "input"), default="output",
                   help="the tasks' prompts: add-task's default shape in the last blocks, or the reference's 8 x 8 in the "
                        "first [output]")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch and onnxruntime threads")
    p.add_argument("--data", type=Path, default=SHARED / "data")
    p.add_argument("--json", type=Path, help="write the results here too")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix="keepclip-onnx-bench-") as tmp:
        for spec in [s.strip() for s in args.backbones.split(",") if s.strip()]:
            results.append(bench_backbone(spec, args, Path(tmp)))
    print()
    print("command: python -m bench.onnx_speed " + " ".join(argv if argv is not None else sys.argv[1:]))
    print("machine:", machine())
    print()
    print(markdown(results, args))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
