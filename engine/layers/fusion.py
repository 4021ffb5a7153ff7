"""Kernel fusion for the small element-wise ops (norms, rotary, SiLU-and-mul).

Eagerly, each of these is several tiny kernels (~60 per decoder layer); on CUDA they are compiled with
``torch.compile`` into one or two fused kernels each, which matters most for small decode batches where
launch count, not bytes, sets the step time. On CPU the plain PyTorch code runs, so results stay exact.
``NANOVLLM_COMPILE=0`` turns compilation off; if compilation fails (no working Triton or compiler), the op
runs eagerly after one warning.
"""
import functools
import os
from collections.abc import Callable

import torch

from engine.logger import get_logger

logger = get_logger(__name__)


def fused_on_cuda(fn: Callable) -> Callable:
    """Run ``fn`` compiled (dynamic shapes) when its first tensor argument is on CUDA, else as written."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not args[0].is_cuda or os.environ.get("NANOVLLM_COMPILE", "1") == "0":
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return compiled(*args)
        except Exception as e:  # stay correct without the fusion
            if compiled is fn:
                raise
            logger.warning("torch.compile of %s failed (%s: %s); running it eagerly", fn.__name__,
                           type(e).__name__, str(e).splitlines()[0] if str(e) else "")
            compiled = fn
            return fn(*args)
    return run


@fused_on_cuda
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


@fused_on_cuda
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``."""
    x = x + residual
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype), x


@fused_on_cuda
def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


@fused_on_cuda
def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q, k ``[tokens, heads, head_dim]``, computed in float32."""
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)
