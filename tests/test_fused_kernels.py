"""Triton fused kernels (engine/kernels/triton_fused.py) against the PyTorch versions in
engine/layers/fusion.py, which in turn must round exactly as HF transformers' eager code does; the raw-logprobs
kernels (engine/kernels/triton_logprobs.py) against ``torch.log_softmax`` + ``topk``.

Two tiers (see tests/triton_tiers.py): small sizes through the Triton interpreter on CPU (or on the GPU when
there is one), and ``gpu``-marked real sizes and CUDA-graph capture.

Expected agreement in bf16/fp16: rotary, SiLU-and-mul and the residual sum are exact (the same
roundings in the same order). RMSNorm may differ by a step or two of the output dtype (NORM_ULP): the
kernel sums the squares in a different order than torch's mean, so the fp32 variance can differ in its
last bits, and that moves the normalised value across a bf16 rounding boundary now and then. In fp32 the
results are close, not equal (reduction order; numpy's vs torch's exp under the interpreter). The attention
prologue (q/k RMSNorm + rotary + KV store in one kernel) is bit for bit, in every dtype, the RMSNorm kernel,
rotary and store it replaced: its norm tiles sum the squares in the RMSNorm kernel's order.

The interpreter (Triton 3.9) truncates fp32 -> bf16 casts, where the GPU rounds to nearest even;
the small tier patches that one conversion (``rne_bf16_casts``) so it checks the kernels' rounding
sequence and not the interpreter's. Sampling tests fix every seed, so they are deterministic; the split sampler
is checked against tokens recorded from the one-program-per-row kernel it replaced (GUMBEL_CASES).
"""
import hashlib
import types

import pytest
import torch

from tests.triton_tiers import (DEVICE, ON_GPU, gpu, in_fresh_interpreter, needs_cuda,  # noqa: F401 (fixture)
                                rne_bf16_casts, run_in_fresh_interpreter, small, triton)
from engine.kernels import reference, triton_fused, triton_kv, triton_logprobs  # noqa: I001 (after triton_tiers)
from engine.layers import fusion, sampler
from engine.layers.sampler import Sampler, SamplingBatch, token_logprobs

HALF_DTYPES = [torch.bfloat16, torch.float16]
DTYPES = [torch.float32, *HALF_DTYPES]


def randn(*shape, dtype=torch.float32, scale=1.0, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


# RMSNorm sums in another order than torch: the normalised value, rounded before the weight multiply, can
# land one step away, and rounding the product can turn that into two steps of the output (measured on H100).
NORM_ULP = 2


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable steps between two half-precision tensors."""
    def line(t):
        bits = t.view(torch.int16).int()
        return torch.where(bits < 0, -(bits & 0x7FFF), bits)
    return int((line(a) - line(b)).abs().max())


def check(out: torch.Tensor, ref: torch.Tensor, max_ulp: int = 0):
    """fp32: close. Half precision: within ``max_ulp``, and off at all in under 1% of the elements
    (a wrong rounding sequence is off by 1 ulp in 10-30% of them)."""
    assert out.dtype == ref.dtype and out.shape == ref.shape
    if ref.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    else:
        assert ulp_distance(out, ref) <= max_ulp
        assert float((out != ref).float().mean()) < 0.01


def qkv_views(tokens: int, q_heads: int, kv_heads: int, head_dim: int, dtype, seed=0):
    """q, k, v as the decoder makes them: views into one fused projection output."""
    fused = randn(tokens, (q_heads + 2 * kv_heads) * head_dim, dtype=dtype, scale=2.0, seed=seed)
    q, k, v = fused.split([q_heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (q.view(-1, q_heads, head_dim), k.view(-1, kv_heads, head_dim),
            v.view(-1, kv_heads, head_dim))


def rope_cache(max_position: int, head_dim: int):
    from engine.layers.rotary import RotaryEmbedding
    rope = RotaryEmbedding(head_dim, max_position, 1_000_000.0).to(DEVICE)
    return rope.cos, rope.sin


# --------------------------------------------- the torch versions are HF's eager code (no Triton)

@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_torch_versions_round_like_hf(dtype):
    from transformers.activations import ACT2FN
    from transformers.models.qwen3 import modeling_qwen3 as hf
    x, w = randn(9, 64, dtype=dtype, scale=3.0), randn(64, dtype=dtype, seed=1)
    norm = hf.Qwen3RMSNorm(64, eps=1e-6).to(DEVICE, dtype)
    norm.weight.data.copy_(w)
    assert torch.equal(fusion.torch_rms_norm(x, w, 1e-6), norm(x))

    q, k, _ = qkv_views(5, 4, 2, 32, dtype)
    cos, sin = rope_cache(64, 32)
    positions = torch.tensor([0, 3, 17, 40, 63], device=DEVICE)
    ref_q, ref_k = hf.apply_rotary_pos_emb(q, k, cos[positions].to(dtype), sin[positions].to(dtype),
                                           unsqueeze_dim=1)
    out_q, out_k = fusion.torch_rotary(positions, q, k, cos, sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)

    gate_up = randn(7, 2 * 48, dtype=dtype, scale=3.0)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(fusion.torch_silu_and_mul(gate_up), ACT2FN["silu"](gate) * up)


def test_dispatch_and_switch(monkeypatch):
    cuda_like = types.SimpleNamespace(is_cuda=True)
    assert not fusion.use_triton_kernels(torch.zeros(1))
    assert fusion.use_triton_kernels(cuda_like)
    monkeypatch.setenv("NANOVLLM_FUSED_KERNELS", "0")
    assert not fusion.use_triton_kernels(cuda_like)


# ---------------------------------------------------------------- small tier (CPU interpreter)

@in_fresh_interpreter
def test_small_tier_in_fresh_interpreter():
    run_in_fresh_interpreter(__file__)


@small
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    w = randn(96, dtype=dtype, scale=0.5, seed=1) + 1
    x = randn(7, 96, dtype=dtype, scale=3.0)  # hidden not a power of two: masked columns
    check(triton_fused.rms_norm(x, w, 1e-6), fusion.torch_rms_norm(x, w, 1e-6), max_ulp=1)
    q, k, _ = qkv_views(5, 3, 2, 32, dtype)  # per-head q/k norm on strided views
    wq = randn(32, dtype=dtype, seed=2)
    check(triton_fused.rms_norm(q, wq, 1e-6), fusion.torch_rms_norm(q, wq, 1e-6), max_ulp=NORM_ULP)
    check(triton_fused.rms_norm(k, wq, 1e-6), fusion.torch_rms_norm(k, wq, 1e-6), max_ulp=NORM_ULP)


@small
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm(dtype):
    x, residual = randn(6, 128, dtype=dtype, scale=2.0), randn(6, 128, dtype=dtype, seed=1)
    w = randn(128, dtype=dtype, seed=2)
    out, summed = triton_fused.add_rms_norm(x, residual, w, 1e-5)
    ref, ref_summed = fusion.torch_add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(summed, ref_summed)
    check(out, ref, max_ulp=1)


@small
@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_fp32_residual(dtype):
    """The decoder's residual stream is fp32: the sum stays fp32, the norm comes back in the layer dtype, and a
    massive channel (~25,000, as in SmolLM2) is added exactly where a bf16 stream would lose it."""
    x = randn(5, 576, dtype=dtype, scale=2.0)  # SmolLM2's hidden size
    residual = randn(5, 576, dtype=torch.float32, seed=1)
    residual[:, 7] = 24926.0
    w = randn(576, dtype=dtype, seed=2)
    out, summed = triton_fused.add_rms_norm(x, residual, w, 1e-5)
    ref, ref_summed = fusion.torch_add_rms_norm(x, residual, w, 1e-5)
    assert out.dtype == ref.dtype == dtype and summed.dtype == ref_summed.dtype == torch.float32
    assert torch.equal(summed, ref_summed) and torch.equal(summed, x.float() + residual)
    check(out, ref, max_ulp=1)


@small
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = randn(2, 3, 2 * 300, dtype=dtype, scale=4.0)  # leading dims are flattened; 300 is not a power of two
    check(triton_fused.silu_and_mul(x), fusion.torch_silu_and_mul(x))


# Head layouts of real checkpoints: (query heads, KV heads, head_dim); head_dim 80 and 96 are not powers of two.
HEAD_LAYOUTS = [(16, 8, 128), (9, 3, 64), (14, 2, 64), (10, 2, 80), (12, 4, 96), (8, 1, 256), (7, 7, 128)]
EPS = 1e-6


def prologue_inputs(tokens, num_heads, num_kv_heads, head_dim, dtype, qk_norm, block_size=16, seed=0,
                    max_position=8192):
    """What the decoder hands the prologue: q, k, v views of one QKV output, positions past 4096 (up to the last
    one), a NaN-poisoned paged cache with padding rows (slot -1), and the q/k norm weights (or None)."""
    q, k, v = qkv_views(tokens, num_heads, num_kv_heads, head_dim, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, max_position, (tokens,), generator=gen)
    positions[:2] = torch.tensor([max_position - 1, 4097])
    num_blocks = -(-tokens // block_size) + 2
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[1::7] = -1
    cache = torch.full((num_blocks, block_size, num_kv_heads, head_dim), float("nan"), dtype=dtype, device=DEVICE)
    weights = None
    if qk_norm:
        weights = (randn(head_dim, dtype=dtype, scale=0.5, seed=seed + 1) + 1,
                   randn(head_dim, dtype=dtype, scale=0.5, seed=seed + 2) + 1)
    cos, sin = rope_cache(max_position, head_dim)
    return dict(positions=positions.to(DEVICE), q=q, k=k, v=v, cos_cache=cos, sin_cache=sin, norm_weights=weights,
                eps=EPS, k_cache=cache, v_cache=cache.clone(), slot_mapping=slots.to(DEVICE))


def unfused_prologue(positions, q, k, v, cos_cache, sin_cache, norm_weights, eps, k_cache, v_cache, slot_mapping,
                     store=reference.store_kvcache_ref):
    """What the decoder ran before the fused kernel: the per-head RMSNorm kernel, rotary (``torch_rotary`` is
    bit for bit the former rotary kernel) and the KV store; writes the caches, returns q and k."""
    if norm_weights is not None:
        q, k = triton_fused.rms_norm(q, norm_weights[0], eps), triton_fused.rms_norm(k, norm_weights[1], eps)
    q, k = fusion.torch_rotary(positions, q, k, cos_cache, sin_cache)
    store(k, v, k_cache, v_cache, slot_mapping)
    return q, k


def check_prologue_matches_unfused(inputs: dict, store=reference.store_kvcache_ref):
    ref = {**inputs, "k_cache": inputs["k_cache"].clone(), "v_cache": inputs["v_cache"].clone()}
    q, k = triton_fused.qk_norm_rotary_store(**inputs)
    ref_q, ref_k = unfused_prologue(**ref, store=store)
    assert q.is_contiguous() and k.is_contiguous()
    assert torch.equal(q, ref_q) and torch.equal(k, ref_k)
    for cache in ("k_cache", "v_cache"):  # padding rows' slots stay NaN
        torch.testing.assert_close(inputs[cache], ref[cache], rtol=0, atol=0, equal_nan=True)


@small
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", HEAD_LAYOUTS)
def test_prologue_matches_unfused(num_heads, num_kv_heads, head_dim, dtype, qk_norm, monkeypatch):
    """q/k RMSNorm + rotary + KV store in one kernel: bit for bit the three-to-four kernels it replaces, and within
    the norm's reduction-order steps of the PyTorch path (HF's rounding)."""
    inputs = prologue_inputs(13, num_heads, num_kv_heads, head_dim, dtype, qk_norm, seed=head_dim + num_heads)
    check_prologue_matches_unfused(inputs)
    q, k = triton_fused.qk_norm_rotary_store(**{**inputs, "k_cache": torch.tensor([])})
    monkeypatch.setenv("NANOVLLM_FUSED_KERNELS", "0")
    torch_q, torch_k, kv_stored = fusion.qk_norm_rotary_store(**inputs)
    assert not kv_stored
    check(q, torch_q, max_ulp=NORM_ULP if qk_norm else 0)
    check(k, torch_k, max_ulp=NORM_ULP if qk_norm else 0)


@small
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_prologue_fp16_and_empty_batches(dtype):
    check_prologue_matches_unfused(prologue_inputs(6, 3, 1, 32, dtype, qk_norm=True, block_size=4))
    inputs = prologue_inputs(6, 3, 1, 32, dtype, qk_norm=True)
    empty = {**inputs, "q": inputs["q"][:0], "k": inputs["k"][:0], "v": inputs["v"][:0],
             "positions": inputs["positions"][:0], "slot_mapping": inputs["slot_mapping"][:0]}
    q, k = triton_fused.qk_norm_rotary_store(**empty)
    assert q.shape == (0, 3, 32) and k.shape == (0, 1, 32) and bool(inputs["k_cache"].isnan().all())


def tiny_decoder_attention(patch: pytest.MonkeyPatch, fused: bool):
    """A Qwen3 attention layer (q/k norms) with random weights and a NaN-poisoned cache; ``fused`` forces the
    prologue's kernel path on CPU tensors, and then the attention layer must not store K/V itself."""
    from transformers import Qwen3Config
    from engine.layers import attention
    from engine.models.decoder import DecoderAttention
    config = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, rms_norm_eps=EPS)
    layer = DecoderAttention(config, qk_norm=True, qkv_bias=False).to(DEVICE)
    gen = torch.Generator().manual_seed(0)
    for param in layer.parameters():
        param.data.copy_(torch.randn(param.shape, generator=gen) * 0.3 + (1.0 if param.dim() == 1 else 0.0))
    layer.attn.k_cache = torch.full((4, 16, 2, 16), float("nan"), device=DEVICE)
    layer.attn.v_cache = layer.attn.k_cache.clone()
    patch.setattr(fusion, "use_triton_kernels", lambda x: fused)
    if fused:
        patch.setattr(attention, "_store", lambda backend: pytest.fail("K/V stored twice"))
    return layer


@small
def test_decoder_attention_uses_the_fused_prologue(monkeypatch):
    """The decoder layer on the kernel path (prefill with a cache, then without one as in warm-up) matches its
    PyTorch path, and the attention layer leaves the store to the prologue (``kv_stored``)."""
    from engine.context import reset_context, set_context
    x = randn(12, 64)
    positions = torch.tensor([*range(5), *range(7)], device=DEVICE)
    set_context(is_prefill=True, cu_seqlens_q=torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE),
                max_seqlen_q=7, max_seqlen_k=7, slot_mapping=torch.tensor([*range(5), *range(16, 23)], device=DEVICE),
                context_lens=torch.tensor([5, 7], dtype=torch.int32, device=DEVICE),
                block_tables=torch.tensor([[0], [1]], dtype=torch.int32, device=DEVICE))
    try:
        results = []
        for fused in (False, True):
            with monkeypatch.context() as patch:
                layer = tiny_decoder_attention(patch, fused)
                caches = layer.attn.k_cache, layer.attn.v_cache
                with_cache = layer(positions, x)
                layer.attn.k_cache = layer.attn.v_cache = torch.tensor([])
                results.append((with_cache, layer(positions, x), *caches))
    finally:
        reset_context()
    for out, ref in zip(results[1], results[0]):
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert int(results[1][2].isnan().sum()) == (64 - 12) * 2 * 16  # only the 12 tokens' slots written


def sampling_batch(temperatures, seeds, positions) -> SamplingBatch:
    t = torch.tensor(temperatures, dtype=torch.float32, device=DEVICE)
    seeds = torch.tensor(seeds, dtype=torch.int64, device=DEVICE)
    n = len(t)
    return SamplingBatch(t, torch.full((n,), -1, device=DEVICE), torch.ones(n, device=DEVICE),
                         torch.zeros(n, device=DEVICE), seeds,
                         torch.tensor(positions, dtype=torch.int64, device=DEVICE),
                         all_greedy=False, any_greedy=bool((t == 0).any()), use_top_k_top_p=False,
                         use_min_p=False, any_seeded=bool((seeds >= 0).any()))


def torch_sample(logits: torch.Tensor, batch: SamplingBatch, monkeypatch) -> torch.Tensor:
    monkeypatch.setenv("NANOVLLM_FUSED_KERNELS", "0")  # the PyTorch path, also on CUDA
    return Sampler()(logits, batch)


def gumbel(logits: torch.Tensor, batch: SamplingBatch, step_seed: int) -> torch.Tensor:
    return triton_fused.gumbel_argmax(logits, batch.temperatures, batch.seeds, batch.positions, step_seed)


@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gumbel_seeded_rows_match_torch_sampler(dtype, monkeypatch):
    """Seeded rows use hashed_uniform's noise bit for bit, so they pick the torch sampler's token."""
    logits = randn(8, 1000, dtype=dtype, scale=2.0)   # 1000: a partial last tile
    logits[3, 500:] = float("-inf")                   # a masked row (as after top-k / top-p)
    batch = sampling_batch([1.0, 0.5, 2.0, 1.0, 0.7, 1.0, 3.0, 1.0], [7, 7, 0, 123, 2 ** 40 + 5, 9, 1, 31],
                           [0, 3, 99, 5, 2 ** 33, 1, 2, 4])
    expected = torch_sample(logits, batch, monkeypatch)
    assert torch.equal(gumbel(logits, batch, 11), expected)
    assert torch.equal(gumbel(logits, batch, 12), expected)  # the step seed does not touch seeded rows
    flat = torch.zeros(4, 1000, device=DEVICE)  # the argmax of the noise alone
    batch = sampling_batch([1.0] * 4, [5, 5, 6, 2 ** 31], [0, 1, 0, 7])
    assert torch.equal(gumbel(flat, batch, 1), torch_sample(flat, batch, monkeypatch))
    masked = torch.full((1, 65632), -1e4, device=DEVICE)  # token 65631 draws the top 24-bit value:
    masked[0, :10] = 0.0                                  # without the cap below 1 its noise is +inf
    assert int(gumbel(masked, sampling_batch([1.0], [20], [0]), 1)) < 10


@small
def test_gumbel_greedy_rows_and_ties():
    logits = randn(5, 1000, scale=2.0)
    logits[1, [3, 700, 999]] = 50.0  # ties across tiles and lanes: lowest index wins
    logits[2, [259, 3]] = 50.0       # same lane, different sub-tile
    logits[3] = float("-inf")        # all masked: index 0, like torch.argmax
    batch = sampling_batch([0.0, 0.0, 0.0, 0.0, 1.0], [-1, 4, -1, -1, -1], [0] * 5)
    out = gumbel(logits, batch, 3)
    assert out[:4].tolist() == logits[:4].argmax(-1).tolist() == [int(logits[0].argmax()), 3, 3, 0]
    assert out.dtype == torch.int64


def random_bitmask(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """An int32 token bitmask ``[rows, ceil(vocab / 32) + 1]`` (xgrammar's layout, one spare word) allowing a random
    ~third of the tokens in each row, every token in row 0 (a row without a grammar), one token in the last."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.rand(rows, 32 * (-(-vocab // 32) + 1), generator=g) < 0.3
    allowed[0], allowed[-1] = True, False
    allowed[-1, vocab - 1] = True
    words = (allowed.view(rows, -1, 32).long() << torch.arange(32)).sum(-1)
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32).to(DEVICE)


@small
@pytest.mark.parametrize("vocab,num_programs", [(1000, 1), (1000, None), (4099, 528)])
def test_gumbel_bitmask_equals_masking_the_logits_first(vocab, num_programs):
    """The kernel's bitmask (the sampler's grammar path) picks the tokens it picks from logits whose disallowed
    tokens were set to -inf first, for greedy, seeded and unseeded rows, whatever the split."""
    from engine.structured import apply_bitmask
    rows = 6
    logits = randn(rows, vocab, dtype=torch.bfloat16 if ON_GPU else torch.float32, scale=3.0)
    bitmask = random_bitmask(rows, vocab)
    batch = sampling_batch([0.0, 1.0, 0.7, 0.0, 2.0, 1.0], [-1, 5, -1, -1, 2 ** 33, -1], [0, 4, 0, 0, 9, 0])
    masked = apply_bitmask(logits.clone(), bitmask)  # (in place when the logits are fp32)
    for step_seed in (1, 2):
        expected = triton_fused.gumbel_argmax(masked, batch.temperatures, batch.seeds, batch.positions, step_seed,
                                              num_programs)
        out = triton_fused.gumbel_argmax(logits, batch.temperatures, batch.seeds, batch.positions, step_seed,
                                         num_programs, bitmask=bitmask)
        assert torch.equal(out, expected)
        assert int(out[-1]) == vocab - 1 and bool(torch.isfinite(masked[torch.arange(rows), out]).all())


@small
def test_gumbel_unseeded_rows_follow_step_seed():
    logits = torch.zeros(8, 64, device=DEVICE)  # identical rows, uniform over 64 tokens
    batch = sampling_batch([1.0] * 8, [-1] * 8, [0] * 8)
    a, b = gumbel(logits, batch, 1), gumbel(logits, batch, 2)
    assert torch.equal(a, gumbel(logits, batch, 1))       # same step seed: same draws
    assert int((a != b).sum()) >= 5                         # a new step seed: new draws
    assert len(set(a.tolist())) >= 5                        # each row has its own stream


@small
def test_gumbel_unseeded_distribution():
    """400 draws (4 step seeds x 100 rows) against softmax(logits / T): chi-square, 2 degrees of freedom."""
    probs = torch.tensor([0.6, 0.3, 0.1])
    temperature = 2.0
    logits = (probs.log() * temperature).repeat(100, 1).to(DEVICE)
    batch = sampling_batch([temperature] * 100, [-1] * 100, [0] * 100)
    draws = torch.cat([gumbel(logits, batch, step) for step in range(4)]).cpu()
    counts = torch.bincount(draws, minlength=3).double()
    expected = probs.double() * len(draws)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 13.8, (counts.tolist(), chi2)  # p = 0.001


# (vocab, rows) -> (logits dtype, digest of the tokens that the one-program-per-row kernel before the split picked
# for gumbel_case(rows, vocab, dtype) at step seed 12345, recorded under the interpreter). The CPU tier runs the
# small ones; the GPU tier all (the kernel's log is libdevice's full-precision one: the same noise to the last bit
# or so, and a winner with a margin that thin is a ~1e-6 event).
GUMBEL_CASES = {(1000, 1): (torch.float32, "aa4f6273907e5d0f"), (1000, 3): (torch.float32, "774ce2afc8802779"),
                (1000, 257): (torch.bfloat16, "046c8801acba12d5"), (49159, 1): (torch.bfloat16, "17c13cd64217f564"),
                (49159, 3): (torch.float32, "970e3e11683f5bc0"), (49159, 257): (torch.float32, "3f6f0d7cdd7f8409"),
                (151936, 1): (torch.float32, "4d2c3f991d2c7a13"), (151936, 3): (torch.bfloat16, "cf04b59efb9e063e"),
                (151936, 257): (torch.bfloat16, "a81d5102c2d216fa")}


def gumbel_case(rows: int, vocab: int, dtype: torch.dtype):
    """Rows at temperatures 0.7 / 0 / 1.0 in turn, half of them seeded; from row 2 every fifth row ties three
    columns at 1e20 (no noise moves them apart: token 3 must win); row 4 all -inf (token 0), row 5 half masked."""
    gen = torch.Generator().manual_seed(rows * 7919 + vocab)
    logits = torch.randn(rows, vocab, generator=gen) * 3.0
    index = torch.arange(rows)
    temperatures = torch.tensor([0.7, 0.0, 1.0])[index % 3]
    seeds = torch.where(index % 4 < 2, torch.randint(0, 2 ** 40, (rows,), generator=gen), -1)
    positions = torch.randint(0, 5000, (rows,), generator=gen)
    logits[2::5, [vocab - 1, vocab // 2, 3]] = 1e20
    if rows > 5:
        logits[4] = float("-inf")
        logits[5, vocab // 2:] = float("-inf")
    return sampling_batch(temperatures.tolist(), seeds.tolist(), positions.tolist()), logits.to(dtype).to(DEVICE)


def check_gumbel_case(vocab: int, rows: int, num_programs_list: list[int | None], monkeypatch):
    dtype, digest = GUMBEL_CASES[vocab, rows]
    batch, logits = gumbel_case(rows, vocab, dtype)
    for num_programs in num_programs_list:
        out = triton_fused.gumbel_argmax(logits, batch.temperatures, batch.seeds, batch.positions, 12345,
                                         num_programs=num_programs)
        assert hashlib.sha256(str(out.tolist()).encode()).hexdigest()[:16] == digest, num_programs
    assert set(out[2::5].tolist()) <= {3} and (rows <= 5 or int(out[4]) == 0)
    greedy, seeded = batch.temperatures == 0, (batch.temperatures > 0) & (batch.seeds >= 0)
    assert torch.equal(out[greedy], logits[greedy].argmax(-1))
    assert torch.equal(out[seeded], torch_sample(logits, batch, monkeypatch)[seeded])


@small
@pytest.mark.parametrize("vocab,rows,num_programs", [
    (1000, 1, [None, 1]), (1000, 3, [None, 528]), (1000, 257, [None, 528]), (49159, 1, [None, 528]),
    (49159, 3, [None, 1]), (151936, 1, [None, 528]), (151936, 3, [None, 1])])
def test_gumbel_split_picks_the_tokens_of_the_kernel_it_replaced(vocab, rows, num_programs, monkeypatch):
    """Whatever the split (None: the default for this device, 4 SMs' worth on the interpreter; 1: one program per
    row; 528: an H200's worth, down to 128-lane slices): the tokens of the pre-split kernel, bit for bit."""
    check_gumbel_case(vocab, rows, num_programs, monkeypatch)


@small
def test_gumbel_split_plan():
    """Rows x splits comes near the wanted program count; narrower slices only when whole tiles are too few."""
    plan = triton_fused._gumbel_plan
    assert plan(1, 151936, 528) == (1024, 128, 304, 1, 304)    # batch 1 on an H200: 304 programs of 512 columns
    assert plan(128, 151936, 528) == (1024, 1024, 38, 8, 5)   # 640 programs
    assert plan(600, 151936, 528) == (1024, 1024, 38, 38, 1)  # one program per row, no second launch
    assert plan(2, 1000, 528) == (256, 128, 2, 1, 2)
    assert plan(1, 10, 528) == (4, 4, 1, 1, 1)


def test_launches_only_compile_ahead_of_time():
    """engine.kernels.warmup: inside ahead_of_time() a launch through ``launch`` compiles (Triton's warmup) instead
    of running, and the compiled kernel is loaded onto the device when the block ends (not at its first launch,
    mid-run); outside it runs."""
    from engine.kernels.warmup import ahead_of_time, launch
    calls = []

    class Compiled:
        def _init_handles(self):
            calls.append(("load",))

    class Future:  # what warmup returns under Triton's AsyncCompileMode (3.6's passes no attribute on)
        def result(self):
            return Compiled()

    class Kernel:
        def __init__(self, compiled=Compiled):
            self.compiled = compiled

        def warmup(self, *args, grid, **kwargs):
            calls.append(("compile", args, grid, kwargs))
            return self.compiled()

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append(("run", args, grid, kwargs))
    launch(Kernel(), (2,))(1, X=3)
    with ahead_of_time(threads=2):
        launch(Kernel(), (4,))(5, X=6)
        launch(Kernel(Future), (5,))(6)
        assert calls[-1][0] == "compile"
    launch(Kernel(), (7,))(8)
    assert calls == [("run", (1,), (2,), {"X": 3}), ("compile", (5,), (4,), {"X": 6}), ("compile", (6,), (5,), {}),
                     ("load",), ("load",), ("run", (8,), (7,), {})]


def test_compiled_gumbel_variants_cover_every_batch_size(monkeypatch):
    """compile_gumbel_argmax (compile-only at engine start-up) launches every kernel variant that gumbel_argmax
    meets for 1 to max_rows rows of bf16 or fp32 logits: the same kernels, argument types and constexprs."""
    launches, unspecialized = [], {"num_chunks", "chunks_per_split", "step_seed", "splits"}  # do_not_specialize

    def record(kernel, grid):
        def args(*values, **constexprs):
            types = tuple(v.dtype if torch.is_tensor(v) else v if name not in unspecialized else type(v)
                          for name, v in zip(kernel.arg_names, values))
            launches.append((kernel, types, tuple(sorted(constexprs.items()))))
        return args
    monkeypatch.setattr(triton_fused, "launch", record)
    max_rows, dtypes, variety = 40, (torch.bfloat16, torch.float32), set()
    for vocab in (5000, 151936):  # (on the interpreter's 4 SMs the small one varies more, on an H200 the large one)
        launches.clear()
        for rows in range(1, max_rows + 1):
            settings, ids = torch.ones(rows, device=DEVICE), torch.zeros(rows, dtype=torch.int64, device=DEVICE)
            for dtype in dtypes:
                logits = torch.empty(rows, vocab, dtype=dtype, device=DEVICE)  # (nothing runs: launches recorded)
                triton_fused.gumbel_argmax(logits, settings, ids, ids, 3)
        used = set(launches)
        launches.clear()
        triton_fused.compile_gumbel_argmax(vocab, max_rows, dtypes, torch.device(DEVICE))
        assert set(launches) == used
        variety |= {(vocab, kernel, constexprs) for kernel, _, constexprs in used}
    assert len(variety) > 5  # several chunk widths and splits


def kernel_logprobs(logits: torch.Tensor, rows: list[int], tokens: torch.Tensor, k: int):
    rows = torch.tensor(rows, device=logits.device)
    partials = triton_logprobs.logprob_partials(logits, rows, k)
    return rows, triton_logprobs.finish_logprobs(partials, logits, rows, tokens)


def check_logprobs(logits: torch.Tensor, rows: list[int], tokens: torch.Tensor, k: int):
    """Against torch: the top ids' logits are ``topk``'s values (ties: lowest id first), the logprobs are
    ``log_softmax``'s (to fp32 rounding of the logsumexp)."""
    rows, (token, top_ids, top) = kernel_logprobs(logits, rows, tokens, k)
    raw = logits.index_select(0, rows).float()
    ref = torch.log_softmax(raw, -1)
    assert top_ids.dtype == torch.int64 and top_ids.shape == top.shape == (len(rows), k)
    assert torch.equal(raw.gather(1, top_ids), raw.topk(k, -1).values)
    values = raw.gather(1, top_ids)
    assert bool(((values[:, 1:] != values[:, :-1]) | (top_ids[:, 1:] > top_ids[:, :-1])).all())
    torch.testing.assert_close(top, ref.gather(1, top_ids), rtol=0, atol=2e-5)
    torch.testing.assert_close(token, ref.gather(1, tokens.index_select(0, rows)[:, None])[:, 0], rtol=0, atol=2e-5)


def masked_logits(vocab: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows as a batch leaves them: plain, masked to 3 tokens (fewer than k), half masked, tied maxima across and
    within segments, and a view with a row stride wider than the vocabulary."""
    logits = randn(6, vocab + 7, dtype=dtype, scale=3.0)[:, :vocab]
    logits[1, 3:] = float("-inf")
    logits[2, ::2] = float("-inf")
    logits[3, [7, 9, vocab // 2, vocab - 1]] = 50.0
    return logits


@small
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab,k", [(1000, 1), (1000, 20), (4099, 5), (4099, 20)])
def test_logprobs_kernel_matches_log_softmax_topk(vocab, k, dtype):
    """4099: a second segment of 3 columns; bf16 logits tie often."""
    tokens = torch.randint(0, vocab, (6,), generator=torch.Generator().manual_seed(vocab)).to(DEVICE)
    tokens[1] = 2  # the masked row's token is one of its 3 allowed ones
    check_logprobs(masked_logits(vocab, dtype), [4, 0, 1, 2, 3], tokens, k)


@small
def test_logprobs_kernel_without_alternatives_and_ties_to_lowest_id():
    logits = masked_logits(1000, torch.float32)
    check_logprobs(logits, [0, 3], torch.zeros(6, dtype=torch.int64, device=DEVICE), 0)
    _, (_, top_ids, _) = kernel_logprobs(logits, [3, 1], torch.zeros(6, dtype=torch.int64, device=DEVICE), 6)
    assert top_ids[0, :4].tolist() == [7, 9, 500, 999]
    assert sorted(top_ids[1, :3].tolist()) == [0, 1, 2] and top_ids[1, 3:].tolist() == [3, 4, 5]  # then -inf by id


@small
@pytest.mark.parametrize("top_p_path", [False, True], ids=["mask-in-kernel", "mask-first"])
def test_sampler_logprobs_read_the_raw_logits(monkeypatch, top_p_path):
    """The sampler's kernel path (forced on CPU): a grammar-masked fp32 row still gets the raw logprobs, and
    the bitmask (applied in the sampling kernel, or first when top-k/top-p need it) does not mask the caller's
    logits in place before the sampled tokens' logits are read."""
    monkeypatch.setattr(sampler, "use_triton_kernels", lambda x: True)
    import numpy as np
    logits = randn(3, 1000, scale=3.0)
    raw = logits.clone()
    allowed = np.full((3, 32), 2 ** 32 - 1, dtype=np.uint32)  # a row per logits row; rows 0 and 1 allow all
    allowed[2] = 0
    allowed[2, 0] = 0b1010  # tokens 1 and 3
    bitmask = torch.from_numpy(allowed.view(np.int32)).to(DEVICE)
    zeros = torch.zeros(3, device=DEVICE)
    batch = SamplingBatch(zeros, zeros.long(), zeros + 1, zeros, zeros.long() - 1, zeros.long(), all_greedy=True,
                          any_greedy=True, use_top_k_top_p=top_p_path, use_min_p=False, any_seeded=False,
                          logprob_rows=torch.tensor([2, 0], device=DEVICE), num_logprobs=4, bitmask=bitmask)
    sampled, logprobs = Sampler().sample(logits, batch)
    assert int(sampled[2]) in (1, 3) and torch.equal(logits, raw)
    ref = token_logprobs(torch.log_softmax(raw[[2, 0]], -1), sampled[[2, 0]], 4)
    assert torch.equal(logprobs.top_ids, ref.top_ids)
    torch.testing.assert_close(logprobs.top, ref.top, rtol=0, atol=2e-5)
    torch.testing.assert_close(logprobs.token, ref.token, rtol=0, atol=2e-5)


# ---------------------------------------------------------------------- GPU tier (real sizes)

@gpu
@needs_cuda
@pytest.mark.parametrize("hidden", [1024, 4096])
def test_norms_gpu(hidden):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
    x, residual = randn(777, hidden, dtype=torch.bfloat16, scale=4.0), randn(777, hidden, dtype=torch.bfloat16)
    w = randn(hidden, dtype=torch.bfloat16, seed=1)
    hf = Qwen3RMSNorm(hidden, eps=1e-6).cuda().bfloat16().requires_grad_(False)
    hf.weight.data.copy_(w)
    out = triton_fused.rms_norm(x, w, 1e-6)
    check(out, hf(x), max_ulp=NORM_ULP)
    out, summed = triton_fused.add_rms_norm(x, residual, w, 1e-6)
    assert torch.equal(summed, x + residual)
    check(out, hf(x + residual), max_ulp=NORM_ULP)
    q, k, _ = qkv_views(777, 16, 8, 128, torch.bfloat16)
    wq = randn(128, dtype=torch.bfloat16, seed=2)
    check(triton_fused.rms_norm(q, wq, 1e-6), fusion.torch_rms_norm(q, wq, 1e-6), max_ulp=NORM_ULP)
    check(triton_fused.rms_norm(k, wq, 1e-6), fusion.torch_rms_norm(k, wq, 1e-6), max_ulp=NORM_ULP)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_silu_gpu(dtype):
    q, k, _ = qkv_views(1000, 16, 8, 128, dtype)
    cos, sin = rope_cache(40960, 128)
    positions = torch.randint(0, 40960, (1000,), device="cuda")
    no_cache = torch.tensor([], device="cuda")
    out_q, out_k = triton_fused.qk_norm_rotary_store(positions, q, k, k, cos, sin, None, EPS, no_cache, no_cache, None)
    ref_q, ref_k = fusion.torch_rotary(positions, q, k, cos, sin)
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)  # fp32 too: no FMA contraction
    x = randn(1000, 2 * 3072, dtype=dtype, scale=4.0)
    out, ref = triton_fused.silu_and_mul(x), fusion.torch_silu_and_mul(x)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(out, ref)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [*HEAD_LAYOUTS, (32, 8, 128)])
def test_prologue_gpu(num_heads, num_kv_heads, head_dim, qk_norm, block_size):
    """bf16 at real sizes (1003 tokens, positions up to 40959): bit for bit the per-head RMSNorm kernel, rotary and
    the Triton KV store it replaces. The norm tiles have _rms_norm_kernel's layout (the same rows per tile), so the
    variance sums in the same order: an off-by-one-step q/k here means they compiled to different layouts."""
    inputs = prologue_inputs(1003, num_heads, num_kv_heads, head_dim, torch.bfloat16, qk_norm, block_size=block_size,
                             seed=head_dim, max_position=40960)
    check_prologue_matches_unfused(inputs, store=triton_kv.store_kvcache)


@gpu
@needs_cuda
@pytest.mark.parametrize("vocab,rows", list(GUMBEL_CASES))
def test_gumbel_split_gpu(vocab, rows, monkeypatch):
    """Every recorded case, split as on this GPU, one program per row, and in the narrowest slices."""
    check_gumbel_case(vocab, rows, [None, 1, 1 << 16], monkeypatch)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gumbel_gpu(dtype, monkeypatch):
    vocab, rows = 151936, 256
    logits = randn(rows, vocab, dtype=dtype, scale=3.0)
    gen = torch.Generator().manual_seed(0)
    temperatures = torch.rand(rows, generator=gen) * 1.5
    temperatures[::4] = 0.0
    seeds = torch.randint(0, 2 ** 40, (rows,), generator=gen)
    seeds[torch.rand(rows, generator=gen) < 0.5] = -1
    positions = torch.randint(0, 4096, (rows,), generator=gen)
    batch = sampling_batch(temperatures.tolist(), seeds.tolist(), positions.tolist())
    out = gumbel(logits, batch, 5)
    greedy, seeded = temperatures == 0, (temperatures > 0) & (seeds >= 0)
    assert torch.equal(out[greedy.cuda()], logits[greedy.cuda()].argmax(-1))
    expected = torch_sample(logits, batch, monkeypatch)
    assert torch.equal(out[seeded.cuda()], expected[seeded.cuda()])
    flat = torch.zeros_like(logits)  # uniform over the vocabulary: a new step seed gives new draws
    a, b = gumbel(flat, batch, 5), gumbel(flat, batch, 6)
    unseeded = ((temperatures > 0) & (seeds < 0)).cuda()
    assert int((a != b)[unseeded].sum()) >= int(unseeded.sum()) - 1
    assert torch.equal(a[seeded.cuda()], b[seeded.cuda()])


@gpu
@needs_cuda
def test_gumbel_distribution_gpu():
    probs = torch.tensor([0.4, 0.25, 0.2, 0.1, 0.05])
    logits = probs.log().repeat(200_000, 1).cuda()
    batch = sampling_batch([1.0] * 200_000, [-1] * 200_000, [0] * 200_000)
    counts = torch.bincount(gumbel(logits, batch, 9), minlength=5).double().cpu()
    expected = probs.double() * 200_000
    assert float(((counts - expected) ** 2 / expected).sum()) < 18.5  # 4 degrees of freedom, p = 0.001


@gpu
@needs_cuda
def test_sampler_uses_kernel_on_cuda(monkeypatch):
    """Top-k masking in torch, then the kernel: samples stay in the top 2, greedy rows are argmax."""
    logits = randn(64, 151936, dtype=torch.bfloat16, scale=3.0)
    batch = sampling_batch([1.0, 0.0] * 32, [-1] * 64, [0] * 64)
    batch.top_ks, batch.use_top_k_top_p = torch.full((64,), 2, device="cuda"), True
    real, calls = triton_fused.gumbel_argmax, []

    def spy(*args, **kwargs):
        calls.append(args[-1])  # the step seed
        return real(*args, **kwargs)
    monkeypatch.setattr(triton_fused, "gumbel_argmax", spy)
    sampler = Sampler(seed=3)
    first, second = sampler(logits, batch), sampler(logits, batch)
    assert len(calls) == 2 and calls[0] != calls[1]
    second_best = logits.float().topk(2, dim=-1).values[:, 1]  # by value: bf16 logits tie now and then
    assert bool((logits.float().gather(1, first[:, None])[:, 0] >= second_best).all())
    assert torch.equal(first[1::2], logits[1::2].argmax(-1)) and torch.equal(first[1::2], second[1::2])


@gpu
@needs_cuda
def test_cuda_graph_capture():
    """Capture the element-wise ops, the prologue (with its cache store) and the split sampler once; replay after
    rewriting the inputs in place."""
    tokens, hidden = 64, 1024
    x, residual = randn(tokens, hidden, dtype=torch.bfloat16), randn(tokens, hidden, dtype=torch.bfloat16, seed=1)
    w = randn(hidden, dtype=torch.bfloat16, seed=2)
    prologue = prologue_inputs(tokens, 16, 8, 128, torch.bfloat16, qk_norm=True, block_size=16, max_position=4096)
    q, k, v = prologue["q"], prologue["k"], prologue["v"]
    gate_up = randn(tokens, 2 * 3072, dtype=torch.bfloat16)
    batch, logits = gumbel_case(3, 151936, torch.bfloat16)  # split over programs, then the winner kernel

    def step():
        return (triton_fused.add_rms_norm(x, residual, w, 1e-6), triton_fused.qk_norm_rotary_store(**prologue),
                triton_fused.rms_norm(q, w[:128], 1e-6), triton_fused.silu_and_mul(gate_up),
                triton_fused.gumbel_argmax(logits, batch.temperatures, batch.seeds, batch.positions, 7))

    from benchmarks.kernels import capture_graph
    graph, outs = capture_graph(step)
    for _ in range(2):
        for t in (x, residual, q, k, v, gate_up, logits):
            t.copy_(torch.randn_like(t, dtype=torch.float32).to(t.dtype))
        prologue["positions"].copy_(torch.randint(0, 4096, (tokens,), device="cuda"))
        prologue["slot_mapping"].copy_(prologue["slot_mapping"].roll(1))
        ref_caches = {"k_cache": prologue["k_cache"].clone(), "v_cache": prologue["v_cache"].clone()}
        graph.replay()
        torch.cuda.synchronize()
        ref = (fusion.torch_add_rms_norm(x, residual, w, 1e-6),
               unfused_prologue(**{**prologue, **ref_caches}, store=triton_kv.store_kvcache),
               fusion.torch_rms_norm(q, w[:128], 1e-6), fusion.torch_silu_and_mul(gate_up),
               triton_fused.gumbel_argmax(logits, batch.temperatures, batch.seeds, batch.positions, 7))
        assert torch.equal(outs[0][1], ref[0][1]) and ulp_distance(outs[0][0], ref[0][0]) <= NORM_ULP
        assert torch.equal(outs[1][0], ref[1][0]) and torch.equal(outs[1][1], ref[1][1])
        for cache in ref_caches:
            torch.testing.assert_close(prologue[cache], ref_caches[cache], rtol=0, atol=0, equal_nan=True)
        assert ulp_distance(outs[2], ref[2]) <= NORM_ULP and torch.equal(outs[3], ref[3])
        assert torch.equal(outs[4], ref[4])


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [5, 20])
def test_logprobs_kernel_gpu(dtype, k, monkeypatch):
    """256 of 300 rows of Qwen3's vocabulary, and the sampler on CUDA against its torch path."""
    logits = randn(300, 151936, dtype=dtype, scale=3.0)
    logits[5, 1000:] = float("-inf")
    rows = list(range(256))
    tokens = torch.randint(0, 1000, (300,), device="cuda")
    check_logprobs(logits, rows, tokens, k)
    batch = sampling_batch([0.0] * 300, [-1] * 300, [0] * 300)
    batch.logprob_rows, batch.num_logprobs = torch.tensor(rows, device="cuda"), k
    sampled, kernel = Sampler().sample(logits, batch)
    monkeypatch.setenv("NANOVLLM_FUSED_KERNELS", "0")
    again, ref = Sampler().sample(logits, batch)
    assert torch.equal(sampled, again) and kernel.top_ids.shape == ref.top_ids.shape == (256, k)
    torch.testing.assert_close(kernel.top, ref.top, rtol=0, atol=2e-5)
    torch.testing.assert_close(kernel.token, ref.token, rtol=0, atol=2e-5)


def test_attention_logs_the_store_the_prologue_did_and_does_not_store_again(monkeypatch):
    """The logging guide's "Storing KV cache" line stays at DEBUG when the fused prologue wrote K/V itself."""
    from engine.context import reset_context, set_context
    from engine.layers import attention
    seen = []
    monkeypatch.setattr(attention.logger, "isEnabledFor", lambda level: True)
    monkeypatch.setattr(attention.logger, "debug", lambda msg, *args: seen.append(msg % args))
    layer = attention.Attention(4, 2, 16, 0.25)
    layer.k_cache, layer.v_cache = torch.zeros(2, 16, 2, 16), torch.zeros(2, 16, 2, 16)
    set_context(is_prefill=False, slot_mapping=torch.tensor([0, 16, 17]),
                context_lens=torch.tensor([1, 2, 2], dtype=torch.int32),
                block_tables=torch.tensor([[0], [1], [1]], dtype=torch.int32))
    try:
        layer(torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16), kv_stored=True)
    finally:
        reset_context()
    assert any(m.startswith("Storing KV cache: N=3, num_heads=2, head_dim=16") for m in seen)
    assert not layer.k_cache.any() and not layer.v_cache.any()
