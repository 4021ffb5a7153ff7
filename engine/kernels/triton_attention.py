"""Triton paged-KV-cache attention: split-K decode and FlashAttention-style varlen prefill.

Semantics and cache layout follow :mod:`engine.kernels.reference`
(``k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim]``). Query head ``h`` reads
KV head ``h // (num_heads // num_kv_heads)``. Both kernels are GQA-aware: one program serves all
query heads of one KV head, so each K/V tile is loaded once per KV head. Softmax runs in base 2
with ``scale * log2(e)`` folded into the scores; accumulation is fp32.

See docs/kernels-notes.md for the design and the measured numbers.
"""
import functools
from dataclasses import dataclass, replace

import numpy as np
import torch
import triton
import triton.language as tl

from engine.kernels.warmup import launch

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of the decode kernel; ``num_splits=None`` picks it from the shapes."""
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    num_splits: int | None = None
    shared_block_m: int = 128   # query rows (sequences x heads in group) per shared-prefix program
    shared_num_warps: int = 8


@dataclass(frozen=True)
class PrefillConfig:
    """Launch parameters of the prefill kernel (``block_m`` counts query rows = tokens x group)."""
    block_m: int = 128
    block_n: int = 128
    num_warps: int = 8
    num_stages: int = 2
    num_splits: int | None = None  # key splits; None: from the shapes when the caller gives max_context


@triton.jit
def _kv_rows(block_table_ptr, tile, offs_n, mask, stride_block, stride_token,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Element offsets of the cache rows of tokens ``tile + offs_n`` of one sequence.

    ``tile`` is a multiple of BLOCK_N, so a tile no larger than a cache block lies in one block
    and needs one scalar block-table load; larger tiles gather one block id per token (lanes off
    ``mask`` get garbage offsets, which callers only use under the same mask).
    """
    tokens = tile + offs_n
    if BLOCK_N <= BLOCK_SIZE:
        block = tl.load(block_table_ptr + tile // BLOCK_SIZE).to(tl.int64)
    else:
        block = tl.load(block_table_ptr + tokens // BLOCK_SIZE, mask=mask).to(tl.int64)
    return block * stride_block + (tokens % BLOCK_SIZE) * stride_token


@triton.jit
def _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, MAY_BE_EMPTY: tl.constexpr = False):
    """Fold one tile of (scaled, masked) scores and its V rows into the running row max
    ``m_i``, denominator ``l_i`` and unnormalised output ``acc``. MAY_BE_EMPTY: a row may have seen no
    visible key yet (a key split after its query position), so its max can still be -inf."""
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    m_ref = m_new
    if MAY_BE_EMPTY:
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # exp2(-inf - -inf) would be NaN
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(scores - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attend_keys(q, k_base, v_base, block_table, start, end, qk_scale, stride_cb, stride_ct,
                 ROWS: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the ``ROWS`` query rows ``q`` over keys ``[start, end)`` of one block
    table (all visible, no causal mask): returns the row max, denominator and unnormalised output."""
    offs_d = tl.arange(0, DIM_P2)
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, DIM_P2], tl.float32)
    for tile in range(start, end, BLOCK_N):
        valid = tile + offs_n < end
        kv_rows = _kv_rows(block_table, tile, offs_n, valid, stride_cb, stride_ct, BLOCK_SIZE,
                           BLOCK_N)
        kv_mask = valid[:, None] & (offs_d < HEAD_DIM)[None, :]
        k = tl.load(k_base + kv_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(valid[None, :], scores, float("-inf"))
        v = tl.load(v_base + kv_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION)
    return m_i, l_i, acc


# Split counts are runtime arguments (not specialised), so the batch sizes captured in CUDA graphs share one
# compiled kernel instead of compiling one per split count at startup. So is the block-table stride (the widest
# row's block count, which changes from step to step in eager steps): Triton would otherwise compile a new variant
# in the middle of a run whenever it becomes 1 or a multiple of 16, or stops being one.
# The row order is a pointer too: it is read once per program, and its alignment differs between the decode graphs'
# static buffer and the uploads of eager and mixed steps.
@triton.jit(do_not_specialize=["split_rows", "num_splits", "num_slots", "stride_bt", "order_ptr"])
def _decode_split_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, context_lens_ptr, shared_blocks_ptr, order_ptr,
                         out_ptr, part_out_ptr, part_lse_ptr, qk_scale, split_rows, num_splits, num_slots,
                         stride_qb, stride_qh, stride_ob, stride_oh, stride_bt,
                         stride_cb, stride_ct, stride_ch,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr,
                         HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_N: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_ORDER: tl.constexpr,
                         DOT_PRECISION: tl.constexpr):
    """Grid (kv_head, part): the GPU starts programs in that order (kv_head fastest). The first
    ``split_rows`` ranks have ``num_splits`` parts each, the others one: part ``i`` is split
    ``i % num_splits`` of rank ``i // num_splits`` below ``split_rows * num_splits``, else the
    whole of rank ``split_rows + i - split_rows * num_splits``. Rank ``r`` serves row ``order[r]``
    (HAS_ORDER; else row ``r``), so rows listed longest first start their long programs first and
    the short ones fill in at the end (longest processing time first), and splitting only the first
    ranks splits only the longest rows. Split ``s`` covers ``[s * split_len, (s + 1) * split_len)``
    of the sequence's own keys, ``split_len`` derived on the device from its length, so every split
    of a long sequence has work and splits past a short one return at once. With HAS_SHARED, the
    first ``shared_blocks`` cache blocks (common to the whole batch) are left to
    :func:`_shared_prefix_kernel` and the splits cover the rest. A program writes the output when
    it is the only one with work; otherwise a normalised partial output and its log2-sum-exp into
    slot ``split`` of ``num_slots``."""
    kv_head = tl.program_id(0)
    rank, split, row_splits = _decode_part(tl.program_id(1), split_rows, num_splits)
    seq, context_len, shared_len = _decode_row(rank, order_ptr, context_lens_ptr, shared_blocks_ptr,
                                               BLOCK_SIZE, HAS_SHARED, HAS_ORDER)
    own_len = context_len - shared_len
    split_len = tl.cdiv(tl.cdiv(own_len, row_splits), BLOCK_N) * BLOCK_N
    start = shared_len + split * split_len
    if (row_splits > 1) & (start >= context_len):
        return
    end = tl.minimum(start + split_len, context_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, DIM_P2)
    heads = kv_head * GROUP + offs_h
    head_mask = offs_h < GROUP
    mask = head_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask, other=0.0)
    m_i, l_i, acc = _attend_keys(q, k_ptr + kv_head * stride_ch, v_ptr + kv_head * stride_ch,
                                 block_tables_ptr + seq.to(tl.int64) * stride_bt, start, end, qk_scale,
                                 stride_cb, stride_ct, BLOCK_H, HEAD_DIM, DIM_P2, BLOCK_SIZE, BLOCK_N,
                                 DOT_PRECISION)

    if _writes_output(row_splits, shared_len, HAS_SHARED):
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty context gives zeros
        out = out_ptr + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        _store_partial(part_out_ptr, part_lse_ptr, (seq * NUM_HEADS + heads) * num_slots + split,
                       acc, m_i, l_i, offs_d, head_mask, HEAD_DIM)


@triton.jit
def _decode_part(part, split_rows, num_splits):
    """Rank, split and the rank's split count of decode part ``part`` (see :func:`_decode_split_kernel`)."""
    long_parts = split_rows * num_splits
    is_split = part < long_parts
    rank = tl.where(is_split, part // num_splits, split_rows + part - long_parts)
    return rank, tl.where(is_split, part % num_splits, 0), tl.where(is_split, num_splits, 1)


@triton.jit
def _decode_row(rank, order_ptr, context_lens_ptr, shared_blocks_ptr, BLOCK_SIZE: tl.constexpr,
                HAS_SHARED: tl.constexpr, HAS_ORDER: tl.constexpr):
    """The row that decode rank ``rank`` serves (``order[rank]`` with HAS_ORDER), its context length and how much
    of it lies in the batch's shared prefix blocks (HAS_SHARED; else 0)."""
    seq = rank
    if HAS_ORDER:
        seq = tl.load(order_ptr + rank)
    context_len = tl.load(context_lens_ptr + seq)
    shared_len = 0
    if HAS_SHARED:
        shared_len = tl.minimum(tl.load(shared_blocks_ptr) * BLOCK_SIZE, context_len)
    return seq, context_len, shared_len


@triton.jit
def _writes_output(num_splits, shared_len, HAS_SHARED: tl.constexpr):
    """Whether the split kernel writes the final output itself (one part only), leaving the reduce idle."""
    direct = num_splits == 1
    if HAS_SHARED:
        direct = direct & (shared_len == 0)
    return direct


@triton.jit
def _store_partial(part_out_ptr, part_lse_ptr, row, acc, m_i, l_i, offs_d, mask,
                   HEAD_DIM: tl.constexpr):
    """Normalised partial output and its log2-sum-exp (-inf for a part with no keys)."""
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    tl.store(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], acc / safe_l[:, None],
             mask=mask[:, None] & (offs_d < HEAD_DIM)[None, :])
    tl.store(part_lse_ptr + row, tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf")), mask=mask)


@triton.jit(do_not_specialize=["batch", "num_splits", "prefix_splits"])
def _shared_prefix_kernel(q_ptr, k_ptr, v_ptr, block_tables_ptr, shared_blocks_ptr,
                          part_out_ptr, part_lse_ptr, qk_scale, batch, num_splits, prefix_splits,
                          stride_qb, stride_qh, stride_cb, stride_ct, stride_ch,
                          NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                          DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (row tile, kv_head, prefix split): attention of every sequence's query to the cache
    blocks the whole batch shares (cascade attention). The rows of a tile are (sequence, head in
    group) pairs across the batch, so each shared K/V tile is read once per row tile instead of
    once per sequence, and scores are a real matrix product. The shared blocks all precede every
    sequence's own keys, so no mask is needed. Writes partial slot ``num_splits + split``."""
    row_tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    shared_len = tl.load(shared_blocks_ptr) * BLOCK_SIZE
    split_len = tl.cdiv(tl.cdiv(shared_len, prefix_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    if start >= shared_len:
        return
    end = tl.minimum(start + split_len, shared_len)

    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    seqs = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = seqs < batch
    offs_d = tl.arange(0, DIM_P2)
    q = tl.load(q_ptr + seqs[:, None].to(tl.int64) * stride_qb + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0)
    m_i, l_i, acc = _attend_keys(q, k_ptr + kv_head * stride_ch, v_ptr + kv_head * stride_ch,
                                 block_tables_ptr, start, end, qk_scale,  # row 0: the blocks are shared
                                 stride_cb, stride_ct, BLOCK_M, HEAD_DIM, DIM_P2, BLOCK_SIZE, BLOCK_N,
                                 DOT_PRECISION)
    slot_rows = (seqs * NUM_HEADS + heads) * (num_splits + prefix_splits) + num_splits + split
    _store_partial(part_out_ptr, part_lse_ptr, slot_rows, acc, m_i, l_i, offs_d, row_mask,
                   HEAD_DIM)


@triton.jit(do_not_specialize=["split_rows", "num_splits", "prefix_splits", "order_ptr"])
def _decode_reduce_kernel(part_out_ptr, part_lse_ptr, context_lens_ptr, shared_blocks_ptr, order_ptr, out_ptr,
                          split_rows, num_splits, prefix_splits, stride_ob, stride_oh, NUM_HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCK_N: tl.constexpr, HAS_SHARED: tl.constexpr, HAS_ORDER: tl.constexpr,
                          SLOTS_P2: tl.constexpr):
    """Grid (ranks, head): merge the partials of rank ``r``'s row (``order[r]`` with HAS_ORDER) from the
    parts that had work (own-key splits, then shared-prefix splits); a no-op when the split kernel
    wrote the output itself."""
    rank = tl.program_id(0)
    head = tl.program_id(1)
    row_splits = tl.where(rank < split_rows, num_splits, 1)
    seq, context_len, shared_len = _decode_row(rank, order_ptr, context_lens_ptr, shared_blocks_ptr,
                                               BLOCK_SIZE, HAS_SHARED, HAS_ORDER)
    if _writes_output(row_splits, shared_len, HAS_SHARED):
        return
    own_len = context_len - shared_len
    split_len = tl.maximum(tl.cdiv(tl.cdiv(own_len, row_splits), BLOCK_N) * BLOCK_N, BLOCK_N)
    slots = tl.arange(0, SLOTS_P2)
    active = slots < tl.cdiv(own_len, split_len)
    if HAS_SHARED:
        prefix_len = tl.cdiv(tl.cdiv(shared_len, prefix_splits), BLOCK_N) * BLOCK_N
        prefix_slot = slots - num_splits
        active |= (prefix_slot >= 0) & (prefix_slot < prefix_splits) \
            & (prefix_slot * prefix_len < shared_len)
    row = (seq * NUM_HEADS + head) * (num_splits + prefix_splits) + slots
    lse = tl.load(part_lse_ptr + row, mask=active, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), -1e30, lse)  # finite: no inf - inf
    weight = tl.where(active, tl.exp2(lse - tl.max(lse, 0)), 0.0)
    offs_d = tl.arange(0, DIM_P2)
    d_mask = offs_d < HEAD_DIM
    part = tl.load(part_out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=active[:, None] & d_mask[None, :], other=0.0)
    total = tl.sum(weight, 0)
    acc = tl.sum(part * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    out = out_ptr + seq * stride_ob + head * stride_oh + offs_d
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _prefill_tile(cu_seqlens_ptr, context_lens_ptr, row_tile, seq, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """Where query tile ``row_tile`` of prompt row ``seq`` lies: its rows are (query token, head in group) pairs,
    token-major. Returns the row's first packed token, new-token count, context length, the tile's first row
    (at or past ``q_len * GROUP`` for tiles past the row's last token) and the position of its last query token."""
    q_start = tl.load(cu_seqlens_ptr + seq)
    q_len = tl.load(cu_seqlens_ptr + seq + 1) - q_start
    context_len = tl.load(context_lens_ptr + seq)
    first_row = row_tile * BLOCK_M
    prefix_len = context_len - q_len
    last_pos = tl.minimum(prefix_len + (first_row + BLOCK_M - 1) // GROUP, context_len - 1)
    return q_start, q_len, context_len, first_row, last_pos


# A mixed step's prefill rows follow its decode rows: the kernel gets the per-row tensors from that offset on, so
# their alignment (like the block-table stride) changes from step to step and must not select a variant. So does
# the key split length, chosen per step from the longest context.
@triton.jit(do_not_specialize=["cu_seqlens_ptr", "context_lens_ptr", "block_tables_ptr", "stride_bt", "split_len",
                               "num_splits"])
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr, cu_seqlens_ptr, context_lens_ptr,
                    block_tables_ptr, qk_scale, split_len, num_splits, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_bt, stride_cb, stride_ct, stride_ch,
                    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Grid (row tile, batch, kv_head + num_kv_heads * split). The rows of a tile are (query token, head in
    group) pairs, token-major, so the GROUP query heads of a KV head share every K/V tile. Query token ``i`` of a
    sequence sits at position ``context_len - q_len + i`` and sees keys up to it.

    With SPLIT, split ``s`` covers keys ``[s * split_len, (s + 1) * split_len)`` of the tile's visible range, so
    a few query tiles deep in a long context still fill the GPU; a tile whose keys fit in one split writes its
    output directly, the others write partials that :func:`_prefill_reduce_kernel` merges."""
    row_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2) % (NUM_HEADS // GROUP)
    q_start, q_len, context_len, first_row, last_pos = _prefill_tile(cu_seqlens_ptr, context_lens_ptr, row_tile,
                                                                     seq, GROUP, BLOCK_M)
    if first_row >= q_len * GROUP:
        return
    key_start = 0
    key_end = last_pos + 1
    if SPLIT:
        split = tl.program_id(2) // (NUM_HEADS // GROUP)
        key_start = split * split_len
        if key_start > last_pos:
            return
        key_end = tl.minimum(key_start + split_len, key_end)
    prefix_len = context_len - q_len

    rows = first_row + tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = q_idx < q_len
    q_pos = prefix_len + q_idx
    offs_d = tl.arange(0, DIM_P2)
    d_mask = offs_d < HEAD_DIM
    offs_n = tl.arange(0, BLOCK_N)
    tokens_q = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tokens_q[:, None] * stride_qt + heads[:, None] * stride_qh
                + offs_d[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_ch
    v_base = v_ptr + kv_head * stride_ch

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)
    # Keys before `unmasked_end` are visible to every row of the tile: no causal mask there.
    # (Two separate loops, unmasked then masked, measured ~10% slower than this branch.)
    unmasked_end = (prefix_len + first_row // GROUP + 1) // BLOCK_N * BLOCK_N
    for tile in range(key_start, key_end, BLOCK_N):
        tokens = tile + offs_n
        valid = tokens < context_len
        kv_rows = _kv_rows(block_table, tile, offs_n, valid, stride_cb, stride_ct, BLOCK_SIZE,
                           BLOCK_N)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_base + kv_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if tile >= unmasked_end:
            visible = (tokens[None, :] <= q_pos[:, None]) & valid[None, :]
            scores = tl.where(visible, scores, float("-inf"))
        v = tl.load(v_base + kv_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _online_softmax_step(scores, v, m_i, l_i, acc, DOT_PRECISION, SPLIT)

    if SPLIT and (last_pos >= split_len):  # (a row with no visible key here stores an empty part)
        _store_partial(part_out_ptr, part_lse_ptr, (tokens_q * NUM_HEADS + heads) * num_splits + split,
                       acc, m_i, l_i, offs_d, row_mask, HEAD_DIM)
    else:
        acc = acc / l_i[:, None]
        tl.store(out_ptr + tokens_q[:, None] * stride_ot + heads[:, None] * stride_oh
                 + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


@triton.jit(do_not_specialize=["cu_seqlens_ptr", "context_lens_ptr", "split_len", "num_splits"])
def _prefill_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, cu_seqlens_ptr, context_lens_ptr, split_len,
                           num_splits, stride_ot, stride_oh, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                           HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Grid (row tile, batch, kv_head), the prefill kernel's tiles: merge each row's key-split partials by their
    log2-sum-exp; a no-op for tiles whose keys fit in one split (the prefill kernel wrote those)."""
    row_tile = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    q_start, q_len, context_len, first_row, last_pos = _prefill_tile(cu_seqlens_ptr, context_lens_ptr, row_tile,
                                                                     seq, GROUP, BLOCK_M)
    if (first_row >= q_len * GROUP) | (last_pos < split_len):
        return
    rows = first_row + tl.arange(0, BLOCK_M)
    q_idx = rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = q_idx < q_len
    tokens_q = (q_start + q_idx).to(tl.int64)
    offs_d = tl.arange(0, DIM_P2)
    mask = row_mask[:, None] & (offs_d < HEAD_DIM)[None, :]
    slot = (tokens_q * NUM_HEADS + heads) * num_splits
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: an empty part's weight is set to 0, not exp2(nan)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_P2], tl.float32)
    for split in range(0, tl.cdiv(last_pos + 1, split_len)):
        lse = tl.load(part_lse_ptr + slot + split, mask=row_mask, other=float("-inf"))
        part = tl.load(part_out_ptr + (slot + split)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        weight = tl.where(lse == float("-inf"), 0.0, tl.exp2(lse - m_new))
        l_i = l_i * alpha + weight
        acc = acc * alpha[:, None] + part * weight[:, None]
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out_ptr + tokens_q[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter runs: small, so CPU tests exercise several splits
    return torch.cuda.get_device_properties(device).multi_processor_count


# Splits of a decode step's own keys (H200, `benchmarks/kernels.py --uneven`, 16-256 rows of 600-2,048 tokens, 8 KV
# heads, rows started longest first): with many programs one split is best (a split costs partial writes and the
# reduce); it was best or within 1 % of the best of 1-16 splits from 80 rows (640 programs) on, and splits were
# 5-12 % slower at 112-256 rows. Below that, aiming at 16 programs per SM came within 1-4 % of the best at every size,
# where aiming at 2 per SM was 3-10 % slower at 16-128 rows. (docs/benchmarks.md, 2026-12-04, sixth session)
ONE_SPLIT_PROGRAMS_PER_SM = 4
SPLIT_PROGRAMS_PER_SM = 16


def decode_num_splits(rows: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int,
                      programs_per_sm: int = SPLIT_PROGRAMS_PER_SM) -> int:
    """Splits of the keys, from shapes only (CUDA graphs), for a grid of ``rows x num_kv_heads`` programs per split
    (sequences, or row tiles of the shared prefix): one when the grid already has ``ONE_SPLIT_PROGRAMS_PER_SM``
    programs per SM, else enough for ``programs_per_sm`` per SM, never more than key tiles in the longest possible
    context, at most 64."""
    programs = rows * num_kv_heads
    if programs >= ONE_SPLIT_PROGRAMS_PER_SM * num_sms:
        return 1
    wanted = triton.cdiv(programs_per_sm * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(max_context, block_n), 64))


# A decode program walks its keys alone at ~13 GB/s (H200: a 20k-token row among ~500 short ones kept a W6 step at
# 23 ms against 13 ms of K/V reads), while the whole GPU reads ~4.2 TB/s: with LPT order a long row's program is
# hidden while it is shorter than the step's read time, i.e. while its keys are fewer than about
# 2 * LONG_ROW_PROGRAMS_PER_SM * SMs programs' fair share of all keys. (Estimates from one W6 run, ninth session.)
LONG_ROW_PROGRAMS_PER_SM = 5
LONG_ROW_MIN_KEYS = 1024
PARTIAL_BYTES = 64 << 20  # the fp32 partials of one call at most (a decode split plan's, a prompt chunk's splits)


def long_row_split_plan(context_lens_desc: np.ndarray, num_kv_heads: int,
                        device: torch.device) -> tuple[int, int] | None:
    """For an eager decode step of rows sorted longest first: ``(rows, splits)`` to split only the rows longer
    than a fair share of the keys (``LONG_ROW_PROGRAMS_PER_SM`` programs per SM, at least ``LONG_ROW_MIN_KEYS``),
    each into enough parts that none exceeds it, when the longest row is over twice the share; None when the
    shape rule already splits every row (a small grid) or no row stands out."""
    rows, num_sms = len(context_lens_desc), _num_sms(device)
    if rows * num_kv_heads < ONE_SPLIT_PROGRAMS_PER_SM * num_sms:
        return None
    share = max(LONG_ROW_MIN_KEYS, int(context_lens_desc.sum()) * num_kv_heads // (LONG_ROW_PROGRAMS_PER_SM * num_sms))
    longest = int(context_lens_desc[0])
    if longest <= 2 * share:
        return None
    return int((context_lens_desc > share).sum()), min(triton.cdiv(longest, share), 64)


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 caches get exact fp32 products; tf32 would cost ~1e-3 relative error.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> int:
    """Validate shapes and strides (host-side, shapes only); return the GQA group size."""
    num_heads, head_dim = q.shape[-2:]
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape == v_cache.shape and k_cache.shape[3] == head_dim
    assert k_cache.stride() == v_cache.stride(), "K and V caches share one layout"
    assert q.dtype == k_cache.dtype == v_cache.dtype
    assert num_heads % num_kv_heads == 0
    assert head_dim % 8 == 0 and 16 <= head_dim <= 256, "head_dim must be a multiple of 8 from 16 to 256"
    block_size = k_cache.shape[1]
    assert block_size & (block_size - 1) == 0, "block_size must be a power of two"
    assert q.stride(-1) == 1 and k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    return num_heads // num_kv_heads


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           shared_blocks: torch.Tensor | None = None, *,
                           order: torch.Tensor | None = None, split_plan: tuple[int, int] | None = None,
                           out: torch.Tensor | None = None, config: DecodeConfig | None = None) -> torch.Tensor:
    """Decode attention, one query token per sequence: ``q [B, num_heads, head_dim]``.

    ``block_tables [B, max_blocks]`` and ``context_lens [B]`` are int32 (int64 works too) device
    tensors; only the first ``cdiv(context_lens[b], block_size)`` entries of a row are read, and a
    context length of 0 gives a zero output. ``shared_blocks`` (int32 ``[1]`` on the device), if
    given, says that the first that many entries of every row are the same full blocks (a prefix
    shared through the prefix cache): they are then attended once for the whole batch (cascade
    attention), and 0 means none. ``order`` (``[B]`` integers on the device, a permutation of the
    rows), if given, is the order the rows' programs start in: longest context first balances the
    SMs (``engine.model_runner.longest_first``); the result does not depend on it. Launch sizes depend on shapes
    only, so the call is CUDA-graph capturable. ``split_plan`` ``(rows, splits)`` (with ``order``, an eager step's
    :func:`long_row_split_plan`) splits only the first ``rows`` rows of ``order`` (the longest), each into
    ``splits`` parts, instead of every row into the count the shapes give. ``out`` (same shape as q, last dim
    contiguous) is written if given.
    """
    group = _check_cache(q, k_cache, v_cache)
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    config = config or _default_decode_config(q.dtype, head_dim)
    max_context = block_tables.shape[1] * block_size
    if split_plan is not None:
        assert order is not None, "a split plan splits the first rows of the order"
        split_rows, num_splits = split_plan  # (partials are kept for every row: their count bounds the splits)
        num_splits = min(num_splits, max(2, PARTIAL_BYTES // (batch * num_heads * head_dim * 4)))
    else:
        split_rows, num_splits = batch, config.num_splits or decode_num_splits(
            batch, num_kv_heads, max_context, config.block_n, _num_sms(q.device))
    row_tiles = triton.cdiv(batch * group, config.shared_block_m)
    prefix_splits = 0 if shared_blocks is None else decode_num_splits(  # (W3 measured with 2 per SM)
        row_tiles, num_kv_heads, max_context, config.block_n, _num_sms(q.device), programs_per_sm=2)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    if batch == 0:
        return out
    slots = num_splits + prefix_splits
    if slots > 1:
        part_out = torch.empty((batch, num_heads, slots, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((batch, num_heads, slots), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split kernel
    shared = context_lens if shared_blocks is None else shared_blocks  # not read without HAS_SHARED
    shapes = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_P2=triton.next_power_of_2(head_dim),
                  BLOCK_SIZE=block_size, BLOCK_N=config.block_n)
    attention = dict(GROUP=group, DOT_PRECISION=_dot_precision(q.dtype), **shapes)
    order_arg = context_lens if order is None else order  # not read without HAS_ORDER
    parts = split_rows * num_splits + batch - split_rows
    _decode_split_kernel[(num_kv_heads, parts)](
        q, k_cache, v_cache, block_tables, context_lens, shared, order_arg, out, part_out, part_lse,
        scale * _LOG2E, split_rows, num_splits, slots, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_H=max(16, triton.next_power_of_2(group)),
        HAS_SHARED=shared_blocks is not None, HAS_ORDER=order is not None, **attention,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if shared_blocks is not None:
        _shared_prefix_kernel[(row_tiles, num_kv_heads, prefix_splits)](
            q, k_cache, v_cache, block_tables, shared_blocks, part_out, part_lse, scale * _LOG2E,
            batch, num_splits, prefix_splits, q.stride(0), q.stride(1), k_cache.stride(0),
            k_cache.stride(1), k_cache.stride(2), BLOCK_M=config.shared_block_m,
            **attention, num_warps=config.shared_num_warps, num_stages=config.num_stages)
    if slots > 1:
        _decode_reduce_kernel[(batch if shared_blocks is not None else split_rows, num_heads)](
            part_out, part_lse, context_lens, shared, order_arg, out, split_rows, num_splits, prefix_splits,
            out.stride(0), out.stride(1), HAS_SHARED=shared_blocks is not None, HAS_ORDER=order is not None,
            SLOTS_P2=max(16, triton.next_power_of_2(slots)), **shapes, num_warps=4)
    return out


# Key splits of a prompt chunk deep in a long context (fewer query tiles than the GPU has SMs): the bf16 prefill
# tile (128 query rows x 128 keys, 2 stages) fits once per SM, so a step whose tiles x KV heads fill less than two
# waves splits their keys into parts of at least PREFILL_MIN_SPLIT_KEYS, aiming at PREFILL_SPLIT_WAVES waves.
PREFILL_SPLIT_WAVES = 4
PREFILL_MIN_SPLIT_KEYS = 1024
PREFILL_MAX_SPLITS = 16


def prefill_num_splits(programs: int, max_context: int, tokens: int, num_heads: int, head_dim: int,
                       num_sms: int) -> int:
    """Key splits for a prefill grid of ``programs`` (query tiles x KV heads) whose longest context is
    ``max_context``: one when the grid fills two waves or the context is short, else enough for
    ``PREFILL_SPLIT_WAVES`` waves, each split at least ``PREFILL_MIN_SPLIT_KEYS`` keys, the partials of
    ``tokens`` query tokens within ``PARTIAL_BYTES``."""
    if programs >= 2 * num_sms:
        return 1
    wanted = triton.cdiv(PREFILL_SPLIT_WAVES * num_sms, programs)
    by_keys = max_context // PREFILL_MIN_SPLIT_KEYS
    by_memory = PARTIAL_BYTES // max(1, tokens * num_heads * head_dim * 4)
    return max(1, min(wanted, by_keys, by_memory, PREFILL_MAX_SPLITS))


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor,
                            block_tables: torch.Tensor, scale: float,
                            max_seqlen_q: int | None = None, *, max_context: int | None = None,
                            out: torch.Tensor | None = None, config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal varlen prefill over the paged cache (see the reference for the semantics).

    q ``[total_q, num_heads, head_dim]`` (last dim contiguous); ``cu_seqlens_q [B+1]``,
    ``context_lens [B]`` and ``block_tables [B, max_blocks]`` are int32 device tensors. The new
    tokens' K/V must already be in the cache. ``max_seqlen_q`` sizes the grid and must be at
    least the longest new-token count (rows past it are not computed); when None it is read
    from ``cu_seqlens_q`` with a host sync. ``max_context`` (the longest of ``context_lens``, a host int), if
    given, lets a grid of few query tiles split long contexts' keys over several programs
    (:func:`prefill_num_splits`; ``config.num_splits`` overrides it). ``out`` (shape of q, last dim contiguous)
    is written if given.
    """
    group = _check_cache(q, k_cache, v_cache)
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    batch = context_lens.shape[0]
    tokens, num_heads, head_dim = q.shape
    config = config or _default_prefill_config(q.dtype, head_dim)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    assert out.shape == q.shape and out.stride(-1) == 1
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max()) if batch else 0
    if batch == 0 or max_seqlen_q == 0:
        return out
    row_tiles = triton.cdiv(max_seqlen_q * group, config.block_m)
    num_splits = config.num_splits or (1 if max_context is None else prefill_num_splits(
        row_tiles * batch * num_kv_heads, max_context, tokens, num_heads, head_dim, _num_sms(q.device)))
    span = max_context if max_context is not None else block_tables.shape[1] * block_size  # the longest context
    split_len = triton.cdiv(triton.cdiv(span, num_splits), config.block_n) * config.block_n
    if num_splits > 1:
        part_out = torch.empty((tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((tokens, num_heads, num_splits), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused without splits
    shapes = dict(NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, DIM_P2=triton.next_power_of_2(head_dim),
                  BLOCK_M=config.block_m)
    launch(_prefill_kernel, (row_tiles, batch, num_kv_heads * num_splits))(
        q, k_cache, v_cache, out, part_out, part_lse, cu_seqlens_q, context_lens, block_tables, scale * _LOG2E,
        split_len, num_splits, q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), BLOCK_SIZE=block_size, BLOCK_N=config.block_n,
        SPLIT=num_splits > 1, DOT_PRECISION=_dot_precision(q.dtype), **shapes,
        num_warps=config.num_warps, num_stages=config.num_stages)
    if num_splits > 1:
        launch(_prefill_reduce_kernel, (row_tiles, batch, num_kv_heads))(
            part_out, part_lse, out, cu_seqlens_q, context_lens, split_len, num_splits, out.stride(0),
            out.stride(1), **shapes, num_warps=4)
    return out


def compile_paged_prefill(num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Compile :func:`paged_prefill_attention`'s kernels for these caches, with and without key splits (call it
    inside :func:`engine.kernels.warmup.ahead_of_time`): the start-up's forward passes have no cached context, so
    without this the first step with some (a chunked prompt, a prefix-cache hit, a mixed step) would compile them."""
    device, head_dim = k_cache.device, k_cache.shape[-1]
    q = torch.empty(1, num_heads, head_dim, dtype=k_cache.dtype, device=device)
    ints = torch.zeros(2, dtype=torch.int32, device=device)  # nothing runs: only the arguments' types count
    config = _default_prefill_config(k_cache.dtype, head_dim)
    for splits in (1, 2):
        paged_prefill_attention(q, k_cache, v_cache, ints, ints[:1], ints[None, :1], 1.0, max_seqlen_q=1,
                                config=replace(config, num_splits=splits))


def _default_decode_config(dtype: torch.dtype, head_dim: int) -> DecodeConfig:
    wide = head_dim > 128  # halve the row tiles: their fp32 accumulators live in registers
    if dtype == torch.float32:
        return DecodeConfig(block_n=32, num_warps=4, num_stages=2, shared_block_m=16 if wide else 32,
                            shared_num_warps=4)
    return DecodeConfig(shared_block_m=64) if wide else DecodeConfig()


def _default_prefill_config(dtype: torch.dtype, head_dim: int) -> PrefillConfig:
    wide = head_dim > 128
    if dtype == torch.float32:
        return PrefillConfig(block_m=32 if wide else 64, block_n=32, num_warps=4, num_stages=2)
    if head_dim <= 64:
        return PrefillConfig(block_m=128, block_n=64, num_warps=4, num_stages=3)
    return PrefillConfig(block_m=64, block_n=64, num_warps=8, num_stages=2) if wide else PrefillConfig()
