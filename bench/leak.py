"""Leak benchmark: how much of the domains a task never learned does its gate claim? (issue 16)

    python -m bench.leak                      # each shared domain learned alone (add-task's default kind), plus a diffuse mix
    python -m bench.leak --kind prompts       # the same with another kind (slower: prompts train for minutes per task)

Every task is learned on its own into a fresh store (as `bench continual` learns it: the same data, the same
2,000-image subsets) and served by itself through the service's router and kind plug-ins. Then every domain's test
images are routed, one by one, and for each (task, domain) pair the benchmark reports:

- claimed: the share of the domain's test images routed to the task with a gate weight w >= 0.5;
- accuracy change with the domain's own labels (the image answered within its own classes, through the task's
  prompted pass when it was routed there; a head leaves the features frozen, so only prompts can move this);
- accuracy change task-agnostic: the engine's answer over the union of the domain's and the task's classes, where an
  image the task claims is answered with the task's classes (wrong by construction, since it is another domain's).

Unlearned domains should be claimed rarely (issue 16's target: <= 5 %) and keep their accuracy (within 1 point);
each task's own domain should be claimed (>= 97 %). The diffuse task `mix` holds 3 classes of each of cifar10,
eurosat, gtsrb and caltech101: wide, like a task of mixed photos; its unlearned domains are mnist and fashion_mnist.

The router gets what the service gives it: each task's frozen class text and the service's open vocabulary, against
which a task must explain an image (`--vocabulary`; for the proxy, the names it was pretrained on, the honest generic
vocabulary of a model that has read no other words; `none` measures the distance gate alone).
Writes OUT/leak.json, OUT/leak.md and OUT/leak-heatmap.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.continual import FULL_TRAIN, eval_tasks, load_task
from bench.learn_domains import DEFAULT_SHARED
from bench.continual_learners import BackboneSpec, EvalTask, accuracy, union_accuracy
from bench.onnx_speed import PROXY
from bench.router_vocabulary import AUTO, HELP, open_vocabulary, vocabulary_names

log = logging.getLogger("bench.leak")
DOMAINS = ("mnist", "fashion_mnist", "cifar10", "eurosat", "gtsrb", "caltech101")
MIX = {"cifar10": 3, "eurosat": 3, "gtsrb": 3, "caltech101": 3}  # the diffuse task: classes taken from each


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.leak", description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", default="head", choices=("head", "prompts", "prompts+head", "auto"), help="add-task --kind [head]")
    p.add_argument("--data-root", type=Path, default=DEFAULT_SHARED / "data", help="one folder per domain [%(default)s]")
    p.add_argument("--model", default=str(PROXY / "proxy-clip.json"))
    p.add_argument("--pretrained", default=str(PROXY / "proxy-clip.safetensors"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    p.add_argument("--no-mix", action="store_true", help="leave out the diffuse mixed task")
    p.add_argument("--limit-train", type=int, default=FULL_TRAIN, help="train images per task (every class kept) [%(default)s]")
    p.add_argument("--limit-test", type=int, help="test images per domain")
    p.add_argument("--threshold", type=float, default=0.5, help="a claim is a route with gate weight >= this [0.5]")
    p.add_argument("--vocabulary", default=AUTO, help=HELP)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "keepclip-bench" / "leak")
    return p.parse_args(argv)


def mixed_task(tasks: dict):
    """A diffuse task: the first classes of several domains, relabelled one after another."""
    from backbone import DEFAULT_TEMPLATES
    from training.data import ImageSet
    from training.learner import TaskData

    parts = {"train": [], "val": []}
    names, offset = [], 0
    for domain, count in MIX.items():
        task = tasks[domain]
        names += [f"{domain} {n}" for n in task.class_names[:count]]
        for split in parts:
            images = getattr(task, split)
            keep = images.labels < count
            parts[split].append(ImageSet(images.pixels[keep], images.labels[keep] + offset))
        offset += count
    train, val = (ImageSet.concat(*parts[s]) for s in ("train", "val"))
    return TaskData("mix", names, list(DEFAULT_TEMPLATES), train, val, None, {"mix": MIX})


def leak_row(learner, name: str, tests: list[EvalTask], threshold: float, router) -> list[dict]:
    """Route every domain's test images to the one learned task; claimed share and accuracy changes per domain."""
    text = learner.text[name]
    row = []
    for i, t in enumerate(tests):
        routes = router.route(t.frozen)
        routed = [(r.task, r.gate) for r in routes]
        claimed = np.array([r.task == name and r.gate >= threshold for r in routes])
        own_before = accuracy(t.frozen, t.text_frozen, t.test.labels)
        feats = learner.features(i, t, routed)  # prompted where routed (prompt kinds), frozen otherwise
        own_after = accuracy(feats, t.text_frozen, t.test.labels)
        unrouted = np.array([task is None for task, _ in routed])
        if t.name == name:  # its own domain: the task's answer where routed, the frozen one elsewhere
            agnostic_before, right = own_before, (t.frozen @ t.text_frozen.T).argmax(-1).numpy() == t.test.labels
            rows = np.flatnonzero(~unrouted)
            if len(rows):
                logits = learner.task_logits(name, feats[rows], t.frozen[rows], [routed[r][1] for r in rows])
                right[rows] = logits.argmax(-1).numpy() == t.test.labels[rows]
        else:  # another domain's images: over the union of its classes and the task's, a claimed image is answered wrongly
            agnostic_before = union_accuracy(t.frozen, [t.text_frozen, text], 0, t.test.labels)
            right = ((feats @ torch.cat([t.text_frozen, text]).T).argmax(-1).numpy() == t.test.labels) & unrouted
        row.append({"domain": t.name, "claimed": float(claimed.mean()), "routed_any_weight": float((~unrouted).mean()),
                    "own_labels_change": float(right.mean()) - own_before if t.name == name else own_after - own_before,
                    "task_agnostic_change": float(right.mean()) - agnostic_before})
    return row


def task_router(learner, name: str, vocabulary=None, class_names=()):
    """The router the service builds for the one task: its distance gate, and its check against the vocabulary."""
    from service.router import Router

    classes = {name: (tuple(class_names), learner.served[name].text_frozen)} if class_names else None
    return Router({name: learner.stats[name]}, top_k=1, threshold=0.01, vocabulary=vocabulary, classes=classes)


def check_frontier(router, name: str, tests: list[EvalTask], text: torch.Tensor, max_move: float = 0.01) -> dict | None:
    """What meeting the accuracy target by the check alone would cost: the lowest check threshold at which no unlearned
    domain loses more than `max_move` of its task-agnostic accuracy (a claimed image is answered wrongly, so the loss
    is the share of its images that are claimed and that frozen CLIP answers rightly; exact for the head, which
    leaves the features frozen), the quantile of the task's calibration sample it sits at (now and then), and
    the share of the task's own test images still claimed there. None without a check or an own test domain."""
    from service.router import CLAIM

    check = router.check(name)
    own = next((t for t in tests if t.name == name), None)
    if check is None or own is None:
        return None

    def scored(t: EvalTask):
        f = torch.nn.functional.normalize(t.frozen.float(), dim=-1)
        return check.score(f).double().numpy(), router.stats[name].weight(f).numpy() >= CLAIM

    needed = check.threshold
    for t in (t for t in tests if unlearned(name, t.name)):
        z, inside = scored(t)
        right = (t.frozen @ torch.cat([t.text_frozen, text]).T).argmax(-1).numpy() == t.test.labels
        harmful = np.sort(z[inside & right & (z >= check.threshold)])  # claimed now, and frozen CLIP answers rightly
        allowed = int(max_move * len(z) + 1e-9)  # images the domain may lose
        if len(harmful) > allowed:  # the threshold must pass the lowest-scoring harmful claims beyond those
            needed = max(needed, float(np.nextafter(harmful[len(harmful) - allowed - 1], np.inf)))
    z_own, inside_own = scored(own)
    sample = check.score(router.stats[name].calibration.float(), router.stats[name].calibration_key_cos).double().numpy()
    return {"threshold": check.threshold, "threshold_needed": needed,
            "quantile_now": float((sample < check.threshold).mean()), "quantile_needed": float((sample < needed).mean()),
            "own_claimed_now": float((inside_own & (z_own >= check.threshold)).mean()),
            "own_claimed_then": float((inside_own & (z_own >= needed)).mean())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    log.setLevel(logging.INFO)
    from backbone import PixelPipeline
    from prompts_store import open_store
    from training.learners import RecipeSettings

    from .continual_learners import KindLearner

    started = time.perf_counter()
    spec = BackboneSpec(args.model, args.pretrained, args.device)
    pipeline = PixelPipeline(spec.load().preprocess)
    tasks = {d: load_task(args.data_root / d, pipeline, args.limit_train, args.limit_test, 0.1, 0) for d in args.domains}
    tests, _ = eval_tasks(spec, list(tasks.values()))
    learn = dict(tasks)
    if not args.no_mix and set(MIX) <= set(tasks):
        learn["mix"] = mixed_task(tasks)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    vocabulary_name, names = vocabulary_names(args.vocabulary, args.data_root, args.model)
    vocabulary = open_vocabulary(spec, names)
    report = {"benchmark": "leak", "kind": args.kind, "threshold": args.threshold, "domains": [t.name for t in tests],
              "vocabulary": {"name": vocabulary_name, "names": len(names)},
              "command": " ".join(["python -m bench.leak", *(argv if argv is not None else sys.argv[1:])]), "rows": {},
              "frontier": {}}
    for name, task in learn.items():
        store = open_store(out / f"store-{name}")
        learner = KindLearner(spec, args.kind, RecipeSettings(), store, progress=False)
        learner.learn(task)
        router = task_router(learner, name, vocabulary, task.class_names)
        report["rows"][name] = leak_row(learner, name, tests, args.threshold, router)
        report["frontier"][name] = check_frontier(router, name, tests, learner.text[name])
        log.info("%s: claimed %s", name, " ".join(f"{c['domain']} {100 * c['claimed']:.1f}" for c in report["rows"][name]))
    report["minutes"] = round((time.perf_counter() - started) / 60, 2)
    report["summary"] = summary(report)
    (out / "leak.json").write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report)
    (out / "leak.md").write_text(markdown)
    heatmap(report, out / "leak-heatmap.png")
    print(markdown)
    print(f"results: {out / 'leak.json'}, {out / 'leak.md'}, {out / 'leak-heatmap.png'}", file=sys.stderr)
    return 0


def unlearned(task: str, domain: str) -> bool:
    return domain != task and not (task == "mix" and domain in MIX)


def summary(report: dict) -> dict:
    cells = [(t, c) for t, row in report["rows"].items() for c in row]
    leaks = [c for t, c in cells if unlearned(t, c["domain"])]
    own = [c["claimed"] for t, c in cells if c["domain"] == t]
    return {"max_claimed_unlearned": max((c["claimed"] for c in leaks), default=0.0),
            "max_abs_accuracy_change_unlearned": max((max(abs(c["own_labels_change"]), abs(c["task_agnostic_change"])) for c in leaks), default=0.0),
            "min_claimed_own": min(own, default=1.0)}


def to_markdown(report: dict) -> str:
    domains = report["domains"]
    vocabulary = report.get("vocabulary") or {"name": "none", "names": 0}
    lines = [f"### Leak: share of each domain's test images a task learned alone claims (w >= {report['threshold']}), kind {report['kind']}",
             "", f"`{report['command']}`", "",
             f"Router vocabulary: {vocabulary['name']} ({vocabulary['names']} names)" + (" (distance gate alone)" if not vocabulary["names"] else ""), "",
             "| task learned \\ images of | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for task, row in report["rows"].items():
        cells = [f"**{100 * c['claimed']:.1f}**" if c["domain"] == task else f"{100 * c['claimed']:.1f}" for c in row]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy change (points) on the domain's images, own labels / task-agnostic:", "",
              "| task learned \\ images of | " + " | ".join(domains) + " |", "|---|" + "---|" * len(domains)]
    for task, row in report["rows"].items():
        lines.append(f"| {task} | " + " | ".join(f"{100 * c['own_labels_change']:+.1f} / {100 * c['task_agnostic_change']:+.1f}" for c in row) + " |")
    s = report["summary"]
    lines += ["", f"Unlearned domains: at most **{100 * s['max_claimed_unlearned']:.1f} %** claimed, accuracy moved at most "
              f"**{100 * s['max_abs_accuracy_change_unlearned']:.1f}** points; own domain claimed at least "
              f"**{100 * s['min_claimed_own']:.1f} %**. {report['minutes']:.1f} minutes."]
    costly = {t: f for t, f in report.get("frontier", {}).items() if f and f["threshold_needed"] > f["threshold"]}
    if costly:
        lines += ["", "Where a task moves an unlearned domain by more than 1 point, the check threshold that would keep every "
                  "one within 1 point (the distance gate unchanged), and what it costs the task's own test images:", "",
                  "| task | check quantile (calibration sample) now → needed | own test images claimed now → then |",
                  "|---|---|---|"]
        lines += [f"| {t} | {100 * f['quantile_now']:.1f} % → {100 * f['quantile_needed']:.1f} % | {100 * f['own_claimed_now']:.1f} % → "
                  f"{100 * f['own_claimed_then']:.1f} % |" for t, f in costly.items()]
    return "\n".join(lines) + "\n"


def heatmap(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, domains = list(report["rows"]), report["domains"]
    grid = np.array([[100 * c["claimed"] for c in report["rows"][t]] for t in tasks])
    fig, ax = plt.subplots(figsize=(1.2 * len(domains) + 2, 0.6 * len(tasks) + 1.5))
    ax.imshow(grid, cmap="Reds", vmin=0, vmax=100)
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(tasks)), tasks)
    for (r, c), value in np.ndenumerate(grid):
        ax.text(c, r, f"{value:.0f}", ha="center", va="center", color="white" if value > 50 else "black", fontsize=8)
    ax.set_xlabel("test images of")
    ax.set_ylabel("task learned alone")
    ax.set_title(f"claimed (w >= {report['threshold']}), %, kind {report['kind']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
