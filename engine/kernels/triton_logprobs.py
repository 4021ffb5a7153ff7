"""Raw logprobs without a log-softmax: per logits row, the logsumexp and the top-k logits, in one read.

``torch.log_softmax`` + ``topk`` over a ``[256, 151936]`` decode batch writes and re-reads a full fp32 copy of the
logits and runs torch's multi-pass top-k; only ``R * (k + 1)`` numbers of it are kept. Here:

* stage 1 (:func:`logprob_partials`, before the logits are processed): one program per (row, segment of
  ``SEGMENT`` logits) reads its segment once and writes its max, its sum of ``exp(x - max)`` and its top ``k``
  (value, column) candidates;
* stage 2 (:func:`finish_logprobs`, once the tokens are sampled): one program per row combines the segments'
  sums into the logsumexp ``lse``, picks the top ``k`` of the ``segments * k`` candidates, and gathers the
  sampled token's raw logit; every logprob is ``logit - lse``.

A segment's top k come from a tournament, not from k passes over the whole segment: the segment is ``GROUPS``
groups of ``WIDTH`` columns, each group's best is known after the read, and each of the k rounds takes the best
group's best and refills that group from its ``WIDTH`` columns (a re-read that L1/L2 serves), so a round costs
two reductions over ``GROUPS`` and two over ``WIDTH`` instead of two over the segment.

The rows are read in place through their indices (no ``index_select`` copy); ``GROUPS`` and ``WIDTH`` are the
tuning knobs (each round's cost against the number of segments, i.e. of programs and of stage-2 candidates).

Order: descending value, ties to the lowest column, in both stages, so the result is deterministic and its
values equal ``torch.topk``'s (ids can differ from torch's only among exactly equal values). Columns whose
logit is -inf (a masked row) are ranked like any other value; a segment with fewer than k columns pads its
candidates with (-inf, ``vocab``), which sorts after every real column.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

GROUPS = 64  # groups per segment: the tournament's width
WIDTH = 64   # columns per group: what a round re-reads
SEGMENT = GROUPS * WIDTH


@dataclass
class LogprobPartials:
    """Stage 1's output for ``rows`` of a logits tensor: per (row, segment) the max and sum of ``exp(x - max)``,
    and its top ``k`` (value, column) candidates."""
    seg_max: torch.Tensor     # [R, segments] fp32
    seg_sum: torch.Tensor     # [R, segments] fp32
    cand_values: torch.Tensor  # [R, segments, k] fp32, raw logits
    cand_ids: torch.Tensor     # [R, segments, k] int32 columns (vocab: none)


@triton.jit
def _best(values, cols, eligible, vocab):
    """The largest eligible value and its lowest column (-inf and ``vocab`` when none is eligible)."""
    best = tl.max(tl.where(eligible, values, float("-inf")), axis=0)
    return best, tl.min(tl.where(eligible & (values == best), cols, vocab), axis=0)


@triton.jit
def _partials_kernel(logits_ptr, rows_ptr, seg_max_ptr, seg_sum_ptr, cand_val_ptr, cand_id_ptr, stride_row, vocab,
                     n_seg, K: tl.constexpr, GROUPS: tl.constexpr, WIDTH: tl.constexpr):
    r, seg = tl.program_id(0), tl.program_id(1)
    row_ptr = logits_ptr + tl.load(rows_ptr + r).to(tl.int64) * stride_row
    start = seg * (GROUPS * WIDTH)
    groups, lanes = tl.arange(0, GROUPS), tl.arange(0, WIDTH)
    cols = start + groups[:, None] * WIDTH + lanes[None, :]
    valid = cols < vocab
    x = tl.load(row_ptr + cols, mask=valid, other=float("-inf")).to(tl.float32)
    group_best = tl.max(x, axis=1)
    seg_max = tl.max(group_best, axis=0)
    shift = tl.where(seg_max == float("-inf"), 0.0, seg_max)  # an all -inf segment sums to 0, not NaN
    out = r * n_seg + seg
    tl.store(seg_max_ptr + out, seg_max)
    tl.store(seg_sum_ptr + out, tl.sum(tl.sum(tl.exp(x - shift), axis=1), axis=0))
    if K > 0:
        group_col = tl.min(tl.where(valid & (x == group_best[:, None]), cols, vocab), axis=1)
        for j in range(K):
            value, col = _best(group_best, group_col, group_col < vocab, vocab)
            tl.store(cand_val_ptr + out * K + j, value)
            tl.store(cand_id_ptr + out * K + j, col)
            # refill the winner's group with its best column ranked after (value, col): the ones before are taken
            g = (col - start) // WIDTH
            refill = start + g * WIDTH + lanes
            inside = refill < tl.where(col < vocab, vocab, 0)  # none when the segment is used up
            y = tl.load(row_ptr + refill, mask=inside, other=float("-inf")).to(tl.float32)
            after = inside & ((y < value) | ((y == value) & (refill > col)))
            next_value, next_col = _best(y, refill, after, vocab)
            group_best = tl.where(groups == g, next_value, group_best)
            group_col = tl.where(groups == g, next_col, group_col)


@triton.jit
def _finish_kernel(seg_max_ptr, seg_sum_ptr, cand_val_ptr, cand_id_ptr, logits_ptr, rows_ptr, tokens_ptr,
                   token_out_ptr, top_out_ptr, ids_out_ptr, stride_row, vocab, n_seg,
                   K: tl.constexpr, SEG_P2: tl.constexpr, CAND_P2: tl.constexpr):
    r = tl.program_id(0)
    segs = tl.arange(0, SEG_P2)
    seg_max = tl.load(seg_max_ptr + r * n_seg + segs, mask=segs < n_seg, other=float("-inf"))
    seg_sum = tl.load(seg_sum_ptr + r * n_seg + segs, mask=segs < n_seg, other=0.0)
    top = tl.max(seg_max, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    lse = shift + tl.log(tl.sum(seg_sum * tl.exp(seg_max - shift), axis=0))
    row = tl.load(rows_ptr + r).to(tl.int64)
    token = tl.load(tokens_ptr + row).to(tl.int64)
    token_logit = tl.load(logits_ptr + row * stride_row + token).to(tl.float32)
    tl.store(token_out_ptr + r, token_logit - lse)
    if K > 0:
        idx = tl.arange(0, CAND_P2)
        in_range = idx < n_seg * K
        values = tl.load(cand_val_ptr + r * n_seg * K + idx, mask=in_range, other=float("-inf"))
        ids = tl.load(cand_id_ptr + r * n_seg * K + idx, mask=in_range, other=vocab)
        for j in range(K):
            value, col = _best(values, ids, ids < vocab, vocab)
            tl.store(top_out_ptr + r * K + j, value - lse)
            tl.store(ids_out_ptr + r * K + j, col.to(tl.int64))
            taken = ids == col  # real columns are unique; a taken one becomes padding
            values = tl.where(taken, float("-inf"), values)
            ids = tl.where(taken, vocab, ids)


def logprob_partials(logits: torch.Tensor, rows: torch.Tensor, k: int) -> LogprobPartials:
    """Stage 1 for rows ``rows`` ``[R]`` of ``logits`` ``[B, V]`` (fp32 / bf16 / fp16, computed in fp32), top ``k``.
    Reads the logits now: call it before anything modifies them."""
    num_rows, vocab = rows.shape[0], logits.shape[1]
    assert logits.dim() == 2 and 0 <= k <= vocab < 2 ** 31 - SEGMENT
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    n_seg = triton.cdiv(vocab, SEGMENT)
    device = logits.device
    partials = LogprobPartials(torch.empty(num_rows, n_seg, device=device), torch.empty(num_rows, n_seg, device=device),
                               torch.empty(num_rows, n_seg, k, device=device),
                               torch.empty(num_rows, n_seg, k, dtype=torch.int32, device=device))
    if num_rows:
        _partials_kernel[(num_rows, n_seg)](logits, rows, partials.seg_max, partials.seg_sum, partials.cand_values,
                                            partials.cand_ids, logits.stride(0), vocab, n_seg, K=k, GROUPS=GROUPS,
                                            WIDTH=WIDTH, num_warps=4)
    return partials


def finish_logprobs(partials: LogprobPartials, logits: torch.Tensor, rows: torch.Tensor, token_ids: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stage 2: per row ``rows[r]``, the logprob of ``token_ids[rows[r]]`` ``[R]``, and its top ``k`` token ids
    ``[R, k]`` (int64) with their logprobs ``[R, k]``. ``logits`` are the ones stage 1 read (their row of the token
    must not have changed since)."""
    num_rows, n_seg, k = partials.cand_values.shape
    vocab, device = logits.shape[1], logits.device
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    token = torch.empty(num_rows, device=device)
    top, top_ids = torch.empty(num_rows, k, device=device), torch.empty(num_rows, k, dtype=torch.int64, device=device)
    if num_rows:
        _finish_kernel[(num_rows,)](partials.seg_max, partials.seg_sum, partials.cand_values, partials.cand_ids,
                                    logits, rows, token_ids, token, top, top_ids, logits.stride(0), vocab, n_seg, K=k,
                                    SEG_P2=triton.next_power_of_2(n_seg),
                                    CAND_P2=triton.next_power_of_2(max(1, n_seg * k)), num_warps=4)
    return token, top_ids, top
