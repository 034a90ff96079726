"""Every command example in README.md and docs/*.md is checked, so the docs stay true.

tests/docs_examples.py takes the commands out of the ```bash / ```sh blocks. Each must be covered by a rule:

* parsed: `keepclip ...`, `python -m training.add_task|bench.*`, `python k8s/render.py` go through the real parser
  (click for the typer app, then the argparse parser a command hands its arguments to); nothing runs. An unknown
  option or subcommand fails with the file:line. This covers the hour-long benchmarks and `keepclip serve` too.
* run here: the add-task examples on the tiny model (the README's on the proxy when ../shared is there), the
  `tasks ... --store` examples on a temporary store, `render.py rayjob`; against the e2e test server:
  tests/e2e/test_docs_examples.py (classify, tasks, curl).
* shell variables (`P=...`, `export KEEPCLIP_MODEL=...`): names that the settings (or Ray) read.
* NOT_RUN: other tools, with the test that covers them or why they are not run here.
"""
from __future__ import annotations

import inspect
import re
import shlex
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED, TINY_CONFIGS
from tests.docs_examples import (
    HANDOFFS, Command, DocExampleError, argv, commands, is_assignment, keepclip_app, of, parse_render,
    parser_for, run_here, settings_env_names, with_option, write_images,
)

# other tools: where they are covered, or why they are not run here
NOT_RUN = {
    "python -m venv": "the README's install step: tests/test_readme.py checks the quick start, .ci/run runs it",
    "pip": "the install step, as above",
    "python -m pytest": "the test command itself: tests/test_readme.py checks CI runs it verbatim",
    "docker": "no Docker engine here: tests/unit/k8s/test_dockerfile.py parses and lints k8s/Dockerfile",
    "kubectl": "no cluster here: tests/unit/k8s/test_manifests.py validates the manifests, tests/e2e/test_k8s.py "
               "deploys their Serve config on a local Ray; below: the files, Secrets and the Pod these commands use",
    "ray": "a second Ray head per test run is heavy, and `ray stop` would stop every Ray on the machine: "
           "tests/e2e/test_k8s.py starts a token-auth head with `ray start`",
    "ray job submit": "as `ray`; its entrypoint is parsed here, and tests/e2e/test_training_ray.py runs add-task "
                      "--workers 2 on Ray Train",
    "python -": "downloads OpenAI's ViT-B-16 weights (no network here); below: the script compiles",
}
RUN_ON_TEST_SERVER = {"curl": "tests/e2e/test_docs_examples.py"}
OTHER_VARIABLES = {"P": "the docs' shorthand for the proxy's folder", "RAY_AUTH_MODE": "Ray's token auth switch"}

# add-task examples run on the tiny model instead of the proxy (or the default ViT-B-16), on tiny colour data
TINY = {"--model": str(TINY_CONFIGS / "keepclip-tiny-a.json"), "--pretrained": "none", "--device": "cpu"}
ON_THE_PROXY = "README.md"  # its add-task example runs on the real proxy and mnist (25-60 s here; once is enough)
# what a comment in the example says happens, made to happen
RUN_EXTRAS = {"--run-name mnist-a": ["--stop-after-epoch", "6"]}  # "killed ... after epoch 6": stopped there
# and what the comment says comes out
COMMENT_CLAIMS = {"--update": "version 2", "--resume mnist-a": "epoch 7/10"}
STORE_URLS = {"s3://bucket/keepclip": "./keepclip-store"}  # no S3 here: the same store commands on a directory

COMMANDS = commands()


def coverage(command: Command) -> str | None:
    """How the tests cover `command`, or None."""
    if is_assignment(command.text):
        return "shell variables"
    a = argv(command)
    if parser_for(a.program):
        return "parsed"
    if a.program in RUN_ON_TEST_SERVER:
        return f"run in {RUN_ON_TEST_SERVER[a.program]}"
    if a.program in NOT_RUN:
        return f"not run: {NOT_RUN[a.program]}"
    return None


# ----------------------------------------------------------------------------- coverage
def test_every_command_is_covered():
    uncovered = [str(c) for c in COMMANDS if coverage(c) is None]
    assert not uncovered, ("commands no rule covers: add their parser (tests/docs_examples.py PYTHON_MODULES, "
                           "HANDOFFS) or a NOT_RUN entry with the reason:\n" + "\n".join(uncovered))


def test_the_extraction_reads_the_docs_as_a_shell_would(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "```bash\n"
        "A=x; export B=$A/y && keepclip classify \\\n    cat.png   # a comment\n"
        "python k8s/render.py rayjob t --data d | kubectl create -f -\n"
        "keepclip tasks list [--json] | show NAME\n"
        "keepclip add-task NAME --data PATH [--kind head|auto]\n"
        "python - <<'EOF'\nprint(1)\nEOF\n"
        "ray job submit --address http://h:8265 -- python -m training.add_task t --data d\n"
        "```\n"
        "```python\nnot = 'a command'\n```\n"
    )
    found = commands([doc])
    assert [(c.line, c.text) for c in found] == [
        (2, "A=x"), (2, "export B=$A/y"), (2, "keepclip classify cat.png"),
        (4, "python k8s/render.py rayjob t --data d"), (4, "kubectl create -f -"),
        (5, "keepclip tasks list"), (5, "keepclip tasks list --json"), (5, "keepclip tasks show NAME"),
        (6, "keepclip add-task NAME --data PATH"), (6, "keepclip add-task NAME --data PATH --kind head"),
        (6, "keepclip add-task NAME --data PATH --kind auto"),
        (7, "python - <<'EOF'"), (10, "ray job submit --address http://h:8265"), (10, "python -m training.add_task t --data d"),
    ]
    assert dict(found[2].env) == {"A": "x", "B": "x/y"}
    assert found[11].heredoc == "print(1)\n" and found[-1].via == "ray job submit"


def test_shell_variables_are_ones_something_reads():
    """`export KEEPCLIP_MODEL=...`, `KEEPCLIP_ADMIN_TOKEN=... keepclip serve`: a misspelt name would do nothing."""
    known = settings_env_names() | set(OTHER_VARIABLES)
    unknown = []
    for command in COMMANDS:
        words = shlex.split(command.text) if is_assignment(command.text) else list(argv(command).env)
        names = [w.split("=", 1)[0] for w in words if w != "export"]
        unknown += [f"{command.where}: {name}" for name in names if name not in known]
    assert not unknown, "variables no settings class (KEEPCLIP_*) reads:\n" + "\n".join(unknown)


# ----------------------------------------------------------------------------- parsed
PARSED = [c for c in COMMANDS if coverage(c) == "parsed"]


@pytest.mark.parametrize("command", PARSED, ids=lambda c: f"{c.where} {c.text[:60]}")
def test_parses_with_the_real_parser(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # `keepclip classify cat.png` checks that the image exists: make one here
    a = argv(command)
    write_images(tmp_path, a.words)
    try:
        parser_for(a.program)(a.args)
    except DocExampleError as e:
        pytest.fail(f"{command.where}: `{command.text}` does not parse: {e}")


@pytest.mark.parametrize("text, message", [
    ("keepclip classify cat.png --nope", "No such option: --nope"),
    ("keepclip tasks shwo red", "No such command 'shwo'"),
    ("keepclip add-task mnist --data d --knid head", "unrecognized arguments: --knid head"),
    ("keepclip bench continual --learners nobody", "invalid choice: 'nobody'"),
    ("keepclip serve --prot 1", "No such option: --prot"),
    ("python -m bench.onnx_speed --jsn x", "unrecognized arguments: --jsn x"),
    ("python -m bench.engine_passes --dpeth 2", "unrecognized arguments: --dpeth 2"),
    ("python -m bench.service_speed --stroe x", "unrecognized arguments: --stroe x"),
    ("python -m bench.learn_domains --knid head", "unrecognized arguments: --knid head"),
    ("python -m bench.leak --vocabluary none", "unrecognized arguments: --vocabluary none"),
    ("python k8s/render.py rayjob t --data d --epoch x", "do not parse"),
])
def test_a_drifted_flag_fails(text, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = argv(Command("doc.md", 1, 1, text))
    write_images(tmp_path, a.words)
    with pytest.raises(DocExampleError, match=re.escape(message)):
        parser_for(a.program)(a.args)


def test_handoffs_are_the_parsers_the_commands_call():
    """HANDOFFS names, for each keepclip command that passes its arguments on, the module it passes them to."""
    passing_on = {}
    for path, info in _typer_commands(keepclip_app()):
        if (info.context_settings or {}).get("allow_extra_args"):
            passing_on[path] = inspect.getsource(info.callback)
    assert set(passing_on) == set(HANDOFFS)
    for path, source in passing_on.items():
        module = HANDOFFS[path][0]
        assert module in source or module.rsplit(".", 1)[-1] in source, f"keepclip {' '.join(path)} does not call {module}"


def _typer_commands(app, path=()):
    for info in app.registered_commands:
        yield (*path, info.name or info.callback.__name__.replace("_", "-")), info
    for group in app.registered_groups:
        yield from _typer_commands(group.typer_instance, (*path, group.name))


# ----------------------------------------------------------------------------- run here: add-task
@pytest.fixture
def one_torch_thread():
    """As in tests/unit/training: a second thread gains the tiny model nothing, and spinning OpenMP threads collapse
    when other jobs share the two cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def add_task_blocks(on_the_proxy: bool) -> dict[tuple[str, int], list[Command]]:
    """The runnable add-task examples (no synopsis, not through Ray) by doc block: a block's commands build on one
    another (`--update`, `--resume`), in one working directory."""
    blocks = defaultdict(list)
    for c in of("keepclip", "add-task") + of("python -m training.add_task"):
        if not c.synopsis and c.via is None and (c.file == ON_THE_PROXY) == on_the_proxy:
            blocks[(c.file, c.block)].append(c)
    return {key: sorted(cs, key=lambda c: c.line) for key, cs in sorted(blocks.items())}


def tiny_data(folder: Path) -> dict[str, str]:
    """--data and --test for the tiny model: noisy colour images of four classes (tests/unit/training/helpers.py)."""
    from tests.unit.training.helpers import write_npz

    train = write_npz(folder / "train.npz", per_class=12, classnames_beside=True)
    test = write_npz(folder / "test.npz", per_class=6, seed=1)
    more = write_npz(folder / "more.npz", per_class=4, seed=2)
    return {"--data": str(train), "--test": str(test), "more": str(more)}


def on_tiny(command: Command, data: dict[str, str], tmp: Path):
    a = argv(command)
    data = dict(data)
    more = data.pop("more")
    if "--update" in a.words:  # new images: what the task already learned is not counted again
        data = {**data, "--data": more}
    words = [w.replace("/tmp/", f"{tmp}/", 1) if w.startswith("/tmp/") else w for w in a.words]
    for option, value in {**TINY, **data}.items():
        if option in words or option in TINY:
            words = with_option(words, option, value)
    for marker, extra in RUN_EXTRAS.items():
        words += extra if marker in command.text else []
    a.words = words
    return a


@pytest.mark.parametrize("block", list(add_task_blocks(on_the_proxy=False)), ids=lambda b: f"{b[0]}:{b[1]}")
def test_add_task_examples_run_on_the_tiny_model(block, tmp_path, monkeypatch, one_torch_thread):
    monkeypatch.chdir(tmp_path)
    data = tiny_data(tmp_path / "tiny")
    for command in add_task_blocks(on_the_proxy=False)[block]:
        a = on_tiny(command, data, tmp_path)
        code, output = run_here(a)
        assert code == 0, f"{command.where}: `{shlex.join(a.words)}` exits {code}:\n{output[-3000:]}"
        if "--stop-after-epoch" not in a.words:
            assert "published task" in output, f"{command.where}: {output[-2000:]}"
        for marker, claim in COMMENT_CLAIMS.items():
            assert marker not in command.text or claim in output, f"{command.where}: no {claim!r} in {output[-2000:]}"


def from_repo(text: str) -> str:
    """The docs' `../shared` paths are relative to the repository root; the example runs in a temporary directory."""
    return text.replace("../shared", str(SHARED))


def test_the_readme_add_task_example_runs_on_the_proxy(shared_dir, tmp_path, monkeypatch, one_torch_thread):
    [[command]] = add_task_blocks(on_the_proxy=True).values()
    monkeypatch.chdir(tmp_path)  # its ./keepclip-store goes here, not into the checkout
    a = argv(command)
    a.words = [from_repo(w) for w in a.words]
    a.env = {**a.env, **{k: from_repo(v) for k, v in command.env if k.startswith("KEEPCLIP_")}}  # its block's exports
    code, output = run_here(a)
    assert code == 0 and "published task 'mnist' version 1" in output, output[-3000:]
    assert re.search(r"test accuracy \d", output), output[-3000:]


# ----------------------------------------------------------------------------- run here: the store, render.py
def test_store_examples_run_on_a_store(tmp_path, monkeypatch, one_torch_thread):
    from backbone import PromptedCLIP
    from prompts_store import open_store
    from testkit.tasks import make_color_task
    from tests.conftest import tiny_backbone

    examples = [c for c in of("keepclip", "tasks") if "--store" in argv(c).words]
    assert len(examples) >= 2
    monkeypatch.chdir(tmp_path)
    store, maker = open_store(tmp_path / "keepclip-store"), PromptedCLIP(tiny_backbone())
    for seed in range(3):  # the task the examples name, in three versions: `rollback cifar10 2` goes back one
        store.publish(make_color_task(maker, "cifar10", (200, 120, 40), seed=seed))
    for command in examples:
        a = argv(command)
        a.words = [STORE_URLS.get(w, w) for w in a.words]
        code, output = run_here(a)
        assert code == 0, f"{command.where}: `{shlex.join(a.words)}` exits {code}:\n{output}"
        assert "cifar10" in output, f"{command.where}: {output}"


def test_render_examples_print_the_rayjob_the_docs_then_look_for():
    examples = of("python k8s/render.py", "rayjob")
    assert examples
    selectors = [argv(c).words[argv(c).words.index("-l") + 1] for c in of("kubectl", "get", "rayjobs")]
    for command in examples:
        args = argv(command).args
        job = yaml.safe_load(parse_render(args))  # render.py only prints: run it
        assert job["kind"] == "RayJob" and shlex.join(args[1:]) in job["spec"]["entrypoint"], command.where
        labels = job["metadata"]["labels"]
        for selector in selectors:  # `kubectl get rayjobs -l keepclip.io/task=eurosat` finds it
            key, value = selector.split("=")
            assert labels.get(key) == value, f"{command.where}: no label {selector} on {labels}"


# ----------------------------------------------------------------------------- not run: what can be checked
def test_not_run_commands_name_files_that_exist():
    missing = [f"{c.where}: {w}" for c in COMMANDS if coverage(c).startswith("not run")
               for w in argv(c).words if re.match(r"(k8s|tests|docs)/", w) and not (REPO / w).exists()]
    assert not missing


def test_kubectl_secrets_are_the_ones_the_manifests_read():
    template = {d["metadata"]["name"]: set(d["stringData"]) for d in yaml.safe_load_all((REPO / "k8s" / "secrets.template.yaml").read_text())}
    examples = of("kubectl", "create", "secret", "generic")
    assert examples
    for command in examples:
        words = argv(command).words
        name, literal = words[4], next(w for w in words if w.startswith("--from-literal="))
        key = literal.removeprefix("--from-literal=").split("=", 1)[0]
        assert key in template.get(name, ()), f"{command.where}: Secret {name} key {key}; k8s/ reads {template}"


def test_heredocs_are_valid():
    """The Python script compiles; the Pod applied with `kubectl apply -f -` validates against Kubernetes' schema."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    heredocs = [c for c in COMMANDS if c.heredoc]
    assert {argv(c).program for c in heredocs} == {"python -", "kubectl"}
    for command in heredocs:
        if argv(command).program == "python -":
            compile(command.heredoc, command.where, "exec")
        else:
            pod = yaml.safe_load(command.heredoc)
            kubernetes_validate.validate(pod, kubernetes_validate.latest_version(), strict=True)
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"]}
            storage = [d["metadata"]["name"] for d in yaml.safe_load_all((REPO / "k8s" / "storage.yaml").read_text())]
            assert claims <= set(storage), f"{command.where}: claims {claims}, k8s/storage.yaml makes {storage}"

