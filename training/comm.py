"""The few collectives a data-parallel learner needs: one process (`Comm`) or torch.distributed (`TorchComm`).

Under Ray Train's `TorchTrainer` the process group is already set up (gloo on CPU, NCCL on GPU); `TorchComm` only
wraps it, moving tensors to the GPU for NCCL and back.
"""
from __future__ import annotations

import torch


class Comm:
    """A single process: rank 0 of 1; every collective is the identity."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's rows, in rank order (ranks may hold different numbers of rows)."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor


class TorchComm(Comm):
    """torch.distributed, as initialised by Ray Train (or torchrun)."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.detach().to(self.device).clone()
        self.dist.all_reduce(out)
        return out.to(tensor.device)

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        local = tensor.detach().to(self.device).contiguous()
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        counts[self.rank] = local.shape[0]
        self.dist.all_reduce(counts)
        most = int(counts.max())
        padded = torch.zeros((most, *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self.dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, counts)]).to(tensor.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = tensor.detach().to(self.device).clone()
        self.dist.broadcast(out, src)
        return out.to(tensor.device)
