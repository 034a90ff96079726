"""Shared fixtures: tiny random open_clip configs (registered from JSON, never mocks) and the proxy from ../shared."""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from backbone import Backbone, PromptedCLIP, image_features, load_backbone
from testkit.net import free_port  # noqa: F401 - re-exported for the e2e tests

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("KEEPCLIP_SHARED", REPO.parent / "shared")).resolve()
TINY_CONFIGS = REPO / "tests" / "fixtures" / "model_configs"
TINY_NAMES = ("keepclip-tiny-a", "keepclip-tiny-b")  # a: nn.MultiheadAttention blocks; b: open_clip's own Attention
PROXY_DIR = SHARED / "models" / "proxy-clip"


def tiny_backbone(name: str = "keepclip-tiny-a", seed: int = 0) -> Backbone:
    """A randomly initialised tiny native open_clip CLIP, the same weights for the same seed."""
    torch.manual_seed(seed)
    return load_backbone(str(TINY_CONFIGS / f"{name}.json"), pretrained=None, device="cpu")


def randomize_prompts(model: PromptedCLIP, task: str, seed: int) -> None:
    """Stand-in for training: non-zero P_K and P_V, so the branch really changes outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.prompt_parameters(task):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def random_images(backbone: Backbone, n: int, seed: int = 0) -> torch.Tensor:
    size = backbone.model.visual.image_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=TINY_NAMES)
def tiny_name(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (PROXY_DIR / "proxy-clip.safetensors").is_file() or not (SHARED / "data").is_dir():
        pytest.skip(f"needs the proxy model and data in {SHARED} (../shared beside the checkout; absent here)")
    return SHARED


@pytest.fixture(scope="session")
def proxy(shared_dir) -> PromptedCLIP:
    backbone = load_backbone(str(PROXY_DIR / "proxy-clip.json"), str(PROXY_DIR / "proxy-clip.safetensors"), "cpu")
    return PromptedCLIP(backbone)


@pytest.fixture(scope="session")
def domain(shared_dir, proxy):
    """domain(name, split, limit=None) -> (features (N, D), labels (N,), class names), features cached per session."""

    @functools.cache
    def load(name: str, split: str, limit: int | None = None):
        data = np.load(shared_dir / "data" / name / f"{split}.npz")
        images, labels = data["images"], data["labels"]
        if limit is not None:  # arrays are ordered by label: take an even, seeded subsample
            keep = np.sort(np.random.default_rng(0).permutation(len(labels))[:limit])
            images, labels = images[keep], labels[keep]
        names = json.loads((shared_dir / "data" / name / "classnames.json").read_text())
        return image_features(proxy, images), torch.as_tensor(labels), names

    return load


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (start/stop costs ~10 s); 4 logical CPUs on any machine; the
    service's default ingress (HAProxy where installed), as `keepclip serve` starts it."""
    import ray

    from service.ingress import prepare_local_cluster
    from service.settings import ServiceSettings

    prepare_local_cluster(ServiceSettings())
    ray.init(
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # workers import backbone, tests.*, ...
    )
    yield ray
    ray.shutdown()
