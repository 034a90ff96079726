"""ONNX graphs of a frozen backbone's towers, exported once per backbone and cached.

Four graphs per backbone for prompts in the first blocks (the reference placement), all fp32, batch dimension dynamic:

| graph | inputs | output |
|---|---|---|
| `image_frozen` | `images (B, 3, H, W)` | `features (B, D)`, L2-normalised |
| `image_prompted` | `images`, `prefix_keys`/`prefix_values (B, depth, n, width)`, `prefix_mask (B, depth, n)`, `weight (B,)` | `features (B, D)` |
| `text_frozen` | `tokens (N, L)` int64 | `features (N, D)` |
| `text_prompted` | `tokens`, `prefix_keys`/`prefix_values (depth, n, width)`, `prefix_mask (depth, n)`, `weight (1,)` | `features (N, D)` |

and four for prompts in the last `depth_top` image blocks (add-task's default placement), split at block
`k = blocks − depth_top` so that a batch runs the blocks below k once for routing and answering, as the torch engine
does (`service/runtime.py`, `Resume`); the last block of the two top graphs computes the pooled token only
(`PromptedCLIP.encode_pooled_from`):

| graph | inputs | output |
|---|---|---|
| `image_bottom` | `images` | `activations (B, T, width)` entering block k |
| `image_top_frozen` | `activations` | `features (B, D)` (pooled last block), `last (B, T, width)` entering the last block |
| `image_top_prompted` | `activations`, prompts as `image_prompted`'s with `depth_top` layers | `features (B, D)` (pooled) |
| `image_last` | `last` | `features (B, D)`: the whole last block, the exact frozen features |

The top graphs are exported when the tower has the layout (`PromptedCLIP.pools_first_token`); otherwise
`depth_top` is 0 and tasks placed there are served by torch. A task of depth d < `depth_top` sits in the graph's
last d layers; the layers below are padding.

Prompts are graph *inputs*, so one prompted graph serves every task, present and future: publishing a task never
re-exports anything. The image side is per sample (one call serves a mixed batch of tasks; a sample with no task
gets zeros and `weight = 0`); the text side takes one task per call, with a scalar weight.

**Padding.** `depth` and `n` are fixed in the graph (the backbone-wide maximum, by default `PromptConfig()`'s 8 and 8,
capped at each tower's layers). A task with fewer layers or prefixes is zero-padded, and padding must not change the
result: a zero key row still takes softmax mass (`exp(q·0) = 1`), which would dilute the task's real prefixes. So
`prefix_mask` (1 = real prefix, 0 = padding) drives the logits of padded slots to `MASKED_LOGIT` (-1e9, finite, in
`prompts.py`), whose `exp` underflows to exactly 0 in fp32: the real slots' softmax is unchanged, whatever the padded
slots hold.
A layer beyond the task's depth is all padding: its branch is multiplied by 0 (the mask's row maximum), so it adds
exactly 0 (and the finite fill keeps its softmax NaN-free, which `-inf` would not).

**How the graphs are built.** No copy of open_clip's code: for the export, each prompted block's `attn` (the first
`depth`, or the top graph's) is temporarily replaced (peft-style `setattr` on the parent block, restored afterwards) by `_FeedAttention`, the torch
engine's `PromptedAttention` with its prompts read from the graph inputs (handed over in a `ScopedValue`, the carrier
of the torch engine's routing): every sample goes through the same `fused_attention` the torch engine runs (`backbone/prompts.py`: one in-projection, the frozen attention plus
`w · softmax(q P_Kᵀ/√h + mask) P_V`, one output projection). The export modules then call open_clip's own
`encode_image` / `encode_text`. The exporter is torch's TorchScript-based one (`dynamo=False`): it exports these
towers in seconds with `dynamic_axes`, needs only the `onnx` package, and supports opsets down to 7 (so the opset is a
real setting); see `export_graphs`.

**Cache.** `OnnxCache(root).ensure(backbone, spec)` -> a directory `<root>/<name>-<sha256[:16]>/` with the
`.onnx` files and `manifest.json` (spec, opset, torch/onnx/onnxruntime versions, SHA-256 of every graph). A missing,
stale (other spec or versions) or damaged (checksum) cache is re-exported. Exports are written to a temporary
directory beside it and renamed into place in one step, so concurrent replicas never read half-written files.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import nn

from .loading import Backbone, sha256_file
from .prompted_clip import PromptedCLIP
from .prompts import PromptConfig, PromptedAttention, RoutingState, SamplePrompts, default_depth
from .scoped import ScopedValue

log = logging.getLogger(__name__)

GRAPHS = ("image_frozen", "image_prompted", "text_frozen", "text_prompted")
TOP_GRAPHS = ("image_bottom", "image_top_frozen", "image_top_prompted", "image_last")  # when spec.depth_top > 0
MANIFEST = "manifest.json"
FORMAT = 3  # bump when the graphs change (inputs, outputs or math): older caches are then re-exported
# 2: prompted blocks are `fused_attention` (one in-projection, one W_o), no longer frozen module + branch
# 3: the top graphs (prompts in the last blocks)
DEFAULT_OPSET = 17  # LayerNormalization is native from 17; onnxruntime >= 1.14 runs it


class OnnxExportError(RuntimeError):
    """A tower could not be exported (or the exported graph not loaded); the message names the graph, op and opset."""


@dataclass(frozen=True)
class GraphSpec:
    """What the prompted graphs accept; part of the cache key (a different spec is a stale cache)."""

    depth_image: int  # prompted blocks of the image tower in the graph (tasks with fewer are zero-padded)
    depth_text: int  # same for the text tower
    n_prefix: int  # prefix slots per block (tasks with fewer are padded and masked)
    width_image: int  # image tower attention width
    width_text: int  # text tower attention width
    image_size: tuple[int, int]  # (H, W) the image graphs were traced with (static)
    context_length: int  # L of the text graphs (static)
    opset: int = DEFAULT_OPSET
    depth_top: int = 0  # image blocks the top graphs prompt (the last ones); 0: no top graphs

    @property
    def graphs(self) -> tuple[str, ...]:
        return GRAPHS + (TOP_GRAPHS if self.depth_top else ())

    @classmethod
    def for_backbone(
        cls, backbone: Backbone, depth: int | None = None, n_prefix: int | None = None, opset: int = DEFAULT_OPSET,
        depth_top: int | None = None,
    ) -> "GraphSpec":
        """Depth and n default to `PromptConfig()`'s (8, 8), the depth capped at each tower's layers; `depth_top` to
        add-task's default depth (`default_depth`), 0 when the tower cannot be split and pooled there."""
        default = PromptConfig()
        depth = default.depth if depth is None else depth
        n_prefix = default.n_prefix if n_prefix is None else n_prefix
        blocks = len(backbone.image_blocks)
        if not PromptedCLIP(backbone).pools_first_token():
            depth_top = 0
        depth_top = min(default_depth(blocks) if depth_top is None else depth_top, blocks)
        size = backbone.model.visual.image_size
        return cls(
            depth_image=min(depth, len(backbone.image_blocks)),
            depth_text=min(depth, len(backbone.text_blocks)),
            n_prefix=n_prefix,
            width_image=_base(backbone.image_blocks[0].attn).in_proj_weight.shape[1],
            width_text=_base(backbone.text_blocks[0].attn).in_proj_weight.shape[1],
            image_size=tuple(size) if isinstance(size, (tuple, list)) else (size, size),
            context_length=_context_length(backbone),
            opset=opset,
            depth_top=depth_top,
        )

    def depth(self, tower: str) -> int:
        return self.depth_image if tower == "visual" else self.depth_text

    def top_block(self, blocks: int) -> int:
        """k: the first image block of the top graphs, in a tower of `blocks` blocks."""
        return blocks - self.depth_top

    def width(self, tower: str) -> int:
        return self.width_image if tower == "visual" else self.width_text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_size"] = list(self.image_size)
        return d


def _base(attn: nn.Module) -> nn.Module:
    """The frozen attention module, under a `PromptedAttention` wrapper if one was injected."""
    return attn.get_base_layer() if isinstance(attn, PromptedAttention) else attn


def _context_length(backbone: Backbone) -> int:
    text = getattr(backbone.model, "text", None)
    return int(getattr(text if text is not None else backbone.model, "context_length"))


# ----------------------------------------------------------------------------- export-time modules


class _FeedInputs(NamedTuple):
    """The prompt inputs of the running export forward: set by the tower module, read by every layer wrapper
    (through a `ScopedValue`, the carrier of the torch engine's routing)."""

    keys: torch.Tensor  # (B or 1, depth, n, D)
    values: torch.Tensor
    mask: torch.Tensor  # (B or 1, depth, n)
    weight: torch.Tensor  # (B,) or (1,)


class _FeedAttention(PromptedAttention):
    """Export-time stand-in for one block's `attn`: the torch wrapper itself, with this layer's prompts read from the
    graph inputs instead of routed from task slots. Every sample goes through `fused_attention` (one without a task
    has zero prompts and w = 0), so the graph holds exactly the math the torch engine runs."""

    def __init__(self, base: nn.Module, tower: str, layer: int, feed: ScopedValue[_FeedInputs | None]):
        super().__init__(base, tower, RoutingState())
        self.layer = layer
        self.feed = feed

    def sample_prompts(self, batch: int) -> SamplePrompts:
        f, i = self.feed.get(), self.layer
        return SamplePrompts(None, f.keys[:, i], f.values[:, i], f.mask[:, i], f.weight)


def _fed_blocks(graph: str, spec: GraphSpec, image_blocks: int) -> dict[str, range]:
    """The blocks of each tower whose prompts `graph` takes as inputs (the feed's layer i is the range's i-th)."""
    if graph == "image_top_prompted":
        return {"visual": range(spec.top_block(image_blocks), image_blocks)}
    if graph.endswith("prompted"):
        return {tower: range(spec.depth(tower)) for tower in ("visual", "text")}
    return {}


@contextmanager
def _export_mode(backbone: Backbone, feed: ScopedValue[_FeedInputs | None] | None,
                 fed: dict[str, range]) -> Iterator[None]:
    """Inject the feed wrappers into the `fed` blocks of each tower (restored on exit); MHA fast path off.

    The fast path (`torch._native_multi_head_attention`) has no ONNX export; the slow path is the same math. The
    backbone must not serve torch forwards while this runs (the runtime exports before it serves).
    """
    swapped = []
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        for tower, blocks in (("visual", backbone.image_blocks), ("text", backbone.text_blocks)):
            for layer, index in enumerate(fed.get(tower, ())):
                block = blocks[index]
                swapped.append((block, block.attn))
                block.attn = _FeedAttention(_base(block.attn), tower, layer, feed)
        yield
    finally:
        for block, attn in swapped:
            block.attn = attn
        torch.backends.mha.set_fastpath_enabled(fastpath)


class TowerGraph(nn.Module):
    """One graph's forward: open_clip's own `encode_image` / `encode_text`, L2-normalised. A prompted graph (with a
    feed) takes the prompt inputs after the images or tokens and puts them where the layer wrappers read them."""

    def __init__(self, clip: nn.Module, tower: str, feed: ScopedValue[_FeedInputs | None] | None = None):
        super().__init__()
        self.clip = clip
        self.tower = tower
        self.feed = feed

    def forward(self, x: torch.Tensor, *prompts: torch.Tensor) -> torch.Tensor:
        encode = self.clip.encode_image if self.tower == "visual" else self.clip.encode_text
        if self.feed is None:
            return encode(x, normalize=True)
        keys, values, mask, weight = prompts
        if self.tower == "text":  # one task per call: a leading batch dim of 1 broadcasts over the N sequences
            keys, values, mask = keys[None], values[None], mask[None]
        with self.feed.use(_FeedInputs(keys, values, mask, weight)):
            return encode(x, normalize=True)


class ImageTopGraph(nn.Module):
    """The forward of one of the split image graphs (`TOP_GRAPHS`), `PromptedCLIP`'s own steps from block `block`.
    The prompted top's wrappers read their prompts from the feed, so it names no task."""

    def __init__(self, model: PromptedCLIP, graph: str, block: int, feed: ScopedValue[_FeedInputs | None] | None = None):
        super().__init__()
        self.model, self.graph, self.block, self.feed = model, graph, block, feed

    def forward(self, x: torch.Tensor, *prompts: torch.Tensor):
        model, block = self.model, self.block
        if self.graph == "image_bottom":
            return model.image_activations(x, block)
        if self.graph == "image_top_frozen":
            return model.encode_pooled_from(x, block, normalize=True)
        if self.graph == "image_last":
            return model.finish_frozen(x, normalize=True)
        with self.feed.use(_FeedInputs(*prompts)):
            return model.encode_image_from(x, block, None, normalize=True, pooled=True)


# ----------------------------------------------------------------------------- export


OUTPUTS = {"image_bottom": ["activations"], "image_top_frozen": ["features", "last"]}  # the others: ["features"]
TOP_INPUT = {"image_top_frozen": "activations", "image_top_prompted": "activations", "image_last": "last"}


def example_inputs(graph: str, spec: GraphSpec, batch: int = 2, model: PromptedCLIP | None = None
                   ) -> dict[str, torch.Tensor]:
    """Inputs of `graph` by name, shaped per `spec` (random images/prompts, all prefixes real, w = 1); a top graph's
    activations are `model`'s for random images."""
    g = torch.Generator().manual_seed(0)
    if graph.startswith("image"):
        inputs = {"images": torch.randn(batch, 3, *spec.image_size, generator=g)}
        lead, tower = (batch,), "visual"
    else:
        inputs = {"tokens": torch.randint(1, 1000, (batch, spec.context_length), generator=g)}
        lead, tower = (), "text"
    if graph in TOP_INPUT:
        blocks = len(model.backbone.image_blocks)
        block = spec.top_block(blocks) if graph != "image_last" else blocks - 1
        images = inputs.pop("images").to(model.backbone.device)
        with torch.no_grad():
            inputs[TOP_INPUT[graph]] = model.image_activations(images, block).cpu()
    if graph.endswith("prompted"):
        depth = spec.depth_top if graph == "image_top_prompted" else spec.depth(tower)
        shape = (*lead, depth, spec.n_prefix, spec.width(tower))
        inputs["prefix_keys"] = torch.randn(shape, generator=g) * 0.02
        inputs["prefix_values"] = torch.randn(shape, generator=g) * 0.02
        inputs["prefix_mask"] = torch.ones(shape[:-1])
        inputs["weight"] = torch.ones(batch if lead else 1)
    return inputs


def _dynamic_axes(graph: str, inputs: list[str]) -> dict[str, dict[int, str]]:
    axes = {name: {0: "batch"} for name in OUTPUTS.get(graph, ["features"])}
    if graph.startswith("image"):
        axes.update({name: {0: "batch"} for name in inputs[:1]})
        if graph.endswith("prompted"):
            axes.update({k: {0: "batch"} for k in ("prefix_keys", "prefix_values", "prefix_mask", "weight")})
    else:
        axes["tokens"] = {0: "batch"}
    return axes


def _unsupported_op(error: BaseException) -> str | None:
    text = str(error)
    m = re.search(r"operator '([\w:.]+)'", text) or re.search(r"failed on (\w+)", text) or re.search(r"(aten::\w+)", text)
    return m.group(1) if m else None


def export_graph(backbone: Backbone, graph: str, spec: GraphSpec, path: str | os.PathLike) -> None:
    """Export one graph to `path` (TorchScript-based exporter, fp32, dynamic batch); OnnxExportError on failure."""
    feed = ScopedValue(None) if graph.endswith("prompted") else None
    clip = backbone.model
    model = PromptedCLIP(backbone)
    if graph in TOP_GRAPHS:
        module = ImageTopGraph(model, graph, spec.top_block(len(backbone.image_blocks)), feed).eval()
    else:
        module = TowerGraph(clip, "visual" if graph.startswith("image") else "text", feed).eval()
    inputs = example_inputs(graph, spec, model=model)
    device = next(clip.parameters()).device
    args = tuple(t.to(device) for t in inputs.values())
    try:
        with _export_mode(backbone, feed, _fed_blocks(graph, spec, len(backbone.image_blocks))), torch.no_grad(), \
                _quiet_exporter():
            torch.onnx.export(
                module, args, str(path),
                dynamo=False,  # TorchScript exporter: see the module docstring
                input_names=list(inputs), output_names=OUTPUTS.get(graph, ["features"]),
                dynamic_axes=_dynamic_axes(graph, list(inputs)),
                opset_version=spec.opset, do_constant_folding=True,
            )
    except Exception as e:  # noqa: BLE001 - every exporter failure becomes one clear error
        op = _unsupported_op(e)
        raise OnnxExportError(
            f"exporting the {graph} graph of {backbone.fingerprint.name} to ONNX opset {spec.opset} failed"
            f"{f' at operator {op}' if op else ''}: {type(e).__name__}: {str(e).strip().splitlines()[0][:400]}"
        ) from e


@contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The TorchScript exporter warns that it is deprecated on every call; say it once in our own log instead."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


def export_graphs(backbone: Backbone, out_dir: str | os.PathLike, spec: GraphSpec) -> dict[str, float]:
    """All the spec's graphs into `out_dir`; -> seconds per graph. Checks each loads in onnxruntime (OnnxExportError if not)."""
    import onnxruntime as ort

    out_dir = Path(out_dir)
    seconds = {}
    for graph in spec.graphs:
        start = time.perf_counter()
        path = out_dir / f"{graph}.onnx"
        export_graph(backbone, graph, spec, path)
        try:  # an opset or op onnxruntime cannot run is an export failure too, found here rather than at serve time
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001
            raise OnnxExportError(
                f"the exported {graph} graph (opset {spec.opset}) does not load in onnxruntime {ort.__version__}: "
                f"{type(e).__name__}: {str(e).strip()[:400]}"
            ) from e
        seconds[graph] = time.perf_counter() - start
    return seconds


# ----------------------------------------------------------------------------- cache


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/keepclip/onnx`, else `~/.cache/keepclip/onnx` (the service setting `onnx_cache_dir` overrides)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "keepclip" / "onnx"


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime as ort
    import open_clip

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
            "open_clip": open_clip.__version__}


@dataclass(frozen=True)
class CachedGraphs:
    directory: Path
    spec: GraphSpec
    exported: bool  # True if this call exported (cache miss, stale or damaged), False if the cache was reused
    export_seconds: float  # 0 when reused

    def path(self, graph: str) -> Path:
        return self.directory / f"{graph}.onnx"


class OnnxCache:
    """Graphs per backbone fingerprint under `root`, re-exported when missing, stale or damaged."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()

    def directory(self, backbone: Backbone) -> Path:
        fp = backbone.fingerprint
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", fp.name)[:80] or "model"
        return self.root / f"{name}-{fp.sha256[:16]}"

    def manifest_for(self, backbone: Backbone, spec: GraphSpec) -> dict[str, Any]:
        return {"format": FORMAT, "backbone": backbone.fingerprint.to_dict(), "spec": spec.to_dict(),
                "graphs": list(spec.graphs), "versions": _versions(), "exporter": "torchscript"}

    def check(self, directory: Path, expected: dict[str, Any]) -> str | None:
        """None if `directory` holds a complete, intact cache for `expected`; else why not."""
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except FileNotFoundError:
            return "no cache"
        except (OSError, ValueError) as e:
            return f"unreadable manifest ({e})"
        if not isinstance(manifest, dict):
            return "manifest is not a mapping"
        for key, value in expected.items():
            if manifest.get(key) != value:
                return f"stale: {key} is {manifest.get(key)!r}, expected {value!r}"
        sums = manifest.get("sha256", {})
        for graph in expected["graphs"]:
            path = directory / f"{graph}.onnx"
            if not path.is_file():
                return f"damaged: {path.name} is missing"
            if sums.get(graph) != sha256_file(path):
                return f"damaged: checksum of {path.name} does not match the manifest"
        return None

    def ensure(self, backbone: Backbone, spec: GraphSpec) -> CachedGraphs:
        """The cached graphs of `backbone`, exporting them first if needed (OnnxExportError when that fails)."""
        directory = self.directory(backbone)
        expected = self.manifest_for(backbone, spec)
        why = self.check(directory, expected)
        if why is None:
            log.info("ONNX graphs of %s reused from %s", backbone.fingerprint.name, directory)
            return CachedGraphs(directory, spec, exported=False, export_seconds=0.0)
        log.info("exporting ONNX graphs of %s to %s (%s)", backbone.fingerprint.name, directory, why)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=self.root))
        try:
            start = time.perf_counter()
            seconds = export_graphs(backbone, tmp, spec)
            total = time.perf_counter() - start
            manifest = dict(expected, sha256={g: sha256_file(tmp / f"{g}.onnx") for g in spec.graphs},
                            export_seconds={g: round(s, 3) for g, s in seconds.items()},
                            created_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            _write_json(tmp / MANIFEST, manifest)
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared by replicas
            self._install(tmp, directory, expected)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("exported ONNX graphs of %s in %.1f s (%s)", backbone.fingerprint.name, total,
                 ", ".join(f"{g} {s:.1f} s" for g, s in seconds.items()))
        return CachedGraphs(directory, spec, exported=True, export_seconds=total)

    def _install(self, tmp: Path, directory: Path, expected: dict[str, Any]) -> None:
        """Rename the finished export into place; a stale/damaged one is moved aside first, a good one kept."""
        for _ in range(3):
            try:
                os.rename(tmp, directory)  # atomic; fails if `directory` exists and is not empty
                return
            except OSError:
                if not directory.exists():
                    continue
                if self.check(directory, expected) is None:  # another replica finished first: use theirs
                    return
                aside = directory.with_name(f".{directory.name}.old-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(directory, aside)
                except OSError:
                    continue
                shutil.rmtree(aside, ignore_errors=True)
        raise OnnxExportError(f"could not move the exported graphs into {directory}")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

