"""The small per-token ops (RMSNorm, residual-add + RMSNorm, SiLU-and-mul, and the attention prologue: per-head
q/k RMSNorm + rotary + KV-cache store): one Triton kernel each on CUDA, plain PyTorch elsewhere.

Eagerly, each op is several tiny kernels (~60 per decoder layer), which matters most for small decode
batches where launch count, not bytes, sets the step time. The hand-written Triton kernels
(``engine/kernels/triton_fused.py``) replace ``torch.compile``, whose cold compilation added 5-20 s to
engine startup and whose bf16 rounding differed from HF's eager code; Triton caches them on disk.

Both versions round bf16/fp16 values exactly where HF transformers' eager code does, so greedy outputs
can match HF token for token (in fp32 all the casts are no-ops):

* RMSNorm: ``h = x.float(); h = h * rsqrt(mean(h ** 2) + eps); out = weight * h.to(x.dtype)``;
* residual add: ``s = x + residual`` in the residual's dtype (the decoder keeps it in fp32, see
  ``engine/models/decoder.py``), then RMSNorm of ``s`` returned in ``x``'s dtype; ``s`` is the new residual;
* SiLU-and-mul: ``silu(gate)`` rounded, times ``up``, rounded;
* rotary: ``cos, sin`` cast to the input dtype; ``q * cos`` and ``rotate_half(q) * sin`` each rounded,
  then their sum; after the q/k RMSNorm (Qwen3) its input is the norm's rounded output.

The prologue's kernel also writes K and V into the paged KV cache, which the PyTorch version leaves to the
attention layer (see :func:`qk_norm_rotary_store`).

``NANOVLLM_FUSED_KERNELS=0`` makes CUDA tensors take the PyTorch versions too (for debugging; read at
each call). The sampler's Gumbel-max kernel follows the same switch.
"""
import os

import torch
import torch.nn.functional as F


def use_triton_kernels(x: torch.Tensor) -> bool:
    """Whether ops on ``x`` run the Triton kernels: on CUDA, unless ``NANOVLLM_FUSED_KERNELS=0``."""
    return x.is_cuda and os.environ.get("NANOVLLM_FUSED_KERNELS", "1") != "0"


def _kernels():
    from engine.kernels import triton_fused  # imports Triton only when a CUDA tensor gets here
    return triton_fused


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton_kernels(x):
        return _kernels().rms_norm(x, weight, eps)
    return torch_rms_norm(x, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(norm(x + residual), x + residual)``: the norm in ``x``'s dtype, the sum in the wider of the two. On CUDA
    ``x`` may also be a product's split-K partial sums (``RowParallelLinear.partial_sums``)."""
    if use_triton_kernels(x):
        return _kernels().add_rms_norm(x, residual, weight, eps)
    return torch_add_rms_norm(x, residual, weight, eps)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` ``[..., 2 * I]``."""
    if use_triton_kernels(x):
        return _kernels().silu_and_mul(x)
    return torch_silu_and_mul(x)


def qk_norm_rotary_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                         norm_weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """The attention prologue: per-head RMSNorm of q and k with ``norm_weights = (q_weight, k_weight)`` (Qwen3; None:
    no norm), then rotate-half rotary (caches ``[max_position, head_dim]``), on q ``[tokens, heads, head_dim]`` and
    k, v ``[tokens, kv_heads, head_dim]``. Returns ``(q, k, kv_stored)``.

    On CUDA one kernel also writes k and v into the paged caches at ``slot_mapping`` (-1: no write; nothing while
    the caches are empty) and says so with ``kv_stored=True``. Elsewhere the PyTorch ops leave the store to the
    attention layer (``kv_stored=False``).
    """
    if use_triton_kernels(q):
        q, k = _kernels().qk_norm_rotary_store(positions, q, k, v, cos_cache, sin_cache, norm_weights, eps,
                                               k_cache, v_cache, slot_mapping)
        return q, k, True
    if norm_weights is not None:
        q, k = torch_rms_norm(q, norm_weights[0], eps), torch_rms_norm(k, norm_weights[1], eps)
    q, k = torch_rotary(positions, q, k, cos_cache, sin_cache)
    return q, k, False


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def torch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return torch_rms_norm(summed, weight, eps).to(x.dtype), summed


def torch_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def torch_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos_cache[positions].unsqueeze(1).to(q.dtype)
    sin = sin_cache[positions].unsqueeze(1).to(q.dtype)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin
