"""Learn the six shared domains one after another into one store with the default recipe, on the proxy CLIP.

    python -m bench.learn_domains                   # the full benchmark: all train images, add-task's default kind (head)
    python -m bench.learn_domains --kind prompts    # the residual prompts, default recipe (10 epochs); also prompts+head, auto
    python -m bench.learn_domains --quick           # a few minutes: 200 train / 200 test images per domain, 2 epochs

Per task it reports the test accuracy with the task given (the task's prompts and its class names), the frozen
proxy's zero-shot accuracy on the same test images, and the minutes `add-task` took (wall clock: loading, decoding,
fingerprint, training, evaluation, publish). After the last task, every task is evaluated again from the store, all
six loaded side by side through the service's own kind plug-ins, to show that the published artifacts reproduce
their numbers and that learning later tasks changed nothing for earlier ones. Results go to OUT/learn_domains.{json,md} and are printed as Markdown.

This is a benchmark, not a test: it needs ../shared (the proxy model and the data) and a quiet CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("KEEPCLIP_SHARED", REPO.parent / "shared"))
DOMAINS = ("mnist", "fashion_mnist", "cifar10", "eurosat", "gtsrb", "caltech101")  # the order they are learnt in

# The proxy's own caption templates, per domain: the table "Training recipe" in ../shared/models/proxy-clip/MODEL.md
# (also what its zero-shot numbers there average over). Copied here so the benchmark matches that card.
TEMPLATES = {
    "cifar10": ["a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}."],
    "caltech101": ["a photo of a {}.", "a blurry photo of a {}.", "a close-up photo of a {}."],
    "eurosat": ["a centered satellite photo of {}.", "a satellite image of {}.", "a photo of a {}."],
    "gtsrb": ['a photo of a "{}" traffic sign.', 'a zoomed in photo of a "{}" traffic sign.', "a photo of a {}."],
    "mnist": ['a photo of the number: "{}".', "a handwritten digit {}.", "a photo of a {}."],
    "fashion_mnist": ["a photo of a {}, a type of clothing.", "a product photo of a {}.", "a photo of a {}."],
}
QUICK = {"train": 200, "test": 200, "epochs": 2}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.learn_domains", description=__doc__.split("\n\n")[0],
                                     epilog="Any other option is passed to add-task as it is (recipe options, e.g. --augment none).")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK['train']} train / {QUICK['test']} test images per domain, {QUICK['epochs']} epochs")
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help=f"the shared folder with models/proxy-clip and data [{DEFAULT_SHARED}]")
    parser.add_argument("--out", type=Path, help="results, store and checkpoints go here (emptied first) [$TMPDIR/keepclip-bench/learn_domains[-quick]]")
    parser.add_argument("--domains", nargs="+", choices=DOMAINS, default=list(DOMAINS), help="a subset, in the given order")
    parser.add_argument("--limit-train", type=int, help="train images per domain (seeded subsample)")
    parser.add_argument("--limit-test", type=int, help="test images per domain (seeded subsample)")
    parser.add_argument("--epochs", type=int, help="override the recipe's epochs")
    parser.add_argument("--workers", type=int, default=0, help="add-task --workers (0: in this process)")
    parser.add_argument("--kind", default="head", choices=("head", "prompts", "prompts+head", "auto"), help="add-task --kind [head]")
    args, args.recipe = parser.parse_known_args(argv)  # the rest goes to add-task as it is: recipe options (--lr 1 ...)
    if args.quick:
        args.limit_train = args.limit_train or QUICK["train"]
        args.limit_test = args.limit_test or QUICK["test"]
        args.epochs = args.epochs or QUICK["epochs"]
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "keepclip-bench" / ("learn_domains-quick" if args.quick else "learn_domains")
    return args


def subsample_index(labels: np.ndarray, limit: int | None, every_class: bool = False, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded subsample (all when `limit` is None); `every_class`: classes take turns, so each
    keeps an image."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    if every_class:  # round robin over the classes, each in a seeded random order
        queues = [list(rng.permutation(np.flatnonzero(labels == c))) for c in np.unique(labels)]
        order = [q[i] for i in range(max(map(len, queues))) for q in queues if i < len(q)]
        return np.sort(np.asarray(order[:limit]))
    return np.sort(rng.permutation(len(labels))[:limit])


def subsample(src: Path, dst: Path, limit: int | None, every_class: bool = False) -> Path:
    """The domain's .npz, or a seeded subsample of it written to `dst`."""
    if limit is None:
        return src
    with np.load(src) as data:
        images, labels = data["images"], data["labels"]
    keep = subsample_index(labels, limit, every_class)
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, images=images[keep], labels=labels[keep])
    shutil.copy(src.parent / "classnames.json", dst.parent / "classnames.json")
    return dst


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    proxy = args.shared / "models" / "proxy-clip"
    if not (proxy / "proxy-clip.safetensors").is_file() or not (args.shared / "data").is_dir():
        print(f"error: needs the proxy model and data in {args.shared} (--shared)", file=sys.stderr)
        return 2
    from training.add_task import main as add_task

    out = args.out.absolute()
    shutil.rmtree(out, ignore_errors=True)
    store, checkpoints = out / "store", out / "checkpoints"
    common = [
        "--model", str(proxy / "proxy-clip.json"), "--pretrained", str(proxy / "proxy-clip.safetensors"), "--device", "cpu",
        "--store", str(store), "--checkpoint-dir", str(checkpoints), "--workers", str(args.workers), "--kind", args.kind,
    ] + (["--epochs", str(args.epochs)] if args.epochs else []) + args.recipe

    rows = []
    for domain in args.domains:
        folder = args.shared / "data" / domain
        train = subsample(folder / "train.npz", out / "data" / domain / "train.npz", args.limit_train, every_class=True)
        test = subsample(folder / "test.npz", out / "data" / f"{domain}-test" / "test.npz", args.limit_test)
        templates = out / "templates" / f"{domain}.json"
        templates.parent.mkdir(parents=True, exist_ok=True)
        templates.write_text(json.dumps(TEMPLATES[domain]))
        print(f"\n=== {domain}: add-task --data {train} --test {test}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        code = add_task([domain, "--data", str(train), "--test", str(test), "--templates", str(templates), *common])
        minutes = (time.perf_counter() - started) / 60
        if code != 0:
            print(f"error: add-task {domain} failed with exit code {code}", file=sys.stderr)
            return code
        rows.append({"domain": domain, "minutes": round(minutes, 2)})

    from prompts_store import open_store

    artifacts = {domain: open_store(store).get(domain) for domain in args.domains}
    again = evaluate_from_store(proxy, artifacts, out, args.limit_test is not None)
    for row in rows:
        metrics = artifacts[row["domain"]].metrics
        row.update({
            "classes": len(artifacts[row["domain"]].class_names),
            "n_train": metrics["n_train"], "n_val": metrics["n_val"], "n_test": metrics["n_test"],
            "test_accuracy": metrics["test_accuracy"],
            "test_zero_shot_accuracy": metrics["test_zero_shot_accuracy"],
            "test_accuracy_from_store_after_all": again[row["domain"]],
            "val_accuracy": metrics["val_accuracy"], "best_epoch": metrics.get("best_epoch"), "epochs": metrics.get("epochs"),
            "kind": artifacts[row["domain"]].kind, "candidates": metrics.get("candidates"),
            "train_minutes": round(metrics["train_seconds"] / 60, 2),
        })
    report = {
        "benchmark": "learn_domains", "quick": args.quick, "domains": list(args.domains), "kind": args.kind,
        "recipe": {k: v for k, v in artifacts[args.domains[0]].recipe.items() if k not in ("data", "split")},
        "limits": {"train": args.limit_train, "test": args.limit_test},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "rows": rows,
        "beats_zero_shot_everywhere": all(r["test_accuracy"] > r["test_zero_shot_accuracy"] for r in rows),
    }
    markdown = to_markdown(report)
    (out / "learn_domains.json").write_text(json.dumps(report, indent=2, sort_keys=True))
    (out / "learn_domains.md").write_text(markdown)
    print(markdown)
    print(f"results: {out / 'learn_domains.json'} and {out / 'learn_domains.md'}; store: {store}", file=sys.stderr)
    return 0


def evaluate_from_store(proxy: Path, artifacts: dict, out: Path, subsampled: bool) -> dict[str, float]:
    """Every task again, from its published artifact, all loaded side by side as a replica loads them (the service's
    kind plug-ins on one torch runtime), each answered with its task given (w = 1)."""
    import torch

    from PIL import Image

    from backbone import PixelPipeline
    from service.kinds import load_kind
    from service.runtime import TorchRuntime
    from training.data import ImageSet
    from training.runtime import load_frozen_backbone

    backbone = load_frozen_backbone(str(proxy / "proxy-clip.json"), str(proxy / "proxy-clip.safetensors"), "cpu")
    runtime = TorchRuntime(backbone)
    served = {name: load_kind(artifact, runtime, name) for name, artifact in artifacts.items()}
    pipeline = PixelPipeline(backbone.preprocess)
    accuracy = {}
    for name, artifact in artifacts.items():
        with np.load(artifact.recipe["data"]["test"]["path"]) as data:  # the test .npz add-task was given
            pixels = np.stack([pipeline.pixels(Image.fromarray(image)) for image in data["images"]])
            images = ImageSet(pixels, data["labels"].astype(np.int64))
        task, correct = served[name], 0
        for start in range(0, len(images), 256):
            batch = pipeline.to_batch(images.pixels[start : start + 256])
            ones = torch.ones(len(batch))
            frozen = runtime.encode_image(batch)
            features = frozen if task.slot is None else runtime.encode_image(batch, [task.slot] * len(batch), ones.tolist())
            predicted = task.logits(features, frozen, ones).argmax(-1)
            correct += int((predicted.numpy() == images.labels[start : start + 256]).sum())
        accuracy[name] = correct / len(images)
    return accuracy


def to_markdown(report: dict) -> str:
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}"

    def kept(r):
        return r.get("kind", "residual-prompts") + (f", {r['best_epoch']}/{r['epochs']}" if r.get("epochs") else "")

    title = "quick run (subsampled, few epochs; a smoke test, not the benchmark)" if report["quick"] else "default recipe"
    title += f", add-task --kind {report.get('kind', 'prompts')}"
    lines = [
        f"### Learning the six shared domains in order on the proxy CLIP — {title}",
        "",
        "| # | domain | classes | train / val / test images | test acc, task given (%) | frozen zero-shot (%) | "
        "from store after all tasks (%) | kept (kind, epoch) | minutes (add-task) | of which training |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(report["rows"], 1):
        lines.append(
            f"| {i} | {r['domain']} | {r['classes']} | {r['n_train']} / {r['n_val']} / {r['n_test']} | **{pct(r['test_accuracy'])}** | "
            f"{pct(r['test_zero_shot_accuracy'])} | {pct(r['test_accuracy_from_store_after_all'])} | {kept(r)} | "
            f"{r['minutes']:.1f} | {r['train_minutes']:.1f} |"
        )
    rows = report["rows"]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    lines += [
        f"| | **mean** | | | **{pct(mean('test_accuracy'))}** | {pct(mean('test_zero_shot_accuracy'))} | "
        f"{pct(mean('test_accuracy_from_store_after_all'))} | | {sum(r['minutes'] for r in rows):.1f} (total) | |",
        "",
        f"Learned accuracy beats zero-shot on every domain: **{'yes' if report['beats_zero_shot_everywhere'] else 'NO'}**. "
        f"Machine: {report['machine']['cpus']} CPUs, {report['machine']['platform']}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
