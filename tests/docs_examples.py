"""The command examples of README.md and docs/*.md, taken from their ```bash / ```sh blocks, and the real parsers
that check them without running them. Used by tests/test_docs_examples.py and tests/e2e/test_docs_examples.py.

A block line becomes commands the way a reader would run them: `\\` continuations joined, `# comments` dropped, a
heredoc body kept with its command, `&&` / `;` / `|` chains split, `ray job submit ... -- CMD` split into the Ray
part and CMD, and a synopsis (`keepclip tasks list | show NAME`, `[--task NAME | --labels ...]`, `head|prompts`)
expanded into concrete variants, every option and alternative in at least one. Placeholders (NAME, PATH, `…`) are
filled in from the tables below, never skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from tests.conftest import REPO

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# ----------------------------------------------------------------------------- substitution tables
# `…` / `...` in the docs: an elided value, or "the arguments shown above". In order; what a concrete command has there.
ELLIPSES = [
    (r"--token \.\.\.", "--token TOKEN"),  # an elided secret
    (r"^(\w+)=\.\.\. ", r"\1=TOKEN "),  # KEEPCLIP_ADMIN_TOKEN=... keepclip serve
    (r"L1,L2,\.\.\.", "cat,dog,car"),  # a label list
    (r"--data …", "--data data.npz"),  # an elided data path
    (r"(training\.add_task \w+) …", r"\1 --data data.npz"),  # "the same arguments": at least the required --data
    (r" (\.\.\.|…)$", ""),  # "and the options shown above": nothing more is needed to parse it
]
# upper-case words of the synopses (and `<...>` names), and the value a concrete command has there
PLACEHOLDERS = {
    "NAME": "mnist",
    "VERSION": "1",
    "PATH": "data.npz",
    "FILE": "names.txt",
    "N": "2",
    "URL": "http://127.0.0.1:8000",
    "TOKEN": "secret",
    "<service>": "keepclip",
    "<rayjob name>": "keepclip-eurosat-abcde",
}
# `A | B` after one of these is a choice of subcommand (`keepclip tasks list | show NAME`), not a pipe
SUBCOMMAND_STEMS = ("keepclip tasks",)
# the first word of a command that some rule knows: `| WORD` is a pipe into it
PROGRAMS = ("keepclip", "python", "python3", "python3.11", "kubectl", "docker", "ray", "curl", "pip", "export")
VENV_BIN = ".venv/bin/"  # `.venv/bin/keepclip` is `keepclip` of the README's virtual environment


# ----------------------------------------------------------------------------- extraction
@dataclass(frozen=True)
class Command:
    file: str  # "README.md", "docs/training.md"
    line: int  # the line the command starts on
    block: int  # the line of the block's opening fence: commands of one block run in one shell
    text: str  # continuations joined, comment dropped, synopsis expanded
    env: tuple[tuple[str, str], ...] = ()  # shell variables set before it in the file (P=..., export ...)
    heredoc: str | None = None
    via: str | None = None  # "ray job submit": CMD of `ray job submit ... -- CMD`
    synopsis: bool = False  # an expanded synopsis line (placeholders, optional parts): parsed, not run

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def __str__(self) -> str:
        return f"{self.where}: {self.text}"


def fenced_blocks(path: Path) -> list[tuple[int, list[tuple[int, str]]]]:
    """(fence line, [(line number, text)]) of every ```bash / ```sh block."""
    blocks, current, start = [], None, 0
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if current is None and re.match(r"^```(bash|sh)\s*$", line):
            current, start = [], number
        elif current is not None and line.startswith("```"):
            blocks.append((start, current))
            current = None
        elif current is not None:
            current.append((number, line))
    return blocks


def strip_comment(line: str) -> str:
    """The line without its `# comment` (a `#` that starts a word outside quotes)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def logical_lines(lines: list[tuple[int, str]]) -> list[tuple[int, str, str | None]]:
    """(first line number, text, heredoc body) per shell line: continuations joined, comments dropped."""
    out, i = [], 0
    while i < len(lines):
        number, text = lines[i]
        while text.rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text = text.rstrip()[:-1] + " " + lines[i][1].strip()
        text = " ".join(strip_comment(text).split())
        body = None
        heredoc = re.search(r"<<-?\s*'?(\w+)'?", text)
        if heredoc:  # the body runs up to the terminator line
            body_lines = []
            while i + 1 < len(lines) and lines[i + 1][1].strip() != heredoc.group(1):
                i += 1
                body_lines.append(lines[i][1])
            i += 1  # the terminator
            body = "\n".join(body_lines) + "\n"
        if text:
            out.append((number, text, body))
        i += 1
    return out


def split_top_level(text: str, separators: tuple[str, ...]) -> list[str]:
    """`text` split at `separators` outside quotes, `$( )` and synopsis `[ ]`."""
    parts, start, depth, quote, i = [], 0, 0, None, 0
    while i < len(text):
        ch = text[i]
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif depth == 0:
            sep = next((s for s in separators if text.startswith(s, i)), None)
            if sep:
                parts.append(text[start:i].strip())
                start = i = i + len(sep)
                continue
        i += 1
    parts.append(text[start:].strip())
    return [p for p in parts if p]


def first_word(text: str) -> str:
    word = text.split()[0] if text.split() else ""
    return word.removeprefix(VENV_BIN)


def pipeline(text: str) -> list[str]:
    """A pipeline's commands, or a synopsis's subcommand choices (`keepclip tasks list | show NAME`) spelt out."""
    parts = split_top_level(text, (" | ",))
    stem = next((s for s in SUBCOMMAND_STEMS if parts[0].startswith(s + " ")), None)
    if stem is None or all(first_word(p) in PROGRAMS for p in parts[1:]):
        return parts  # a pipe (into a program no rule knows: the coverage test names it)
    return [parts[0]] + [f"{stem} {p}" for p in parts[1:]]


def expand(text: str) -> list[str]:
    """A synopsis's variants: `[X]` optional, `[A | B]` and `a|b` alternatives. The bare command, then variant i
    with every optional part at its i-th alternative (or its last), so each option and alternative appears."""
    pieces = re.split(r"((?<!\S)\[[^\]]*\](?!\S))", text)
    slots: list[tuple[bool, list[str]]] = []  # (optional, alternatives)
    for piece in pieces:
        optional = piece.startswith("[")
        body = piece[1:-1] if optional else piece
        alternatives = [word_alternatives(alt) for alt in (body.split(" | ") if optional else [body])]
        slots.append((optional, [a for alts in alternatives for a in alts]))
    width = max(len(alts) for _, alts in slots)
    variants = [" ".join(alts[0] for optional, alts in slots if not optional)]
    variants += [" ".join(alts[min(i, len(alts) - 1)] for _, alts in slots) for i in range(width)]
    return list(dict.fromkeys(" ".join(v.split()) for v in variants))


def word_alternatives(text: str) -> list[str]:
    """`--kind head|prompts` -> ['--kind head', '--kind prompts'] (a word of names joined by `|`)."""
    words = text.split(" ")
    choices = [w.split("|") if re.fullmatch(r"[\w.+-]+(\|[\w.+-]+)+", w) else [w] for w in words]
    width = max(len(c) for c in choices)
    return [" ".join(c[min(i, len(c) - 1)] for c in choices) for i in range(width)]


def commands(paths: list[Path] = DOCS) -> list[Command]:
    """Every command of every bash/sh block of `paths`, in order."""
    out = []
    for path in paths:
        env: dict[str, str] = {}  # a reader runs a file's blocks in one shell: P=... holds for later blocks
        for fence, lines in fenced_blocks(path):
            for number, text, body in logical_lines(lines):
                for segment in split_top_level(text, ("&&", ";")):
                    segment = re.sub(r"\s*&$", "", segment)  # `kubectl port-forward ... &`: in the background
                    for part in pipeline(segment):
                        out += _commands_of(path, fence, number, part, body, env)
    return out


def _commands_of(path: Path, fence: int, number: int, text: str, body: str | None, env: dict[str, str]) -> list[Command]:
    name = str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name
    where = dict(file=name, line=number, block=fence, heredoc=body)
    variants = expand(text)
    synopsis = len(variants) > 1 or any(re.search(_placeholder_pattern(p), text) for p in PLACEHOLDERS if p.isupper())
    found = []
    for variant in variants:
        ray, sep, entrypoint = variant.partition(" -- ")
        if ray.startswith("ray job submit") and sep:  # the entrypoint is a command of its own
            found.append(Command(text=ray, env=tuple(env.items()), synopsis=synopsis, **where))
            found.append(Command(text=entrypoint, env=tuple(env.items()), via="ray job submit", synopsis=synopsis, **where))
            continue
        found.append(Command(text=variant, env=tuple(env.items()), synopsis=synopsis, **where))
        if is_assignment(variant):
            env.update(assignments(variant, env))
    return found


def of(program: str, *first: str) -> list[Command]:
    """The commands of `program` (as Argv.program names it) whose arguments start with `first`."""
    return [c for c in commands() if argv(c).program == program and argv(c).args[: len(first)] == list(first)]


# ----------------------------------------------------------------------------- words of a command
def _placeholder_pattern(name: str) -> str:
    return re.escape(name) if name.startswith("<") else rf"(?<![\w$/.-]){name}(?![\w])"


def substitute(text: str, table: dict[str, str]) -> str:
    """`text` with the ELLIPSES filled in and each placeholder (a whole word) replaced by its value in `table`."""
    for pattern, value in ELLIPSES:
        text = re.sub(pattern, value, text)
    for name, value in table.items():
        text = re.sub(_placeholder_pattern(name), lambda _: value, text)
    return text


def expand_vars(text: str, env: dict[str, str]) -> str:
    """$NAME / ${NAME} from `env` (the block's variables and PWD); an unknown one is an error, `$(...)` stays."""
    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in env:
            raise DocExampleError(f"${name} is not set by the docs before this command")
        return env[name]

    return re.sub(r"\$(?:\{(\w+)\}|(\w+))", value, text)


def is_assignment(text: str) -> bool:
    words = shlex.split(text)
    words = words[1:] if words[:1] == ["export"] else words
    return bool(words) and all(re.fullmatch(r"\w+=.*", w) for w in words)


def assignments(text: str, env: dict[str, str]) -> dict[str, str]:
    """NAME -> value of `P=...` / `export A=... B=...` (values expanded with the variables before them)."""
    words = shlex.split(expand_vars(text, {"PWD": str(REPO), **env}))
    words = words[1:] if words[:1] == ["export"] else words
    return dict(w.split("=", 1) for w in words)


@dataclass
class Argv:
    env: dict[str, str]  # NAME=VALUE words before the program
    words: list[str]  # the program and its arguments (`.venv/bin/` dropped)

    @property
    def program(self) -> str:
        """'keepclip', 'python -m training.add_task', 'python k8s/render.py', 'python -', 'kubectl', ..."""
        w = self.words
        if not w:  # only NAME=VALUE words: an assignment
            return ""
        if w[0] in ("python", "python3", "python3.11") and len(w) > 1:
            return f"python -m {w[2]}" if w[1] == "-m" and len(w) > 2 else f"python {w[1]}"
        if w[0] == "ray" and w[1:3] == ["job", "submit"]:
            return "ray job submit"
        return w[0]

    @property
    def args(self) -> list[str]:
        """What the program's parser gets."""
        skip = 3 if self.program.startswith("python -m") else 2 if self.program.startswith("python ") else 1
        return self.words[skip:]


def argv(command: Command, table: dict[str, str] = PLACEHOLDERS, pwd: Path = REPO) -> Argv:
    """The command's words as the shell would pass them, with placeholders from `table`."""
    try:
        text = expand_vars(substitute(command.text, table), {"PWD": str(pwd), **dict(command.env)})
    except DocExampleError as e:
        raise DocExampleError(f"{command.where}: {e}") from None
    words = shlex.split(text)
    env = {}
    while words and re.fullmatch(r"\w+=.*", words[0]):
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    if words:
        words[0] = words[0].removeprefix(VENV_BIN)
    return Argv(env, words)


# ----------------------------------------------------------------------------- parsing with the real parsers
class DocExampleError(AssertionError):
    pass


class _Parsed(Exception):
    """Raised by a patched ArgumentParser.parse_args: the arguments parsed, stop before anything runs."""


def _argparse(parse, *args) -> object:
    """Call `parse`; an argparse error (SystemExit after a usage message) becomes DocExampleError with the message."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return parse(*args)
    except SystemExit as e:
        raise DocExampleError(stderr.getvalue().strip() or f"exit {e.code}") from None


def _parse_inline(main, args: list[str]) -> argparse.Namespace:
    """For a module whose parser is built inside main(): run main(args) until its parse_args returns, then stop."""
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        raise _Parsed(real(self, *a, **kw))

    with mock.patch.object(argparse.ArgumentParser, "parse_args", parse_then_stop):
        try:
            _argparse(main, args)
        except _Parsed as parsed:
            return parsed.args[0]
    raise DocExampleError(f"{main.__module__}.main() returned without parsing its arguments")


def parse_add_task(args: list[str], prog: str = "python -m training.add_task") -> argparse.Namespace:
    from training.add_task import build_parser

    return _argparse(build_parser(prog).parse_args, args)


def parse_learn_domains(args: list[str]) -> argparse.Namespace:
    """bench.learn_domains passes the options it does not know to add-task: those must parse there."""
    from bench.learn_domains import parse_args

    ns = _argparse(parse_args, args)
    parse_add_task(["task", "--data", "data.npz", *ns.recipe], "add-task (options learn_domains passes on)")
    return ns


def _module_parser(module: str, *extra: str):
    """`module.parse_args(args, *extra)`, imported when first used (the bench modules import torch)."""
    def parse(args: list[str]):
        return _argparse(importlib.import_module(module).parse_args, args, *extra)

    return parse


def _inline(module: str):
    def parse(args: list[str]):
        return _parse_inline(importlib.import_module(module).main, args)

    return parse


# `python -m MODULE` -> how its arguments are parsed: the module's own parser function, else its main() stopped
# right after parse_args (bench.service_speed and bench.onnx_speed build their parser inside main())
PYTHON_MODULES = {
    "training.add_task": parse_add_task,
    "bench.continual": _module_parser("bench.continual", "python -m bench.continual"),
    "bench.speed": _module_parser("bench.speed", "python -m bench.speed"),
    "bench.learn_domains": parse_learn_domains,
    "bench.service_speed": _inline("bench.service_speed"),
    "bench.onnx_speed": _inline("bench.onnx_speed"),
    "bench.engine_passes": _inline("bench.engine_passes"),
    "bench.leak": _module_parser("bench.leak"),
    "bench.class_balance": _module_parser("bench.class_balance"),
    "bench.image_decode": _module_parser("bench.image_decode"),
    "bench.fair_share": _module_parser("bench.fair_share"),
}


def _click_command(typer_app):
    import typer.main

    return typer.main.get_command(typer_app)


def parse_click(command, args: list[str], prog: str) -> list[tuple[tuple[str, ...], dict, list[str]]]:
    """Parse `args` with a typer app's command tree without running it: each command's invoke is replaced by one that
    records (command path, parsed options, extra arguments). Usage errors become DocExampleError."""
    import typer

    calls = []

    def recorder(path):
        return lambda ctx: calls.append((path, dict(ctx.params), list(ctx.args)))

    def replace(cmd, path=()):
        if hasattr(cmd, "commands"):  # a group: it still resolves its subcommand; its callback (logging) is skipped
            cmd.callback = None
            for name, sub in cmd.commands.items():
                replace(sub, (*path, name))
        else:
            cmd.invoke = recorder(path)

    replace(command)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            command.main(list(args), prog_name=prog, standalone_mode=False)
    except typer.TyperException as e:  # typer's (vendored click's) usage errors
        raise DocExampleError(f"{prog}: {e.format_message()}") from None
    except typer.Exit as e:  # --help
        raise DocExampleError(f"{prog} {' '.join(args)}: exits {e.exit_code} without running a command") from None
    if not calls:
        raise DocExampleError(f"{prog} {' '.join(args)}: runs no command")
    return calls


def keepclip_app():
    """The typer app behind the `keepclip` console script (pyproject.toml [project.scripts])."""
    import tomllib

    target = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["keepclip"]
    module = importlib.import_module(target.split(":")[0])
    return module.app


def _model_command(name: str):
    def parse(args: list[str]):
        from clients import model_commands

        app = getattr(model_commands, f"{name}_app")
        return parse_click(_click_command(app), args, f"keepclip {name}")

    return parse


# keepclip commands that hand their arguments to another parser (the module each one calls, for the check below)
HANDOFFS = {
    ("serve",): ("clients.model_commands", _model_command("serve")),
    ("info",): ("clients.model_commands", _model_command("info")),
    ("add-task",): ("training.add_task", lambda args: parse_add_task(args, "keepclip add-task")),
    ("bench", "continual"): ("bench.continual", _module_parser("bench.continual", "keepclip bench continual")),
    ("bench", "speed"): ("bench.speed", _module_parser("bench.speed", "keepclip bench speed")),
}


def parse_keepclip(args: list[str]) -> tuple[str, ...]:
    """Parse a keepclip command line down to the last parser; -> the command path, e.g. ('tasks', 'rollback')."""
    [(path, _, extra)] = parse_click(_click_command(keepclip_app()), args, "keepclip")
    if path in HANDOFFS:
        HANDOFFS[path][1](extra)
    elif extra:
        raise DocExampleError(f"keepclip {' '.join(path)}: unexpected arguments {extra}")
    return path


def parse_render(args: list[str]) -> object:
    """k8s/render.py: `rayjob` checks its arguments with add-task's parser and only prints; the rest is argparse."""
    from tests.unit.k8s.helpers import render

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if args[:1] == ["rayjob"]:
            code = render().main(list(args))
        else:
            return _parse_inline(render().main, args)
    if code != 0:
        raise DocExampleError(f"python k8s/render.py exits {code}: {err.getvalue().strip()}")
    return out.getvalue()


def parser_for(program: str):
    """The function that parses a program's arguments (raising DocExampleError), or None."""
    if program == "keepclip":
        return parse_keepclip
    if program == "python k8s/render.py":
        return parse_render
    if program.startswith("python -m "):
        return PYTHON_MODULES.get(program.removeprefix("python -m "))
    return None


def settings_env_names() -> set[str]:
    """Every KEEPCLIP_* variable some settings class reads."""
    from backbone.settings import BackboneSettings
    from clients.client import ClientSettings
    from prompts_store import StoreSettings
    from service.settings import ServiceSettings

    return {cls.model_config.get("env_prefix", "") + name.upper()
            for cls in (BackboneSettings, ClientSettings, StoreSettings, ServiceSettings) for name in cls.model_fields}


def write_images(folder: Path, words: list[str], colour: str = "red") -> None:
    """A small PNG for each image a command names (`cat.png`, `a.png`, curl's `image=@cat.png`), in `folder`."""
    from PIL import Image

    from testkit.tasks import color_sample

    for word in words:
        name = word.removeprefix("image=@")
        if name.endswith(".png") and not (folder / name).exists():
            Image.fromarray(color_sample(colour, 1, seed=5)[0]).save(folder / name)


# ----------------------------------------------------------------------------- running, in this process
def run_here(a: Argv) -> tuple[int, str]:
    """Run a keepclip or `python -m training.add_task` command in this process (the same entry points the console
    script and `python -m` call; no interpreter start-up, torch imported once): -> (exit code, output)."""
    import os

    if a.program == "keepclip":
        from typer.testing import CliRunner

        result = CliRunner().invoke(keepclip_app(), a.args, env=a.env)
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.output
    if a.program == "python -m training.add_task":
        from training.add_task import main

        out = io.StringIO()
        with mock.patch.dict(os.environ, a.env), contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            return main(a.args), out.getvalue()
    raise ValueError(f"cannot run {a.program} here")


def with_option(words: list[str], option: str, value: str) -> list[str]:
    """`words` with `option`'s value set to `value` (replaced where given, else appended)."""
    if option in words:
        i = words.index(option)
        return [*words[: i + 1], value, *words[i + 2:]]
    return [*words, option, value]
