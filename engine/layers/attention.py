"""Attention over the paged KV cache: store this step's K/V (unless the caller did), then attend with the selected
backend.

Backends: "torch" (exact, any device: the CPU path), "triton" (the in-tree kernels: the CUDA default),
"flash-attn" (optional, when importable). The runner picks one per engine with :func:`select_backend`.
"""
import functools
import importlib.util
import inspect
import logging
import os

import torch
from torch import nn

from engine.context import get_context
from engine.kernels import reference
from engine.logger import get_logger

logger = get_logger(__name__)
BACKENDS = ("torch", "triton", "flash-attn")


def select_backend(device: torch.device, block_size: int) -> str:
    """``NANOVLLM_ATTENTION_BACKEND`` if set and usable, else triton on CUDA and torch on CPU."""
    default = "triton" if device.type == "cuda" else "torch"
    wanted = os.environ.get("NANOVLLM_ATTENTION_BACKEND", default).lower()
    if wanted not in BACKENDS:
        logger.warning("Unknown NANOVLLM_ATTENTION_BACKEND=%r; using %s", wanted, default)
        return default
    if wanted != "torch" and device.type != "cuda":
        logger.warning("Attention backend %s needs CUDA; using torch on %s", wanted, device.type)
        return "torch"
    if wanted == "flash-attn" and importlib.util.find_spec("flash_attn") is None:
        logger.warning("flash-attn is not installed; falling back to the triton attention backend")
        return "triton"
    if wanted == "flash-attn" and block_size % 256:
        logger.warning("flash-attn's paged KV cache needs kvcache_block_size=256; using the triton backend")
        return "triton"
    return wanted


class Attention(nn.Module):
    backend = "torch"  # set for all layers by the model runner

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.k_cache = self.v_cache = torch.tensor([])  # views into the runner's cache, set after allocation

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_stored: bool = False) -> torch.Tensor:
        """q ``[tokens, heads, dim]``, k/v ``[tokens, kv_heads, dim]`` → ``[tokens, heads, dim]``.

        ``kv_stored``: the caller already wrote k and v into the cache (the decoder's fused prologue on CUDA).
        k and v are read again only by the warm-up's prefill, before the cache exists.
        """
        ctx = get_context()
        debug = logger.isEnabledFor(logging.DEBUG)
        if debug:
            logger.debug("Attention forward: is_prefill=%s, q=%s, k=%s, v=%s", ctx.is_prefill,
                         list(q.shape), list(k.shape), list(v.shape))
        if self.k_cache.numel():
            if debug:  # (also when the fused prologue stored them: the logging guide's line for this stage)
                logger.debug("Storing KV cache: N=%d, num_heads=%d, head_dim=%d, num_slots=%d",
                             k.shape[0], self.num_kv_heads, self.head_dim, ctx.slot_mapping.numel())
            if not kv_stored:
                _store(self.backend)(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            out = self._prefill(q, k, v, ctx)
        else:
            if debug:
                logger.debug("Decode attention: k_cache=%s, v_cache=%s", list(self.k_cache.shape),
                             list(self.v_cache.shape))
            out = _decode(self.backend)(q, self.k_cache, self.v_cache, ctx.block_tables, ctx.context_lens,
                                        self.scale, ctx.shared_blocks, order=ctx.decode_order,
                                        split_plan=ctx.decode_split_plan)
        if debug:
            logger.debug("Attention output: %s", list(out.shape))
        return out

    def _prefill(self, q, k, v, ctx) -> torch.Tensor:
        # Prompts without cached context also read their keys from the cache: torch's varlen FlashAttention took
        # 463 us per layer for W1's 28-prompt prefill step (GQA expanded by copies) against 230 us for the
        # paged kernel (H200, docs/benchmarks.md), so it serves only the warm-up, before the cache exists.
        if not self.k_cache.numel():
            if _use_varlen(q):
                return _varlen_attn()(q, k, v, ctx.cu_seqlens_q, ctx.max_seqlen_q, self.scale)
            return reference.varlen_attention_ref(q, k, v, ctx.cu_seqlens_q, self.scale)
        if self.backend == "flash-attn":
            from flash_attn import flash_attn_varlen_func
            cu_k = torch.nn.functional.pad(ctx.context_lens.cumsum(0, dtype=torch.int32), (1, 0))
            return flash_attn_varlen_func(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q, cu_k,
                                          ctx.max_seqlen_q, ctx.max_seqlen_k, softmax_scale=self.scale,
                                          causal=True, block_table=ctx.block_tables)
        prefill = reference.paged_prefill_attention_ref
        if self.backend == "triton":
            from engine.kernels.triton_attention import paged_prefill_attention as prefill
        out, n = torch.empty(q.shape, dtype=q.dtype, device=q.device), ctx.num_decode_tokens
        if n:  # one-token rows would fill 1/BLOCK_M of the prefill kernel's query tiles, without splitting keys
            _decode(self.backend)(q[:n], self.k_cache, self.v_cache, ctx.block_tables[:n], ctx.context_lens[:n],
                                  self.scale, order=ctx.decode_order, split_plan=ctx.decode_split_plan, out=out[:n])
        return prefill(q, self.k_cache, self.v_cache, ctx.cu_seqlens_q[n:], ctx.context_lens[n:],
                       ctx.block_tables[n:], self.scale, ctx.max_seqlen_q, max_context=ctx.max_prompt_context,
                       out=out)


def _use_varlen(q: torch.Tensor) -> bool:
    """torch's varlen FlashAttention serves the warm-up's CUDA prefills in fp16/bf16 (it has no fp32 kernel)."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _varlen_attn() is not None


def _store(backend: str):
    if backend == "torch":
        return reference.store_kvcache_ref
    from engine.kernels.triton_kv import store_kvcache
    return store_kvcache


def _decode(backend: str):
    if backend == "flash-attn":
        from flash_attn import flash_attn_with_kvcache

        def run(q, k_cache, v_cache, block_tables, context_lens, scale, shared_blocks=None, order=None,
                split_plan=None):
            out = flash_attn_with_kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=context_lens.int(),
                                          block_table=block_tables.int(), softmax_scale=scale, causal=True)
            return out.squeeze(1)
        return run
    if backend == "triton":
        from engine.kernels.triton_attention import paged_decode_attention
        return paged_decode_attention
    return reference.paged_decode_attention_ref


@functools.cache
def _varlen_attn():
    """Causal packed prefill through ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention inside
    torch >= 2.10), adapting to its keyword changes across torch versions; None when absent. Imported at the first
    CUDA prefill: the module imports ``torch._dynamo``, 1.7 s of every start of a CPU engine otherwise."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    causal = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    gqa = "enable_gqa" in params

    def run(q, k, v, cu_seqlens, max_seqlen, scale):
        if gqa:
            kwargs = {**causal, "enable_gqa": True}
        else:
            group = q.shape[1] // k.shape[1]
            k, v, kwargs = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), causal
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, scale=scale, **kwargs)
    return run

