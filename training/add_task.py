"""Learn a new task on the frozen CLIP and publish it to the store.

    keepclip add-task NAME --data PATH [--kind head|prompts|prompts+head|auto] [--update] [--classnames FILE] [--workers N] ...
    python -m training.add_task NAME --data PATH ...        (the same arguments; what `ray job submit` runs)

The flow reads top to bottom: settings → data (checked, decoded, split) → store and backbone checks → the learner of
`--kind` (`learners.py`: a closed-form head in seconds by default, residual prompts by SGD, both, or the best of them
on validation) → publish. `--update` adds images and classes to a live head task in closed form. With `--workers 0` (the default) everything runs in this process; with
`--workers N` it runs as a Ray Train `TorchTrainer` with N data-parallel workers on the Ray cluster found through
`--address` / `RAY_ADDRESS` (or a new local one). Bad input is reported as `error: ...` with exit code 2 before
any training starts.

Top-level imports stay light (no torch, ray or open_clip) so that `--help` answers at once.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import importlib.util
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin, get_type_hints

from .errors import InputError, TrainingDiverged, TrainingStopped
from .settings import HeadSettings, ResidualPromptSettings, SplitSettings

if TYPE_CHECKING:  # imported where used: --help must not wait for torch
    from backbone import Backbone
    from prompts_store import TaskArtifact, TaskStore

    from .data import LabeledSource
    from .learner import TaskData
    from .learners import RecipeSettings
    from .ray_train import WorkerConfig

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_CHECKPOINT_DIR = "./keepclip-checkpoints"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
log = logging.getLogger("training.add_task")  # not __name__: that is "__main__" under `python -m`


# ---------------------------------------------------------------- options
def _settings_module(package: str):
    """`backbone.settings` / `prompts_store.settings`: the one source of the backbone and store defaults (KEEPCLIP_*).

    These modules need only pydantic-settings, but importing them through their packages imports torch and
    open_clip (seconds); so, unless the package is already imported, the module file is loaded on its own.
    """
    if package not in sys.modules:
        try:
            spec = importlib.util.find_spec(package)
            path = Path(spec.origin).parent / "settings.py"
            name = f"_keepclip_light_settings_{package}"
            module = sys.modules.get(name)
            if module is None:
                module_spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[name] = module
                module_spec.loader.exec_module(module)
            return module
        except Exception:  # anything unusual: take the ordinary (slower) import
            sys.modules.pop(f"_keepclip_light_settings_{package}", None)
    return importlib.import_module(f"{package}.settings")


def _default_prog() -> str:
    launched = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m training.add_task" if launched in ("add_task.py", "-m", "__main__.py") else "keepclip add-task"


# the prompts recipe's options in --help order, each a field of ResidualPromptSettings, with its metavar
_PROMPT_OPTIONS = {
    "epochs": "N", "lr": "X", "lr_reference_logit_scale": "S", "key_init": "X", "batch_size": "N", "depth": "N",
    "prompt_placement": None, "n_prefix": "N", "momentum": "X", "weight_decay": "X", "warmup_steps": "N", "final_lr_ratio": "X",
    "text_templates": None, "augment": None, "crop_scale": "X", "seed": "N", "eval_batch_size": "N", "frozen_runtime": None,
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of `keepclip add-task` and `python -m training.add_task` (DESIGN §7)."""
    backbone_settings = _settings_module("backbone")
    backbone_defaults = backbone_settings.BackboneSettings()
    store_defaults = _settings_module("prompts_store").StoreSettings()
    parser = argparse.ArgumentParser(
        prog=prog or _default_prog(),
        description=(
            "Learn a new image-classification task on the frozen CLIP and publish it to the store: a closed-form head on "
            "the frozen features (--kind head, the default: seconds), residual attention prompts (--kind prompts: the "
            "deep tier, minutes), both, or the best of them on validation (--kind auto); every task also gets a "
            "fingerprint of its images for routing. Earlier tasks and the backbone are never touched. Runs here, "
            "or with --workers N as a Ray Train job (`ray job submit -- python -m training.add_task ...` takes the same "
            "arguments as `keepclip add-task`)."
        ),
        epilog=(
            "data layouts: a folder per class (PATH/<class>/<images>); a .jsonl or .csv manifest of path,label "
            "(paths relative to the manifest); an .npz with `images` uint8 [N,H,W,3] and `labels` int [N] "
            "(class names from --classnames, --class-names, or classnames.json beside it) or str [N] (the class names). "
            "Bad input: `error: ...` on stderr and exit code 2, before any training. See docs/training.md."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="task name: 1-64 characters of [a-z0-9._-], starting with a letter or digit")

    kind = parser.add_argument_group("what to learn")
    kind.add_argument("--kind", choices=("head", "prompts", "prompts+head", "auto"), default="head",
                      help="head: ridge regression on random features of the frozen image feature, fused with zero-shot (one frozen "
                           "pass, seconds); prompts: residual attention prompts by SGD (the deep tier, a second pass when served); "
                           "prompts+head: the head on prompted features; auto: all three, keeps the best on validation [head]")
    kind.add_argument("--update", action="store_true", help="add --data (more images, new classes) to the live head task NAME in "
                      "closed form, from the features its artifact keeps (no old images needed; images it already learned with the same "
                      "class are counted once); publishes a new version")
    _recipe_option(kind, HeadSettings, "width", "N", flag="--head-width")
    balance = next(f for f in fields(HeadSettings) if f.name == "balance_classes")
    kind.add_argument("--balance-classes", action=argparse.BooleanOptionalAction, default=None,
                      help=f"{balance.metadata['help']} [off; an --update keeps the live version's choice]")

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="PATH", help="training data: a folder per class, a .jsonl/.csv manifest, or an .npz")
    names = data.add_mutually_exclusive_group()
    names.add_argument("--classnames", metavar="FILE", help="class names: a JSON list (label order), a JSON object {folder: name}, or one name per line")
    names.add_argument("--class-names", metavar="A,B,...", help="class names inline, comma-separated, in label order")
    default_templates = ", ".join(repr(t) for t in backbone_settings.DEFAULT_TEMPLATES)
    data.add_argument("--templates", metavar="FILE", help=f"prompt templates with {{}} for the class name: a JSON list or one per line [default: {default_templates}]")
    data.add_argument("--test", metavar="PATH", help="optional held-out test data in any layout, same classes; its accuracy goes into the metrics")
    _recipe_option(data, SplitSettings, "val_fraction", "F")
    data.add_argument("--skip-unreadable", action="store_true", help="leave out images that cannot be read (default: fail and list them)")
    data.add_argument("--max-image-pixels", type=_positive_int, default=backbone_settings.MAX_IMAGE_PIXELS, metavar="N",
                      help="largest image file (width x height) decoded; a larger one is refused from its header, as an "
                      f"unreadable image is (it guards against decompression bombs) [{backbone_settings.MAX_IMAGE_PIXELS}]")

    train = parser.add_argument_group("prompts recipe (--kind prompts, prompts+head, auto; defaults: the reference recipe)")
    for name, metavar in _PROMPT_OPTIONS.items():
        _recipe_option(train, ResidualPromptSettings, name, metavar)

    where = parser.add_argument_group("backbone and store (defaults from KEEPCLIP_* environment variables)")
    where.add_argument("--model", default=backbone_defaults.model, help=f"open_clip model name, or path to a model-config JSON [KEEPCLIP_MODEL: {backbone_defaults.model}]")
    where.add_argument("--pretrained", default=backbone_defaults.pretrained, help=f"open_clip pretrained tag, checkpoint path, or 'none' [KEEPCLIP_PRETRAINED: {backbone_defaults.pretrained}]")
    where.add_argument("--device", choices=("auto", "cpu", "cuda"), default=backbone_defaults.device, help=f"[KEEPCLIP_DEVICE: {backbone_defaults.device}]")
    where.add_argument("--store", default=store_defaults.store, help=f"store URL: a directory or an fsspec URL [KEEPCLIP_STORE: {store_defaults.store}]")

    run = parser.add_argument_group("running")
    run.add_argument("--workers", type=int, default=0, metavar="N", help="0: train in this process; N >= 1: a Ray Train TorchTrainer with N data-parallel workers [0]")
    run.add_argument("--address", metavar="ADDR", help="Ray cluster to use with --workers (default: RAY_ADDRESS, as set by `ray job submit`, else a new local one)")
    run.add_argument("--checkpoint-dir", default=DEFAULT_CHECKPOINT_DIR, metavar="DIR", help=f"per-epoch checkpoints go to DIR/RUN/epoch-NNNN (shared storage for multi-node Ray) [{DEFAULT_CHECKPOINT_DIR}]")
    resume = run.add_mutually_exclusive_group()
    resume.add_argument("--run-name", metavar="RUN", help="name of this run's checkpoint folder [NAME-date-time]")
    resume.add_argument("--resume", metavar="RUN", help="continue the killed or stopped run RUN from its last checkpoint (same arguments otherwise)")
    run.add_argument("--stop-after-epoch", type=int, metavar="K", help="stop after epoch K's checkpoint without publishing (resume later with --resume)")
    run.add_argument("--max-failures", type=int, default=0, metavar="N", help="Ray Train: restart failed workers from the last checkpoint up to N times [0]")
    run.add_argument("--force", action="store_true", help="publish even if the new version's validation accuracy is below the "
                     "live version's or below frozen zero-shot (otherwise refused, the live version untouched)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines still print)")
    run.add_argument("-q", "--quiet", action="store_true", help="only errors and the final result")
    run.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _recipe_option(group, settings: type, name: str, metavar: str | None, flag: str | None = None) -> None:
    """The option of the recipe field `name`: its default, help text and type (or choices) come from the field."""
    spec = next(f for f in fields(settings) if f.name == name)
    hint = get_type_hints(settings)[name]
    if get_origin(hint) is Literal:
        typed = {"choices": get_args(hint)}
    else:  # int, float, or int | None, float | None (written 'none')
        optional = {float | None: _optional(float), int | None: _optional(int)}
        typed = {"type": optional.get(hint, hint), "metavar": metavar}
    shown = "none" if spec.default is None else spec.default
    group.add_argument(flag or f"--{name.replace('_', '-')}", default=spec.default, help=f"{spec.metadata['help']} [{shown}]", **typed)


def _optional(kind: type):
    def parse(text: str):
        return None if text.strip().lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message: "invalid int value"
    return parse


def _refuse_unknown_options(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """A mistyped option, named with its likely meaning: argparse would first complain that --data is missing when
    `--dta` was meant, and never name `--dta` at all."""
    known = [option for action in parser._actions for option in action.option_strings if option.startswith("--")]
    for arg in argv:
        if arg == "--":
            return
        name = arg.split("=", 1)[0]
        if name.startswith("--") and not any(option.startswith(name) for option in known):  # prefixes: argparse's
            close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
            parser.error(f"unrecognized option {name}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return value


def recipe_settings(args: argparse.Namespace) -> RecipeSettings:
    """Both recipes from the options (the head's only when --kind uses it: it needs a validation split)."""
    from .learners import RecipeSettings

    def options(settings: type) -> dict[str, Any]:
        return {f.name: getattr(args, f.name) for f in fields(settings)}

    head = HeadSettings() if args.kind == "prompts" else HeadSettings(
        width=args.head_width, balance_classes=bool(args.balance_classes), **options(SplitSettings))
    return RecipeSettings(ResidualPromptSettings(**options(ResidualPromptSettings)), head)


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse, learn, publish. -> exit code (0 ok, 2 bad input, 1 training failed, 130 interrupted)."""
    try:
        parser = build_parser(prog)
        _refuse_unknown_options(parser, sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, or an argparse usage error (already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_BAD_INPUT
    from .runtime import configure_logging

    configure_logging(args.verbose, args.quiet)
    from backbone import BackboneError
    from prompts_store import StoreError, StoreWriteFailed

    plan = None
    try:
        plan = check_arguments(args)
        return add_task(args, plan)
    except StoreWriteFailed as e:  # not the input's fault: a full disk, a read-only store
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (InputError, StoreError, BackboneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"error: training failed: {e}; nothing was published", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        run_name = plan.run_name if plan is not None else "RUN"
        print(f"error: interrupted; nothing was published (resume from the last epoch with --resume {run_name})", file=sys.stderr)
        return EXIT_INTERRUPTED


@dataclass(frozen=True)
class Plan:
    """The arguments, checked before any data is read."""

    name: str  # the task's name, as the store accepts it
    recipes: RecipeSettings
    class_names: list[str] | dict[str, str] | None  # from --classnames / --class-names; None: from the data
    names_from: str | None  # where they came from, for error messages
    templates: list[str]
    run_name: str
    run_dir: str | Path  # DIR/RUN of --checkpoint-dir; a URL for Ray Train on object storage


@dataclass(frozen=True)
class Target:
    """Where the task goes and what it is learnt on."""

    store: TaskStore
    store_url: str  # absolute, so that Ray workers find the same store
    backbone: Backbone  # frozen
    model: str  # --model and --pretrained, absolute where they are files (for Ray workers)
    pretrained: str | None
    previous: TaskArtifact | None  # --update: the live version, with its update state


def check_arguments(args: argparse.Namespace) -> Plan:
    """Everything that can be checked without reading data."""
    from backbone import DEFAULT_TEMPLATES
    from prompts_store import validate_task_name

    from .data import parse_class_names, read_class_names, read_templates

    recipes = recipe_settings(args)
    name = validate_task_name(args.name)
    _check_run_options(args, recipes.prompts.epochs)
    class_names, names_from = None, None
    if args.classnames:
        class_names, names_from = read_class_names(args.classnames), f"--classnames {args.classnames}"
    elif args.class_names:
        class_names, names_from = parse_class_names(args.class_names), "--class-names"
    templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    run_name, run_dir = _run_location(args, name)
    return Plan(name, recipes, class_names, names_from, templates, run_name, run_dir)


def _check_run_options(args: argparse.Namespace, epochs: int) -> None:
    trains_prompts = args.kind != "head"
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    if args.stop_after_epoch is not None and not (trains_prompts and 1 <= args.stop_after_epoch <= epochs):
        raise InputError(f"--stop-after-epoch must be in 1..--epochs ({epochs}) with a kind that trains prompts, got {args.stop_after_epoch} with --kind {args.kind}")
    if args.resume and not trains_prompts:
        raise InputError("--resume: a head is solved in one step, there is no run to resume; run add-task again")
    if args.update and args.kind != "head":
        raise InputError(f"--update adds to a head task in closed form; it does not apply to --kind {args.kind}")
    if args.balance_classes and args.kind in ("prompts", "auto"):
        raise InputError(f"--balance-classes weighs the classes in the head's solve (--kind head or prompts+head); --kind "
                         f"{args.kind} {'has no head' if args.kind == 'prompts' else 'compares its candidates by plain accuracy'}")


def add_task(args: argparse.Namespace, plan: Plan) -> int:
    """Data → store and backbone → the learner of --kind → publish (here or on Ray Train)."""
    from .data import scan
    from .learners import make_learner

    started = time.perf_counter()
    train_source = scan(args.data, plan.class_names, plan.names_from, max_pixels=args.max_image_pixels)  # nothing decoded yet
    test_source = scan(args.test, reference=train_source, option="--test", max_pixels=args.max_image_pixels) if args.test else None
    target = open_target(args, plan.name)
    plan = replace(plan, recipes=plan.recipes.for_backbone(target.backbone))  # --depth's default is per backbone
    if target.previous is not None and args.balance_classes is None:  # an update weighs classes as the live version did
        kept = bool(target.previous.recipe.get("head_settings", {}).get("balance_classes", False))
        plan = replace(plan, recipes=replace(plan.recipes, head=replace(plan.recipes.head, balance_classes=kept)))
    task = load_task(args, plan, target, train_source, test_source)
    learner = make_learner(args.kind, plan.recipes)
    runner = "ray-train" if args.workers else "local"
    if args.resume and "://" not in str(plan.run_dir):  # fail fast, before Ray or the fingerprint pass start
        _check_local_resume(learner, task, target.backbone, runner, plan)
    _log_start(args, plan, target, task, train_source)
    try:
        if args.workers:
            version, summary = _fit_on_ray(task, _worker_config(args, plan, target, task), _ray_run(args, plan))
        else:
            version, summary = _fit_here(args, plan, target, task, learner, runner)
    except TrainingStopped as stopped:
        print(f"{stopped}; nothing was published. Continue with the same arguments and --resume {plan.run_name} "
              f"(checkpoints in {plan.run_dir})", file=sys.stderr)
        return EXIT_OK
    _print_summary(plan.name, version, target.store.url, task, summary, time.perf_counter() - started)
    return EXIT_OK


def open_target(args: argparse.Namespace, name: str) -> Target:
    """The store and the frozen backbone: the new task must fit the store's backbone (and --update its live version)."""
    from prompts_store import open_store

    from .runtime import load_frozen_backbone

    store_url = _absolute_url(args.store)
    store = open_store(store_url)
    store.check_writable()  # a read-only store fails now, not after the learning
    live = store.list()
    model, pretrained = _absolute_if_file(args.model), _absolute_if_file(args.pretrained)
    backbone = load_frozen_backbone(model, pretrained, "cpu" if args.workers else args.device)
    fingerprint = backbone.fingerprint.to_dict()
    previous = _live_head(store, name, fingerprint, backbone) if args.update else None
    for info in live:
        if info.backbone is not None and info.backbone != fingerprint:
            raise InputError(
                f"--store {store.url}: task {info.name!r} (version {info.version}) was made for backbone {info.backbone}, "
                f"but --model {args.model} --pretrained {args.pretrained} is {fingerprint}; a store serves one backbone: "
                "use the store's backbone, or another --store"
            )
    return Target(store, store_url, backbone, model, pretrained, previous)


def load_task(
    args: argparse.Namespace, plan: Plan, target: Target, train_source: LabeledSource, test_source: LabeledSource | None
) -> TaskData:
    """Every image decoded once (the backbone's own transform), then split: the task's `TaskData`."""
    from backbone import PixelPipeline
    from backbone.task_stats import MIN_IMAGES

    from .data import check_no_empty_class, decode, split_train_val
    from .learner import TaskData

    pipeline, progress = PixelPipeline(target.backbone.preprocess), _shows_progress(args)
    images, skipped = decode(train_source, pipeline, args.skip_unreadable, "--data", progress, args.max_image_pixels)
    if skipped:
        check_no_empty_class(train_source, "--data", labels=images.labels, after=" left after skipping unreadable files")
    test_images, test_skipped = (decode(test_source, pipeline, args.skip_unreadable, "--test", progress, args.max_image_pixels) if test_source else (None, []))
    if args.kind != "prompts":
        _check_val_split(images.labels, train_source)
    class_names, templates = train_source.class_names, plan.templates
    if target.previous is not None:  # known classes keep their labels, new ones are appended
        class_names, templates = _onto_previous(target.previous, train_source, args.templates, plan.templates, images, test_images)
    split = plan.recipes.prompts
    train_index, val_index = split_train_val(images.labels, split.val_fraction, split.seed)
    if len(images) < MIN_IMAGES:
        raise InputError(f"--data {train_source.path}: {len(images)} readable images; a task needs at least {MIN_IMAGES}")
    source = {
        "train": {**train_source.describe(), "n_decoded": len(images), "skipped_unreadable": skipped[:100], "n_skipped": len(skipped)},
        "test": None if test_source is None else {**test_source.describe(), "n_decoded": len(test_images), "n_skipped": len(test_skipped)},
    }
    train, val = images.split(train_index, val_index)
    return TaskData(name=plan.name, class_names=class_names, templates=templates, train=train,
                    val=val if len(val) else None, test=test_images, source=source)


def _check_local_resume(learner, task: TaskData, backbone: Backbone, runner: str, plan: Plan) -> None:
    """The checkpoint of --resume must describe this task and recipe (checked again when the learner loads it)."""
    from .checkpoint import check_resumable, latest_local, load_state

    found = latest_local(plan.run_dir)
    state = load_state(found)
    check_resumable(state.info, learner.recipe(task), learner.identity(task, backbone, runner), f"{found}")
    log.info("resuming run %s after epoch %d of %d", plan.run_name, state.epoch, plan.recipes.prompts.epochs)


def _log_start(args: argparse.Namespace, plan: Plan, target: Target, task: TaskData, train_source: LabeledSource) -> None:
    update = f", update of version {target.previous.version}" if target.previous is not None else ""
    log.info(
        "task %s (kind %s%s): %s (names from %s), %d train / %d val images%s%s",
        plan.name, args.kind, update, _count(len(task.class_names), "class", "classes"), train_source.class_names_from, len(task.train),
        len(task.val) if task.val is not None else 0,
        f", {len(task.test)} test images" if task.test is not None else "",
        f"; run {plan.run_name}, checkpoints in {plan.run_dir}" if args.kind != "head" else "",
    )
    if args.kind != "prompts" and args.balance_classes is None and target.previous is None:
        _note_uneven_classes(task)
    if len(task.class_names) == 1:
        log.warning("task %s has one class (%r): every image routed to it gets that answer, so only its fingerprint "
                    "decides, and its accuracy figures are 100%% by construction", plan.name, task.class_names[0])


UNEVEN = 4  # a largest class this many times the smallest gets a hint about --balance-classes


def _note_uneven_classes(task: TaskData) -> None:
    """Say so when the head will follow very uneven class proportions, and how to weigh the classes equally."""
    import numpy as np

    labels = np.concatenate([task.train.labels] + ([task.val.labels] if task.val is not None else []))
    counts = np.bincount(labels, minlength=len(task.class_names))
    big, small = int(counts.argmax()), int(counts.argmin())
    if counts[big] >= UNEVEN * counts[small]:
        log.info("classes are uneven (%r: %d images, %r: %d): the head follows these proportions, which favours the large "
                 "classes; --balance-classes weighs every class equally", task.class_names[big], counts[big],
                 task.class_names[small], counts[small])


def _shows_progress(args: argparse.Namespace) -> bool:
    return not (args.no_progress or args.quiet)


# ---------------------------------------------------------------- learning and publishing
def _fit_here(args: argparse.Namespace, plan: Plan, target: Target, task: TaskData, learner, runner: str) -> tuple[int, dict[str, Any]]:
    """Learn in this process, check and publish. -> (version, metrics without the history)."""
    from prompts_store import StoreWriteFailed

    from .checkpoint import LocalCheckpoints
    from .learner import RunContext
    from .publish_check import check_publishable, live_metrics

    run = RunContext(
        checkpoints=LocalCheckpoints(plan.run_dir), resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch,
        progress=_shows_progress(args), runner=runner, extra_metrics={"workers": 0, "device": str(target.backbone.device)},
    )
    if target.previous is not None:
        artifact = learner.fit(task, target.backbone, run, previous=target.previous)
    else:
        artifact = learner.fit(task, target.backbone, run)
    check_publishable(artifact.metrics, live_metrics(target.store, plan.name), args.force)
    try:
        version = target.store.publish(artifact)
    except StoreWriteFailed as e:  # a disk that filled up while the task was learned
        raise StoreWriteFailed(f"{e}: the task was learned but not published") from e
    return version, {k: v for k, v in artifact.metrics.items() if k != "history"}


@dataclass(frozen=True)
class RayRun:
    """Where and how a Ray Train run goes (--workers N)."""

    workers: int
    address: str | None  # --address; None: RAY_ADDRESS, else a new local Ray
    device: str  # --device: cuda, or auto on a cluster with GPUs, trains on GPUs
    max_failures: int
    run_name: str
    run_dir: str | Path

    @property
    def storage_path(self) -> str:
        """RunConfig's storage_path: the folder (or URL) that holds the run's folder."""
        run_dir = str(self.run_dir)
        return str(Path(run_dir).parent) if "://" not in run_dir else run_dir.rsplit("/", 1)[0]


def _ray_run(args: argparse.Namespace, plan: Plan) -> RayRun:
    return RayRun(args.workers, args.address, args.device, args.max_failures, plan.run_name, plan.run_dir)


def _worker_config(args: argparse.Namespace, plan: Plan, target: Target, task: TaskData) -> WorkerConfig:
    from .ray_train import WorkerConfig

    return WorkerConfig(
        task=task.name, class_names=task.class_names, templates=task.templates, source=task.source, kind=args.kind,
        settings=plan.recipes.to_dict(), model=target.model, pretrained=target.pretrained,
        backbone=target.backbone.fingerprint.to_dict(), store=target.store_url, resume=bool(args.resume),
        stop_after_epoch=args.stop_after_epoch, update_from=target.previous.version if target.previous is not None else None,
        force=args.force, progress=_shows_progress(args), verbose=args.verbose, quiet=args.quiet,
    )


def _connect_ray(ray, address: str | None) -> None:
    """Join `address` (else RAY_ADDRESS, which `ray job submit` sets to the cluster's GCS address) or start a local Ray.

    Ray Train's own detached actors (its placement-group cleaner) find the cluster by scanning the node's processes
    when RAY_ADDRESS is unset, and warn "Found multiple active Ray instances" on every poll where a second Ray runs on
    the node (`keepclip serve`'s). Handing them the concrete address through the job's environment keeps them quiet.
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    concrete = address is not None and address != "auto" and "://" not in address
    runtime_env = {"env_vars": {"RAY_ADDRESS": address}} if concrete else None
    ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)


def _fit_on_ray(task: TaskData, job: WorkerConfig, where: RayRun) -> tuple[int, dict[str, Any]]:
    """Learn on Ray Train workers; rank 0 checks and publishes. -> (version, metrics without the history)."""
    import ray

    from prompts_store import StoreWriteFailed

    from .ray_train import fit_on_ray, unwrap_worker_error

    if not ray.is_initialized():
        _connect_ray(ray, where.address)
    use_gpu = where.device == "cuda" or (where.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
    images = {f"{split}_{part}": None if subset is None else getattr(subset, part)
              for split, subset in (("train", task.train), ("val", task.val), ("test", task.test)) for part in ("pixels", "labels")}
    try:
        result = fit_on_ray(job, images, workers=where.workers, use_gpu=use_gpu, run_name=where.run_name,
                            storage_path=where.storage_path, max_failures=where.max_failures)
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        cause = unwrap_worker_error(e)
        if isinstance(cause, (InputError, TrainingDiverged, StoreWriteFailed)):  # rank 0's publish: a full disk too
            raise cause from None
        raise
    if result.get("stopped_after_epoch"):
        raise TrainingStopped(int(result["stopped_after_epoch"]))
    if result.get("published_version") is None:
        raise RuntimeError(f"the Ray Train run ended without publishing (last report: {result})")
    return result["published_version"], result.get("summary", {})


# ---------------------------------------------------------------- checks and helpers
def _live_head(store, name: str, fingerprint: dict, backbone):
    """The live version of the head task `--update` adds to, with its update state; refused by name otherwise."""
    from prompts_store import TaskNotFound

    from .head_learner import check_updatable

    try:
        previous = store.get(name, backbone=fingerprint, with_update_state=True)
    except TaskNotFound:
        raise InputError(f"--update: no live task {name!r} in store {store.url} (add it first without --update)") from None
    check_updatable(previous, int(backbone.model.visual.output_dim), "--update")
    return previous


def _onto_previous(previous, source, templates_file: str | None, templates, images, test_images) -> tuple[list[str], list[str]]:
    """-> the class names and templates of the live version; the labels of `images` and `test_images` are mapped
    onto its classes in place (known classes keep their labels, new ones are appended)."""
    import numpy as np

    from .head_learner import merge_class_names

    if templates_file and list(templates) != list(previous.templates):
        raise InputError(f"--templates {templates_file}: task {previous.name!r} was learnt with templates {previous.templates}; "
                         "an update keeps them (leave out --templates)")
    names, mapping = merge_class_names(list(previous.class_names), list(source.class_names), f"--data {source.path}")
    mapping = np.asarray(mapping, dtype=np.int64)
    images.labels = mapping[images.labels]
    if test_images is not None:
        test_images.labels = mapping[test_images.labels]
    return names, list(previous.templates)


def _check_val_split(labels, source) -> None:
    """A head reports held-out accuracy on a stratified split: every class needs one image for it and one to fit."""
    import numpy as np

    counts = np.bincount(labels, minlength=len(source.class_names))
    few = [source.class_names[c] for c in np.flatnonzero(counts < 2)]
    if few:
        raise InputError(f"--data {source.path}: class {few[0]!r} has {int(counts[source.class_names.index(few[0])])} image(s)"
                         f"{f' (and {len(few) - 1} more classes)' if len(few) > 1 else ''}; a head needs at least 2 per class "
                         "(one for the validation split)")


def _run_location(args, task: str) -> tuple[str, str | Path]:
    """-> (run name, its checkpoint folder). A new run must not reuse a folder with checkpoints; --resume needs one."""
    from .checkpoint import latest_local

    run_name = args.resume or args.run_name or f"{task}-{time.strftime('%Y%m%d-%H%M%S')}"
    option = "--resume" if args.resume else "--run-name"
    if not _RUN_NAME.fullmatch(run_name):
        raise InputError(f"{option} {run_name!r}: a run name is 1-128 characters of [A-Za-z0-9._-], starting with a letter or digit")
    base = args.checkpoint_dir
    if "://" in base:  # object storage (Ray Train only): existence is checked by the workers
        if not args.workers:
            raise InputError(f"--checkpoint-dir {base}: a URL needs --workers (Ray Train); use a local folder here")
        return run_name, f"{base.rstrip('/')}/{run_name}"
    run_dir = Path(base).expanduser().absolute() / run_name
    if args.resume and latest_local(run_dir) is None:
        raise InputError(f"--resume {run_name}: no checkpoint in {run_dir} (is --checkpoint-dir the one of that run?)")
    if not args.resume and args.kind != "head" and run_dir.exists() and latest_local(run_dir) is not None:  # a head keeps none
        raise InputError(f"--run-name {run_name}: {run_dir} already holds checkpoints; pass --resume {run_name} to continue that run, or choose another --run-name")
    return run_name, run_dir


def _absolute_url(url: str) -> str:
    return url if "://" in url else str(Path(url).expanduser().absolute())


def _absolute_if_file(value: str | None) -> str | None:
    """Paths become absolute so that Ray workers (other working directories) find the same files."""
    if value is None or "://" in value:
        return value
    path = Path(value).expanduser()
    return str(path.absolute()) if path.exists() or path.suffix in (".json", ".safetensors", ".pt", ".bin") else value


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _weakest_classes(class_names: list[str], recall: dict[str, dict | None], shown: int = 3) -> str:
    """"on test: 'cat' 41.0%, 'dog' 55.2%, ...": the classes with the lowest recall (on test, else validation)."""
    from .learner import _pct

    split = "test" if recall.get("test") else "val"
    values = [(r, name) for name, r in (recall.get(split) or {}).items() if r is not None]
    if len(class_names) < 3 or len(values) < 3:
        return ""
    return f"on {split}: " + ", ".join(f"{name!r} {_pct(r)}" for r, name in sorted(values)[:shown])


def _print_summary(name: str, version: int, store_url: str, task, summary: dict[str, Any], seconds: float) -> None:
    from .learner import _pct

    def pct(key):
        return _pct(summary.get(key))

    kept = f"; kept epoch {summary.get('best_epoch')} of {summary.get('epochs')}" if summary.get("epochs") else ""
    if summary.get("fusion") is not None:
        kept += f"; head λ {summary.get('lambda'):g}, fusion {summary.get('fusion'):g}"
    measure = summary.get("accuracy_measure", "accuracy")  # or the mean per-class recall (--balance-classes)
    lines = [
        f"published task {name!r} version {version} to store {store_url}",
        f"  {_count(len(task.class_names), 'class', 'classes')}; {summary.get('n_train')} train / {summary.get('n_val')} val images{kept}",
        f"  val {measure} {pct('val_accuracy')} (frozen zero-shot {pct('val_zero_shot_accuracy')})",
    ]
    if summary.get("candidates"):
        lines.append("  auto, validation accuracy: " + ", ".join(f"{k} {_pct(v['val_accuracy'])}" for k, v in summary["candidates"].items()))
    if summary.get("test_accuracy") is not None:
        lines.append(f"  test {measure} {pct('test_accuracy')} (frozen zero-shot {pct('test_zero_shot_accuracy')}) on {summary.get('n_test')} images")
    if weakest := _weakest_classes(task.class_names, summary.get("recall_per_class") or {}):
        lines.append(f"  weakest classes {weakest}")
    lines.append(f"  training {summary.get('train_seconds', 0):.1f} s, fingerprint {summary.get('fingerprint_seconds', 0):.1f} s, total {seconds:.1f} s")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
