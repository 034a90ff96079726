"""Image features in batches, split across data-parallel ranks: the one frozen (or prompted) pass every learner needs."""
from __future__ import annotations

import logging
import math
from typing import Callable

import numpy as np
import torch

from backbone import Backbone, PixelPipeline, PromptedCLIP

from .comm import Comm
from .data import ImageSet

log = logging.getLogger(__name__)


GPU_EVAL_BATCH, CPU_EVAL_BATCH = 256, 16


def eval_batch(size: int | None, device: torch.device | str) -> int:
    """Images per inference pass: `size` when set. Else 256 on GPU and 16 on CPU, where large batches run slower (their
    activations outgrow the caches; 2 cores: the proxy 190-220 images/s at 16-32 against 142 at 256, ViT-B/16 4.5
    at 8 against 3.4 at 64)."""
    if size is not None:
        return size
    return GPU_EVAL_BATCH if torch.device(device).type == "cuda" else CPU_EVAL_BATCH


class FrozenGraph:
    """The frozen image tower in ONNX Runtime: the graph the service runs (`backbone.onnx_export`), from the same
    cache, so add-task and the service export it once between them. Normalised features, like torch's."""

    def __init__(self, backbone: Backbone):
        import onnxruntime as ort

        from backbone.onnx_export import GraphSpec, OnnxCache

        graphs = OnnxCache().ensure(backbone, GraphSpec.for_backbone(backbone))
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(graphs.path("image_frozen")), options, providers=["CPUExecutionProvider"])
        log.info("frozen image pass: ONNX Runtime, %d threads, %s", options.intra_op_num_threads, graphs.path("image_frozen"))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {"images": images.numpy()})[0])


_GRAPHS: dict[tuple[str, str], FrozenGraph | None] = {}  # (backbone sha256, cache) -> its graph here (None: torch after a failure)


def frozen_encoder(model: PromptedCLIP, runtime: str = "auto") -> Callable[[torch.Tensor], torch.Tensor]:
    """What runs the frozen image pass: ONNX Runtime (`runtime` onnx, or auto on CPU: 1.4-1.8x torch eager measured
    on 2 cores) or torch (on GPU, or where the export fails, logged)."""
    if runtime not in ("auto", "torch", "onnx"):
        raise ValueError(f"frozen runtime must be auto, torch or onnx, got {runtime!r}")
    torch_pass = lambda batch: model.encode_image(batch, normalize=True)  # noqa: E731
    backbone = model.backbone
    if runtime == "torch" or (runtime == "auto" and backbone.device.type != "cpu"):
        return torch_pass
    from backbone.onnx_export import default_cache_dir

    key = (backbone.fingerprint.sha256, str(default_cache_dir()))
    if key not in _GRAPHS:
        try:
            _GRAPHS[key] = FrozenGraph(backbone)
        except Exception as e:  # an op the exporter or this onnxruntime lacks: torch does the same work, slower
            log.warning("the frozen image pass runs in torch: its ONNX graph is not available (%s: %s)", type(e).__name__, e)
            _GRAPHS[key] = None
    graph = _GRAPHS[key]
    return torch_pass if graph is None else (lambda batch: graph(batch.cpu()))


@torch.no_grad()
def sharded_features(
    model: PromptedCLIP, pipeline: PixelPipeline, images: ImageSet, batch_size: int | None, comm: Comm | None = None,
    task: str | None = None, runtime: str = "torch",
) -> torch.Tensor:
    """(N, D) normalised image features (frozen, or through `task`'s prompts); each rank computes a contiguous shard
    and every rank gets all rows, in order. `batch_size` None: `eval_batch`'s default for the model's device.
    `runtime`: what runs the frozen pass (`frozen_encoder`); prompted passes run in torch."""
    comm = comm or Comm()
    batch_size = eval_batch(batch_size, model.backbone.device)
    frozen = frozen_encoder(model, runtime) if task is None else None
    shard = np.array_split(np.arange(len(images)), comm.world_size)[comm.rank]
    out = []
    for chunk in np.array_split(shard, max(1, math.ceil(len(shard) / batch_size))):
        if len(chunk):
            batch = pipeline.to_batch(images.pixels[chunk], model.backbone.device)
            features = frozen(batch) if frozen is not None else model.encode_image(batch, tasks=task, normalize=True)
            out.append(features.float().cpu())
    local = torch.cat(out) if out else torch.zeros(0, model.clip.visual.output_dim)
    return comm.all_gather_rows(local)
