"""Pure-PyTorch paged-KV-cache attention: the exact CPU path and the reference for the Triton kernels.

Cache layout (one layer): ``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``.
A token's slot is ``block_id * block_size + offset``; ``slot_mapping`` entries of -1 are skipped.
"""
import torch


def store_kvcache_ref(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write key/value ``[N, num_kv_heads, head_dim]`` into the caches at ``slot_mapping`` ``[N]``."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = key[keep].to(k_cache.dtype)
    v_cache.view(-1, *v_cache.shape[2:])[slots] = value[keep].to(v_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, context_len: int) -> torch.Tensor:
    """Return the first ``context_len`` cached tokens of one sequence: ``[context_len, kv_heads, dim]``."""
    block_size = cache.shape[1]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]
    return blocks.reshape(-1, *cache.shape[2:])[:context_len]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last ``len(q)`` positions of a context of ``len(k)`` tokens."""
    num_q, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k = k.repeat_interleave(group, dim=1).transpose(0, 1).float()
    v = v.repeat_interleave(group, dim=1).transpose(0, 1).float()
    scores = torch.matmul(q.transpose(0, 1).float(), k.transpose(1, 2)) * scale
    offset = k.shape[1] - num_q
    q_pos = torch.arange(num_q, device=q.device)[:, None] + offset
    k_pos = torch.arange(k.shape[1], device=q.device)[None, :]
    scores.masked_fill_(k_pos > q_pos, float("-inf"))
    out = torch.matmul(torch.softmax(scores, dim=-1), v)
    return out.transpose(0, 1).to(q.dtype)


def paged_prefill_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                                block_tables: torch.Tensor, scale: float,
                                max_seqlen_q: int | None = None, *, max_context: int | None = None,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill attention where each sequence's new tokens are the last ones of its cached context.

    q: ``[total_q, num_heads, head_dim]``, sequences packed back to back (``cu_seqlens_q`` ``[B+1]``);
    ``context_lens[b]`` counts cached + new tokens; K/V are read from the cache (already stored).
    ``max_seqlen_q`` and ``max_context`` are launch-size hints for the Triton kernel; the reference ignores them. ``out``
    (shape of q), if given, is written at the rows of these sequences only.
    """
    out = torch.empty_like(q) if out is None else out
    starts = cu_seqlens_q.tolist()
    for b, ctx in enumerate(context_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        k = gather_context(k_cache, block_tables[b], ctx)
        v = gather_context(v_cache, block_tables[b], ctx)
        out[s:e] = _attend(q[s:e], k, v, scale)
    return out


def paged_decode_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               block_tables: torch.Tensor, context_lens: torch.Tensor,
                               scale: float, shared_blocks: torch.Tensor | None = None, *,
                               order: torch.Tensor | None = None, split_plan: tuple[int, int] | None = None,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode attention: one query token per sequence (``q: [B, num_heads, head_dim]``).

    ``shared_blocks`` (how many leading blocks every row shares), ``order`` (the order the rows'
    programs start in) and ``split_plan`` (which rows' keys it splits) are hints for the Triton kernel; the
    result depends on none of them. ``out``
    (shape of q) is written if given."""
    out = torch.empty_like(q) if out is None else out
    for b, ctx in enumerate(context_lens.tolist()):
        k = gather_context(k_cache, block_tables[b], ctx)
        v = gather_context(v_cache, block_tables[b], ctx)
        out[b:b + 1] = _attend(q[b:b + 1], k, v, scale)
    return out


def varlen_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                         scale: float) -> torch.Tensor:
    """Causal attention over packed sequences with no cache (used for the memory-profiling warm-up)."""
    out = torch.empty_like(q)
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[s:e] = _attend(q[s:e], k[s:e], v[s:e], scale)
    return out
