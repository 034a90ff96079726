"""Load a frozen open_clip CLIP the open_clip way: model name (or config JSON) + pretrained tag (or checkpoint).

Architecture ("which model") and weights ("which numbers") stay apart, and both end up in the backbone
fingerprint that every task artifact records: the model name plus the SHA-256 of the weights.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import urlparse

import open_clip
import torch
from torch import nn

log = logging.getLogger(__name__)

SUPPORTED = (
    "keepclip supports open_clip CLIP models whose image tower is open_clip's native VisionTransformer and whose "
    "text tower is open_clip's native text transformer (e.g. ViT-B-32, ViT-B-16, ViT-L-14, or a config JSON of "
    "that family)"
)
NO_WEIGHTS = ("", "none", "random")  # `--pretrained none`: random init (tiny test configs)


class BackboneError(RuntimeError):
    """A backbone that cannot be loaded; the message says why and what to do instead."""


class UnsupportedBackbone(BackboneError):
    pass


class WeightsUnavailable(BackboneError):
    pass


@dataclass(frozen=True)
class BackboneFingerprint:
    """Identifies architecture + weights; a task made for one backbone is refused by another."""

    name: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "sha256": self.sha256}


@dataclass
class Backbone:
    """A frozen open_clip CLIP with its eval preprocess and tokenizer."""

    model: nn.Module  # open_clip CLIP / CustomTextCLIP, eval mode, requires_grad=False everywhere
    preprocess: Callable  # PIL image -> (3, H, W) float tensor, open_clip's eval transform
    tokenizer: Callable  # list[str] -> (N, context_length) int64 tokens
    fingerprint: BackboneFingerprint
    device: torch.device

    @property
    def image_blocks(self) -> nn.ModuleList:
        return self.model.visual.transformer.resblocks

    @property
    def text_blocks(self) -> nn.ModuleList:
        text = getattr(self.model, "text", None)  # CustomTextCLIP keeps its text tower in `.text`
        return (text if text is not None else self.model).transformer.resblocks


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    return device


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, e.g. a container's cpuset), else the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """Order-independent over names, exact over values: name, dtype, shape and raw bytes of every tensor."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _resolve_config(model: str) -> tuple[str, dict[str, Any]]:
    """Model name + its config dict; a path to a config JSON is registered with open_clip under its file stem."""
    path = Path(model)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise BackboneError(f"model config file not found: {path}")
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BackboneError(f"model config {path} is not valid JSON: {e}") from e
        missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
        if missing:
            raise BackboneError(f"model config {path} lacks the open_clip keys {missing}")
        open_clip.add_model_config(path)
        return path.stem, cfg
    cfg = open_clip.get_model_config(model)
    if cfg is None:
        raise BackboneError(
            f"unknown open_clip model '{model}': pass a name from open_clip.list_models() "
            "or the path to a model-config JSON"
        )
    return model, cfg


def check_supported(name: str, cfg: dict[str, Any]) -> None:
    """Refuse, before anything is downloaded, towers the attention wrappers cannot serve."""
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    reasons = []
    if vision.get("timm_model_name"):
        reasons.append(f"its image tower is the timm model '{vision['timm_model_name']}'")
    if isinstance(vision.get("layers"), (list, tuple)):
        reasons.append("its image tower is a ModifiedResNet")
    if text.get("hf_model_name"):
        reasons.append(f"its text tower is the Hugging Face model '{text['hf_model_name']}'")
    if "multimodal_cfg" in cfg:
        reasons.append("it is a CoCa captioning model")
    if reasons:
        raise UnsupportedBackbone(f"model '{name}' is not supported: {'; '.join(reasons)}. {SUPPORTED}.")


def _fetch_pretrained(name: str, tag: str, cache_dir: str | None) -> str:
    pretrained_cfg = open_clip.get_pretrained_cfg(name, tag)
    try:
        with _cache_only_when_offline():
            return open_clip.download_pretrained(pretrained_cfg, cache_dir=cache_dir)
    except Exception as e:  # network, hub or disk errors all mean the same thing to the user
        raise WeightsUnavailable(
            f"could not fetch the pretrained weights '{tag}' for '{name}' ({type(e).__name__}: {e}). "
            "Without network access, pass a local checkpoint instead: --pretrained /path/to/weights.safetensors "
            "(or an open_clip .pt/.bin state dict), or set KEEPCLIP_PRETRAINED."
        ) from e


@contextmanager
def _cache_only_when_offline(timeout_s: float = 3.0) -> Iterator[None]:
    """Without a route to the Hugging Face Hub, huggingface_hub retries for about 50 s before it looks in its cache
    (measured, no DNS). When the hub's host cannot be reached directly (and no proxy is configured), go to the cache
    at once, as HF_HUB_OFFLINE=1 would: cached weights load, missing ones fail in a second."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or any(os.environ.get(v) for v in _PROXY_VARIABLES) or _reachable(constants.ENDPOINT, timeout_s):
        yield
        return
    log.warning("%s cannot be reached: looking for the weights in the local Hugging Face cache only", constants.ENDPOINT)
    constants.HF_HUB_OFFLINE = True  # read at call time (is_offline_mode); HF_HUB_OFFLINE in the environment is read once
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = False


_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _reachable(url: str, timeout_s: float) -> bool:
    """A TCP connection to the URL's host opens within timeout_s (name resolution in a thread: it has no timeout)."""
    parts = urlparse(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    pool = ThreadPoolExecutor(1)
    try:
        address = pool.submit(socket.getaddrinfo, parts.hostname, port, type=socket.SOCK_STREAM).result(timeout_s)
        socket.create_connection(address[0][4][:2], timeout=timeout_s).close()
        return True
    except (OSError, FuturesTimeout):
        return False
    finally:
        pool.shutdown(wait=False)  # a resolver that hangs is left behind, not waited for


def tag_needs_quick_gelu(name: str, tag: str | None) -> bool:
    """OpenAI's weights were trained with QuickGELU; open_clip only warns when `ViT-B-16` + `openai` would use GELU."""
    return bool(tag) and bool((open_clip.get_pretrained_cfg(name, tag) or {}).get("quick_gelu", False))


def _resolve_weights(name: str, pretrained: str | None, cache_dir: str | None) -> tuple[str | None, str | None]:
    """-> (value for open_clip's `pretrained`, local file to fingerprint); (None, None) for random init."""
    if pretrained is None or str(pretrained).strip().lower() in NO_WEIGHTS:
        log.warning("backbone '%s' is randomly initialised (no pretrained weights)", name)
        return None, None
    if os.path.isfile(pretrained):
        return pretrained, pretrained
    _check_tag(name, pretrained)
    return pretrained, _fetch_pretrained(name, pretrained, cache_dir)


def _check_tag(name: str, pretrained: str) -> None:
    if pretrained not in open_clip.list_pretrained_tags_by_model(name):
        raise BackboneError(
            f"pretrained '{pretrained}' is neither a checkpoint file nor a known open_clip tag for '{name}' "
            f"(tags: {open_clip.list_pretrained_tags_by_model(name) or 'none'})"
        )


def check_backbone(model: str, pretrained: str | None) -> None:
    """What `load_backbone` refuses before it reads or downloads any weights (a missing or bad model config, an
    unsupported tower, a weights file or tag that does not exist), for a command whose backbone loads elsewhere:
    `keepclip serve` fails at once, in one line, rather than once its replicas have tried."""
    name, cfg = _resolve_config(model)
    check_supported(name, cfg)
    if pretrained is not None and str(pretrained).strip().lower() not in NO_WEIGHTS and not os.path.isfile(pretrained):
        _check_tag(name, pretrained)


def _check_towers(name: str, backbone: Backbone) -> None:
    """The config check covers known variants; this catches anything else that slipped through."""
    try:
        blocks = [backbone.image_blocks, backbone.text_blocks]
    except AttributeError as e:
        raise UnsupportedBackbone(f"model '{name}' has no native transformer towers ({e}). {SUPPORTED}.") from e
    for block in (b for tower in blocks for b in tower):
        attn = getattr(block, "attn", None)
        if attn is None or getattr(attn, "in_proj_weight", None) is None or not hasattr(attn, "out_proj"):
            raise UnsupportedBackbone(f"model '{name}' has attention without a fused in-projection. {SUPPORTED}.")


def freeze(model: nn.Module) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def load_backbone(
    model: str = "ViT-B-16",
    pretrained: str | None = "openai",
    device: str | torch.device = "auto",
    cache_dir: str | None = None,
) -> Backbone:
    """Load a frozen CLIP by open_clip name + tag, or by config JSON + local checkpoint (`pretrained=None`: random)."""
    name, cfg = _resolve_config(model)
    check_supported(name, cfg)
    pretrained_arg, weights_file = _resolve_weights(name, pretrained, cache_dir)
    target = resolve_device(device)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained_arg,
            device=target,
            cache_dir=cache_dir,
            precision="fp32",
            force_quick_gelu=tag_needs_quick_gelu(name, pretrained_arg) and not cfg.get("quick_gelu", False),
        )
    except Exception as e:  # config is validated already: this is an unreadable checkpoint or another architecture's
        raise BackboneError(f"could not load weights '{pretrained}' into '{name}': {type(e).__name__}: {str(e)[:500]}") from e
    sha = sha256_file(weights_file) if weights_file else sha256_tensors(clip.state_dict().items())
    backbone = Backbone(
        model=freeze(clip),
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),
        fingerprint=BackboneFingerprint(name=name, sha256=sha),
        device=target,
    )
    _check_towers(name, backbone)
    log.info("loaded backbone %s (weights sha256 %s…) on %s", name, sha[:12], target)
    return backbone
