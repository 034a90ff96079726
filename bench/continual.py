"""Continual-learning benchmark (MTIL protocol, DESIGN §6): learn tasks in order; after each, evaluate every task.

    keepclip bench continual --quick          # a smoke run: 200 train / 200 test images per domain, few epochs
    keepclip bench continual                  # the full run: all images, keepclip's default recipe
    python -m bench.continual --help          # the same

Learners (`--learners`): keepclip-head (add-task's default kind: the closed-form head + routing), keepclip (residual
prompts + routing), keepclip-prompts+head and keepclip-auto (the other add-task kinds), zero-shot (frozen), full-ft (sequential fine-tuning
of the image tower), lwf (full-ft + distillation over a replayed vocabulary of random texts), image-text-prompts
(deep visual + text context prompts per task, a task-identity head on class statistics picks the task),
continual-pretraining (both towers, contrastive, compatible momentum + topology KL); see
bench/continual_learners.py. The keepclip learners are evaluated with the task id given, with per-sample routing, with a batch
vote and task-agnostic; image-text-prompts with the task id given, per sample (its head) and task-agnostic; the
single-model learners with their task's classes given and task-agnostic.

Data: a folder per task under `--data-root` (default ../shared/data) holding `train` and `test` data in any layout
`add-task` reads (`train.npz`, a `train/` folder per class, `train.jsonl` or `train.csv`; the same for `test`),
`classnames.json` when the layout has no names, and optional `templates.json`. Backbone: `--model/--pretrained`
(default the proxy CLIP in ../shared/models/proxy-clip); on a connected machine, e.g. `--model ViT-B-16
--pretrained openai` with MTIL folders.

Writes OUT/continual.json (accuracy matrices, Transfer/Avg/Last, training seconds and trainable parameters per
task), OUT/continual.md and OUT/continual-heatmap.png, and the stores the prompt learners published their tasks to
(OUT/store-keepclip, OUT/store-image-text-prompts) and continual pretraining its model after each task
(OUT/store-continual-pretraining).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .continual_report import continual_metrics, heatmap, retrieval_scores, to_markdown
from .learn_domains import DOMAINS, TEMPLATES, subsample_index
from .router_vocabulary import AUTO, HELP as VOCABULARY_HELP, open_vocabulary, vocabulary_names

log = logging.getLogger("bench.continual")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = Path(os.environ.get("KEEPCLIP_SHARED", REPO.parent / "shared"))
LEARNERS = ("keepclip-head", "keepclip", "zero-shot", "full-ft", "lwf", "image-text-prompts", "continual-pretraining",
            "keepclip-prompts+head", "keepclip-auto")
DEFAULT_LEARNERS = LEARNERS[:5]  # the full run of these takes 75 min here; add the others with --learners
QUICK = {"train": 200, "test": 200, "epochs": 2, "ft_epochs": 1}
FULL_TRAIN = 2000  # images per task in the full run: all of four domains, seeded subsets of gtsrb and caltech101 (< 2 h)
LAYOUTS = ("{}.npz", "{}", "{}.jsonl", "{}.csv")


class BenchInputError(ValueError):
    """Bad arguments or data: printed as one line, exit code 2."""


def build_parser(prog: str = "python -m bench.continual") -> argparse.ArgumentParser:
    from training.settings import ResidualPromptSettings

    from .continual_learners import FineTuneRecipe

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Figures of the last full run: docs/BENCHMARKS.md")
    p.add_argument("--tasks", nargs="+", default=list(DOMAINS), metavar="NAME", help=f"task folders under --data-root, in learning order [{' '.join(DOMAINS)}]")
    p.add_argument("--data-root", type=Path, default=DEFAULT_SHARED / "data", help="one folder per task [%(default)s]")
    proxy = DEFAULT_SHARED / "models" / "proxy-clip"
    p.add_argument("--model", default=str(proxy / "proxy-clip.json"), help="open_clip name or model-config JSON [the proxy CLIP]")
    p.add_argument("--pretrained", default=str(proxy / "proxy-clip.safetensors"), help="pretrained tag or checkpoint path ('none': random) [the proxy's weights]")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="[%(default)s]")
    p.add_argument("--learners", nargs="+", choices=LEARNERS, default=list(DEFAULT_LEARNERS), help=f"[{' '.join(DEFAULT_LEARNERS)}]")
    p.add_argument("--quick", action="store_true", help=f"{QUICK['train']} train / {QUICK['test']} test images per task, prompt learners "
                   f"{QUICK['epochs']} epochs, fine-tuning {QUICK['ft_epochs']} epoch (under 10 minutes on 2 CPU cores)")
    p.add_argument("--limit-train", type=int, default=FULL_TRAIN, help="train images per task (seeded, every class kept; 0: all) [%(default)s]")
    p.add_argument("--limit-test", type=int, help="test images per task (seeded)")
    p.add_argument("--epochs", type=int, help=f"keepclip and image-text-prompts epochs [{ResidualPromptSettings.epochs}, their default recipes]")
    ft = FineTuneRecipe()
    p.add_argument("--ft-epochs", type=int, default=ft.epochs, help="full-ft, lwf and continual-pretraining epochs per task [%(default)s]")
    p.add_argument("--ft-lr", type=float, default=ft.lr, help="full-ft, lwf and continual-pretraining AdamW learning rate [%(default)s]")
    p.add_argument("--vocabulary", default=AUTO, help=VOCABULARY_HELP)
    p.add_argument("--vote-batch", type=int, default=64, help="evaluation batch of the batch-vote mode [%(default)s]")
    p.add_argument("--out", type=Path, help="results, store and logs go here (emptied first) [$TMPDIR/keepclip-bench/continual[-quick]]")
    p.add_argument("--retrieval", action="store_true", help="also text→image retrieval after each task: Recall@1/5 and mAP per task "
                   "(one query per class over the task's test images), with each learner's embeddings")
    p.add_argument("--keepclip-from", metavar="STORE", help="evaluate keepclip's tasks as an earlier run published them to STORE "
                   "(its store-keepclip folder; checksums verified, and each task's recipe and data must be this run's) instead of "
                   "learning them again; its training minutes are the earlier run's")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def parse_args(argv: list[str] | None, prog: str) -> argparse.Namespace:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.quick:
        args.limit_train = QUICK["train"] if args.limit_train == FULL_TRAIN else args.limit_train
        args.limit_test = args.limit_test or QUICK["test"]
        args.epochs = args.epochs or QUICK["epochs"]
        args.ft_epochs = QUICK["ft_epochs"] if args.ft_epochs == parser.get_default("ft_epochs") else args.ft_epochs
    args.limit_train = args.limit_train or None  # 0: every image
    for name in ("limit_train", "limit_test", "epochs", "ft_epochs", "vote_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.ft_lr > 0:
        parser.error(f"--ft-lr must be > 0, got {args.ft_lr}")
    if len(set(args.tasks)) != len(args.tasks):
        parser.error(f"--tasks names a task twice: {args.tasks}")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "keepclip-bench" / ("continual-quick" if args.quick else "continual")
    return args


# ----------------------------------------------------------------------------------------- data
def find_split(folder: Path, split: str) -> Path:
    for pattern in LAYOUTS:
        path = folder / pattern.format(split)
        if path.exists():
            return path
    raise BenchInputError(f"{folder}: no {split} data (looked for {', '.join(p.format(split) for p in LAYOUTS)})")


def load_task(folder: Path, pipeline, limit_train: int | None, limit_test: int | None, val_fraction: float, seed: int):
    """One task of the sequence as `TaskData` (train/val split as add-task makes it), decoded once."""
    from backbone import DEFAULT_TEMPLATES
    from training.data import decode, read_class_names, read_templates, scan, split_train_val
    from training.learner import TaskData

    if not folder.is_dir():
        raise BenchInputError(f"--tasks: {folder} is not a folder (see --data-root)")
    names_file = folder / "classnames.json"
    names = read_class_names(names_file) if names_file.is_file() else None
    train_source = scan(find_split(folder, "train"), names, str(names_file) if names else None)
    test_source = scan(find_split(folder, "test"), reference=train_source, option="test")
    templates_file = folder / "templates.json"
    templates = read_templates(templates_file) if templates_file.is_file() else TEMPLATES.get(folder.name, list(DEFAULT_TEMPLATES))
    images, _ = decode(train_source, pipeline, progress=False)
    test, _ = decode(test_source, pipeline, option="test", progress=False)
    images = images.subset(subsample_index(images.labels, limit_train, every_class=True, seed=seed))
    test = test.subset(subsample_index(test.labels, limit_test, seed=seed))
    train_index, val_index = split_train_val(images.labels, val_fraction, seed)
    return TaskData(folder.name, train_source.class_names, list(templates), images.subset(train_index),
                    images.subset(val_index) if len(val_index) else None, test,
                    {"train": str(train_source.path), "test": str(test_source.path), "n_train": len(train_index),
                     "n_val": len(val_index), "n_test": len(test)})


def eval_tasks(spec, tasks, batch: int = 256):
    """Frozen test features and frozen class text of every task, computed once and shared by every learner."""
    from backbone import PromptedCLIP, text_classifier
    from training.image_text_prompts import prompted_images

    from .continual_learners import EvalTask

    backbone = spec.load()
    model = PromptedCLIP(backbone)  # no task: the frozen text tower
    out = []
    for task in tasks:
        frozen = prompted_images(backbone, None, task.test.pixels, batch)
        text = text_classifier(model, task.class_names, task.templates).float().cpu()
        out.append(EvalTask(task.name, task.class_names, task.templates, task.test, frozen, text))
    return out, backbone.fingerprint.to_dict()


# ----------------------------------------------------------------------------------------- the run
def make_learner(name: str, args, spec, out: Path):
    from training.settings import ResidualPromptSettings

    from training.image_text_prompts import ImageTextPromptSettings

    from .continual_learners import ContinualPretraining, FineTuneRecipe, FullFineTune, ImageTextPromptsLearner, KeepclipLearner, LwF, ZeroShot

    from prompts_store import open_store

    progress = not args.no_progress
    store = open_store(str(out / f"store-{name}"))  # the prompt learners and continual pretraining publish
    if name == "keepclip":
        settings = ResidualPromptSettings(**({"epochs": args.epochs} if args.epochs else {}))
        reuse = open_store(args.keepclip_from) if args.keepclip_from else None
        return KeepclipLearner(spec, settings, store, vote_batch=args.vote_batch, progress=progress, reuse=reuse,
                               vocabulary=args.router_vocabulary)
    if name.startswith("keepclip-"):  # keepclip-head, keepclip-prompts+head, keepclip-auto: add-task --kind
        from training.learners import RecipeSettings
        from training.settings import HeadSettings

        from .continual_learners import KindLearner

        recipes = RecipeSettings(ResidualPromptSettings(**({"epochs": args.epochs} if args.epochs else {})), HeadSettings())
        return KindLearner(spec, name.removeprefix("keepclip-"), recipes, store, vote_batch=args.vote_batch, progress=progress,
                           vocabulary=args.router_vocabulary)
    if name == "zero-shot":
        return ZeroShot()
    if name == "image-text-prompts":
        settings = ImageTextPromptSettings(**({"epochs": args.epochs} if args.epochs else {}))
        return ImageTextPromptsLearner(spec, settings, store, progress=progress, vocabulary=args.router_vocabulary)
    recipe = FineTuneRecipe(epochs=args.ft_epochs, lr=args.ft_lr)
    if name == "continual-pretraining":
        return ContinualPretraining(spec, recipe, store, progress=progress)
    return {"full-ft": FullFineTune, "lwf": LwF}[name](spec, recipe, progress=progress)


def retrieval_row(learner, tests) -> dict[str, list[float]]:
    """Text→image retrieval scores of every task with the learner's current embeddings (after `evaluate`)."""
    scores = []
    for i, t in enumerate(tests):
        images, queries = learner.embeddings(i, t)
        scores.append(retrieval_scores(images.float().numpy(), queries.float().numpy(), t.test.labels))
    return {metric: [s[metric] for s in scores] for metric in scores[0]}


def run_learner(learner, tasks, tests, retrieval: bool = False) -> dict:
    """Learn the tasks in order; after each (and once before any), evaluate every task."""
    before = learner.evaluate(0, tests)
    rows: dict[str, list[list[float]]] = {mode: [] for mode in before}
    before_retrieval = retrieval_row(learner, tests) if retrieval else {}
    retrieval_rows: dict[str, list[list[float]]] = {metric: [] for metric in before_retrieval}
    learned = []
    for j, task in enumerate(tasks):
        log.info("%s: learning task %d/%d (%s)", learner.name, j + 1, len(tasks), task.name)
        result = learner.learn(task)
        started = time.perf_counter()
        accuracy = learner.evaluate(j + 1, tests)
        for mode, row in accuracy.items():
            rows[mode].append(row)
        for metric, row in (retrieval_row(learner, tests) if retrieval else {}).items():
            retrieval_rows[metric].append(row)
        learned.append({"task": task.name, "seconds": round(result.seconds, 2), "trainable_parameters": result.trainable_parameters,
                        "eval_seconds": round(time.perf_counter() - started, 2), **result.details})
        log.info("%s after %s (%.1f min): %s", learner.name, task.name, result.seconds / 60,
                 "; ".join(f"{m} " + " ".join(f"{100 * a:.1f}" for a in r) for m, r in accuracy.items()))
    modes = {mode: {"matrix": rows[mode], "before": before[mode], "metrics": continual_metrics(rows[mode])} for mode in rows}
    result = {"name": learner.name, "tasks": learned, "modes": modes}
    if retrieval:
        result["retrieval"] = {metric: {"matrix": retrieval_rows[metric], "before": before_retrieval[metric],
                                        "metrics": continual_metrics(retrieval_rows[metric])} for metric in retrieval_rows}
    return result


def main(argv: list[str] | None = None, prog: str = "python -m bench.continual") -> int:
    args = parse_args(argv, prog)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for package in ("bench", "training", "backbone", "prompts_store"):  # libraries stay quiet (open_clip logs at INFO)
        logging.getLogger(package).setLevel(logging.INFO)
    try:
        return run(args, argv)
    except BenchInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # our own input errors (data, backbone) arrive with a message naming the file or field
        from backbone import BackboneError
        from training.errors import InputError

        if isinstance(e, (InputError, BackboneError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


def run(args, argv) -> int:
    from backbone import PixelPipeline
    from training.settings import ResidualPromptSettings

    from .continual_learners import BackboneSpec

    started = time.perf_counter()
    spec = BackboneSpec(args.model, None if args.pretrained == "none" else args.pretrained, args.device)
    out = args.out.absolute()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    backbone = spec.load()
    pipeline, settings = PixelPipeline(backbone.preprocess), ResidualPromptSettings()
    log.info("decoding %d tasks from %s", len(args.tasks), args.data_root)
    tasks = [load_task(args.data_root / name, pipeline, args.limit_train, args.limit_test, settings.val_fraction, settings.seed)
             for name in args.tasks]
    del backbone
    tests, fingerprint = eval_tasks(spec, tasks)
    vocabulary_name, names = vocabulary_names(args.vocabulary, args.data_root, args.model)
    args.router_vocabulary = open_vocabulary(spec, names)  # what the routing learners check each task against
    report = {
        "benchmark": "continual", "quick": args.quick, "command": " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "tasks": [t.name for t in tasks], "backbone": fingerprint,
        "data": {t.name: t.source for t in tasks}, "keepclip_from": args.keepclip_from,
        "settings": {"limit_train": args.limit_train, "limit_test": args.limit_test, "keepclip_epochs": args.epochs or settings.epochs,
                     "ft_epochs": args.ft_epochs, "ft_lr": args.ft_lr, "vote_batch": args.vote_batch,
                     "retrieval": args.retrieval, "vocabulary": {"name": vocabulary_name, "names": len(names)}},
        "machine": machine(), "learners": [],
    }
    for name in args.learners:
        report["learners"].append(run_learner(make_learner(name, args, spec, out), tasks, tests, args.retrieval))
        write(report, out, time.perf_counter() - started)  # partial results survive an interrupted run
    markdown = write(report, out, time.perf_counter() - started)
    heatmap(report, out / "continual-heatmap.png")
    print(markdown)
    print(f"results: {out / 'continual.json'}, {out / 'continual.md'}, {out / 'continual-heatmap.png'}; "
          f"{report['minutes']:.1f} minutes", file=sys.stderr)
    return 0


def write(report: dict, out: Path, seconds: float) -> str:
    report["minutes"] = round(seconds / 60, 2)
    markdown = to_markdown(report)
    (out / "continual.json").write_text(json.dumps(report, indent=2))
    (out / "continual.md").write_text(markdown)
    return markdown


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").is_file() else platform.processor()
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "platform": platform.platform()}


if __name__ == "__main__":
    sys.exit(main())
