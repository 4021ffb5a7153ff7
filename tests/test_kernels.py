"""Triton KV-store and paged-attention kernels against engine.kernels.reference.

Two tiers (see tests/triton_tiers.py): small sizes through the Triton interpreter on CPU (or on the GPU
when there is one), and ``gpu``-marked real sizes: bf16, contexts up to 8192, CUDA-graph capture.

The interpreter (Triton 3.9) multiplies bf16 dot operands as raw bits, so the CPU tier checks
fp32 and fp16; bf16 is covered by the GPU tier. Outputs are poisoned with NaN before each call,
so any element the kernel fails to write fails the check.
"""
import functools

import pytest
import torch

from tests.triton_tiers import (DEVICE, gpu, in_fresh_interpreter, needs_cuda, run_in_fresh_interpreter,
                                small)
from engine.kernels import reference, triton_attention, triton_kv  # noqa: I001 (after triton_tiers)
from engine.model_runner import longest_first

TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "output has NaN: an element was not written"
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def make_paged(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
               dtype: torch.dtype, gen: torch.Generator, spare_blocks: int = 2):
    """Random caches plus block tables that scatter each sequence over a shuffled block pool.

    Table entries past a sequence's blocks are -1 (as the engine pads them); the table is wider
    than the longest sequence needs, so the kernels cannot rely on its width.
    """
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)
    v_cache = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype).to(DEVICE)
    pool = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.full((len(context_lens), max(needed) + spare_blocks), -1, dtype=torch.int32)
    for row, count in enumerate(needed):
        tables[row, :count] = torch.tensor(pool[:count], dtype=torch.int32)
        pool = pool[count:]
    lens = torch.tensor(context_lens, dtype=torch.int32)
    return k_cache, v_cache, tables.to(DEVICE), lens.to(DEVICE)


def strided_query(tokens: int, num_heads: int, head_dim: int, dtype: torch.dtype,
                  gen: torch.Generator) -> torch.Tensor:
    """A query view sliced out of a wider fused-QKV-like buffer (token stride > heads * dim)."""
    fused = torch.randn(tokens, num_heads + 3, head_dim, generator=gen).to(dtype).to(DEVICE)
    return fused[:, 1:num_heads + 1]


def poisoned_like(q: torch.Tensor) -> torch.Tensor:
    return torch.full(q.shape, float("nan"), dtype=q.dtype, device=q.device)


def check_decode(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
                 config=None):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, lens = make_paged(context_lens, num_kv_heads, head_dim,
                                                block_size, dtype, gen)
    q = strided_query(len(context_lens), num_heads, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                                  out=poisoned_like(q), config=config)
    ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    assert rel_error(out, ref) < TOLERANCE[dtype]
    assert_order_changes_nothing(out, q, k_cache, v_cache, tables, lens, scale, config=config)


def assert_order_changes_nothing(out, q, k_cache, v_cache, tables, lens, scale, *args, config):
    """The engine's launch order (rows longest first) and a shuffled one give ``out`` bit for bit: a row's
    programs compute the same whichever position of the grid serves it."""
    gen = torch.Generator().manual_seed(len(lens))
    for order in (longest_first(lens.cpu().numpy()), torch.randperm(len(lens), generator=gen).numpy()):
        ordered = triton_attention.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, scale, *args, order=torch.from_numpy(order).to(DEVICE),
            out=poisoned_like(q), config=config)
        assert torch.equal(ordered, out)


def share_prefix(tables: torch.Tensor, shared: int) -> torch.Tensor:
    """Point the first ``shared`` table entries of every row at row 0's blocks (a cached prefix)."""
    tables = tables.clone()
    tables[:, :shared] = tables[0, :shared]
    return tables


def check_shared_decode(context_lens, shared, num_heads, num_kv_heads, head_dim, block_size, dtype,
                        seed, config=None):
    """Cascade decode: rows share their first ``shared`` blocks; a context-0 row (CUDA-graph
    padding) must come out as zeros and not disturb the others."""
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, lens = make_paged(context_lens + [0], num_kv_heads, head_dim,
                                                block_size, dtype, gen)
    tables = share_prefix(tables, shared)
    q = strided_query(len(context_lens) + 1, num_heads, head_dim, dtype, gen)
    scale = head_dim ** -0.5
    shared_blocks = torch.tensor([shared], dtype=torch.int32, device=DEVICE)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                                  shared_blocks, out=poisoned_like(q),
                                                  config=config)
    ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
    assert rel_error(out[:-1], ref[:-1]) < TOLERANCE[dtype]
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert_order_changes_nothing(out, q, k_cache, v_cache, tables, lens, scale, shared_blocks, config=config)


def poison_past_contexts(k_cache, v_cache, tables, lens) -> None:
    """NaN in every cache slot past a sequence's context in its last block: a kernel that reads one into its
    products (even with the score masked: 0 x NaN) puts NaN in the output."""
    block_size = k_cache.shape[1]
    for row, n in enumerate(lens.tolist()):
        if n % block_size:
            last = int(tables[row, (n - 1) // block_size])
            k_cache[last, n % block_size:] = float("nan")
            v_cache[last, n % block_size:] = float("nan")


def check_prefill(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                  seed, config=None, max_context=None):
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, lens = make_paged(context_lens, num_kv_heads, head_dim,
                                                block_size, dtype, gen)
    poison_past_contexts(k_cache, v_cache, tables, lens)
    q = strided_query(sum(q_lens), num_heads, head_dim, dtype, gen)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    scale = head_dim ** -0.5
    out = triton_attention.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, scale,
                                                   max(q_lens), max_context=max_context,
                                                   out=poisoned_like(q), config=config)
    ref = reference.paged_prefill_attention_ref(q, k_cache, v_cache, cu, lens, tables, scale)
    assert rel_error(out, ref) < TOLERANCE[dtype]


# ---------------------------------------------------------------- small tier (CPU interpreter)

@in_fresh_interpreter
def test_small_tier_in_fresh_interpreter():
    run_in_fresh_interpreter(__file__)


@small
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_store_kvcache(block_size, slot_dtype, dtype):
    gen = torch.Generator().manual_seed(block_size + len(str(slot_dtype)) + len(str(dtype)))
    num_kv_heads, head_dim, num_blocks, tokens = 3, 16, 4, 11
    fused = torch.randn(tokens, 2 * num_kv_heads + 1, head_dim, generator=gen).to(dtype)
    key, value = fused[:, :num_kv_heads].to(DEVICE), fused[:, num_kv_heads + 1:].to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[[2, 7]] = -1
    slots = slots.to(slot_dtype).to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    triton_kv.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache_ref(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@small
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (6, 2), (8, 2)])
@pytest.mark.parametrize("head_dim,dtype", [(16, torch.float32), (32, torch.float16)])
def test_decode_small(block_size, num_heads, num_kv_heads, head_dim, dtype):
    context_lens = [1, block_size - 1, block_size + 1, 2 * block_size + 7]
    # block_n below / above the block size: one block per key tile / a block id per token
    block_n = 32 if block_size == 16 else 16
    config = triton_attention.DecodeConfig(block_n=block_n, num_stages=2)
    check_decode(context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                 seed=block_size * num_heads + head_dim, config=config)


@small
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_splits(num_splits):
    """Forced split counts, including more splits than a short sequence has tiles."""
    config = triton_attention.DecodeConfig(block_n=16, num_stages=2, num_splits=num_splits)
    check_decode([1, 16, 45, 100], 4, 2, 16, 16, torch.float32, seed=num_splits, config=config)


@small
@pytest.mark.parametrize("split_plan", [(1, 16), (2, 5), (6, 3)])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (10, 2, 80), (16, 8, 128)])
def test_decode_split_plan_small(split_plan, num_heads, num_kv_heads, head_dim):
    """Only the first rows of the order (the longest) split, the others one program each: a row with no key, a
    one-token row, more splits than a row has tiles, every row split; plain and with a shared prefix (cascade)."""
    context_lens, dtype, seed = [200, 5, 17, 0, 90, 33], torch.float32, sum(split_plan) + head_dim
    gen = torch.Generator().manual_seed(seed)
    k_cache, v_cache, tables, lens = make_paged(context_lens, num_kv_heads, head_dim, 16, dtype, gen)
    q = strided_query(len(context_lens), num_heads, head_dim, dtype, gen)
    order = torch.from_numpy(longest_first(lens.cpu().numpy())).to(DEVICE)
    config = triton_attention.DecodeConfig(block_n=16, num_stages=2, shared_block_m=16, shared_num_warps=4)
    ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, order=order,
                                                  split_plan=split_plan, out=poisoned_like(q), config=config)
    assert rel_error(out, ref) < TOLERANCE[dtype]
    long_rows = [r for r in (0, 4, 5, 1, 2) if context_lens[r] >= 33]  # all rows but the empty one share 2 blocks
    shared = torch.tensor([2], dtype=torch.int32, device=DEVICE)
    tables = share_prefix(tables, 2)
    lens = torch.tensor([n if r in long_rows else 0 for r, n in enumerate(context_lens)], dtype=torch.int32,
                        device=DEVICE)
    order = torch.from_numpy(longest_first(lens.cpu().numpy())).to(DEVICE)
    ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, shared,
                                                  order=order, split_plan=split_plan, out=poisoned_like(q),
                                                  config=config)
    assert rel_error(out[lens > 0], ref[lens > 0]) < TOLERANCE[dtype]


@small
def test_decode_split_plan_within_partial_bytes(monkeypatch):
    """A plan's split count is cut to what PARTIAL_BYTES holds (partials are kept for every row): room for 3
    slots turns (1, 16) into (1, 3), and the result still equals the reference."""
    context_lens, num_heads, head_dim = [300, 5, 17, 0, 90, 33], 9, 64
    gen = torch.Generator().manual_seed(4)
    k_cache, v_cache, tables, lens = make_paged(context_lens, 3, head_dim, 16, torch.float32, gen)
    q = strided_query(len(context_lens), num_heads, head_dim, torch.float32, gen)
    order = torch.from_numpy(longest_first(lens.cpu().numpy())).to(DEVICE)
    monkeypatch.setattr(triton_attention, "PARTIAL_BYTES", 3 * len(context_lens) * num_heads * head_dim * 4)
    launched, kernel = [], triton_attention._decode_split_kernel

    class GridSpy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]
    monkeypatch.setattr(triton_attention, "_decode_split_kernel", GridSpy())
    config = triton_attention.DecodeConfig(block_n=16, num_stages=2, shared_block_m=16, shared_num_warps=4)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, order=order,
                                                  split_plan=(1, 16), out=poisoned_like(q), config=config)
    assert launched == [(3, 3 + len(context_lens) - 1)]  # (KV heads, parts): 3 parts for the longest row
    ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    assert rel_error(out, ref) < TOLERANCE[torch.float32]


def test_long_row_split_plan(monkeypatch):
    """Split only rows far longer than the rest (W6: a few 20k-token rows among ~500 short ones), never batches the
    shape rule already splits (few rows) or whose longest row is within twice a fair share (W1, W5, all long)."""
    import numpy as np
    monkeypatch.setattr(triton_attention, "_num_sms", lambda device: 132)
    plan = functools.partial(triton_attention.long_row_split_plan, num_kv_heads=8, device="cuda")
    desc = lambda *groups: np.array(sorted(sum((list(g) for g in groups), []), reverse=True))  # noqa: E731
    rng = np.random.default_rng(0)
    assert plan(desc([20_000] * 3, [700] * 500)) == (3, 5)  # share (60k + 350k) * 8 / 660 keys = 4,969
    assert plan(desc([20_000] * 3, [700] * 20)) is None     # 184 programs: the shape rule splits every row
    assert plan(desc(rng.integers(600, 2049, 128))) is None    # W1's rows
    assert plan(desc(rng.integers(100, 1601, 1008))) is None   # W5's
    assert plan(desc([20_000] * 500)) is None
    assert plan(desc([9_000], [100] * 700)) == (1, 9)  # share (9k + 70k) * 8 / 660 = 957: at its 1,024-key floor


@small
def test_decode_zero_context_gives_zeros():
    gen = torch.Generator().manual_seed(5)
    k_cache, v_cache, tables, lens = make_paged([0, 20], 1, 16, 16, torch.float32, gen)
    q = strided_query(2, 2, 16, torch.float32, gen)
    for splits in (1, 2):
        config = triton_attention.DecodeConfig(block_n=16, num_splits=splits)
        out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25,
                                                      out=poisoned_like(q), config=config)
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        ref = reference.paged_decode_attention_ref(q[1:], k_cache, v_cache, tables[1:],
                                                   lens[1:], 0.25)
        assert rel_error(out[1:], ref) < TOLERANCE[torch.float32]


# Every (shared blocks, splits) pair once; the head layouts and dtypes in a Latin square over them, so each shared
# count and each split count meets every layout.
DECODE_LAYOUTS = [(4, 2, torch.float32), (8, 2, torch.float16), (2, 2, torch.float32)]
SHARED_PREFIX_CASES = [(shared, num_splits, *DECODE_LAYOUTS[(i + j) % 3])
                       for i, shared in enumerate([0, 1, 3]) for j, num_splits in enumerate([None, 1, 3])]


@small
@pytest.mark.parametrize("shared,num_splits,num_heads,num_kv_heads,dtype", SHARED_PREFIX_CASES)
def test_decode_shared_prefix(shared, num_splits, num_heads, num_kv_heads, dtype):
    """Every row has at least one block of its own after the shared ones (as in the engine)."""
    context_lens = [3 * 16 + 1, 4 * 16, 5 * 16 + 9, 3 * 16 + 16, 7 * 16 + 2]
    config = triton_attention.DecodeConfig(block_n=16, num_stages=2, num_splits=num_splits,
                                           shared_block_m=16, shared_num_warps=4)
    check_shared_decode(context_lens, shared, num_heads, num_kv_heads, 16, 16, dtype,
                        seed=shared * 10 + (num_splits or 0) + num_heads, config=config)


@small
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_heads,num_kv_heads", [(2, 2), (4, 2), (3, 1), (8, 2)])
@pytest.mark.parametrize("head_dim,dtype", [(16, torch.float32), (32, torch.float16)])
def test_prefill_small(block_size, num_heads, num_kv_heads, head_dim, dtype):
    # (new tokens, context): no prefix, prefix not a multiple of the block, single token,
    # and a long prompt that spans several query tiles.
    q_lens = [5, 7, 1, 40]
    context_lens = [5, 7 + block_size + 3, 18, 40]
    block_n = 32 if block_size == 16 else 16
    config = triton_attention.PrefillConfig(block_m=32, block_n=block_n, num_warps=4,
                                            num_stages=2)
    check_prefill(q_lens, context_lens, num_heads, num_kv_heads, head_dim, block_size, dtype,
                  seed=block_size + num_heads * 7 + head_dim, config=config)


@small
def test_prefill_default_config_and_max_seqlen_from_cu():
    gen = torch.Generator().manual_seed(11)
    k_cache, v_cache, tables, lens = make_paged([9, 30], 2, 16, 16, torch.float32, gen)
    q = strided_query(9 + 12, 4, 16, torch.float32, gen)
    cu = torch.tensor([0, 9, 21], dtype=torch.int32, device=DEVICE)
    out = triton_attention.paged_prefill_attention(q, k_cache, v_cache, cu, lens, tables, 0.25)
    ref = reference.paged_prefill_attention_ref(q, k_cache, v_cache, cu, lens, tables, 0.25)
    assert rel_error(out, ref) < TOLERANCE[torch.float32]


@small
@pytest.mark.parametrize("num_splits,num_heads,num_kv_heads,head_dim,dtype",  # each split count, each layout
                         [(16, 9, 3, 64, torch.float32), (3, 10, 2, 80, torch.float16),
                          (2, 14, 2, 64, torch.float32), (3, 4, 4, 32, torch.float32)])
def test_prefill_key_splits_small(num_splits, num_heads, num_kv_heads, head_dim, dtype):
    """Keys split over several programs: chunks deep in a context (the first query rows of a tile see no key of the
    last splits: empty parts), a tile whose keys fit in the first split (written directly), a prompt without
    prefix, a single token, more splits than key tiles; with the split length from ``max_context`` and from the
    block table's width."""
    q_lens, context_lens = [9, 20, 1, 33, 3], [9, 150, 97, 120, 140]
    config = triton_attention.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2, num_splits=num_splits)
    for max_context in (max(context_lens), None):
        check_prefill(q_lens, context_lens, num_heads, num_kv_heads, head_dim, 16, dtype,
                      seed=num_splits + num_heads, config=config, max_context=max_context)


def test_prefill_num_splits():
    """One split when the grid fills two waves or the context is short; else toward four waves, each split at least
    PREFILL_MIN_SPLIT_KEYS keys, the partials within PARTIAL_BYTES."""
    sms = 132
    assert triton_attention.prefill_num_splits(2 * sms, 20_000, 700, 16, 128, sms) == 1
    assert triton_attention.prefill_num_splits(88, 2047, 700, 16, 128, sms) == 1       # under two splits' keys
    assert triton_attention.prefill_num_splits(88, 20_000, 700, 16, 128, sms) == 6     # 4 waves: cdiv(528, 88)
    assert triton_attention.prefill_num_splits(8, 20_000, 60, 16, 128, sms) == 16      # at most PREFILL_MAX_SPLITS
    assert triton_attention.prefill_num_splits(8, 5_000, 60, 16, 128, sms) == 4        # 5,000 // 1,024 keys
    assert triton_attention.prefill_num_splits(8, 50_000, 1_000, 32, 256, sms) == 2    # 64 MiB // 32.8 MB a split


# Head layouts of real checkpoints at small scale: (query heads, KV heads, head_dim). GQA groups 1, 2, 3, 5, 7, 8;
# head_dim 64 / 80 / 96 / 128 / 256 (80 and 96 are not powers of two: the kernels mask the padded lanes).
REAL_HEADS = [(9, 3, 64),     # SmolLM2-135M
              (14, 2, 64),    # Qwen2-0.5B (group 7)
              (10, 2, 80),    # group 5, head_dim 80
              (6, 2, 96),     # head_dim 96
              (4, 4, 128),    # MHA
              (16, 8, 128),   # Qwen3-0.6B
              (8, 1, 256)]    # head_dim 256, group 8


@small
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", REAL_HEADS)
def test_real_head_layouts_small(num_heads, num_kv_heads, head_dim):
    """Store, decode (split and cascade) and paged prefill on the head layouts real models have."""
    dtype, block_size, seed = torch.float32, 16, num_heads * 1000 + head_dim
    gen = torch.Generator().manual_seed(seed)
    key = torch.randn(5, num_kv_heads, head_dim, generator=gen).to(DEVICE)
    k_cache = torch.full((2, block_size, num_kv_heads, head_dim), float("nan"), device=DEVICE)
    v_cache, k_ref, v_ref = k_cache.clone(), k_cache.clone(), k_cache.clone()
    slots = torch.tensor([0, 17, 3, -1, 31], device=DEVICE)
    triton_kv.store_kvcache(key, -key, k_cache, v_cache, slots)
    reference.store_kvcache_ref(key, -key, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)
    contexts = [1, 15, 33, 50]
    for splits in (1, 3):
        config = triton_attention.DecodeConfig(block_n=16, num_stages=2, num_splits=splits)
        check_decode(contexts, num_heads, num_kv_heads, head_dim, block_size, dtype, seed, config)
    check_shared_decode([33, 40, 49], 2, num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
                        triton_attention.DecodeConfig(block_n=16, num_stages=2, shared_block_m=16,
                                                      shared_num_warps=4))
    check_prefill([5, 1, 20], [5, 18, 40], num_heads, num_kv_heads, head_dim, block_size, dtype, seed,
                  triton_attention.PrefillConfig(block_m=16, block_n=16, num_warps=4, num_stages=2))


def check_mixed_step(num_heads, num_kv_heads, head_dim, dtype, seed):
    """A step of decode rows followed by prompt chunks through the Attention layer with the Triton backend
    (decode rows through the decode kernel, chunks through the paged prefill kernel) against the reference
    prefill attention over every row."""
    from engine.context import reset_context, set_context
    from engine.layers.attention import Attention
    block_size, gen = 16, torch.Generator().manual_seed(seed)
    q_lens, contexts = [1, 1, 1, 7, 20], [17, 33, 5, 16, 20]  # 3 decode rows; a chunk after 9 cached tokens; a prompt
    k_cache, v_cache, tables, lens = make_paged(contexts, num_kv_heads, head_dim, block_size, dtype, gen)
    q = strided_query(sum(q_lens), num_heads, head_dim, dtype, gen)
    k = torch.randn(sum(q_lens), num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(sum(q_lens), num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    positions = [p for n, c in zip(q_lens, contexts) for p in range(c - n, c)]
    rows = [r for r, n in enumerate(q_lens) for _ in range(n)]
    slots = torch.tensor([tables[r, p // block_size].item() * block_size + p % block_size
                          for r, p in zip(rows, positions)], device=DEVICE)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0).to(torch.int32).to(DEVICE)
    layer = Attention(num_heads, num_kv_heads, head_dim, head_dim ** -0.5)
    layer.k_cache, layer.v_cache = k_cache, v_cache
    set_context(is_prefill=True, cu_seqlens_q=cu, num_decode_tokens=3, max_seqlen_q=max(q_lens),
                max_seqlen_k=max(contexts), max_prompt_context=max(contexts[3:]), slot_mapping=slots, context_lens=lens,
                block_tables=tables, decode_order=torch.tensor([1, 0, 2], device=DEVICE))
    try:
        Attention.backend = "triton"
        out = layer(q, k, v)
    finally:
        Attention.backend = "torch"
        reset_context()
    ref = reference.paged_prefill_attention_ref(q, k_cache, v_cache, cu, lens, tables, head_dim ** -0.5)
    assert rel_error(out, ref) < TOLERANCE[dtype]


@small
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (10, 2, 80), (16, 8, 128)])
@pytest.mark.parametrize("min_split_keys", [1024, 8])
def test_mixed_step_attention_small(num_heads, num_kv_heads, head_dim, min_split_keys, monkeypatch):
    """Also with the chunks' keys split (the split count from the step's longest prompt context, on a GPU of 64
    SMs): the reduce kernel runs exactly then."""
    launched = []

    def spy(kernel, grid):
        launched.append(kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__)
        return launch(kernel, grid)
    launch = triton_attention.launch
    monkeypatch.setattr(triton_attention, "launch", spy)
    monkeypatch.setattr(triton_attention, "_num_sms", lambda device: 64)
    monkeypatch.setattr(triton_attention, "PREFILL_MIN_SPLIT_KEYS", min_split_keys)
    check_mixed_step(num_heads, num_kv_heads, head_dim, torch.float32, seed=num_heads + head_dim)
    assert ("_prefill_reduce_kernel" in launched) == (min_split_keys == 8)


# ---------------------------------------------------------------------- GPU tier (real sizes)

HEADS = [(16, 16), (16, 8), (32, 4)]  # GQA ratios 1, 2, 8


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_decode_gpu(block_size, num_heads, num_kv_heads):
    gen = torch.Generator().manual_seed(block_size + num_heads)
    lens = [1, 2, 255, 256, 257, 1000, 4095, 8192]
    lens += torch.randint(1, 8193, (8,), generator=gen).tolist()
    check_decode(lens, num_heads, num_kv_heads, 128, block_size, torch.bfloat16,
                 seed=block_size * num_heads)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
def test_decode_gpu_large_batch(block_size):
    """Batch 256 (one split per sequence with the default heuristic), contexts 1..2048."""
    gen = torch.Generator().manual_seed(block_size)
    lens = torch.randint(1, 2049, (256,), generator=gen).tolist()
    check_decode(lens, 16, 8, 128, block_size, torch.bfloat16, seed=block_size + 1)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 8, 128), (9, 3, 64)])
def test_decode_gpu_long_rows_split(num_heads, num_kv_heads, head_dim):
    """W6's mix at real sizes: 3 rows of 16k-24k tokens among 500 of 100-2,048, with the plan an eager step makes
    (only the long rows split), bf16 at the engine's block size."""
    import numpy as np
    gen = torch.Generator().manual_seed(head_dim)
    context_lens = [16_500, 20_000, 24_000] + torch.randint(100, 2049, (500,), generator=gen).tolist()
    plan = triton_attention.long_row_split_plan(np.array(sorted(context_lens, reverse=True)), num_kv_heads,
                                                torch.device("cuda"))
    assert plan is not None and plan[0] == 3
    k_cache, v_cache, tables, lens = make_paged(context_lens, num_kv_heads, head_dim, 128, torch.bfloat16, gen)
    q = strided_query(len(context_lens), num_heads, head_dim, torch.bfloat16, gen)
    order = torch.from_numpy(longest_first(lens.cpu().numpy())).to(DEVICE)
    out = triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, head_dim ** -0.5, order=order,
                                                  split_plan=plan, out=poisoned_like(q))
    ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, head_dim ** -0.5)
    assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
@pytest.mark.parametrize("batch", [16, 256])
def test_decode_gpu_shared_prefix(block_size, num_heads, num_kv_heads, batch):
    """W3's shape: a ~900-token prefix shared by the batch, 100-300 own tokens per sequence."""
    gen = torch.Generator().manual_seed(block_size + batch)
    shared = 896 // block_size if block_size < 896 else 1
    lens = (shared * block_size + torch.randint(1, 300, (batch,), generator=gen)).tolist()
    check_shared_decode(lens, shared, num_heads, num_kv_heads, 128, block_size, torch.bfloat16,
                        seed=block_size * num_heads + batch)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_decode_gpu_dtypes(dtype, head_dim):
    check_decode([1, 300, 3000], 16, 8, head_dim, 16, dtype, seed=head_dim)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_heads,num_kv_heads", HEADS)
def test_prefill_gpu(block_size, num_heads, num_kv_heads):
    # no prefix; prefix-cache hits of various lengths; a single new token; an 8192 context
    q_lens = [1000, 37, 1, 2048, 513]
    context_lens = [1000, 37 + 700, 4000, 8192, 513 + block_size]
    check_prefill(q_lens, context_lens, num_heads, num_kv_heads, 128, block_size,
                  torch.bfloat16, seed=block_size + 3 * num_heads)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 8, 128), (9, 3, 64), (12, 4, 96)])
def test_prefill_gpu_long_context_chunks(num_heads, num_kv_heads, head_dim):
    """W6's prompt chunks: a few hundred tokens deep in 16k-token contexts, whose few query tiles split their keys
    (the default split count from ``max_context``), beside a short prompt; bf16 at the engine's block size."""
    q_lens, context_lens = [700, 300, 90], [16_500, 9_000, 90]
    programs = 6 * 3 * num_kv_heads  # at most 6 query tiles a row (700 x 2 / 128 for Qwen3), 3 rows
    assert triton_attention.prefill_num_splits(programs, 16_500, 1090, num_heads, head_dim, 132) > 1
    check_prefill(q_lens, context_lens, num_heads, num_kv_heads, head_dim, 128, torch.bfloat16,
                  seed=head_dim, max_context=max(context_lens))


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64])
def test_prefill_gpu_dtypes(dtype, head_dim):
    check_prefill([300, 77], [300, 500], 8, 2, head_dim, 16, dtype, seed=head_dim)


@gpu
@needs_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (16, 8, 128)])
def test_mixed_step_attention_gpu_bf16(num_heads, num_kv_heads, head_dim):
    check_mixed_step(num_heads, num_kv_heads, head_dim, torch.bfloat16, seed=head_dim)


@gpu
@needs_cuda
def test_store_kvcache_gpu():
    gen = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv_heads, head_dim, tokens = 64, 256, 8, 128, 5000
    fused = torch.randn(tokens, 3 * num_kv_heads, head_dim, generator=gen).bfloat16().cuda()
    key, value = fused[:, num_kv_heads:2 * num_kv_heads], fused[:, 2 * num_kv_heads:]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::7] = -1
    slots = slots.cuda()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=torch.bfloat16, device="cuda")
    v_cache = torch.full_like(k_cache, float("nan"))
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    triton_kv.store_kvcache(key, value, k_cache, v_cache, slots)
    reference.store_kvcache_ref(key, value, k_ref, v_ref, slots)
    torch.testing.assert_close(k_cache, k_ref, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, v_ref, rtol=0, atol=0, equal_nan=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
def test_decode_cuda_graph(block_size):
    """Capture once; replay after rewriting q, context_lens, block_tables and the shared-prefix
    length in place."""
    batch, num_heads, num_kv_heads, head_dim, max_len = 32, 16, 8, 128, 8192
    gen = torch.Generator().manual_seed(block_size)
    max_blocks = max_len // block_size
    num_blocks = batch * max_blocks
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen).bfloat16().cuda()
    v_cache = torch.randn(shape, generator=gen).bfloat16().cuda()
    q = torch.randn(batch, num_heads, head_dim, generator=gen).bfloat16().cuda()
    tables = torch.zeros(batch, max_blocks, dtype=torch.int32, device="cuda")
    lens = torch.ones(batch, dtype=torch.int32, device="cuda")
    shared_blocks = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    scale = head_dim ** -0.5

    def step():
        triton_attention.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale,
                                                shared_blocks, out=out)

    from benchmarks.kernels import capture_graph
    graph, _ = capture_graph(step)

    for shared in (0, 3, 0, 1):  # the shared-prefix length changes between replays
        new_lens = torch.randint(shared * block_size + 1, max_len + 1, (batch,), generator=gen)
        new_lens[0], new_lens[1] = shared * block_size + 1, max_len
        lens.copy_(new_lens.to(torch.int32))
        perm = torch.randperm(num_blocks, generator=gen).view(batch, max_blocks).int()
        tables.copy_(share_prefix(perm, shared))
        shared_blocks.fill_(shared)
        q.copy_(torch.randn(q.shape, generator=gen).bfloat16())
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, lens, scale)
        assert rel_error(out, ref) < TOLERANCE[torch.bfloat16]
