"""Triton kernels for the small per-token ops: RMSNorm (optionally after the residual add), rotary
embedding, SiLU-and-mul, and the sampler's Gumbel-max step.

Each op is one launch whose size depends only on tensor shapes (no host syncs), so all of them can
be captured in CUDA graphs. On bf16/fp16 inputs they round exactly where HF transformers' eager code
rounds (see the torch versions in ``engine/layers/fusion.py``), so greedy decoding can match HF token
for token; only the order of the sum inside RMSNorm's mean differs.

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

# The interpreter (CPU tests) cannot call libdevice; there numpy's exp stands in.
_LIBDEVICE: tl.constexpr = tl.constexpr(not triton.knobs.runtime.interpret)
_NORM_TILE = 2048       # elements per RMSNorm program: several short rows (per-head q/k norm) or one long
_SILU_BLOCK = 1024
_VOCAB_BLOCK = 1024     # lanes per sub-tile of the Gumbel-max loop (4 sub-tiles per Philox call)
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


@triton.jit(do_not_specialize=["n_rows"])  # one compiled variant for every batch size
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, sum_ptr, n_rows, inner, n_cols,
                     sx_outer, sx_inner, sr_outer, sr_inner, inv_n, eps,
                     HAS_RESIDUAL: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_mask[None, :]
    outer, within = (rows // inner).to(tl.int64), (rows % inner).to(tl.int64)
    x = tl.load(x_ptr + (outer * sx_outer + within * sx_inner)[:, None] + cols[None, :], mask=mask, other=0.0)
    dst = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + (outer * sr_outer + within * sr_inner)[:, None] + cols[None, :], mask=mask,
                    other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + dst, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=1) * inv_n  # torch's CUDA mean multiplies by 1/n too
    h = (h * tl.rsqrt(variance + eps)[:, None]).to(x.dtype)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0)
    out = w.to(tl.float32)[None, :] * h.to(tl.float32)
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                     out_dtype: torch.dtype, sum_dtype: torch.dtype):
    n_cols = x.shape[-1]
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device) if residual is not None else out
    if out.numel() == 0:
        return out, summed
    xv = _rows_view(x)
    rv = _rows_view(residual) if residual is not None else xv
    n_rows = xv.shape[0] * xv.shape[1]
    block = triton.next_power_of_2(n_cols)
    rows = max(1, _NORM_TILE // block)
    _rms_norm_kernel[(triton.cdiv(n_rows, rows),)](
        xv, rv, weight, out, summed, n_rows, xv.shape[1], n_cols,
        xv.stride(0), xv.stride(1), rv.stride(0), rv.stride(1), 1.0 / n_cols, eps,
        HAS_RESIDUAL=residual is not None, ROWS=rows, BLOCK=block, num_warps=4 if block <= 4096 else 8,
        enable_fp_fusion=False)
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim; ``x`` may be a strided view (unit last stride avoids a copy)."""
    assert weight.shape == (x.shape[-1],) and weight.is_contiguous()
    out, _ = _launch_rms_norm(x, None, weight, eps, torch.promote_types(x.dtype, weight.dtype), x.dtype)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(s), s)`` with ``s = x + residual`` in the wider dtype of the two, in one pass; the norm comes
    back in ``x``'s dtype (an fp32 residual stream feeding bf16 layers)."""
    assert x.shape == residual.shape and weight.shape == (x.shape[-1],) and weight.is_contiguous()
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
    _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(inner, block))](rows, out, inner, rows.stride(0),
                                                                      BLOCK=block, num_warps=4,
                                                                      enable_fp_fusion=False)
    return out


@triton.jit
def _round(x, dtype: tl.constexpr):
    """Round an fp32 value to ``dtype`` and back (a no-op for fp32)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(src, dst, stride_head, cos1, sin1, cos2, sin2, heads,
                  HALF: tl.constexpr, HEADS_P2: tl.constexpr, HALF_P2: tl.constexpr):
    """HF's ``q * cos + rotate_half(q) * sin`` for all heads of one token, rounding each step."""
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HALF_P2)[None, :]
    mask = (h < heads) & (d < HALF)
    x1 = tl.load(src + h * stride_head + d, mask=mask, other=0.0)
    x2 = tl.load(src + h * stride_head + HALF + d, mask=mask, other=0.0)
    dt = x1.dtype
    a1, a2 = x1.to(tl.float32), x2.to(tl.float32)
    out1 = _round(a1 * cos1, dt) + _round(-a2 * sin1, dt)
    out2 = _round(a2 * cos2, dt) + _round(a1 * sin2, dt)
    tl.store(dst + h * (2 * HALF) + d, out1.to(dt), mask=mask)
    tl.store(dst + h * (2 * HALF) + HALF + d, out2.to(dt), mask=mask)


@triton.jit
def _rotary_kernel(pos_ptr, q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
                   sq_token, sq_head, sk_token, sk_head, s_cache, num_q_heads, num_k_heads,
                   HALF: tl.constexpr, Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr,
                   HALF_P2: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    row = tl.load(pos_ptr + token).to(tl.int64) * s_cache
    d = tl.arange(0, HALF_P2)
    d_mask = d < HALF
    dt = q_ptr.dtype.element_ty
    cos1 = _round(tl.load(cos_ptr + row + d, mask=d_mask, other=0.0), dt)[None, :]  # HF: cos.to(dtype)
    cos2 = _round(tl.load(cos_ptr + row + HALF + d, mask=d_mask, other=0.0), dt)[None, :]
    sin1 = _round(tl.load(sin_ptr + row + d, mask=d_mask, other=0.0), dt)[None, :]
    sin2 = _round(tl.load(sin_ptr + row + HALF + d, mask=d_mask, other=0.0), dt)[None, :]
    _rotate_heads(q_ptr + token * sq_token, q_out_ptr + token * num_q_heads * (2 * HALF), sq_head,
                  cos1, sin1, cos2, sin2, num_q_heads, HALF, Q_HEADS_P2, HALF_P2)
    _rotate_heads(k_ptr + token * sk_token, k_out_ptr + token * num_k_heads * (2 * HALF), sk_head,
                  cos1, sin1, cos2, sin2, num_k_heads, HALF, K_HEADS_P2, HALF_P2)


def rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
           sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q, k ``[tokens, heads, head_dim]`` (strided views are fine).

    ``cos_cache``/``sin_cache`` are ``[max_position, head_dim]``; positions are not bounds-checked.
    """
    tokens, num_q_heads, head_dim = q.shape
    assert k.shape[0] == tokens and k.shape[2] == head_dim and k.dtype == q.dtype and head_dim % 2 == 0
    assert positions.shape == (tokens,) and cos_cache.stride() == sin_cache.stride()
    assert cos_cache.stride(-1) == 1 and cos_cache.shape[-1] == head_dim
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    q_out, k_out = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype,
                                                                                    device=k.device)
    if tokens == 0:
        return q_out, k_out
    half = head_dim // 2
    _rotary_kernel[(tokens,)](positions, q, k, cos_cache, sin_cache, q_out, k_out,
                              q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0),
                              num_q_heads, k.shape[1], HALF=half,
                              Q_HEADS_P2=triton.next_power_of_2(num_q_heads),
                              K_HEADS_P2=triton.next_power_of_2(k.shape[1]),
                              HALF_P2=triton.next_power_of_2(half), num_warps=4, enable_fp_fusion=False)
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
def _race(row_ptr, cols, vocab, scale, noise, best, best_col):
    """Per lane, keep the best ``logit / scale + noise`` seen; strict ``>`` keeps the lowest column."""
    x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    score = tl.math.div_rn(x, scale) + noise  # IEEE division, as torch's logits / T
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_col)


@triton.jit(do_not_specialize=["step_seed"])
def _gumbel_argmax_kernel(logits_ptr, temp_ptr, seed_ptr, pos_ptr, out_ptr, stride_row, vocab, step_seed,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0)
    temperature = tl.load(temp_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    sampled = temperature > 0
    hashed = sampled & (seed >= 0)
    scale = tl.where(sampled, temperature, 1.0)
    position = tl.load(pos_ptr + row).to(tl.int64)
    row_mix = seed.to(tl.uint64) * 0x9E3779B1 + position.to(tl.uint64) * 0x85EBCA77
    philox_key = (row.to(tl.uint64) << 32) | step_seed.to(tl.uint64)  # distinct stream per (row, step)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, 4 * BLOCK):
        c0 = start + lanes
        c1, c2, c3 = c0 + BLOCK, c0 + 2 * BLOCK, c0 + 3 * BLOCK
        if hashed:
            g0, g1 = _gumbel(_hashed_uniform(row_mix, c0)), _gumbel(_hashed_uniform(row_mix, c1))
            g2, g3 = _gumbel(_hashed_uniform(row_mix, c2)), _gumbel(_hashed_uniform(row_mix, c3))
        elif sampled:
            r0, r1, r2, r3 = tl.randint4x(philox_key, start // 4 + lanes)  # one Philox call, four tiles
            g0, g1 = _gumbel(_uniform_24(r0 >> 8)), _gumbel(_uniform_24(r1 >> 8))
            g2, g3 = _gumbel(_uniform_24(r2 >> 8)), _gumbel(_uniform_24(r3 >> 8))
        else:  # greedy: x / 1 + 0 == x
            g0 = tl.zeros([BLOCK], tl.float32)
            g1, g2, g3 = g0, g0, g0
        best, best_col = _race(row_ptr, c0, vocab, scale, g0, best, best_col)
        best, best_col = _race(row_ptr, c1, vocab, scale, g1, best, best_col)
        best, best_col = _race(row_ptr, c2, vocab, scale, g2, best, best_col)
        best, best_col = _race(row_ptr, c3, vocab, scale, g3, best, best_col)
    top = tl.max(best, axis=0)
    winner = tl.min(tl.where(best == top, best_col, vocab), axis=0)  # ties across lanes: lowest column
    tl.store(out_ptr + row, winner.to(tl.int64))


def gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, seeds: torch.Tensor,
                  positions: torch.Tensor, step_seed: int) -> torch.Tensor:
    """Per row of ``logits`` ``[B, V]``: ``argmax(logits / T - log(-log(U)))``, or the plain argmax if T == 0.

    U is made in the kernel: ``hashed_uniform(seed, position)`` for rows with ``seed >= 0`` (bit for
    bit), else Philox keyed by (row, ``step_seed``), so pass a new ``step_seed`` every call. Ties go
    to the lowest token id. ``step_seed`` is a launch argument: a CUDA graph would freeze it.
    """
    rows, vocab = logits.shape
    assert temperatures.shape == seeds.shape == positions.shape == (rows,)
    assert 0 <= step_seed < _MAX_STEP_SEED and vocab < 2 ** 31 - 4 * _VOCAB_BLOCK
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    block = min(_VOCAB_BLOCK, triton.next_power_of_2(triton.cdiv(vocab, 4)))
    _gumbel_argmax_kernel[(rows,)](logits, temperatures, seeds, positions, out, logits.stride(0), vocab,
                                   step_seed, BLOCK=block, num_warps=8)
    return out
