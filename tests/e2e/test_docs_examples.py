"""The docs' client examples run against the e2e test server (`keepclip_service` in tests/e2e/conftest.py: a real
Ray Serve app with a tiny model and the colour tasks red and green): every `keepclip classify`, `keepclip tasks`
(without --store) and `curl` command of README.md and docs/*.md, with the substitutions below. They are also parsed,
and everything else is covered, in tests/test_docs_examples.py."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import time

import httpx

from testkit.tasks import make_color_task
from tests.docs_examples import PLACEHOLDERS, Argv, Command, argv, of, run_here, write_images

# the docs talk to the default address (or a cluster's, `<service>` -> keepclip); the test server has a free port
DOCS_URLS = r"(https?://)?(127\.0\.0\.1|localhost|keepclip):8000"
# the tasks the docs name do not exist on the test server: its task red stands in for them (classify, list, show) ...
SERVER_TASKS = {"NAME": "red", "cifar10": "red", "eurosat": "red"}
# ... and delete/rollback work on a throw-away task published for them, so that the other e2e tests find the service
# as it was
THROWAWAY, THROWAWAY_RGB = "docs-example", (90, 60, 30)
ADMIN_TASKS = {"NAME": THROWAWAY, "cifar10": THROWAWAY, "eurosat": THROWAWAY, "VERSION": "1"}


def on_test_server(command: Command, url: str, tasks: dict[str, str]) -> Argv:
    a = argv(command, {**PLACEHOLDERS, **tasks})
    a.words = [re.sub(DOCS_URLS, url, w) for w in a.words]
    if a.program == "keepclip" and "--url" not in a.words:
        a.words += ["--url", url]  # the docs rely on the default URL (KEEPCLIP_URL)
    return a


def service_commands(*first: str) -> list[Command]:
    """keepclip commands that talk to a service (not `--store`)."""
    return [c for c in of("keepclip", *first) if "--store" not in argv(c).words]


def run(command: Command, a: Argv) -> str:
    code, output = run_here(a)
    assert code == 0, f"{command.where}: `{shlex.join(a.words)}` exits {code}:\n{output}"
    return output


def test_classify_examples(keepclip_service, tmp_path, monkeypatch):
    examples = service_commands("classify")
    assert len(examples) >= 5
    monkeypatch.chdir(tmp_path)
    for command in examples:
        a = on_test_server(command, keepclip_service.url, SERVER_TASKS)
        write_images(tmp_path, a.words)
        output = run(command, a)
        if "--json" in a.words:
            answers = [json.loads(line) for line in output.splitlines()]
            assert all(answer["scores"] for answer in answers), f"{command.where}: {output}"
        if "--task" in a.words:
            assert "red" in output, f"{command.where}: {output}"


def test_task_list_and_show_examples(keepclip_service):
    examples = [c for c in service_commands("tasks") if argv(c).args[1] in ("list", "show")]
    assert len(examples) >= 4
    for command in examples:
        output = run(command, on_test_server(command, keepclip_service.url, SERVER_TASKS))
        assert "red" in output, f"{command.where}: {output}"


def test_delete_and_rollback_examples(keepclip_service, monkeypatch):
    svc = keepclip_service
    examples = [c for c in service_commands("tasks") if argv(c).args[1] in ("delete", "rollback")]
    assert len(examples) >= 4
    monkeypatch.setenv("KEEPCLIP_ADMIN_TOKEN", svc.token)  # "delete/rollback need KEEPCLIP_ADMIN_TOKEN" (or --token)
    try:
        for command in examples:
            svc.store.publish(make_color_task(svc.maker, THROWAWAY, THROWAWAY_RGB))  # live, with a version 1 to go back to
            output = run(command, on_test_server(command, svc.url, {**ADMIN_TASKS, "TOKEN": svc.token}))
            assert THROWAWAY in output, f"{command.where}: {output}"
    finally:
        if any(t.name == THROWAWAY for t in svc.store.list()):
            svc.store.delete(THROWAWAY)
        wait_until_not_served(svc.url, THROWAWAY)


def wait_until_not_served(url: str, name: str, timeout_s: float = 30) -> None:
    """The next tests find the service as it was: the throw-away task is gone from what it serves."""
    deadline = time.monotonic() + timeout_s
    while name in {t["name"] for t in httpx.get(f"{url}/v1/tasks", timeout=10).json()["tasks"]}:
        assert time.monotonic() < deadline, f"the service still serves {name}"
        time.sleep(0.1)


def test_curl_examples(keepclip_service, tmp_path):
    examples = of("curl")
    assert len(examples) >= 2
    for command in examples:
        a = on_test_server(command, keepclip_service.url, SERVER_TASKS)
        write_images(tmp_path, a.words)
        done = subprocess.run(a.words, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{command.where}: `{shlex.join(a.words)}`: {done.stderr}"
        body = json.loads(done.stdout)
        assert "error" not in body, f"{command.where}: `{shlex.join(a.words)}` answers {body}"
