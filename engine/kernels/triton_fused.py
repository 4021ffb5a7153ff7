"""Triton kernels for the small per-token ops: RMSNorm (optionally after the residual add), SiLU-and-mul, the
attention prologue (per-head q/k RMSNorm when the model has it, rotary embedding and the KV-cache store, in one
kernel), and the sampler's Gumbel-max step.

Each op is one launch (the sampler: two when it splits rows over several programs) whose size depends only on
tensor shapes (no host syncs), so all of them can be captured in CUDA graphs. On bf16/fp16 inputs they round
exactly where HF transformers' eager code rounds (see the torch versions in ``engine/layers/fusion.py``), so greedy
decoding can match HF token for token; only the order of the sum inside RMSNorm's mean differs.

Exactness on the GPU relies on three details. A product of two bf16/fp16 values is exact in fp32, so
rounding it once gives torch's half-precision multiply. These kernels launch with
``enable_fp_fusion=False``: otherwise the compiler contracts ``round(a * b) + c`` into one fused
multiply-add (it does so even in bf16), skipping a rounding HF does. And SiLU uses libdevice ``exp`` and
a correctly rounded division (``div_rn``), which is what torch's CUDA kernel compiles to, where
``tl.exp`` and ``/`` are faster approximations.
"""
import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from engine.kernels.triton_attention import _num_sms
from engine.kernels.triton_kv import cache_slot
from engine.kernels.warmup import launch

# The interpreter (CPU tests) cannot call libdevice; there numpy's exp stands in.
_LIBDEVICE: tl.constexpr = tl.constexpr(not triton.knobs.runtime.interpret)
_NORM_TILE = 2048       # elements per RMSNorm program: several short rows (per-head q/k norm) or one long
_SILU_BLOCK = 1024
_VOCAB_TILE = 1024      # Gumbel-max: Philox lanes of a tile of 4 x 1024 columns (one call draws four per lane)
_MIN_CHUNK_LANES = 128  # Gumbel-max: the narrowest slice of a tile one program races at a time
_PROGRAMS_PER_SM = 4    # Gumbel-max: rows are split over programs until the batch has this many per SM
_MAX_STEP_SEED = 1 << 31


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[outer, inner, cols]`` with a unit last stride, a view where possible.

    A per-head q/k norm gets ``[tokens, heads, head_dim]`` sliced out of the fused QKV output,
    whose token stride is not ``heads * head_dim``; two row strides cover it without a copy.
    """
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 1:
        return x.view(1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(1)
    return x.reshape(-1, x.shape[-2], x.shape[-1])


@triton.jit(do_not_specialize=["n_rows", "part_stride"])  # one compiled variant for every batch size
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_rows, inner, n_cols,
                     sx_outer, sx_inner, sr_outer, sr_inner, inv_n, eps, part_stride,
                     HAS_RESIDUAL: tl.constexpr, PARTS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    outer, within = (rows // inner).to(tl.int64), (rows % inner).to(tl.int64)
    x_offs = (outer * sx_outer + within * sx_inner)[:, None] + cols[None, :]
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0)
    if PARTS > 0:  # split-K partial sums of the product before this norm: their sum, rounded as its output
        for part in tl.static_range(1, PARTS):
            x += tl.load(x_ptr + part * part_stride + x_offs, mask=mask, other=0.0)
        x = x.to(out_ptr.dtype.element_ty)
    dst = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (outer * sr_outer + within * sr_inner)[:, None] + cols[None, :], mask=mask,
                    other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + dst, x, mask=mask)
    h = x.to(tl.float32)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out = _weighted_rms(h, _inv_rms(h, inv_n, eps), w, x.dtype)
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _inv_rms(h, inv_n, eps):
    """``rsqrt(mean(h ** 2) + eps)`` of each row of fp32 ``h`` ``[rows, cols]`` (padded columns hold zeros);
    the mean multiplies the sum by ``1 / n``, as torch's CUDA mean does."""
    return tl.rsqrt(tl.sum(h * h, axis=1) * inv_n + eps)


@triton.jit
def _weighted_rms(h, inv_rms, w, dtype: tl.constexpr):
    """HF's ``weight * (h * inv_rms).to(dtype)`` in fp32: the normalised value is rounded to ``dtype`` first."""
    return w * _round(h * inv_rms[:, None], dtype)


@triton.jit
def _round(x, dtype: tl.constexpr):
    """Round an fp32 value to ``dtype`` and back (a no-op for fp32)."""
    return x.to(dtype).to(tl.float32)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype, sum_dtype: torch.dtype, parts: int = 0):
    """``parts > 0``: ``x`` holds that many partial sums ``[parts, *shape]`` (see :func:`add_rms_norm`)."""
    shape = x.shape[1:] if parts else x.shape
    out = torch.empty(shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(shape, dtype=sum_dtype, device=x.device) if residual is not None else out
    if out.numel() == 0:
        return out, summed
    part_stride = x.stride(0) if parts else 0
    xv = _rows_view(x[0] if parts else x)
    rv = _rows_view(residual) if residual is not None else xv
    n_cols = shape[-1]
    n_rows = xv.shape[0] * xv.shape[1]
    block = triton.next_power_of_2(n_cols)
    rows = max(1, _NORM_TILE // block)
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        xv, rv, weight, out, summed, n_rows, xv.shape[1], n_cols,
        xv.stride(0), xv.stride(1), rv.stride(0), rv.stride(1), 1.0 / n_cols, eps, part_stride,
        HAS_RESIDUAL=residual is not None, PARTS=parts, ROWS=rows, BLOCK=block,
        num_warps=4 if block <= 4096 else 8, enable_fp_fusion=False)
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; ``x`` may be a strided view (unit last stride avoids a copy)."""
    assert weight.shape == (x.shape[-1],) and weight.is_contiguous()
    out, _ = _launch_rms_norm(x, None, weight, eps, torch.promote_types(x.dtype, weight.dtype), x.dtype)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s), s)`` with ``s = x + residual`` in the wider dtype of the two, in one pass; the norm comes
    back in ``x``'s dtype (an fp32 residual stream feeding bf16 layers).

    ``x`` may also be the fp32 partial sums ``[splits, *residual.shape]`` of the product before the norm
    (``engine.kernels.triton_gemm.split_k_linear``): they are added up and rounded to ``weight``'s dtype, as that
    product's own output would be, and the norm comes back in that dtype."""
    assert weight.shape == (residual.shape[-1],) and weight.is_contiguous()
    if x.dim() == residual.dim() + 1:
        assert x.shape[1:] == residual.shape and x.dtype == torch.float32 and x.stride(-1) == 1
        assert weight.dtype in (torch.bfloat16, torch.float16), "partial sums of a half-precision layer"
        return _launch_rms_norm(x, residual, weight, eps, weight.dtype,
                                torch.promote_types(weight.dtype, residual.dtype), parts=x.shape[0])
    assert x.shape == residual.shape
    return _launch_rms_norm(x, residual, weight, eps, x.dtype, torch.promote_types(x.dtype, residual.dtype))


@triton.jit
def _exp(x):
    """``expf`` as torch's CUDA kernels call it (``tl.exp`` is the faster, less exact ``ex2.approx``)."""
    if _LIBDEVICE:
        y = libdevice.exp(x)
    else:
        y = tl.exp(x)
    return y


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inner, stride_row, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(x_ptr + row * stride_row + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_row + inner + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = tl.math.div_rn(g, 1.0 + _exp(-g)).to(gate.dtype)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * inner + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(x[..., :I]) * x[..., I:]`` for ``x`` ``[..., 2 * I]``."""
    inner = x.shape[-1] // 2
    out = torch.empty((*x.shape[:-1], inner), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rows = x.reshape(-1, x.shape[-1]) if x.stride(-1) == 1 else x.contiguous().view(-1, x.shape[-1])
    block = min(_SILU_BLOCK, triton.next_power_of_2(inner))
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](
        rows, out, inner, rows.stride(0), BLOCK=block, num_warps=4, enable_fp_fusion=False)
    return out


@triton.jit
def _cos_sin(cos_ptr, sin_ptr, row, dt: tl.constexpr, HALF: tl.constexpr, HALF_P2: tl.constexpr):
    """The halves of one position's cos and sin rows ``[1, HALF_P2]``, rounded to ``dt`` (HF: ``cos.to(dtype)``)."""
    d = tl.arange(0, HALF_P2)
    mask = d < HALF
    cos1 = _round(tl.load(cos_ptr + row + d, mask=mask, other=0.0), dt)[None, :]
    cos2 = _round(tl.load(cos_ptr + row + HALF + d, mask=mask, other=0.0), dt)[None, :]
    sin1 = _round(tl.load(sin_ptr + row + d, mask=mask, other=0.0), dt)[None, :]
    sin2 = _round(tl.load(sin_ptr + row + HALF + d, mask=mask, other=0.0), dt)[None, :]
    return cos1, sin1, cos2, sin2


@triton.jit
def _load_halves(src, stride_head, heads, HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    """The two halves ``[HEADS_P2, HALF_P2]`` of one token's heads (``[heads, 2 * HALF]``, heads ``stride_head``
    apart), padded with zeros."""
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HALF_P2)[None, :]
    mask = (h < heads) & (d < HALF)
    return (tl.load(src + h * stride_head + d, mask=mask, other=0.0),
            tl.load(src + h * stride_head + HALF + d, mask=mask, other=0.0))


@triton.jit
def _store_halves(dst, stride_head, x1, x2, heads, HALF: tl.constexpr, HEADS_P2: tl.constexpr,
                  HALF_P2: tl.constexpr):
    """Write halves as :func:`_load_halves` reads them, cast to ``dst``'s dtype."""
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HALF_P2)[None, :]
    mask = (h < heads) & (d < HALF)
    tl.store(dst + h * stride_head + d, x1.to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + h * stride_head + HALF + d, x2.to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _norm_rotate(src, stride_head, w_ptr, heads, inv_n, eps, cos1, sin1, cos2, sin2, dt: tl.constexpr,
                 HAS_NORM: tl.constexpr, HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    """One token's heads: the per-head RMSNorm if ``HAS_NORM`` (its output rounded to ``dt``), then HF's
    ``x * cos + rotate_half(x) * sin``, rounding each product and the sum to ``dt``; returns the two halves."""
    x1, x2 = _load_halves(src, stride_head, heads, HALF, HEADS_P2, HALF_P2)
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    if HAS_NORM:
        # the mean of squares over whole rows, summed in the same order as _rms_norm_kernel
        h = tl.arange(0, HEADS_P2)[:, None]
        cols = tl.arange(0, 2 * HALF_P2)[None, :]
        rows = tl.load(src + h * stride_head + cols, mask=(h < heads) & (cols < 2 * HALF), other=0.0)
        inv_rms = _inv_rms(rows.to(tl.float32), inv_n, eps)
        w1, w2 = _load_halves(w_ptr, 0, 1, HALF, 1, HALF_P2)  # the weight, as one head
        a1 = _round(_weighted_rms(a1, inv_rms, w1.to(tl.float32), x1.dtype), dt)
        a2 = _round(_weighted_rms(a2, inv_rms, w2.to(tl.float32), x1.dtype), dt)
    out1 = _round(_round(a1 * cos1, dt) + _round(-a2 * sin1, dt), dt)
    out2 = _round(_round(a2 * cos2, dt) + _round(a1 * sin2, dt), dt)
    return out1, out2


@triton.jit
def _qk_norm_rotary_store_kernel(
        pos_ptr, q_ptr, k_ptr, v_ptr, q_w_ptr, k_w_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
        sq_token, sq_head, sk_token, sk_head, sv_token, sv_head, s_rope, num_q_heads, num_kv_heads, inv_n, eps,
        slot_ptr, k_cache_ptr, v_cache_ptr, skc_block, skc_offset, skc_head, svc_block, svc_offset, svc_head,
        HAS_NORM: tl.constexpr, STORE: tl.constexpr, HALF: tl.constexpr, Q_HEADS_P2: tl.constexpr,
        KV_HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One token: q and k normed (``HAS_NORM``) and rotated into contiguous ``q_out`` / ``k_out``; with ``STORE``,
    the rotated k and the untouched v also go to the paged caches at the token's slot (-1: none)."""
    token = tl.program_id(0).to(tl.int64)
    dt = q_out_ptr.dtype.element_ty
    rope_row = tl.load(pos_ptr + token).to(tl.int64) * s_rope
    cos1, sin1, cos2, sin2 = _cos_sin(cos_ptr, sin_ptr, rope_row, dt, HALF, HALF_P2)
    q1, q2 = _norm_rotate(q_ptr + token * sq_token, sq_head, q_w_ptr, num_q_heads, inv_n, eps,
                          cos1, sin1, cos2, sin2, dt, HAS_NORM, HALF, Q_HEADS_P2, HALF_P2)
    _store_halves(q_out_ptr + token * num_q_heads * (2 * HALF), 2 * HALF, q1, q2, num_q_heads,
                  HALF, Q_HEADS_P2, HALF_P2)
    k1, k2 = _norm_rotate(k_ptr + token * sk_token, sk_head, k_w_ptr, num_kv_heads, inv_n, eps,
                          cos1, sin1, cos2, sin2, dt, HAS_NORM, HALF, KV_HEADS_P2, HALF_P2)
    _store_halves(k_out_ptr + token * num_kv_heads * (2 * HALF), 2 * HALF, k1, k2, num_kv_heads,
                  HALF, KV_HEADS_P2, HALF_P2)
    if STORE:
        slot = tl.load(slot_ptr + token).to(tl.int64)
        if slot >= 0:
            k_dst = cache_slot(k_cache_ptr, slot, skc_block, skc_offset, BLOCK_SIZE)
            _store_halves(k_dst, skc_head, k1, k2, num_kv_heads, HALF, KV_HEADS_P2, HALF_P2)
            v1, v2 = _load_halves(v_ptr + token * sv_token, sv_head, num_kv_heads, HALF, KV_HEADS_P2, HALF_P2)
            v_dst = cache_slot(v_cache_ptr, slot, svc_block, svc_offset, BLOCK_SIZE)
            _store_halves(v_dst, svc_head, v1, v2, num_kv_heads, HALF, KV_HEADS_P2, HALF_P2)


def _head_rows(heads: int, head_dim: int, norm: bool) -> int:
    """Rows of the prologue's head tiles. With the norm, at least as many as ``_rms_norm_kernel`` normalises per
    program: the same tile layout on the GPU, so the sum of squares adds up in the same order (the same bits)."""
    rows = triton.next_power_of_2(heads)
    return max(rows, _NORM_TILE // triton.next_power_of_2(head_dim)) if norm else rows


def qk_norm_rotary_store(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                         norm_weights: tuple[torch.Tensor, torch.Tensor] | None, eps: float, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, slot_mapping: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention prologue in one launch: per-head RMSNorm of q and k (``norm_weights = (q_weight, k_weight)``,
    or None), rotate-half rotary, and, when ``k_cache`` is not empty, rotated k and v into the paged caches
    ``[num_blocks, block_size, kv_heads, head_dim]`` at ``slot_mapping`` (slot -1: no write). Returns the rotated
    ``(q, k)``, contiguous.

    q ``[tokens, heads, head_dim]``, k and v ``[tokens, kv_heads, head_dim]`` may be strided views (the split of the
    fused QKV output); ``cos_cache``/``sin_cache`` are ``[max_position, head_dim]``; positions are not bounds-checked.
    """
    tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, norm, store = k.shape[1], norm_weights is not None, k_cache.numel() > 0
    assert k.shape == v.shape == (tokens, num_kv_heads, head_dim) and k.dtype == q.dtype and head_dim % 2 == 0
    assert positions.shape == (tokens,) and cos_cache.stride() == sin_cache.stride()
    assert cos_cache.stride(-1) == 1 and cos_cache.shape[-1] == head_dim
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    q_w, k_w = norm_weights if norm else (q, k)  # without the norm: stand-ins, never read
    assert not norm or (q_w.shape == k_w.shape == (head_dim,) and q_w.dtype == k_w.dtype and q_w.is_contiguous()
                        and k_w.is_contiguous())
    out_dtype = torch.promote_types(q.dtype, q_w.dtype) if norm else q.dtype  # as the RMSNorm's output
    q_out, k_out = (torch.empty(x.shape, dtype=out_dtype, device=q.device) for x in (q, k))
    if tokens == 0:
        return q_out, k_out
    if store:
        assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
        assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1 and slot_mapping.shape == (tokens,)
        cache_args = (slot_mapping, k_cache, v_cache, *k_cache.stride()[:3], *v_cache.stride()[:3])
    else:
        cache_args = (positions, k_out, k_out, 0, 0, 0, 0, 0, 0)  # stand-ins, never read or written
    _qk_norm_rotary_store_kernel[(tokens,)](
        positions, q, k, v, q_w, k_w, cos_cache, sin_cache, q_out, k_out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_cache.stride(0),
        num_q_heads, num_kv_heads, 1.0 / head_dim, eps, *cache_args, HAS_NORM=norm, STORE=store, HALF=head_dim // 2,
        Q_HEADS_P2=_head_rows(num_q_heads, head_dim, norm), KV_HEADS_P2=_head_rows(num_kv_heads, head_dim, norm),
        HALF_P2=triton.next_power_of_2(head_dim // 2), BLOCK_SIZE=k_cache.shape[1] if store else 1, num_warps=4,
        enable_fp_fusion=False)
    return q_out, k_out


@triton.jit
def _uniform_24(bits):
    """``(bits + 0.5) / 2**24`` for 24-bit ``bits`` in fp32, capped below 1 (as ``hashed_uniform``)."""
    u = (bits.to(tl.float32) + 0.5) * 5.9604644775390625e-08
    return tl.minimum(u, 0.99999994039535522)


@triton.jit
def _hashed_uniform(row_mix, cols):
    """``engine.layers.sampler.hashed_uniform`` for one row, in uint64 (so ``>>`` is logical)."""
    x = row_mix + cols.to(tl.uint64) * 0x27D4EB2F
    x = x ^ (x >> 33)
    x = x * 0xFF51AFD7ED558CCD
    x = x ^ (x >> 33)
    x = x * 0xC4CEB9FE1A85EC53
    x = x ^ (x >> 33)
    return _uniform_24((x >> 40) & 0xFFFFFF)


@triton.jit
def _gumbel(u):
    return -tl.log(-tl.log(u))


@triton.jit
def _race(row_ptr, mask_row_ptr, masked, cols, vocab, scale, noise, best, best_col):
    """Per lane, keep the best ``logit / scale + noise`` seen and its column; equal scores keep the lower column.
    ``masked``: a column whose bit is 0 in the row's token bitmask (32 columns per int32 word) counts as -inf."""
    inside = cols < vocab
    if masked:
        words = tl.load(mask_row_ptr + cols // 32, mask=inside, other=0)
        inside = inside & (((words >> (cols % 32)) & 1) != 0)
    x = tl.load(row_ptr + cols, mask=inside, other=float("-inf")).to(tl.float32)
    score = tl.math.div_rn(x, scale) + noise  # IEEE division, as torch's logits / T
    better = (score > best) | ((score == best) & (cols < best_col))
    return tl.where(better, score, best), tl.where(better, cols, best_col)


@triton.jit
def _best_lowest_column(best, best_col, vocab):
    """The top score of ``best`` and the lowest column among the lanes that reach it."""
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, best_col, vocab), axis=0)


# The per-row settings are views at any offset of the step's upload: specialising on their alignment would compile
# a variant per batch-size parity. The grammar bitmask's arguments are not specialised either: one variant serves
# batches with and without it.
@triton.jit(do_not_specialize=["temp_ptr", "seed_ptr", "pos_ptr", "num_chunks", "chunks_per_split", "step_seed",
                               "mask_ptr", "mask_stride", "masked"])
def _gumbel_slice_kernel(logits_ptr, temp_ptr, seed_ptr, pos_ptr, out_ptr, score_ptr, col_ptr, stride_row, vocab,
                         num_chunks, chunks_per_split, step_seed, mask_ptr, mask_stride, masked,
                         TILE: tl.constexpr, LANES: tl.constexpr, SPLIT: tl.constexpr):
    """Races one slice of one row: chunks ``[split * chunks_per_split, ...)`` of ``LANES`` lanes.

    The vocabulary is cut in tiles of 4 x ``TILE`` columns; Philox counter ``t * TILE + lane`` draws the noise
    of columns ``t * 4 * TILE + j * TILE + lane``, j = 0..3. Chunk ``c`` holds lanes ``(c % G) * LANES + [0,
    LANES)`` of tile ``c // G`` (G = TILE / LANES), so its counters are ``c * LANES + [0, LANES)`` and every
    column gets the same noise however the row is split. ``SPLIT``: write the slice's best score and column for
    :func:`_gumbel_winner_kernel`, else the row's token.
    """
    row = tl.program_id(0)
    split = tl.program_id(1)
    temperature = tl.load(temp_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    sampled = temperature > 0
    hashed = sampled & (seed >= 0)
    scale = tl.where(sampled, temperature, 1.0)
    position = tl.load(pos_ptr + row).to(tl.int64)
    row_mix = seed.to(tl.uint64) * 0x9E3779B1 + position.to(tl.uint64) * 0x85EBCA77
    philox_key = (row.to(tl.uint64) << 32) | step_seed.to(tl.uint64)  # distinct stream per (row, step)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    mask_row_ptr = mask_ptr + row.to(tl.int64) * mask_stride
    lanes = tl.arange(0, LANES)
    best = tl.full([LANES], float("-inf"), tl.float32)
    best_col = tl.zeros([LANES], tl.int32)
    first = split * chunks_per_split
    for chunk in range(first, tl.minimum(first + chunks_per_split, num_chunks)):
        c0 = (chunk // (TILE // LANES)) * (4 * TILE) + (chunk % (TILE // LANES)) * LANES + lanes
        c1, c2, c3 = c0 + TILE, c0 + 2 * TILE, c0 + 3 * TILE
        if hashed:
            g0, g1 = _gumbel(_hashed_uniform(row_mix, c0)), _gumbel(_hashed_uniform(row_mix, c1))
            g2, g3 = _gumbel(_hashed_uniform(row_mix, c2)), _gumbel(_hashed_uniform(row_mix, c3))
        elif sampled:
            r0, r1, r2, r3 = tl.randint4x(philox_key, chunk * LANES + lanes)  # one Philox call, four columns
            g0, g1 = _gumbel(_uniform_24(r0 >> 8)), _gumbel(_uniform_24(r1 >> 8))
            g2, g3 = _gumbel(_uniform_24(r2 >> 8)), _gumbel(_uniform_24(r3 >> 8))
        else:  # greedy: x / 1 + 0 == x
            g0 = tl.zeros([LANES], tl.float32)
            g1, g2, g3 = g0, g0, g0
        best, best_col = _race(row_ptr, mask_row_ptr, masked, c0, vocab, scale, g0, best, best_col)
        best, best_col = _race(row_ptr, mask_row_ptr, masked, c1, vocab, scale, g1, best, best_col)
        best, best_col = _race(row_ptr, mask_row_ptr, masked, c2, vocab, scale, g2, best, best_col)
        best, best_col = _race(row_ptr, mask_row_ptr, masked, c3, vocab, scale, g3, best, best_col)
    top, winner = _best_lowest_column(best, best_col, vocab)
    if SPLIT:
        partial = row.to(tl.int64) * tl.num_programs(1) + split
        tl.store(score_ptr + partial, top)
        tl.store(col_ptr + partial, winner)
    else:
        tl.store(out_ptr + row, winner.to(tl.int64))


@triton.jit(do_not_specialize=["splits"])
def _gumbel_winner_kernel(score_ptr, col_ptr, out_ptr, splits, vocab, SPLITS_P2: tl.constexpr):
    """One row's token from its slices' bests: the top score, ties to the lowest column."""
    row = tl.program_id(0).to(tl.int64)
    i = tl.arange(0, SPLITS_P2)
    score = tl.load(score_ptr + row * splits + i, mask=i < splits, other=float("-inf"))
    col = tl.load(col_ptr + row * splits + i, mask=i < splits, other=vocab)
    _, winner = _best_lowest_column(score, col, vocab)
    tl.store(out_ptr + row, winner.to(tl.int64))


def _gumbel_plan(rows: int, vocab: int, num_programs: int) -> tuple[int, int, int, int, int]:
    """``(tile, lanes, chunks, chunks_per_split, splits)``: each row's chunks split so that ``rows * splits`` comes
    near ``num_programs``, chunks narrowed (down to ``_MIN_CHUNK_LANES``) when rows x tiles falls short of it.
    ``tile`` depends on the vocabulary only: it fixes which Philox counter draws each column's noise."""
    tile = min(_VOCAB_TILE, triton.next_power_of_2(triton.cdiv(vocab, 4)))
    tiles = triton.cdiv(vocab, 4 * tile)
    lanes = tile
    while lanes > _MIN_CHUNK_LANES and rows * tiles * (tile // lanes) < num_programs:
        lanes //= 2
    chunks = tiles * (tile // lanes)
    chunks_per_split = triton.cdiv(chunks, min(chunks, triton.cdiv(num_programs, rows)))
    return tile, lanes, chunks, chunks_per_split, triton.cdiv(chunks, chunks_per_split)


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, step_seed: int, num_programs: int | None = None,
                  bitmask: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``logits`` ``[B, V]``: ``argmax(logits / T - log(-log(U)))``, or the plain argmax if T == 0;
    with a grammar ``bitmask`` (int32 ``[B, >= ceil(V / 32)]``, xgrammar's layout) over the allowed tokens only, as
    if the others' logits were -inf (without writing them).

    U is made in the kernel: ``hashed_uniform(seed, position)`` for rows with ``seed >= 0`` (bit for
    bit), else Philox keyed by (row, ``step_seed``), so pass a new ``step_seed`` every call. Ties go
    to the lowest token id. ``step_seed`` is a launch argument: a CUDA graph would freeze it.

    Each row's vocabulary is split over several programs so that the batch fills the GPU (``num_programs``,
    default ``_PROGRAMS_PER_SM`` per SM); a second launch then picks each row's winner. The result does not
    depend on the split.
    """
    rows, vocab = logits.shape
    assert temperatures.shape == seeds.shape == positions.shape == (rows,)
    assert 0 <= step_seed < _MAX_STEP_SEED and vocab < 2 ** 31 - 4 * _VOCAB_TILE
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    num_programs = num_programs or _PROGRAMS_PER_SM * _num_sms(logits.device)
    if bitmask is not None:
        assert bitmask.dtype == torch.int32 and bitmask.shape[0] == rows and bitmask.shape[1] * 32 >= vocab
        assert bitmask.stride(-1) == 1
    _race_rows(logits, temperatures, seeds, positions, step_seed, out, _gumbel_plan(rows, vocab, num_programs),
               bitmask)
    return out


def _race_rows(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
               step_seed: int, out: torch.Tensor, plan: tuple[int, int, int, int, int],
               bitmask: torch.Tensor | None = None) -> None:
    """Launch :func:`gumbel_argmax`'s kernels with ``plan`` (:func:`_gumbel_plan`), writing the tokens into ``out``."""
    rows, vocab = logits.shape
    tile, lanes, chunks, chunks_per_split, splits = plan
    score = torch.empty((rows, splits), dtype=torch.float32, device=logits.device) if splits > 1 else out
    col = torch.empty((rows, splits), dtype=torch.int32, device=logits.device) if splits > 1 else out
    # without a bitmask, a stand-in of the same dtype (never read), so that both launches share one variant
    mask = bitmask if bitmask is not None else temperatures.new_empty(1, dtype=torch.int32)
    launch(_gumbel_slice_kernel, (rows, splits))(
        logits, temperatures, seeds, positions, out, score, col, logits.stride(0), vocab, chunks, chunks_per_split,
        step_seed, mask, mask.stride(0) if bitmask is not None else 0, int(bitmask is not None),
        TILE=tile, LANES=lanes, SPLIT=splits > 1, num_warps=min(8, max(2, lanes // 128)))
    if splits > 1:
        most_splits = triton.cdiv(vocab, 4 * tile) * max(1, tile // _MIN_CHUNK_LANES)  # per vocabulary: one binary
        launch(_gumbel_winner_kernel, (rows,))(score, col, out, splits, vocab,
                                               SPLITS_P2=triton.next_power_of_2(most_splits), num_warps=4)


def compile_gumbel_argmax(vocab: int, max_rows: int, dtypes: tuple[torch.dtype, ...], device: torch.device) -> None:
    """Compile the variants :func:`gumbel_argmax` launches for 1 to ``max_rows`` rows of logits in each of
    ``dtypes`` (the kernel's chunk width and its split depend on the row count). Call it inside
    :func:`engine.kernels.warmup.ahead_of_time`: a variant's arguments, not the launch's size, select it, so one
    row stands for all."""
    num_programs = _PROGRAMS_PER_SM * _num_sms(device)
    plans = {}
    for rows in range(1, max_rows + 1):
        plan = _gumbel_plan(rows, vocab, num_programs)
        plans.setdefault((plan[1], plan[4] > 1), plan)  # (lanes, split) select the variant
    settings = torch.ones(1, device=device)
    ids = torch.zeros(1, dtype=torch.int64, device=device)
    for dtype in dtypes:
        logits = torch.zeros(1, vocab, dtype=dtype, device=device)
        for plan in plans.values():
            _race_rows(logits, settings, ids, ids, 1, torch.empty_like(ids), plan)
