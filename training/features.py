"""Image features in batches, split across data-parallel ranks: the one frozen (or prompted) pass every learner needs."""
from __future__ import annotations

import math

import numpy as np
import torch

from backbone import PixelPipeline, PromptedCLIP

from .comm import Comm
from .data import ImageSet


@torch.no_grad()
def sharded_features(
    model: PromptedCLIP, pipeline: PixelPipeline, images: ImageSet, batch_size: int, comm: Comm | None = None,
    task: str | None = None,
) -> torch.Tensor:
    """(N, D) normalised image features (frozen, or through `task`'s prompts); each rank computes a contiguous shard
    and every rank gets all rows, in order."""
    comm = comm or Comm()
    shard = np.array_split(np.arange(len(images)), comm.world_size)[comm.rank]
    out = []
    for chunk in np.array_split(shard, max(1, math.ceil(len(shard) / batch_size))):
        if len(chunk):
            batch = pipeline.to_batch(images.pixels[chunk], model.backbone.device)
            out.append(model.encode_image(batch, tasks=task, normalize=True).float().cpu())
    local = torch.cat(out) if out else torch.zeros(0, model.clip.visual.output_dim)
    return comm.all_gather_rows(local)
