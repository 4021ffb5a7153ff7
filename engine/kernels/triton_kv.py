"""Triton kernel that writes new key/value vectors into the paged KV cache.

Same semantics as :func:`engine.kernels.reference.store_kvcache_ref`: token ``i`` goes to slot
``slot_mapping[i] = block_id * block_size + offset`` of ``[num_blocks, block_size, kv_heads, dim]``
caches, and slots of -1 are skipped. One program copies one token (all KV heads, K and V). The decoder's
attention layers store through ``triton_fused.qk_norm_rotary_store`` on CUDA instead, which shares
:func:`cache_slot`.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def cache_slot(cache_ptr, slot, stride_block, stride_offset, BLOCK_SIZE: tl.constexpr):
    """Where slot ``block_id * BLOCK_SIZE + offset`` starts in a ``[num_blocks, BLOCK_SIZE, heads, dim]`` cache."""
    return cache_ptr + (slot // BLOCK_SIZE) * stride_block + (slot % BLOCK_SIZE) * stride_offset


@triton.jit
def _store_kvcache_kernel(key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                          stride_kn, stride_kh, stride_vn, stride_vh,
                          stride_kcb, stride_kct, stride_kch,
                          stride_vcb, stride_vct, stride_vch,
                          NUM_KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                          HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_P2)[:, None]
    dims = tl.arange(0, DIM_P2)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    src = token.to(tl.int64)
    key = tl.load(key_ptr + src * stride_kn + heads * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + src * stride_vn + heads * stride_vh + dims, mask=mask)
    k_dst = cache_slot(k_cache_ptr, slot, stride_kcb, stride_kct, BLOCK_SIZE) + heads * stride_kch + dims
    v_dst = cache_slot(v_cache_ptr, slot, stride_vcb, stride_vct, BLOCK_SIZE) + heads * stride_vch + dims
    tl.store(k_dst, key.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, value.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                  v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value ``[N, num_kv_heads, head_dim]`` into the caches at ``slot_mapping`` ``[N]``.

    key/value may be strided views (e.g. slices of a fused QKV output) as long as the last
    dimension is contiguous; ``slot_mapping`` may be int32 or int64. No host synchronisation,
    so the call is CUDA-graph capturable.
    """
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_P2=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, DIM_P2=triton.next_power_of_2(head_dim), BLOCK_SIZE=k_cache.shape[1], num_warps=4)
