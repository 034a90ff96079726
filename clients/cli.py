"""The `keepclip` command line. Option defaults come from the same typed settings as the service (KEEPCLIP_*).

Only what `--help`, `classify` and `tasks` need is imported here (typer, httpx, pydantic): they answer in a fraction
of a second. torch, open_clip, Ray and the service are imported inside the commands that use them; `serve` and
`info` live in clients/model_commands.py because even their option defaults need those packages.
"""
from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, List, NoReturn, Optional

import typer
from pydantic import ValidationError

from clients.client import Classification, ClientSettings, KeepclipClient, KeepclipError, TaskList

app = typer.Typer(
    help="keepclip: keep one CLIP frozen and keep adding image-classification tasks to it.",
    no_args_is_help=True,
    add_completion=False,
)
_client = ClientSettings()  # client commands: KEEPCLIP_URL, KEEPCLIP_ADMIN_TOKEN
_RAW = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}  # another parser reads the rest
FAILED, USAGE = 1, 2  # exit codes: the command failed; the command line is wrong (argparse/typer convention)


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logging")) -> None:
    # libraries stay at WARNING (open_clip logs every step at INFO); our own packages log progress at INFO
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for package in ("backbone", "prompts_store", "training", "service", "clients", "bench"):
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)


# ----------------------------------------------------------------------------- commands that load the model
@app.command(context_settings=_RAW, add_help_option=False)
def info(ctx: typer.Context) -> None:
    """Load the backbone and print its fingerprint, tower sizes and the size of one task's prompts (`--help`: options)."""
    from clients.model_commands import info_app

    info_app(list(ctx.args), prog_name="keepclip info")


@app.command(context_settings=_RAW, add_help_option=False)
def serve(ctx: typer.Context) -> None:
    """Run the service (API, /docs and /ui on one port) on Ray Serve until Ctrl-C (`--help`: options)."""
    from clients.model_commands import serve_app

    serve_app(list(ctx.args), prog_name="keepclip serve")


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


# ----------------------------------------------------------------------------- errors of the client commands
def _fail(message: str, code: int = FAILED) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


# what to do about a refusal, where the service's message speaks HTTP
_HINTS = {"unauthorized": "pass the service's admin token with --token or KEEPCLIP_ADMIN_TOKEN",
          "forbidden": "--token or KEEPCLIP_ADMIN_TOKEN must be the token the service was started with"}


def _describe(e: KeepclipError) -> str:
    """One line: the message, then the HTTP status and code when there was an HTTP answer (and a hint, for some)."""
    text = e.message if e.status == 0 else f"{e.message} ({e.status} {e.code})"
    if e.code in _HINTS:
        text += f": {_HINTS[e.code]}"
    return " ".join(text.split())  # a server's message may span lines


@contextmanager
def _failures_reported() -> Iterator[None]:
    """Any failure of a client command becomes one `error: ...` line on stderr and exit code 1, never a traceback."""
    try:
        yield
    except KeepclipError as e:
        _fail(_describe(e))
    except ValidationError as e:  # valid JSON, but not the shape a keepclip service answers with
        _fail(f"unexpected answer, is --url a keepclip service? ({e.error_count()} fields do not match)")


# ----------------------------------------------------------------------------- classify
UrlOpt = typer.Option(_client.url, "--url", help="service URL [KEEPCLIP_URL]")
# refusals about one image: report it and go on with the next; any other refusal is the same for every image
_IMAGE_ERRORS = frozenset({"invalid_image", "empty_image", "image_too_large", "payload_too_large"})
# images go in requests of at most this many (and bytes): they join the service's dynamic batch together
IMAGES_PER_REQUEST = 16
BYTES_PER_REQUEST = 4 * 2**20


@app.command()
def classify(
    images: List[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files"),
    task: Optional[str] = typer.Option(None, "--task", help="classify within this task's classes"),
    labels: Optional[str] = typer.Option(None, "--labels", help="open-vocabulary labels, comma-separated"),
    top_k: int = typer.Option(5, "--top-k", min=1, help="scores to show"),
    url: str = UrlOpt,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object per image"),
) -> None:
    """Classify images through a running service: task-agnostic by default, or --task NAME, or --labels L1,L2,...

    The images go in one request (up to 16 per request), each still routed on its own. Exit code 1 when the service
    refuses or cannot be reached, or any image could not be classified.
    """
    if task and labels:
        _fail("give --task or --labels, not both", USAGE)
    label_list = [part.strip() for part in labels.split(",") if part.strip()] if labels is not None else None
    with _failures_reported(), KeepclipClient(url) as client:
        failures = 0
        for chunk in _chunks(images):
            failures += _classify_chunk(client, chunk, task, label_list, top_k, as_json)
    if failures:
        raise typer.Exit(FAILED)


def _chunks(paths: Iterable[Path]) -> Iterator[list[tuple[Path, bytes | None]]]:
    """(path, bytes; None when unreadable) in requests of at most IMAGES_PER_REQUEST images and BYTES_PER_REQUEST,
    read as they are sent."""
    chunk: list[tuple[Path, bytes | None]] = []
    size = 0
    for path in paths:
        try:
            data = path.read_bytes()
        except OSError as e:
            typer.echo(f"error: {path}: cannot read it ({e.strerror or e})", err=True)
            data = None
        if chunk and (len(chunk) == IMAGES_PER_REQUEST or size + len(data or b"") > BYTES_PER_REQUEST):
            yield chunk
            chunk, size = [], 0
        chunk.append((path, data))
        size += len(data or b"")
    if chunk:
        yield chunk


def _classify_chunk(client: KeepclipClient, chunk: list[tuple[Path, bytes | None]], task, labels, top_k: int, as_json: bool) -> int:
    """Print the answers of one request's images; returns how many images failed. When the service refuses one
    image of the request (or the request is too large), each image is sent on its own, to say which one."""
    readable = [(path, data) for path, data in chunk if data is not None]
    failures = len(chunk) - len(readable)
    if not readable:
        return failures
    try:
        results = client.classify_many([data for _, data in readable], task=task, labels=labels, top_k=top_k)
    except KeepclipError as e:
        if e.code not in _IMAGE_ERRORS | {"too_many_images"}:
            raise
        return failures + sum(not _classify_one(client, path, data, task, labels, top_k, as_json) for path, data in readable)
    for (path, _), result in zip(readable, results):
        _print_classification(path, result, as_json)
    return failures


def _classify_one(client: KeepclipClient, path: Path, data: bytes, task, labels, top_k: int, as_json: bool) -> bool:
    """Print one image's answer; False (after an `error: PATH: ...` line) when that image alone was refused."""
    try:
        result = client.classify(data, task=task, labels=labels, top_k=top_k)
    except KeepclipError as e:
        if e.code not in _IMAGE_ERRORS:
            raise
        typer.echo(f"error: {path}: {_describe(e)}", err=True)
        return False
    _print_classification(path, result, as_json)
    return True


def _print_classification(path: Path, result: Classification, as_json: bool) -> None:
    typer.echo(json.dumps({"image": str(path), **result.model_dump()}) if as_json else _classification_line(path, result))


def _classification_line(path: Path, result: Classification) -> str:
    if result.task is None:
        head = "no learned task (frozen CLIP over the open vocabulary)" if result.scores else "no learned task (frozen CLIP)"
    else:
        head = f"task {result.task} v{result.version}, gate {result.gate:.3f}"
    scores = ", ".join(f"{s.label} {s.score:.3f}" for s in result.scores) or (result.message or "")
    return f"{path}: {head}: {scores}"


# ----------------------------------------------------------------------------- tasks
tasks_app = typer.Typer(
    help="List, show, delete or roll back tasks: of a running service (--url, the default), or of a store directly (--store).",
    no_args_is_help=True,
)
app.add_typer(tasks_app, name="tasks")
TasksUrlOpt = typer.Option(None, "--url", help=f"service URL [KEEPCLIP_URL, default {_client.url}]", show_default=False)
StoreOpt = typer.Option(
    None, "--store", metavar="URL", show_default=False,
    help="work on this store directly, without a service: a directory or an fsspec URL, as for `serve --store` "
    "(KEEPCLIP_STORE is not read here: without --store these commands ask the service). No admin token: the store's "
    "file permissions decide who may change it; a running service follows within a poll interval.",
)
TokenOpt = typer.Option(None, "--token", help="admin token of the service [KEEPCLIP_ADMIN_TOKEN]", show_default=False)


def _tasks_of(url: Optional[str], store: Optional[str], token: Optional[str] = None):
    """A KeepclipClient for the service, or a StoreTasks for --store: the same methods and answers."""
    if store is None:
        return KeepclipClient(url, token=token)  # url None: KEEPCLIP_URL or its default
    if url is not None:
        _fail("give --url or --store, not both", USAGE)
    if token is not None:
        _fail("--token is for a service; with --store the store's file permissions decide who may change it", USAGE)
    from clients.store_tasks import StoreTasks  # imports prompts_store, hence torch: only here

    return StoreTasks(store)


@tasks_app.command("list")
def tasks_list(url: Optional[str] = TasksUrlOpt, store: Optional[str] = StoreOpt, as_json: bool = typer.Option(False, "--json")) -> None:
    """Live tasks: version, kind, classes, creation time, the version the service serves, and why a task is damaged.

    Exits 1 when some task has an error (its live version refused: damaged, another backbone, ...)."""
    with _failures_reported(), _tasks_of(url, store) as source:
        listing = source.tasks()
    if as_json:
        typer.echo(listing.model_dump_json(indent=2))
    else:
        for line in _task_table(listing):
            typer.echo(line)
    _exit_on_errors({t.name: t.error for t in listing.tasks})


def _task_table(listing: TaskList) -> list[str]:
    """A header line and a table; `served` only for a service, `error` only when some task.json is damaged."""
    served = listing.served_generation is not None
    title = f"store generation {listing.generation}" + (f" (served: {listing.served_generation})" if served else "")
    header = ["task", "version", *(["served"] if served else []), "kind", "classes", "created"]
    rows = [
        [t.name, _cell(t.version), *([_cell(t.loaded_version)] if served else []), _cell(t.kind), _cell(t.num_classes), _cell(t.created_at)]
        for t in listing.tasks
    ]
    if any(t.error for t in listing.tasks):
        header.append("error")
        for row, t in zip(rows, listing.tasks):
            row.append(t.error or "")
    return [title, *_aligned([header, *rows])]


def _cell(value) -> str:
    return "-" if value is None else str(value)


def _aligned(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


@tasks_app.command("show")
def tasks_show(name: str, url: Optional[str] = TasksUrlOpt, store: Optional[str] = StoreOpt) -> None:
    """One task as JSON: classes, templates, metrics and every version (with its metrics).

    Exits 1 when the task has an error (its live version refused: `version` is the live one, `loaded_version` the one
    served, `error` why)."""
    with _failures_reported(), _tasks_of(url, store) as source:
        detail = source.task(name)
    typer.echo(detail.model_dump_json(indent=2))
    _exit_on_errors({detail.name: detail.error})


def _exit_on_errors(errors: dict[str, str | None]) -> None:
    bad = {name: why for name, why in errors.items() if why}
    for name, why in bad.items():
        typer.echo(f"error: task {name}: {why}", err=True)
    if bad:
        raise typer.Exit(1)


@tasks_app.command("delete")
def tasks_delete(
    name: str, url: Optional[str] = TasksUrlOpt, store: Optional[str] = StoreOpt, token: Optional[str] = TokenOpt
) -> None:
    """Take a task out of service (its versions stay; rollback revives one).

    A service needs its admin token; with --store no token: the store's file permissions are the control.
    """
    with _failures_reported(), _tasks_of(url, store, token) as source:
        change = source.delete_task(name)
    typer.echo(f"deleted {change.name} (was v{change.version}); store generation {change.generation}")


@tasks_app.command("rollback")
def tasks_rollback(
    name: str, version: int, url: Optional[str] = TasksUrlOpt, store: Optional[str] = StoreOpt, token: Optional[str] = TokenOpt
) -> None:
    """Make VERSION of a task live again (also revives a deleted task).

    A service needs its admin token; with --store no token: the store's file permissions are the control.
    """
    with _failures_reported(), _tasks_of(url, store, token) as source:
        change = source.rollback_task(name, version)
    typer.echo(f"{change.name} v{change.version} is live; store generation {change.generation}")


def main() -> None:
    app()
