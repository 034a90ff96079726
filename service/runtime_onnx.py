"""ONNX Runtime implementation of the `Runtime` seam, and the choice between it and torch.

`OnnxRuntime` runs the graphs of `backbone.onnx_export` (frozen and prompted image and text towers, and the image
tower split for prompts in its last blocks), exported once per backbone and cached. Task prompts are graph inputs:
`load_task` only pads the task's tensors to the graph's fixed `depth` × `n` (with a mask, see
`backbone/onnx_export.py`), nothing is re-exported. A prompted image pass gathers, per sample, the prompts of its task
(zeros and `w = 0` for samples without one), so a mixed batch is one call.

A task placed in the last blocks (add-task's default) runs in the split graphs, as the torch engine runs it: while one
is loaded, the frozen pass is `image_bottom` + `image_top_frozen` (provisional features for routing, and a resume
point), the prompted pass resumes from it in `image_top_prompted`, and `finish_frozen` runs `image_last`; its class
text, prompted in the text tower's last blocks, comes from torch (once per task, at load). A task whose depth or
prefix count exceeds the graphs', or an image-text prompt task, is served by the torch path (logged at load), and so
are the samples routed to it. While a residual-prompt task is served there, the image passes go through torch whole
(`images_by_torch`: its frozen pass keeps the activations that task resumes from); otherwise images never touch torch.

`select_runtime(settings)` is what `Engine.from_settings` calls: `runtime = torch | onnx | auto`. `auto` measures
both on a probe batch at startup (frozen + prompted pass, interleaved repeats, figures logged) and keeps the faster.
When the graphs cannot be exported or loaded, the error (graph, operator, opset) is logged and torch serves.

Execution provider: `CUDAExecutionProvider` when onnxruntime-gpu is installed and the backbone is on a CUDA device,
else `CPUExecutionProvider`; intra-op threads = torch's (the cores this process may use, or the replica's share),
all graph optimisations on. A graph's session is opened when first needed: the frozen ones at start, the prompted
ones with the first task that uses them; the whole frozen image graph is closed while the split graphs stand in for it.
"""
from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from backbone import Backbone, PromptConfig, UnknownTask, load_backbone
from backbone.onnx_export import DEFAULT_OPSET, TOP_GRAPHS, CachedGraphs, GraphSpec, OnnxCache
from backbone.prompts import default_depth
from backbone.zeroshot import zero_shot_classifier

from .runtime import Resume, Runtime, TorchRuntime

log = logging.getLogger(__name__)

TOWERS = ("visual", "text")
TEXT_CHUNK = 256  # sequences per text call (bounds activation memory for large class lists)


@dataclass(frozen=True, eq=False)
class _TaskPrompts:
    """One task's prompts padded to the graph's (depth, n); `mask` marks the real prefix slots."""

    keys: dict[str, np.ndarray]  # tower -> (depth, n, width) float32
    values: dict[str, np.ndarray]
    mask: dict[str, np.ndarray]  # tower -> (depth, n) float32, 1 = real prefix


@dataclass(frozen=True)
class _GraphResume(Resume):
    """A resume point kept by the split graphs: its prompted pass runs in `image_top_prompted`, not in torch."""

    def rows(self, index: Sequence[int]) -> "_GraphResume":
        return _GraphResume(self.block, self.activations[list(index)], self.provisional)


def _threads(threads: int | None) -> int:
    """`threads`, else torch's intra-op count: the cores available to this process, or what the replica reserved
    (Ray sets OMP_NUM_THREADS to the replica's CPUs; `torch_threads` sets it explicitly) — so both runtimes get the same."""
    return int(threads) if threads else torch.get_num_threads()


def providers_for(device: torch.device) -> list:
    """CUDA EP when onnxruntime-gpu is installed and the backbone is on a CUDA device; CPU otherwise."""
    import onnxruntime as ort

    if device.type == "cuda" and torch.cuda.is_available():
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        log.warning("the backbone is on %s but onnxruntime has no CUDA provider (install onnxruntime-gpu, extra "
                    "'gpu'): ONNX graphs run on CPU", device)
    return ["CPUExecutionProvider"]


class OnnxRuntime:
    """Frozen and prompted towers in ONNX Runtime; torch only for tasks larger than the graphs."""

    name = "onnx"

    def __init__(
        self,
        backbone: Backbone,
        cache_dir: str | os.PathLike | None = None,
        depth: int | None = None,
        n_prefix: int | None = None,
        opset: int = DEFAULT_OPSET,
        threads: int | None = None,
        providers: list | None = None,
    ):
        import onnxruntime as ort

        self.backbone = backbone
        self.torch = TorchRuntime(backbone)  # tasks the graphs cannot take; shares the backbone's weights
        self.fingerprint = backbone.fingerprint
        self.preprocess = backbone.preprocess
        self.embed_dim = self.torch.embed_dim
        self.spec = GraphSpec.for_backbone(backbone, depth, n_prefix, opset)
        self.graphs: CachedGraphs = OnnxCache(cache_dir).ensure(backbone, self.spec)  # OnnxExportError on failure
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = _threads(threads)
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # idle pool threads block instead of spinning: the engine runs torch/FAISS work between graph calls, and
        # spinning threads would take those cores (measured: torch passes ran up to 50x slower right after a run)
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers or providers_for(backbone.device)
        self._options = opts
        self._sessions: dict[str, Any] = {}  # graph -> InferenceSession, opened when first needed (`_session`)
        self._opening = threading.Lock()
        used = self._session("image_frozen").get_providers()[0]
        self._session("text_frozen")
        self.device = torch.device("cuda", backbone.device.index or 0) if used == "CUDAExecutionProvider" else torch.device("cpu")
        self._scale = self.torch.logit_scale()
        self._tasks: dict[str, _TaskPrompts] = {}  # slot -> padded prompts (graph path, first blocks)
        self._top: dict[str, _TaskPrompts] = {}  # slot -> padded image prompts of the top graphs (last blocks)
        self._torch_tasks: set[str] = set()  # slots served by the torch path (too deep / too many prefixes / image-text)
        self._torch_residual: set[str] = set()  # those with residual prompts: while any is loaded, images go through torch
        log.info("ONNX runtime for %s: %s, %d intra-op threads, graphs %s (prompted depth %d/%d, last %d, n %d)",
                 self.fingerprint.name, used, opts.intra_op_num_threads, self.graphs.directory,
                 self.spec.depth_image, self.spec.depth_text, self.spec.depth_top, self.spec.n_prefix)

    @classmethod
    def load(cls, model: str, pretrained: str | None, device: str = "auto", **kwargs) -> "OnnxRuntime":
        return cls(load_backbone(model, pretrained, device), **kwargs)

    @property
    def image_size(self) -> tuple[int, int]:
        return self.spec.image_size

    def close(self) -> None:
        """Drop the sessions (their memory); the object is unusable afterwards."""
        self._sessions = {}

    def _session(self, graph: str):
        """The graph's session, opened on first use: the frozen graphs at start, the prompted ones when a task that
        needs them is loaded (in the poller thread, off the request path), so a replica holds the weights of only
        the graphs its tasks use (a ViT-B's image graphs are ~350 MB each)."""
        session = self._sessions.get(graph)
        if session is None:
            import onnxruntime as ort

            with self._opening:
                session = self._sessions.get(graph)
                if session is None:
                    session = ort.InferenceSession(str(self.graphs.path(graph)), self._options, providers=self.providers)
                    self._sessions[graph] = session
        return session

    # ------------------------------------------------------------------ tasks
    def load_task(self, slot: str, prompts: dict[str, torch.Tensor], config: PromptConfig) -> None:
        # the torch model checks the shapes against the backbone (same errors as TorchRuntime) and keeps a copy
        # (a few hundred KB) so the task can always be served there
        self.torch.load_task(slot, prompts, config)
        self._forget(slot)
        if not isinstance(config, PromptConfig):  # image-text prompt tokens: the graphs take residual prompts only
            self._torch_tasks.add(slot)
            log.info("task %s (%s) is served by torch", slot, type(config).__name__)
            return
        misfit = self._misfit(config)
        if misfit:
            self._torch_tasks.add(slot)
            self._torch_residual.add(slot)
            log.warning("task %s does not fit the ONNX graphs (%s): it is served by torch", slot, misfit)
        elif config.placement == "input":
            self._open("image_prompted", "text_prompted")
            self._tasks[slot] = self._padded(prompts, config, top=False)
        else:
            self._sessions.pop("image_frozen", None)  # closed first, so that the split graphs may reuse its memory
            self._open(*TOP_GRAPHS)
            self._top[slot] = self._padded(prompts, config, top=True)
        self._frozen_graph_as_needed()

    def _open(self, *graphs: str) -> None:
        for graph in graphs:
            self._session(graph)

    def _frozen_graph_as_needed(self) -> None:
        """The whole frozen image graph is not run while a task placed in the last blocks is loaded (the split
        graphs give the frozen features then): its session is closed, and opened again when the last such task
        goes (a ViT-B's is ~350 MB). A call that still finds it closed opens it (`_session`)."""
        if self._top:
            self._sessions.pop("image_frozen", None)
        else:
            self._open("image_frozen")

    def open_graphs(self) -> list[str]:
        """The graphs whose sessions are open (their weights in memory)."""
        return sorted(self._sessions)

    def _forget(self, slot: str) -> None:
        for table in (self._tasks, self._top):
            table.pop(slot, None)
        self._torch_tasks.discard(slot)
        self._torch_residual.discard(slot)

    def _misfit(self, config: PromptConfig) -> str:
        """Why the graphs cannot take a residual-prompt task ('' when they can)."""
        if config.placement == "input":
            depths = {t: min(config.depth, self._layers(t)) for t in TOWERS}
            too_big = [f"{t} depth {depths[t]} > {self.spec.depth(t)}" for t in TOWERS if depths[t] > self.spec.depth(t)]
        else:
            depth = min(config.depth, self._layers("visual"))
            too_big = [] if depth <= self.spec.depth_top else [f"image depth {depth} in the last blocks > {self.spec.depth_top}"]
        if config.n_prefix > self.spec.n_prefix:
            too_big.append(f"n_prefix {config.n_prefix} > {self.spec.n_prefix}")
        return ", ".join(too_big)

    def _padded(self, prompts: dict[str, torch.Tensor], config: PromptConfig, top: bool) -> _TaskPrompts:
        """The task's prompts zero-padded to the graph's (depth, n), with the mask of the real ones. The top graph
        takes image prompts only; a task shallower than it sits in its last layers."""
        keys, values, mask = {}, {}, {}
        for tower in ("visual",) if top else TOWERS:
            depth = self.spec.depth_top if top else self.spec.depth(tower)
            shape = (depth, self.spec.n_prefix, self.spec.width(tower))
            keys[tower], values[tower] = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
            mask[tower] = np.zeros(shape[:2], np.float32)
            layers = config.layers(self._layers(tower))
            first = depth - len(layers) if top else 0
            for i, layer in enumerate(layers):
                keys[tower][first + i, : config.n_prefix] = prompts[f"{tower}.{layer}.key"].detach().float().cpu().numpy()
                values[tower][first + i, : config.n_prefix] = prompts[f"{tower}.{layer}.value"].detach().float().cpu().numpy()
                mask[tower][first + i, : config.n_prefix] = 1.0
        return _TaskPrompts(keys, values, mask)

    def delete_task(self, slot: str) -> None:
        self.torch.delete_task(slot)  # UnknownTask if it was never loaded
        self._forget(slot)
        self._frozen_graph_as_needed()

    def served_by_torch(self, slot: str) -> bool:
        return slot in self._torch_tasks

    def _layers(self, tower: str) -> int:
        return len(self.backbone.image_blocks if tower == "visual" else self.backbone.text_blocks)

    def _task(self, slot: str) -> _TaskPrompts:
        try:
            return self._tasks[slot] if slot in self._tasks else self._top[slot]
        except KeyError:
            loaded = sorted({*self._tasks, *self._top})
            raise UnknownTask(f"unknown task '{slot}' (loaded: {loaded or 'none'})") from None

    def _text_by_torch(self, slot: str | None) -> bool:
        """Image-text prompt tasks, tasks too large for the graphs, and tasks placed in the last blocks (whose text
        prompts sit in the text tower's last blocks: the text graph prompts its first) have their text from torch."""
        return slot in self._torch_tasks or slot in self._top

    # ------------------------------------------------------------------ encoding
    def _run(self, graph: str, **inputs: np.ndarray) -> np.ndarray:
        return self._session(graph).run(None, inputs)[0]

    def images_by_torch(self) -> bool:
        """While a residual-prompt task the graphs cannot take is loaded (deeper or with more prefixes than they
        hold), images go through torch whole: its frozen pass keeps the activations that task's prompted pass
        resumes from, where the graphs' frozen pass would be thrown away for that task's images and the whole tower
        run again. Frozen answers then come from that same torch pass, so w = 0 is still bit for bit the frozen
        pass."""
        return bool(self._torch_residual)

    def prompted_graphs_in_use(self) -> bool:
        """Whether a task loaded runs in the prompted graphs (`engine_batches` auto runs two batches at once then)."""
        return bool(self._tasks or self._top)

    def encode_frozen(self, images):
        """Torch's frozen pass (`images_by_torch`); while a task placed in the last blocks is loaded, the split
        graphs' (provisional features and a resume point, like torch's); else the frozen graph (exact, no resume)."""
        if self.images_by_torch():
            return self.torch.encode_frozen(images)
        if self._top:
            return self._split_frozen(images)
        return self.encode_image(images), None

    def _split_frozen(self, images: torch.Tensor) -> tuple[torch.Tensor, _GraphResume]:
        activations = self._run("image_bottom", images=_numpy(images))
        features, last = self._session("image_top_frozen").run(None, {"activations": activations})
        block = self.spec.top_block(self._layers("visual"))
        return _tensor(features), _GraphResume(block, torch.from_numpy(activations), True, torch.from_numpy(last))

    def finish_frozen(self, resume):
        """The whole last block over the split graphs' batch (`image_last`), or torch's."""
        if isinstance(resume, _GraphResume):
            return _tensor(self._run("image_last", last=resume.last.numpy()))
        return self.torch.finish_frozen(resume)

    def encode_image(self, images, tasks=None, weights=None, resume=None):
        if self.images_by_torch() or (resume is not None and not isinstance(resume, _GraphResume)):
            return self.torch.encode_image(images, tasks, weights, resume)
        images = images.detach().float().cpu()
        batch = images.shape[0]
        names = [None] * batch if tasks is None else list(tasks)
        if len(names) != batch:
            raise ValueError(f"got {len(names)} task names for a batch of {batch}")
        w = [1.0] * batch if weights is None else [float(x) for x in weights]
        if len(w) != batch:
            raise ValueError(f"got {len(w)} weights for a batch of {batch}")
        # samples with no task or w = 0: frozen; image-text prompt tasks: torch (here, residual prompts the graphs
        # cannot take have sent the whole call to torch above); tasks in the last blocks: the top graph (from the
        # resume point when given); the rest: the whole prompted graph
        active = [i for i in range(batch) if names[i] is not None and w[i] != 0]
        for i in active:
            if names[i] not in self._torch_tasks:
                self._task(names[i])
        by_torch = [i for i in active if names[i] in self._torch_tasks]
        top = [i for i in active if names[i] in self._top]
        rows = sorted(set(range(batch)) - set(by_torch) - set(top))  # each row runs in one place only
        out = torch.empty(batch, self.embed_dim)
        if rows:
            out[rows] = self._whole_graph(images if len(rows) == batch else images[rows],
                                          [names[i] for i in rows], [w[i] for i in rows])
        if top:
            activations = (resume.activations[top].numpy() if resume is not None
                           else self._run("image_bottom", images=images[top].numpy()))
            out[top] = _tensor(self._run("image_top_prompted", activations=activations,
                                         **self._image_prompts([names[i] for i in top], [w[i] for i in top], top=True)))
        if by_torch:
            out[by_torch] = self.torch.encode_image(
                images[by_torch], tasks=[names[i] for i in by_torch], weights=[w[i] for i in by_torch]
            )
        return out

    def _whole_graph(self, images: torch.Tensor, names, w) -> torch.Tensor:
        """Frozen (while a task placed in the last blocks is loaded, through the split graphs: the same bits as
        `finish_frozen` of the batch), or the whole prompted graph."""
        if any(n is not None and x != 0 for n, x in zip(names, w)):
            return _tensor(self._run("image_prompted", images=images.numpy(), **self._image_prompts(names, w)))
        if self._top:
            return self.finish_frozen(self._split_frozen(images)[1])
        return _tensor(self._run("image_frozen", images=images.numpy()))

    def _image_prompts(self, names, w, top: bool = False) -> dict[str, np.ndarray]:
        """Per-sample prompt inputs of the whole (or the top) prompted graph: each sample's task's padded prompts,
        zeros and w = 0 for a sample without one."""
        batch, table = len(names), self._top if top else self._tasks
        d, n, width = self.spec.depth_top if top else self.spec.depth_image, self.spec.n_prefix, self.spec.width_image
        keys = np.zeros((batch, d, n, width), np.float32)
        values = np.zeros_like(keys)
        mask = np.zeros((batch, d, n), np.float32)
        weight = np.zeros(batch, np.float32)
        for i, name in enumerate(names):
            if name is not None and w[i] != 0:
                task = table[name]
                keys[i], values[i], mask[i] = task.keys["visual"], task.values["visual"], task.mask["visual"]
                weight[i] = w[i]
        return {"prefix_keys": keys, "prefix_values": values, "prefix_mask": mask, "weight": weight}

    def encode_text(self, texts: Sequence[str], task: str | None = None, weight: float = 1.0) -> torch.Tensor:
        if task is not None and weight != 0 and self._text_by_torch(task):
            return self.torch.encode_text(texts, task, weight)
        tokens = self.backbone.tokenizer(list(texts)).cpu().numpy().astype(np.int64)
        if task is None or weight == 0:
            graph, extra = "text_frozen", {}
        else:
            t = self._task(task)
            graph = "text_prompted"
            extra = {"prefix_keys": t.keys["text"], "prefix_values": t.values["text"], "prefix_mask": t.mask["text"],
                     "weight": np.array([weight], np.float32)}
        chunks = [self._run(graph, tokens=tokens[i : i + TEXT_CHUNK], **extra) for i in range(0, len(tokens), TEXT_CHUNK)]
        return torch.from_numpy(np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32))

    def class_text(self, class_names, templates, task=None, weight=1.0) -> torch.Tensor:
        if task is not None and weight != 0 and self._text_by_torch(task):
            return self.torch.class_text(class_names, templates, task, weight)
        return zero_shot_classifier(lambda texts: self.encode_text(texts, task, weight), list(class_names), list(templates))

    def logit_scale(self) -> float:
        return self._scale


def _numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().float().cpu().numpy()


def _tensor(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))


# ----------------------------------------------------------------------------------------- choice


PROBE_TASK = "__keepclip_runtime_probe__"


def measure(runtimes: dict[str, Any], image_size: tuple[int, int], batch: int = 4, rounds: int = 2) -> dict[str, float]:
    """Median seconds of one frozen + one prompted image pass at `batch` (the prompted one from the frozen pass's
    resume point, as the engine runs them), per runtime, repeats interleaved.

    Every runtime gets the same probe task (add-task's default shape: `default_depth` blocks at the top, n of
    `PromptConfig()`; random keys and values), removed afterwards. One warm-up pass each is not counted.
    """
    images = torch.randn(batch, 3, *image_size, generator=torch.Generator().manual_seed(0))
    any_rt = next(iter(runtimes.values()))
    backbone = any_rt.backbone
    config = PromptConfig(depth=default_depth(len(backbone.image_blocks)), placement="output")
    g = torch.Generator().manual_seed(1)
    prompts = {}
    for tower, blocks in (("visual", backbone.image_blocks), ("text", backbone.text_blocks)):
        attn = blocks[0].attn
        width = (attn.get_base_layer() if hasattr(attn, "get_base_layer") else attn).in_proj_weight.shape[1]
        for layer in config.layers(len(blocks)):
            prompts[f"{tower}.{layer}.key"] = torch.rand(config.n_prefix, width, generator=g) * 0.04 - 0.02
            prompts[f"{tower}.{layer}.value"] = torch.randn(config.n_prefix, width, generator=g) * 0.02
    weights = [1.0] * batch
    slots = {name: f"{PROBE_TASK}{name}" for name in runtimes}  # one per runtime: they may share a torch model
    times: dict[str, list[float]] = {name: [] for name in runtimes}
    loaded = []
    try:
        for name, rt in runtimes.items():
            rt.load_task(slots[name], prompts, config)
            loaded.append(name)
            _probe(rt, images, slots[name], weights)  # warm-up
        for _ in range(rounds):
            for name, rt in runtimes.items():
                start = time.perf_counter()
                _probe(rt, images, slots[name], weights)
                times[name].append(time.perf_counter() - start)
    finally:
        for name in loaded:
            runtimes[name].delete_task(slots[name])
    return {name: statistics.median(t) for name, t in times.items()}


def _probe(runtime, images: torch.Tensor, slot: str, weights: list[float]) -> None:
    _, resume = runtime.encode_frozen(images)
    runtime.encode_image(images, [slot] * len(images), weights, resume=resume)


def select_runtime(settings) -> Runtime:
    """The runtime `settings.runtime` asks for: `torch`, `onnx` (torch if the graphs fail, logged), or `auto`."""
    backbone = load_backbone(settings.model, settings.pretrained, settings.device)
    choice = settings.runtime
    if choice == "torch":
        return TorchRuntime(backbone)
    try:
        onnx = OnnxRuntime(backbone, cache_dir=settings.onnx_cache_dir, opset=settings.onnx_opset,
                           threads=settings.torch_threads)
    except Exception as e:  # noqa: BLE001 - OnnxExportError (names graph, op, opset) or onnxruntime refusing a graph
        log.error("runtime '%s': the ONNX path is unavailable, serving with torch instead. %s: %s",
                  choice, type(e).__name__, e)
        return TorchRuntime(backbone)
    if choice == "onnx":
        return onnx
    batch = max(1, min(settings.max_batch_size, 4))
    start = time.perf_counter()
    figures = measure({"onnx": onnx, "torch": onnx.torch}, onnx.image_size, batch=batch)
    best = min(figures, key=figures.get)
    other = "torch" if best == "onnx" else "onnx"
    log.info("runtime auto: per probe batch of %d (frozen + prompted pass) onnx %.4f s, torch %.4f s -> %s "
             "(%.2fx faster; measured in %.1f s)", batch, figures["onnx"], figures["torch"], best,
             figures[other] / figures[best], time.perf_counter() - start)
    if best == "onnx":
        return onnx
    onnx.close()
    return onnx.torch
