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
import importlib
import importlib.util
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from .errors import InputError, TrainingDiverged, TrainingStopped
from .settings import HeadSettings, ResidualPromptSettings

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130
DEFAULT_CHECKPOINT_DIR = "./keepclip-checkpoints"
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# ---------------------------------------------------------------- settings
def _load_settings(package: str, cls: str):
    """`BackboneSettings()` / `StoreSettings()`, the one source of the backbone and store defaults (KEEPCLIP_*).

    Their modules need only pydantic-settings, but importing them through their packages imports torch and
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
            return getattr(module, cls)()
        except Exception:  # anything unusual: take the ordinary (slower) import
            sys.modules.pop(f"_keepclip_light_settings_{package}", None)
    return getattr(importlib.import_module(f"{package}.settings"), cls)()


def _default_prog() -> str:
    launched = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else ""
    return "python -m training.add_task" if launched in ("add_task.py", "-m", "__main__.py") else "keepclip add-task"


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The arguments of `keepclip add-task` and `python -m training.add_task` (DESIGN §7)."""
    backbone_defaults = _load_settings("backbone", "BackboneSettings")
    store_defaults = _load_settings("prompts_store", "StoreSettings")
    recipe, head = ResidualPromptSettings(), HeadSettings()
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
            "(class names from --classnames, --class-names, or classnames.json beside it). "
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
                      "closed form, from the features its artifact keeps (no old images needed); publishes a new version")
    kind.add_argument("--head-width", type=int, default=head.width, metavar="N", help=f"head: random features per image [{head.width}]")

    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="PATH", help="training data: a folder per class, a .jsonl/.csv manifest, or an .npz")
    names = data.add_mutually_exclusive_group()
    names.add_argument("--classnames", metavar="FILE", help="class names: a JSON list (label order), a JSON object {folder: name}, or one name per line")
    names.add_argument("--class-names", metavar="A,B,...", help="class names inline, comma-separated, in label order")
    data.add_argument("--templates", metavar="FILE", help="prompt templates with {} for the class name: a JSON list or one per line [default: 'a photo of a {}.']")
    data.add_argument("--test", metavar="PATH", help="optional held-out test data in any layout, same classes; its accuracy goes into the metrics")
    data.add_argument("--val-fraction", type=float, default=recipe.val_fraction, metavar="F", help=f"stratified validation hold-out that picks the best epoch; 0 keeps the last epoch [{recipe.val_fraction}]")
    data.add_argument("--skip-unreadable", action="store_true", help="leave out images that cannot be read (default: fail and list them)")

    train = parser.add_argument_group("prompts recipe (--kind prompts, prompts+head, auto; defaults: the reference recipe)")
    train.add_argument("--epochs", type=int, default=recipe.epochs, metavar="N", help=f"[{recipe.epochs}]")
    train.add_argument("--lr", type=float, default=recipe.lr, metavar="X", help=f"SGD learning rate, cosine-decayed per step [{recipe.lr}]")
    train.add_argument("--lr-reference-logit-scale", type=_optional_float, default=recipe.lr_reference_logit_scale, metavar="S",
                       help=f"lr is meant at this logit scale (CLIP's); the step applied is lr x S / the backbone's logit scale; 'none': lr as is [{recipe.lr_reference_logit_scale}]")
    train.add_argument("--key-init", type=_optional_float, default=recipe.key_init, metavar="X",
                       help="prefix keys ~ U(-X, X); default: matched to the spread of each block's own keys")
    train.add_argument("--batch-size", type=int, default=recipe.batch_size, metavar="N", help=f"global batch, split across workers [{recipe.batch_size}]")
    train.add_argument("--depth", type=int, default=recipe.depth, metavar="N", help=f"prompted blocks per tower [{recipe.depth}]")
    train.add_argument("--n-prefix", type=int, default=recipe.n_prefix, metavar="N", help=f"prefix tokens per prompted block [{recipe.n_prefix}]")
    train.add_argument("--momentum", type=float, default=recipe.momentum, metavar="X", help=f"SGD momentum [{recipe.momentum}]")
    train.add_argument("--weight-decay", type=float, default=recipe.weight_decay, metavar="X", help=f"[{recipe.weight_decay}]")
    train.add_argument("--warmup-steps", type=int, default=recipe.warmup_steps, metavar="N", help=f"linear warm-up steps before the cosine [{recipe.warmup_steps}]")
    train.add_argument("--final-lr-ratio", type=float, default=recipe.final_lr_ratio, metavar="X", help=f"the cosine ends at lr x this [{recipe.final_lr_ratio}]")
    train.add_argument("--text-templates", choices=("mean", "sample"), default=recipe.text_templates, help=f"class text features per training step: the mean over all templates (what is evaluated and served), or one random template per class (cheaper) [{recipe.text_templates}]")
    train.add_argument("--augment", choices=("none", "random-crop"), default=recipe.augment, help=f"training images only: 'random-crop' takes a random crop of each image at every step (no flips) [{recipe.augment}]")
    train.add_argument("--crop-scale", type=float, default=recipe.crop_scale, metavar="X", help=f"random-crop: the smallest crop as a fraction of the image area [{recipe.crop_scale}]")
    train.add_argument("--seed", type=int, default=recipe.seed, metavar="N", help=f"split, data order, templates, prompt init [{recipe.seed}]")
    train.add_argument("--eval-batch-size", type=int, default=recipe.eval_batch_size, metavar="N", help=f"[{recipe.eval_batch_size}]")

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


def _optional_float(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "") else float(text)


def recipe_settings(args: argparse.Namespace):
    """Both recipes from the arguments (the head's only when --kind uses it: it needs a validation split)."""
    from .learners import RecipeSettings

    head = HeadSettings() if args.kind == "prompts" else HeadSettings(
        width=args.head_width, val_fraction=args.val_fraction, seed=args.seed, eval_batch_size=args.eval_batch_size)
    return RecipeSettings(prompt_settings(args), head)


def prompt_settings(args: argparse.Namespace) -> ResidualPromptSettings:
    return ResidualPromptSettings(
        depth=args.depth, n_prefix=args.n_prefix, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_reference_logit_scale=args.lr_reference_logit_scale, key_init=args.key_init,
        momentum=args.momentum, weight_decay=args.weight_decay, final_lr_ratio=args.final_lr_ratio,
        warmup_steps=args.warmup_steps, val_fraction=args.val_fraction, seed=args.seed,
        text_templates=args.text_templates, eval_batch_size=args.eval_batch_size, augment=args.augment,
        crop_scale=args.crop_scale,
    )


# ---------------------------------------------------------------- entry point
def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """Parse, learn, publish. -> exit code (0 ok, 2 bad input, 1 training failed, 130 interrupted)."""
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as exit_:  # --help, or an argparse usage error (already printed)
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_BAD_INPUT
    from .runtime import configure_logging

    configure_logging(args.verbose, args.quiet)
    from backbone import BackboneError
    from prompts_store import StoreError

    try:
        return add_task(args)
    except (InputError, StoreError, BackboneError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"error: training failed: {e}; nothing was published", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"error: interrupted; nothing was published (resume from the last epoch with --resume {getattr(args, '_run_name', 'RUN')})", file=sys.stderr)
        return EXIT_INTERRUPTED


def add_task(args: argparse.Namespace) -> int:
    import logging

    from prompts_store import open_store, validate_task_name

    from .checkpoint import check_resumable, latest_local, load_state
    from .data import DEFAULT_TEMPLATES, PixelPipeline, check_no_empty_class, decode, parse_class_names, read_class_names, read_templates, scan, split_train_val
    from .learner import TaskData
    from .learners import make_learner
    from .publish_check import check_publishable, live_metrics

    log = logging.getLogger("training.add_task")
    started = time.perf_counter()

    # -- settings: everything that can be checked without reading data
    recipes = recipe_settings(args)
    settings = recipes.prompts
    name = validate_task_name(args.name)
    if args.workers < 0:
        raise InputError(f"--workers must be >= 0, got {args.workers}")
    epochs_apply = args.kind != "head"
    if args.stop_after_epoch is not None and not (epochs_apply and 1 <= args.stop_after_epoch <= settings.epochs):
        raise InputError(f"--stop-after-epoch must be in 1..--epochs ({settings.epochs}) with a kind that trains prompts, got {args.stop_after_epoch} with --kind {args.kind}")
    if args.resume and not epochs_apply:
        raise InputError("--resume: a head is solved in one step, there is no run to resume; run add-task again")
    if args.update and args.kind != "head":
        raise InputError(f"--update adds to a head task in closed form; it does not apply to --kind {args.kind}")
    class_names, names_from = None, None
    if args.classnames:
        class_names, names_from = read_class_names(args.classnames), f"--classnames {args.classnames}"
    elif args.class_names:
        class_names, names_from = parse_class_names(args.class_names), "--class-names"
    templates = read_templates(args.templates) if args.templates else list(DEFAULT_TEMPLATES)
    run_name, run_dir = _run_location(args, name)
    args._run_name = run_name

    # -- data: layout, labels and class names (nothing decoded yet)
    train_source = scan(args.data, class_names, names_from)
    test_source = scan(args.test, reference=train_source, option="--test") if args.test else None

    # -- store and backbone: the new task must fit the store's backbone
    store_url = _absolute_url(args.store)
    store = open_store(store_url)
    live = store.list()
    model_arg, pretrained_arg = _absolute_if_file(args.model), _absolute_if_file(args.pretrained)
    from .runtime import load_frozen_backbone

    backbone = load_frozen_backbone(model_arg, pretrained_arg, "cpu" if args.workers else args.device)
    fingerprint = backbone.fingerprint.to_dict()
    previous = _live_head(store, name, fingerprint, backbone) if args.update else None
    for info in live:
        if info.backbone is not None and info.backbone != fingerprint:
            raise InputError(
                f"--store {store.url}: task {info.name!r} (version {info.version}) was made for backbone {info.backbone}, "
                f"but --model {args.model} --pretrained {args.pretrained} is {fingerprint}; a store serves one backbone: "
                "use the store's backbone, or another --store"
            )

    # -- decode every image once (the backbone's own transform), then split
    pipeline = PixelPipeline(backbone.preprocess)
    progress = not (args.no_progress or args.quiet)
    images, skipped = decode(train_source, pipeline, args.skip_unreadable, "--data", progress)
    if skipped:
        check_no_empty_class(train_source, "--data", labels=images.labels, after=" left after skipping unreadable files")
    test_images, test_skipped = (decode(test_source, pipeline, args.skip_unreadable, "--test", progress) if test_source else (None, []))
    if args.kind != "prompts":
        _check_val_split(images.labels, train_source)
    class_names, templates = train_source.class_names, templates
    if previous is not None:  # known classes keep their labels, new ones are appended
        class_names, templates, images, test_images = _onto_previous(previous, train_source, templates, images, test_images, args)
    train_index, val_index = split_train_val(images.labels, settings.val_fraction, settings.seed)
    from backbone.task_stats import MIN_IMAGES

    if len(images) < MIN_IMAGES:
        raise InputError(f"--data {train_source.path}: {len(images)} readable images; a task needs at least {MIN_IMAGES}")
    source = {
        "train": {**train_source.describe(), "n_decoded": len(images), "skipped_unreadable": skipped[:100], "n_skipped": len(skipped)},
        "test": None if test_source is None else {**test_source.describe(), "n_decoded": len(test_images), "n_skipped": len(test_skipped)},
    }
    task = TaskData(
        name=name,
        class_names=class_names,
        templates=templates,
        train=images.subset(train_index),
        val=images.subset(val_index) if len(val_index) else None,
        test=test_images,
        source=source,
    )
    learner = make_learner(args.kind, recipes)
    runner = "ray-train" if args.workers else "local"
    if args.resume and "://" not in str(run_dir):  # fail fast, before Ray or the fingerprint pass start
        found = latest_local(run_dir)
        state = load_state(found)
        check_resumable(state.info, learner.recipe(task), learner.identity(task, backbone, runner), f"{found}")
        log.info("resuming run %s after epoch %d of %d", run_name, state.epoch, settings.epochs)
    log.info(
        "task %s (kind %s%s): %d classes (names from %s), %d train / %d val images%s%s",
        name, args.kind, f", update of version {previous.version}" if previous is not None else "", len(task.class_names),
        train_source.class_names_from, len(task.train), len(val_index),
        f", {len(test_images)} test images" if test_images is not None else "",
        f"; run {run_name}, checkpoints in {run_dir}" if epochs_apply else "",
    )

    # -- learn and publish
    try:
        if args.workers == 0:
            from .checkpoint import LocalCheckpoints
            from .learner import RunContext

            run = RunContext(
                checkpoints=LocalCheckpoints(run_dir), resume=bool(args.resume), stop_after_epoch=args.stop_after_epoch,
                progress=progress, runner=runner, extra_metrics={"workers": 0, "device": str(backbone.device)},
            )
            artifact = learner.fit(task, backbone, run, previous=previous) if previous is not None else learner.fit(task, backbone, run)
            check_publishable(artifact.metrics, live_metrics(store, name), args.force)
            version = store.publish(artifact)
            summary = {k: v for k, v in artifact.metrics.items() if k != "history"}
        else:
            result = _fit_on_ray(args, task, recipes, backbone, fingerprint, store_url, model_arg, pretrained_arg, run_name, run_dir, progress,
                                 previous.version if previous is not None else None)
            if result.get("stopped_after_epoch"):
                raise TrainingStopped(int(result["stopped_after_epoch"]))
            version, summary = result.get("published_version"), result.get("summary", {})
            if version is None:
                raise RuntimeError(f"the Ray Train run ended without publishing (last report: {result})")
    except TrainingStopped as stopped:
        print(f"{stopped}; nothing was published. Continue with the same arguments and --resume {run_name} "
              f"(checkpoints in {run_dir})", file=sys.stderr)
        return EXIT_OK
    _print_summary(name, version, store.url, task, summary, time.perf_counter() - started)
    return EXIT_OK


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


def _fit_on_ray(args, task, settings, backbone, fingerprint, store_url, model_arg, pretrained_arg, run_name, run_dir, progress,
                update_from: int | None = None) -> dict[str, Any]:
    import ray

    from .ray_train import fit_on_ray, unwrap_worker_error

    if not ray.is_initialized():
        _connect_ray(ray, args.address)
    use_gpu = args.device == "cuda" or (args.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)

    def arrays(prefix, images):
        return {f"{prefix}_pixels": None if images is None else images.pixels, f"{prefix}_labels": None if images is None else images.labels}

    images = {**arrays("train", task.train), **arrays("val", task.val), **arrays("test", task.test)}
    config = {
        "task": task.name, "class_names": task.class_names, "templates": task.templates, "source": task.source,
        "settings": settings.to_dict(), "model": model_arg, "pretrained": pretrained_arg, "backbone": fingerprint,
        "store": store_url, "resume": bool(args.resume), "stop_after_epoch": args.stop_after_epoch,
        "progress": progress, "verbose": args.verbose, "quiet": args.quiet, "extra_metrics": {},
        "kind": args.kind, "update_from": update_from, "force": args.force,
    }
    try:
        return fit_on_ray(
            config, images, workers=args.workers, use_gpu=use_gpu, run_name=run_name,
            storage_path=str(Path(run_dir).parent) if "://" not in str(run_dir) else str(run_dir).rsplit("/", 1)[0],
            max_failures=args.max_failures,
        )
    except Exception as e:
        from ray.train import TrainingFailedError

        if not isinstance(e, TrainingFailedError):
            raise
        cause = unwrap_worker_error(e)
        if isinstance(cause, (InputError, TrainingDiverged)):
            raise cause from None
        raise


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


def _onto_previous(previous, source, templates, images, test_images, args):
    """Class names, templates and labels of the new data mapped onto the live version's."""
    import numpy as np

    from .head_learner import merge_class_names

    if args.templates and list(templates) != list(previous.templates):
        raise InputError(f"--templates {args.templates}: task {previous.name!r} was learnt with templates {previous.templates}; "
                         "an update keeps them (leave out --templates)")
    names, mapping = merge_class_names(list(previous.class_names), list(source.class_names), f"--data {source.path}")
    mapping = np.asarray(mapping, dtype=np.int64)
    images.labels = mapping[images.labels]
    if test_images is not None:
        test_images.labels = mapping[test_images.labels]
    return names, list(previous.templates), images, test_images


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


def _print_summary(name: str, version: int, store_url: str, task, summary: dict[str, Any], seconds: float) -> None:
    from .learner import _pct

    def pct(key):
        return _pct(summary.get(key))

    kept = f"; kept epoch {summary.get('best_epoch')} of {summary.get('epochs')}" if summary.get("epochs") else ""
    if summary.get("fusion") is not None:
        kept += f"; head λ {summary.get('lambda'):g}, fusion {summary.get('fusion'):g}"
    lines = [
        f"published task {name!r} version {version} to store {store_url}",
        f"  {len(task.class_names)} classes; {summary.get('n_train')} train / {summary.get('n_val')} val images{kept}",
        f"  val accuracy {pct('val_accuracy')} (frozen zero-shot {pct('val_zero_shot_accuracy')})",
    ]
    if summary.get("candidates"):
        lines.append("  auto, validation accuracy: " + ", ".join(f"{k} {_pct(v['val_accuracy'])}" for k, v in summary["candidates"].items()))
    if summary.get("test_accuracy") is not None:
        lines.append(f"  test accuracy {pct('test_accuracy')} (frozen zero-shot {pct('test_zero_shot_accuracy')}) on {summary.get('n_test')} images")
    lines.append(f"  training {summary.get('train_seconds', 0):.1f} s, fingerprint {summary.get('fingerprint_seconds', 0):.1f} s, total {seconds:.1f} s")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    sys.exit(main())
