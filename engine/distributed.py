"""Tensor-parallel collectives. Each one logs op, shape, dtype, bytes and rank at DEBUG
(during CUDA-graph capture that line is written once, at capture, not at replay)."""
import logging

import torch
import torch.distributed as dist

from engine.logger import get_logger

logger = get_logger(__name__)


def tp_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def tp_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _log(op: str, x: torch.Tensor) -> None:
    if logger.isEnabledFor(logging.DEBUG):
        logger.debug("[Rank %d] %s: shape=%s, dtype=%s, bytes=%d", tp_rank(), op, list(x.shape),
                     str(x.dtype).removeprefix("torch."), x.numel() * x.element_size())


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the TP group in place (no-op at TP=1)."""
    if tp_size() > 1:
        _log("all_reduce", x)
        dist.all_reduce(x)
    return x


def gather_to_first(x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
    """Concatenate every rank's ``x`` along ``dim`` on rank 0; other ranks get None."""
    if tp_size() == 1:
        return x
    _log("gather", x)
    parts = [torch.empty_like(x) for _ in range(tp_size())] if tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim) if parts is not None else None
