"""Class balance: the head on training data whose classes have unequal image counts, with and without
`add-task --balance-classes`.

    python -m bench.class_balance                      # the six shared domains, every other class cut to 1/20

For each domain the training images (the same 2,000-image subsets as `bench continual`) keep every image of the even
classes and one in `--ratio` of the odd ones (at least 3 per class); the validation split is cut the same way. The
frozen features are computed once, then the head is solved twice (`fit_head`, the solve add-task runs), once
following the training proportions and once with every class weighed equally. Each is scored on two test sets:

- even: the domain's whole test set, scored by the mean per-class recall (every class matters the same);
- skewed: the test set cut like the training data, scored by accuracy (the deployment sees the training proportions).

Writes OUT/class-balance.json and OUT/class-balance.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.continual import FULL_TRAIN, load_task
from bench.leak import DOMAINS
from bench.learn_domains import DEFAULT_SHARED
from bench.continual_learners import BackboneSpec
from bench.onnx_speed import PROXY


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.class_balance", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", type=Path, default=DEFAULT_SHARED / "data", help="one folder per domain [%(default)s]")
    p.add_argument("--model", default=str(PROXY / "proxy-clip.json"))
    p.add_argument("--pretrained", default=str(PROXY / "proxy-clip.safetensors"))
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    p.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    p.add_argument("--ratio", type=int, default=20, help="the odd classes keep one image in this many [20]")
    p.add_argument("--limit-train", type=int, default=FULL_TRAIN, help="train images per domain before the cut [%(default)s]")
    p.add_argument("--limit-test", type=int, help="test images per domain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "keepclip-bench" / "class-balance")
    return p.parse_args(argv)


def skew(labels: np.ndarray, ratio: int, rng: np.random.Generator, at_least: int = 3) -> np.ndarray:
    """Row indices: every row of an even class, one in `ratio` (at least `at_least`) of each odd class's."""
    keep = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        keep.append(rows if c % 2 == 0 else rng.choice(rows, min(len(rows), max(at_least, len(rows) // ratio)), replace=False))
    return np.sort(np.concatenate(keep))


def split_rows(split, rows: np.ndarray):
    from training.head_learner import Features

    return Features(split.features[rows], split.labels[rows])


def scores(fit, test, text, scale: float, skewed: np.ndarray, num_classes: int) -> dict[str, float]:
    from training.head_learner import Scorer, recall_per_class

    logits = fit.head.logits(test.features, scale * test.features @ text.T, torch.ones(len(test)))
    predicted, truth = logits.argmax(-1).numpy(), test.labels.numpy()
    rare = [r for c, r in enumerate(recall_per_class(predicted, truth, num_classes)) if c % 2 and r is not None]
    return {"even_mean_recall": Scorer(num_classes, True)(predicted, truth),
            "rare_classes_recall": float(np.mean(rare)),
            "skewed_accuracy": Scorer(num_classes, False)(predicted[skewed], truth[skewed]),
            "lambda": fit.lam, "fusion": fit.head.fusion}


def domain_row(name: str, task, backbone, ratio: int, seed: int) -> dict:
    from backbone import PixelPipeline, PromptedCLIP, text_classifier
    from training.head_learner import HeadLearner, Scorer, fit_head
    from training.learner import RunContext
    from training.settings import HeadSettings

    rng = np.random.default_rng(seed)
    learner, model = HeadLearner(), PromptedCLIP(backbone)
    pipeline = PixelPipeline(backbone.preprocess)
    train, val, test = (learner.features(model, pipeline, split, RunContext(progress=False)) for split in (task.train, task.val, task.test))
    train, val = (split_rows(f, skew(f.labels.numpy(), ratio, rng)) for f in (train, val))
    skewed = skew(test.labels.numpy(), ratio, rng)
    text = text_classifier(model, task.class_names, task.templates).float().cpu()
    scale, c = float(model.logit_scale()), len(task.class_names)
    zero_shot = (scale * test.features @ text.T).argmax(-1).numpy()
    row = {"domain": name, "classes": c, "n_train": len(train), "n_val": len(val), "n_test": len(test), "n_test_skewed": len(skewed),
           "zero_shot": {"even_mean_recall": Scorer(c, True)(zero_shot, test.labels.numpy()),
                         "skewed_accuracy": Scorer(c, False)(zero_shot[skewed], test.labels.numpy()[skewed])}}
    for label, balanced in (("proportional", False), ("balanced", True)):
        fit = fit_head(train, val, text, scale, HeadSettings(balance_classes=balanced), c)
        row[label] = scores(fit, test, text, scale, skewed, c)
    return row


def to_markdown(report: dict) -> str:
    lines = [f"### The head on skewed classes (odd classes cut to 1/{report['ratio']}), `{report['command']}`", "",
             "| domain | classes | train / val images | zero-shot: even recall / skewed acc | head: even recall / rare recall / skewed acc | "
             "`--balance-classes`: even recall / rare recall / skewed acc |", "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        z, p, b = r["zero_shot"], r["proportional"], r["balanced"]
        lines.append(f"| {r['domain']} | {r['classes']} | {r['n_train']} / {r['n_val']} | {100 * z['even_mean_recall']:.1f} / "
                     f"{100 * z['skewed_accuracy']:.1f} | {100 * p['even_mean_recall']:.1f} / {100 * p['rare_classes_recall']:.1f} / "
                     f"{100 * p['skewed_accuracy']:.1f} | {100 * b['even_mean_recall']:.1f} / {100 * b['rare_classes_recall']:.1f} / "
                     f"{100 * b['skewed_accuracy']:.1f} |")
    mean = lambda kind, key: 100 * float(np.mean([r[kind][key] for r in report["rows"]]))
    lines += ["", f"Mean over the domains: even recall {mean('proportional', 'even_mean_recall'):.1f} → "
              f"{mean('balanced', 'even_mean_recall'):.1f}, rare classes {mean('proportional', 'rare_classes_recall'):.1f} → "
              f"{mean('balanced', 'rare_classes_recall'):.1f}, skewed accuracy {mean('proportional', 'skewed_accuracy'):.1f} → "
              f"{mean('balanced', 'skewed_accuracy'):.1f}. {report['minutes']:.1f} minutes."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from backbone import PixelPipeline

    started = time.perf_counter()
    backbone = BackboneSpec(args.model, args.pretrained, args.device).load()
    pipeline = PixelPipeline(backbone.preprocess)
    report = {"benchmark": "class_balance", "ratio": args.ratio, "rows": [],
              "command": " ".join(["python -m bench.class_balance", *(argv if argv is not None else sys.argv[1:])])}
    for name in args.domains:
        task = load_task(args.data_root / name, pipeline, args.limit_train, args.limit_test, 0.1, args.seed)
        report["rows"].append(domain_row(name, task, backbone, args.ratio, args.seed))
        print(json.dumps(report["rows"][-1]), file=sys.stderr, flush=True)
    report["minutes"] = round((time.perf_counter() - started) / 60, 2)
    out = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    (out / "class-balance.json").write_text(json.dumps(report, indent=2))
    markdown = to_markdown(report)
    (out / "class-balance.md").write_text(markdown)
    print(markdown)
    print(f"results: {out / 'class-balance.json'}, {out / 'class-balance.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
