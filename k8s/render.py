"""Keep the KubeRay manifests in step with their one source, and make a RayJob per task.

    python k8s/render.py                  copy k8s/serve-config.yaml verbatim into k8s/rayservice.yaml's serveConfigV2
    python k8s/render.py --check          exit 1 (and say what) when a manifest is out of step; changes nothing
    python k8s/render.py rayjob NAME --data PATH [add-task options]  [--image IMAGE]
                                          print a RayJob (from k8s/rayjob-add-task.yaml) that learns task NAME

`rayjob` checks the add-task arguments with add-task's own parser (`training.add_task.build_parser`) and fills in
`--model`, `--pretrained`, `--store` and `--device` from the Serve config's `args`, so the task is made for the
backbone the service serves and lands in the store it follows; `--workers` (default: the template's GPU workers)
also sets the size of the job's GPU worker group. Needs only PyYAML and an installed keepclip (for the parser).
"""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

K8S = Path(__file__).resolve().parent
SERVE_CONFIG = K8S / "serve-config.yaml"
RAYSERVICE = K8S / "rayservice.yaml"
RAYJOB_TEMPLATE = K8S / "rayjob-add-task.yaml"
ENTRYPOINT = ("python", "-m", "training.add_task")
# add-task options that must match what the service serves; taken from the Serve config's `args`.
PINNED = {"--model": "model", "--pretrained": "pretrained", "--store": "store", "--device": "device"}
_BLOCK = re.compile(r"^(?P<indent>[ ]*)serveConfigV2: \|[-+]?[ ]*$")


class RenderError(Exception):
    """A manifest or an argument that cannot be rendered; the message says what to fix."""


# ----------------------------------------------------------------------------- serveConfigV2
def serve_config_text(path: Path = SERVE_CONFIG) -> str:
    text = path.read_text()
    if not text.endswith("\n") or text.endswith("\n\n") or "\t" in text or any(
            line != line.rstrip() for line in text.splitlines()):
        raise RenderError(f"{path}: must end with exactly one newline and hold no tabs or trailing spaces "
                          "(it is embedded verbatim as a YAML block)")
    return text


def serve_config(path: Path = SERVE_CONFIG) -> dict[str, Any]:
    return yaml.safe_load(serve_config_text(path))


def embed_serve_config(manifest: str, config: str) -> str:
    """`manifest` with the block scalar under `serveConfigV2: |` replaced by `config`, indented one level deeper."""
    lines = manifest.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if _BLOCK.match(line)]
    if len(starts) != 1:
        raise RenderError(f"expected exactly one `serveConfigV2: |` line in the RayService manifest, found {len(starts)}")
    start = starts[0]
    indent = len(_BLOCK.match(lines[start])["indent"])
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip(" ")) > indent):
        end += 1
    while end > start + 1 and not lines[end - 1].strip():  # blank lines before the next key stay outside the block
        end -= 1
    pad = " " * (indent + 2)
    block = [f"{pad}{line}" if line.strip() else "\n" for line in config.splitlines(keepends=True)]
    return "".join(lines[: start + 1] + block + lines[end:])


def rendered_rayservice() -> str:
    return embed_serve_config(RAYSERVICE.read_text(), serve_config_text())


# ----------------------------------------------------------------------------- RayJob per task
def add_task_parser():
    try:
        from training.add_task import build_parser
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RenderError(f"cannot import training.add_task ({e}); install keepclip (pip install -e .) first") from None
    return build_parser(prog="python -m training.add_task")


def entrypoint_argv(entrypoint: str) -> list[str]:
    """The add-task arguments of a RayJob entrypoint (`python -m training.add_task ...`)."""
    argv = shlex.split(entrypoint)
    if tuple(argv[: len(ENTRYPOINT)]) != ENTRYPOINT:
        raise RenderError(f"the entrypoint must start with `{' '.join(ENTRYPOINT)}`, got {entrypoint!r}")
    return argv[len(ENTRYPOINT):]


def gpu_group(spec: dict[str, Any]) -> dict[str, Any]:
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    if len(groups) != 1:
        raise RenderError("the RayJob template must have exactly one (GPU) worker group")
    return groups[0]


def rayjob(task_args: list[str], image: str | None = None, template: Path = RAYJOB_TEMPLATE) -> dict[str, Any]:
    """The template's RayJob for `task_args` (add-task's NAME --data PATH [options]), checked and completed."""
    job = yaml.safe_load(template.read_text())
    app_args = serve_config()["applications"][0]["args"]
    for option in PINNED:
        if any(a == option or a.startswith(option + "=") for a in task_args):
            raise RenderError(f"{option} comes from k8s/serve-config.yaml (args.{PINNED[option]}: the served "
                              f"backbone and store); change it there, not per task")
    group = gpu_group(job["spec"])
    argv = list(task_args)
    for option, key in PINNED.items():
        argv += [option, str(app_args[key])]
    defaults = {"--workers": str(group["replicas"]), "--checkpoint-dir": "/mnt/keepclip/checkpoints"}
    for option, value in defaults.items():
        if not any(a == option or a.startswith(option + "=") for a in task_args):
            argv += [option, value]
    if "--no-progress" not in argv:
        argv.append("--no-progress")
    try:
        args = add_task_parser().parse_args(argv)
    except SystemExit:
        raise RenderError("the add-task arguments do not parse (see the message above)") from None
    if args.workers < 1:
        raise RenderError("--workers must be >= 1 on Kubernetes: training runs on the job's GPU workers")
    job["spec"]["entrypoint"] = shlex.join([*ENTRYPOINT, *argv])
    if len(args.name) <= 63:  # a label value's limit; task names may have 64 characters
        job["metadata"]["labels"]["keepclip.io/task"] = args.name
    else:
        job["metadata"]["labels"].pop("keepclip.io/task", None)
    group.update(replicas=args.workers, minReplicas=args.workers, maxReplicas=args.workers)
    if image:
        for pod in pod_templates(job):
            for container in pod["spec"]["containers"]:
                container["image"] = image
    return job


def pod_templates(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every Pod template of a RayService or RayJob (head, then worker groups)."""
    spec = manifest["spec"]
    cluster = spec.get("rayClusterConfig") or spec.get("rayClusterSpec")
    return [cluster["headGroupSpec"]["template"], *(g["template"] for g in cluster.get("workerGroupSpecs", []))]


# ----------------------------------------------------------------------------- checks
def problems() -> list[str]:
    """What is out of step between the one source (serve-config.yaml) and the manifests; empty when all is well."""
    found = []
    try:
        if RAYSERVICE.read_text() != rendered_rayservice():
            found.append(f"{RAYSERVICE.name}: serveConfigV2 differs from {SERVE_CONFIG.name}; run `python k8s/render.py`")
    except RenderError as e:
        found.append(str(e))
    service = yaml.safe_load(RAYSERVICE.read_text())
    job = yaml.safe_load(RAYJOB_TEMPLATE.read_text())
    app_args = serve_config()["applications"][0]["args"]
    args = add_task_parser().parse_args(entrypoint_argv(job["spec"]["entrypoint"]))
    for option, key in PINNED.items():
        if str(getattr(args, key)) != str(app_args[key]):
            found.append(f"{RAYJOB_TEMPLATE.name}: {option} {getattr(args, key)} differs from args.{key} "
                         f"{app_args[key]} in {SERVE_CONFIG.name}")
    if args.workers != gpu_group(job["spec"])["replicas"]:
        found.append(f"{RAYJOB_TEMPLATE.name}: --workers {args.workers} but {gpu_group(job['spec'])['replicas']} GPU workers")
    images = {c["image"] for m in (service, job) for p in pod_templates(m) for c in p["spec"]["containers"]}
    if len(images) != 1:
        found.append(f"the Pods use different images {sorted(images)}; use one image everywhere")
    ray_versions = {service["spec"]["rayClusterConfig"]["rayVersion"], job["spec"]["rayClusterSpec"]["rayVersion"]}
    if len(ray_versions) != 1:
        found.append(f"rayVersion differs between the RayService and the RayJob: {sorted(ray_versions)}")
    return found


# ----------------------------------------------------------------------------- command line
def _pop_option(argv: list[str], option: str) -> tuple[list[str], str | None]:
    """argv without `option VALUE` / `option=VALUE` (add-task has no such option), and VALUE."""
    rest, value, i = [], None, 0
    while i < len(argv):
        if argv[i] == option:
            if i + 1 >= len(argv):
                raise RenderError(f"{option} needs a value")
            value, i = argv[i + 1], i + 2
            continue
        if argv[i].startswith(option + "="):
            value = argv[i].split("=", 1)[1]
        else:
            rest.append(argv[i])
        i += 1
    return rest, value


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["rayjob"]:
            task_args, image = _pop_option(argv[1:], "--image")
            if not task_args or task_args[0] in ("-h", "--help"):
                print("usage: python k8s/render.py rayjob NAME --data PATH [add-task options] [--image IMAGE]\n\n"
                      "Prints a RayJob that learns task NAME (add-task options: python -m training.add_task --help;\n"
                      f"{', '.join(PINNED)} come from k8s/serve-config.yaml).")
                return 0
            job = rayjob(task_args, image=image)
            sys.stdout.write(yaml.safe_dump(job, sort_keys=False, width=1000))
            return 0
        parser = argparse.ArgumentParser(prog="python k8s/render.py", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--check", action="store_true", help="only check; exit 1 when a manifest is out of step")
        ns = parser.parse_args(argv)
        if not ns.check:
            text = rendered_rayservice()
            if text != RAYSERVICE.read_text():
                RAYSERVICE.write_text(text)
                print(f"updated serveConfigV2 in {RAYSERVICE}")
        found = problems()
        for problem in found:
            print(f"k8s: {problem}", file=sys.stderr)
        return 1 if found else 0
    except RenderError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
