"""Split-K products of decode-sized batches (engine/kernels/triton_gemm.py) and the residual-add RMSNorm that sums
their partials (engine/kernels/triton_fused.py), at the shapes of real checkpoints: Qwen3-0.6B's ``o_proj``
(2,048 -> 1,024) and ``down_proj`` (3,072 -> 1,024), SmolLM2-135M's (576 -> 576, 1,536 -> 576: not multiples of
the kernel's 64-column and 128-input tiles). Small tier through the interpreter on CPU; real sizes on the GPU."""
import pytest
import torch

from tests.triton_tiers import (DEVICE, ON_GPU, gpu, in_fresh_interpreter, needs_cuda,  # noqa: F401
                                rne_bf16_casts, run_in_fresh_interpreter, small)
from engine.kernels import triton_fused, triton_gemm  # noqa: I001 (after triton_tiers)
from engine.layers import linear

SHAPES = [(2048, 1024), (3072, 1024), (576, 576), (1536, 576)]  # (inputs k, outputs n)


def randn(*shape, dtype=torch.bfloat16, scale=1.0, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def summed_in_order(parts: torch.Tensor) -> torch.Tensor:
    """The partials added up slice by slice, in the order the norm kernel adds them."""
    total = parts[0].clone()
    for part in parts[1:]:
        total += part
    return total


@in_fresh_interpreter
def test_small_tier_in_fresh_interpreter():
    run_in_fresh_interpreter(__file__)


def test_plan_cuts_k_into_whole_tiles():
    for rows, k, splits in [(1, 3072, 8), (64, 3072, 8), (65, 3072, 4), (256, 2048, 4), (16, 576, 5), (1, 100, 1)]:
        block_m, got, split_len = triton_gemm.split_k_plan(rows, k)
        assert got == splits and split_len % 128 == 0 and (got - 1) * split_len < k <= got * split_len
        assert block_m == (16 if rows <= 16 else 64)


@small
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", [1, 17, 70])
def test_partials_sum_to_the_product(k, n, rows):
    x, w = randn(rows, k, seed=rows), randn(n, k, scale=0.05, seed=k)
    parts = triton_gemm.split_k_linear(x, w)
    block_m, splits, _ = triton_gemm.split_k_plan(rows, k)
    assert parts.shape == (splits, rows, n) and parts.dtype == torch.float32
    ref = x.double() @ w.double().T
    torch.testing.assert_close(parts.double().sum(0), ref, rtol=1e-4, atol=1e-4)


@small
@pytest.mark.parametrize("k,n", SHAPES[1:3])
def test_add_rms_norm_sums_the_partials_then_rounds_as_the_product(k, n):
    """Same outputs, bit for bit, as the norm of the product rounded to bf16 (what cuBLAS would hand it), with the
    fp32 residual stream and a massive channel."""
    rows = 9
    parts = triton_gemm.split_k_linear(randn(rows, k), randn(n, k, scale=0.05, seed=1))
    residual = randn(rows, n, dtype=torch.float32, seed=2)
    residual[:, 7] = 24926.0
    w = randn(n, seed=3)
    out, summed = triton_fused.add_rms_norm(parts, residual, w, 1e-6)
    ref, ref_summed = triton_fused.add_rms_norm(summed_in_order(parts).to(torch.bfloat16), residual, w, 1e-6)
    assert out.dtype == torch.bfloat16 and summed.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(summed, ref_summed)


def test_row_parallel_partial_sums_only_where_they_pay(monkeypatch):
    """Partial sums for a decode-sized bf16 batch on CUDA; ``forward`` on CPU, with the fused kernels off, with a
    bias, in fp32 and above SPLIT_K_MAX_ROWS rows."""
    def layer(bias=False, dtype=torch.bfloat16):
        made = linear.RowParallelLinear(64, 32, bias=bias).to(DEVICE, dtype)
        made.weight.data.copy_(randn(32, 64, dtype=dtype))
        if bias:
            made.bias.data.copy_(randn(32, dtype=dtype, seed=1))
        return made
    x = randn(5, 64)
    plain = layer()
    if not ON_GPU:
        assert torch.equal(plain.partial_sums(x), plain(x))
        return
    parts = plain.partial_sums(x)
    assert parts.dim() == 3 and torch.allclose(summed_in_order(parts).to(torch.bfloat16).float(), plain(x).float(),
                                               rtol=2e-2, atol=2e-2)
    assert torch.equal(layer(bias=True).partial_sums(x), layer(bias=True)(x))
    assert layer(dtype=torch.float32).partial_sums(x.float()).dim() == 2
    assert plain.partial_sums(randn(linear.SPLIT_K_MAX_ROWS + 1, 64)).dim() == 2
    monkeypatch.setenv("NANOVLLM_FUSED_KERNELS", "0")
    assert plain.partial_sums(x).dim() == 2


@gpu
@needs_cuda
@pytest.mark.parametrize("k,n", SHAPES)
@pytest.mark.parametrize("rows", [1, 16, 64, 128, 256])
def test_split_k_gpu(k, n, rows):
    x, w = randn(rows, k, seed=rows), randn(n, k, scale=0.05, seed=k)
    parts = triton_gemm.split_k_linear(x, w)
    cublas = (x @ w.T).float()
    assert (summed_in_order(parts) - cublas).abs().max() <= 2e-2 * cublas.abs().max()
    residual, weight = randn(rows, n, dtype=torch.float32, seed=2), randn(n, seed=3)
    out, _ = triton_fused.add_rms_norm(parts, residual, weight, 1e-6)
    ref, _ = triton_fused.add_rms_norm(summed_in_order(parts).to(torch.bfloat16), residual, weight, 1e-6)
    assert torch.equal(out, ref)
