"""Split-K matrix products for decode-sized batches, left as partial sums for the RMSNorm that follows.

A decode layer's two products with few outputs (``o_proj`` and ``down_proj``: 1,024 outputs in Qwen3-0.6B, 4-6 MB
of weights, 1-1.5 us of HBM time) took cuBLAS 6-8 us each at 1-256 rows on an H200 (12.8 us for ``o_proj`` at one
row): its tiles leave most SMs idle. Cutting K into 4-8 slices gives every output tile several programs; each slice
writes its fp32 partial sum, and the residual-add RMSNorm that follows each of these products
(``engine.kernels.triton_fused.add_rms_norm``) adds the slices up before rounding, so the split costs no extra
launch: 3.6-4.5 us for ``o_proj`` and 4.2-5.2 us for ``down_proj`` up to 128 rows in a chain of products
(docs/benchmarks.md, 2026-12-04, fifth session). In whole decode steps it paid up to ~100 rows only
(``SPLIT_K_MAX_ROWS`` in engine/layers/linear.py, where the choice is made).
"""
import torch
import triton
import triton.language as tl

_BLOCK_N = 64
_BLOCK_K = 128
# The interpreter (CPU tests) multiplies bf16 operands of tl.dot as their raw bits: there they are widened first
# (exact: a product of two bf16 values is exact in fp32).
_WIDEN: tl.constexpr = tl.constexpr(triton.knobs.runtime.interpret)


# ``rows`` is not specialised: one compiled variant serves every batch size of the decode graphs.
@triton.jit(do_not_specialize=["rows"])
def _split_k_kernel(x_ptr, w_ptr, part_ptr, rows, n, k, split_len, stride_x, stride_w,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (row tiles, column tiles, splits): ``x @ w.T`` over ``k`` in ``[split * split_len, ...)``, in fp32, into
    slice ``split`` of ``part [splits, rows, n]``."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    split = tl.program_id(2)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < rows, offs_n < n
    start = split * split_len
    end = tl.minimum(start + split_len, k)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(start, end, BLOCK_K):
        ks = k0 + offs_k
        k_mask = ks < end
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_x + ks[None, :],
                    mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * stride_w + ks[None, :],
                    mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        if _WIDEN:
            x, w = x.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(x, tl.trans(w), acc)
    out = part_ptr + (split * rows + offs_m[:, None]).to(tl.int64) * n + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


def split_k_plan(rows: int, k: int) -> tuple[int, int, int]:
    """``(block_m, splits, split_len)`` for ``rows`` rows and ``k`` inputs (H200 sweep: 8 slices up to 64 rows, 4
    above; row tiles of 16 up to 16 rows, of 64 above)."""
    block_m = 16 if rows <= 16 else 64
    wanted = 8 if rows <= 64 else 4
    split_len = triton.cdiv(triton.cdiv(k, wanted), _BLOCK_K) * _BLOCK_K
    return block_m, triton.cdiv(k, split_len), split_len


def split_k_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T`` (``x [rows, k]``, ``weight [n, k]``, both with unit last stride) as fp32 partial sums
    ``[splits, rows, n]``: their sum over the first dimension is the product."""
    rows, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and x.stride(-1) == 1 and weight.stride(-1) == 1
    block_m, splits, split_len = split_k_plan(rows, k)
    parts = torch.empty((splits, rows, n), dtype=torch.float32, device=x.device)
    if rows:
        _split_k_kernel[(triton.cdiv(rows, block_m), triton.cdiv(n, _BLOCK_N), splits)](
            x, weight, parts, rows, n, k, split_len, x.stride(0), weight.stride(0),
            BLOCK_M=block_m, BLOCK_N=_BLOCK_N, BLOCK_K=_BLOCK_K, num_warps=4, num_stages=4)
    return parts
