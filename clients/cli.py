"""The `keepclip` command line. Option defaults come from the same typed settings as the service (KEEPCLIP_*)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from backbone.settings import BackboneSettings
from clients.client import ClientSettings, KeepclipClient, KeepclipError
from service.settings import ServiceSettings

app = typer.Typer(
    help="keepclip: keep one CLIP frozen and keep adding image-classification tasks to it.",
    no_args_is_help=True,
    add_completion=False,
)
_defaults = BackboneSettings()
_service = ServiceSettings()  # `keepclip serve` defaults (KEEPCLIP_*; the same settings the Serve app reads)
_client = ClientSettings()  # client commands: KEEPCLIP_URL, KEEPCLIP_ADMIN_TOKEN

ModelOpt = typer.Option(_defaults.model, "--model", help="open_clip model name, or path to a model-config JSON [KEEPCLIP_MODEL]")
PretrainedOpt = typer.Option(
    _defaults.pretrained, "--pretrained", help="open_clip pretrained tag, checkpoint path, or 'none' [KEEPCLIP_PRETRAINED]"
)
DeviceOpt = typer.Option(_defaults.device, "--device", help="cuda, cpu or auto [KEEPCLIP_DEVICE]")
_RAW = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}  # argparse parses the rest


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    # libraries stay at WARNING (open_clip logs every step at INFO); our own packages log progress at INFO
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in ("backbone", "prompts_store", "training", "service", "clients", "bench"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


@app.command()
def info(model: str = ModelOpt, pretrained: Optional[str] = PretrainedOpt, device: str = DeviceOpt) -> None:
    """Load the backbone and print its fingerprint, tower sizes and the size of one task's prompts."""
    from backbone import BackboneError, PromptConfig, PromptedCLIP, load_backbone

    try:
        backbone = load_backbone(model, pretrained, device)
    except BackboneError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    prompted = PromptedCLIP(backbone)
    prompted.add_task("probe", PromptConfig())
    typer.echo(f"backbone     {backbone.fingerprint.name}")
    typer.echo(f"weights      sha256 {backbone.fingerprint.sha256}")
    typer.echo(f"device       {backbone.device}")
    for tower, blocks in (("visual", backbone.image_blocks), ("text", backbone.text_blocks)):
        typer.echo(f"{tower:<12} {len(blocks)} blocks, width {prompted.width(tower)}")
    typer.echo(f"task prompts {prompted.num_prompt_parameters('probe'):,} parameters (default depth 8, 8 prefix tokens)")


# ----------------------------------------------------------------------------- serve
@app.command()
def serve(
    host: str = typer.Option(_service.host, "--host", help="HTTP host [KEEPCLIP_HOST]"),
    port: int = typer.Option(_service.port, "--port", help="HTTP port [KEEPCLIP_PORT]"),
    address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting one"),
    model: str = typer.Option(_service.model, "--model", help="open_clip model name, or path to a model-config JSON [KEEPCLIP_MODEL]"),
    pretrained: Optional[str] = typer.Option(_service.pretrained, "--pretrained", help="pretrained tag, checkpoint path, or 'none' [KEEPCLIP_PRETRAINED]"),
    store: str = typer.Option(_service.store, "--store", help="store URL: a directory or an fsspec URL [KEEPCLIP_STORE]"),
    device: str = typer.Option(_service.device, "--device", help="cuda, cpu or auto [KEEPCLIP_DEVICE]"),
    replicas: int = typer.Option(_service.num_replicas, "--replicas", help="Serve replicas [KEEPCLIP_NUM_REPLICAS]"),
    settings_file: Optional[Path] = typer.Option(None, "--settings-file", help="YAML/JSON settings file [KEEPCLIP_SETTINGS_FILE]"),
) -> None:
    """Run the service (API, /docs and /ui on one port) on Ray Serve until Ctrl-C."""
    from pydantic import ValidationError

    from service.app import run_service

    try:
        settings = ServiceSettings.load(
            file=settings_file, host=host, port=port, model=model, pretrained=pretrained, store=store, device=device, num_replicas=replicas
        )
    except (ValidationError, ValueError) as e:
        typer.echo(f"error: invalid settings: {e}", err=True)
        raise typer.Exit(2) from None
    if device == "cuda" and settings.replica_gpus == 0:
        settings = settings.model_copy(update={"replica_gpus": 1.0})
    try:
        run_service(settings, address=address)
    except (TimeoutError, ConnectionError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None


# ----------------------------------------------------------------------------- add-task
@app.command("add-task", context_settings=_RAW, add_help_option=False)
def add_task(ctx: typer.Context) -> None:
    """Learn a task and publish it (NAME --data PATH ...; --workers N runs it on Ray Train). `add-task --help` lists every option."""
    from training.add_task import main as add_task_main

    # the same argparse parser as `python -m training.add_task`, so both take exactly the same arguments
    raise typer.Exit(add_task_main(list(ctx.args), prog="keepclip add-task"))


# ----------------------------------------------------------------------------- benchmarks
bench_app = typer.Typer(help="Benchmarks: continual learning (accuracy matrix, Transfer/Avg/Last) and speed.", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("continual", context_settings=_RAW, add_help_option=False)
def bench_continual(ctx: typer.Context) -> None:
    """Learn tasks in order, evaluate every task after each: keepclip against zero-shot, full-ft and LwF (`--help`: options)."""
    from bench.continual import main as continual_main

    raise typer.Exit(continual_main(list(ctx.args), prog="keepclip bench continual"))


@bench_app.command("speed", context_settings=_RAW, add_help_option=False)
def bench_speed(ctx: typer.Context) -> None:
    """Engine vs plain open_clip images/s, router cost at 10/100/1000 tasks, memory per task (`--help`: options)."""
    from bench.speed import main as speed_main

    raise typer.Exit(speed_main(list(ctx.args), prog="keepclip bench speed"))


# ----------------------------------------------------------------------------- client commands
UrlOpt = typer.Option(_client.url, "--url", help="service URL [KEEPCLIP_URL]")
TokenOpt = typer.Option(None, "--token", help="admin token [KEEPCLIP_ADMIN_TOKEN]", show_default=False)


def _fail(e: KeepclipError) -> None:
    typer.echo(f"error: {e.message if e.status == 0 else e}", err=True)
    raise typer.Exit(1 if e.status in (0, 500, 503) else 2)


@app.command()
def classify(
    images: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files"),
    task: Optional[str] = typer.Option(None, "--task", help="classify within this task's classes"),
    labels: Optional[str] = typer.Option(None, "--labels", help="open-vocabulary labels, comma-separated"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="scores to show"),
    url: str = UrlOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per image"),
) -> None:
    """Classify images through a running service: task-agnostic by default, or --task NAME, or --labels L1,L2,..."""
    if task and labels:
        typer.echo("error: give --task or --labels, not both", err=True)
        raise typer.Exit(2)
    label_list = [part.strip() for part in labels.split(",") if part.strip()] if labels is not None else None
    with KeepclipClient(url) as client:
        for path in images:
            try:
                result = client.classify(path, task=task, labels=label_list, top_k=top_k)
            except KeepclipError as e:
                if e.status == 0:
                    _fail(e)
                typer.echo(f"{path}: error: {e}", err=True)
                continue
            if as_json:
                typer.echo(json.dumps({"image": str(path), **result.model_dump()}))
                continue
            if result.task is None:
                head = "no learned task (frozen CLIP)"
            else:
                head = f"task {result.task} v{result.version}, gate {result.gate:.3f}"
            scores = ", ".join(f"{s.label} {s.score:.3f}" for s in result.scores) or (result.message or "")
            typer.echo(f"{path}: {head}: {scores}")


tasks_app = typer.Typer(help="List, show, delete or roll back the tasks of a running service.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("list")
def tasks_list(url: str = UrlOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Live tasks in the store and the version this replica serves."""
    try:
        with KeepclipClient(url) as client:
            listing = client.tasks()
    except KeepclipError as e:
        _fail(e)
    if as_json:
        typer.echo(listing.model_dump_json(indent=2))
        return
    typer.echo(f"store generation {listing.generation} (served: {listing.served_generation})")
    typer.echo(f"{'task':<24} {'version':>7} {'served':>6} {'classes':>7}  created")
    for t in listing.tasks:
        served = "-" if t.loaded_version is None else str(t.loaded_version)
        typer.echo(f"{t.name:<24} {t.version or '-':>7} {served:>6} {t.num_classes or '-':>7}  {t.created_at or ''}")
        if t.error:
            typer.echo(f"  ! {t.error}")


@tasks_app.command("show")
def tasks_show(name: str, url: str = UrlOpt) -> None:
    """One task: classes, templates, metrics and every version."""
    try:
        with KeepclipClient(url) as client:
            detail = client.task(name)
    except KeepclipError as e:
        _fail(e)
    typer.echo(detail.model_dump_json(indent=2))


@tasks_app.command("delete")
def tasks_delete(name: str, url: str = UrlOpt, token: Optional[str] = TokenOpt) -> None:
    """Take a task out of service (its versions stay; rollback revives one). Needs the admin token."""
    try:
        with KeepclipClient(url, token=token) as client:
            change = client.delete_task(name)
    except KeepclipError as e:
        _fail(e)
    typer.echo(f"deleted {change.name} (was v{change.version}); store generation {change.generation}")


@tasks_app.command("rollback")
def tasks_rollback(name: str, version: int, url: str = UrlOpt, token: Optional[str] = TokenOpt) -> None:
    """Make VERSION of a task live again. Needs the admin token."""
    try:
        with KeepclipClient(url, token=token) as client:
            change = client.rollback_task(name, version)
    except KeepclipError as e:
        _fail(e)
    typer.echo(f"{change.name} v{change.version} is live; store generation {change.generation}")


def main() -> None:
    app()
