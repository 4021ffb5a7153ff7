"""Chunked prefill under one token budget: greedy outputs equal HF transformers token for token (fp32, CPU)
when prompts are longer than the budget, with decodes in the same steps, prefix-cache hits landing mid-chunk,
preemption under a small KV cache, GQA with odd head counts, and async scheduling on and off."""
import random

import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import hf_greedy

BUDGET, BS, MAX_NEW = 32, 16, 6
_EXPECTED: dict = {}


def expected(path: str, prompt: list[int], max_new: int = MAX_NEW) -> list[int]:
    key = (path, tuple(prompt), max_new)
    if key not in _EXPECTED:
        _EXPECTED[key] = hf_greedy(path, prompt, max_new)
    return _EXPECTED[key]


def generate(path: str, prompts: list[list[int]], max_new: int = MAX_NEW, llm: LLM | None = None, **kwargs):
    """Greedy outputs and step records; every step within the budget and the running limit."""
    llm = llm or LLM(path, device="cpu", kvcache_block_size=BS, max_model_len=512, max_num_batched_tokens=BUDGET,
                     **kwargs)
    records = []
    llm.add_step_callback(records.append)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new, ignore_eos=True), use_tqdm=False)
    llm.step_callbacks.clear()
    assert all(r.num_tokens <= llm.config.max_num_batched_tokens for r in records)
    assert all(r.batch_size <= llm.config.max_num_seqs and r.num_running <= llm.config.max_num_seqs
               for r in records)
    assert llm.scheduler.block_manager.num_used_blocks == 0
    return outs, records


def random_prompts(vocab: int, lengths, seed: int = 0, prefix: list[int] | None = None) -> list[list[int]]:
    rng = random.Random(seed)
    return [(prefix or []) + [rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_long_prompts_in_chunks_mixed_with_decodes_match_hf(tiny_models, arch, async_scheduling):
    path = tiny_models[arch]
    prompts = random_prompts(512, (5, 300, 17, 100, 213, 40))
    outs, records = generate(path, prompts, async_scheduling=async_scheduling)
    assert [o["token_ids"] for o in outs] == [expected(path, p) for p in prompts]
    prefill_tokens = sum(r.num_prefill_tokens for r in records)
    assert prefill_tokens == sum(map(len, prompts)) - sum(r.prefix_cache_hit_tokens for r in records)
    assert any(r.num_decode_seqs and r.num_prefill_tokens for r in records)  # decodes ride along with chunks
    assert sum(r.phase == "prefill" for r in records) >= -(-prefill_tokens // BUDGET)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_chunks_cut_by_the_work_cap_beside_decodes_match_hf(tiny_models, async_scheduling, monkeypatch):
    """Beside decode rows a step takes at most 12 tokens of prompt work (at its face value beside any number of
    them), a token at position p counting 1 + p / attention_break_even: the long prompts' late chunks shrink to a
    few tokens, down to the one-token floor."""
    from engine import scheduler
    monkeypatch.setattr(scheduler, "PROMPT_CAP_ROWS", 1)
    path = tiny_models["qwen2"]
    prompts = random_prompts(512, (5, 300, 17, 213), seed=4)
    outs, records = generate(path, prompts, max_new=12, max_prefill_tokens_with_decodes=12,
                             async_scheduling=async_scheduling)
    assert [o["token_ids"] for o in outs] == [expected(path, p, 12) for p in prompts]
    mixed = [r.num_prefill_tokens for r in records if r.num_decode_seqs and r.num_prefill_tokens]
    assert mixed and max(mixed) <= 12 and min(mixed) < 12


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_prefix_cache_hits_land_mid_chunk(tiny_models, async_scheduling):
    """Prompts sharing 120 tokens arrive together: each later one, first scheduled while the first is still
    being prefilled chunk by chunk, starts after the blocks computed so far (a multiple of 16, not of the
    32-token chunks). A second round hits the blocks the finished sequences left in the cache."""
    path = tiny_models["qwen3"]
    shared = random_prompts(512, (120,), seed=1)[0]
    prompts = random_prompts(512, (3, 30, 77, 150), seed=2, prefix=shared)
    llm = LLM(path, device="cpu", kvcache_block_size=BS, max_model_len=512, max_num_batched_tokens=BUDGET,
              async_scheduling=async_scheduling)
    first, _ = generate(path, prompts, llm=llm)
    assert [o["token_ids"] for o in first] == [expected(path, p) for p in prompts]
    hits = [o["num_cached_tokens"] for o in first]
    assert hits[0] == 0 and all(h > 0 for h in hits[1:]) and any(h % BUDGET for h in hits)
    second, _ = generate(path, prompts, llm=llm)
    assert [o["token_ids"] for o in second] == [o["token_ids"] for o in first]
    assert all(o["num_cached_tokens"] >= 112 for o in second)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_preemption_with_chunked_prefill_matches_hf(tiny_models, async_scheduling):
    path = tiny_models["llama"]
    prompts = random_prompts(512, (150, 140, 130, 20), seed=3)
    outs, records = generate(path, prompts, max_new=20, num_kvcache_blocks=24, max_num_seqs=4,
                             async_scheduling=async_scheduling)
    assert sum(r.num_preempted for r in records) > 0
    assert [o["token_ids"] for o in outs] == [expected(path, p, 20) for p in prompts]


@pytest.fixture(scope="module")
def llama_9_heads(tmp_path_factory) -> str:
    """A Llama with 9 query heads sharing 3 KV heads of dim 64 (hidden 576), as in SmolLM2-135M."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from engine.demo import build_tokenizer
    path = str(tmp_path_factory.mktemp("llama_9_heads"))
    vocab = build_tokenizer(path)
    config = LlamaConfig(vocab_size=vocab, hidden_size=576, intermediate_size=768, num_hidden_layers=2,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_gqa_9_heads_3_kv_heads_match_hf(llama_9_heads, async_scheduling):
    prompts = random_prompts(512, (90, 7, 161), seed=4)
    outs, records = generate(llama_9_heads, prompts, async_scheduling=async_scheduling)
    assert [o["token_ids"] for o in outs] == [expected(llama_9_heads, p) for p in prompts]
    assert any(r.num_decode_seqs and r.num_prefill_tokens for r in records)


def test_max_model_len_is_independent_of_the_budget(tiny_models):
    """The budget no longer grows to max_model_len: a prompt of the model's whole length runs in chunks."""
    path = tiny_models["qwen2"]
    llm = LLM(path, device="cpu", kvcache_block_size=BS, max_model_len=100_000, max_num_batched_tokens=64)
    assert llm.config.max_model_len == 4096 and llm.config.max_num_batched_tokens == 64
    prompt = random_prompts(512, (1000,), seed=5)[0]
    outs, records = generate(path, [prompt], max_new=2, llm=llm)
    assert outs[0]["token_ids"] == expected(path, prompt, 2) and len(records) == 1000 // 64 + 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("model", ["qwen3", "llama_9_heads"])
def test_chunked_prefill_on_gpu_matches_hf_fp32(tiny_models, llama_9_heads, model, async_scheduling):
    """On CUDA in fp32: mixed steps through the Triton paged prefill kernel (decode rows as one-token
    queries), decode-only steps through CUDA graphs, pending tokens fed on the device."""
    from transformers import AutoModelForCausalLM
    path = llama_9_heads if model == "llama_9_heads" else tiny_models[model]
    shared = random_prompts(512, (70,), seed=6)[0]
    prompts = random_prompts(512, (5, 300, 17, 100, 213, 40)) + random_prompts(512, (9, 50), seed=7, prefix=shared)
    llm = LLM(path, dtype="float32", kvcache_block_size=BS, max_model_len=512, max_num_batched_tokens=BUDGET,
              gpu_memory_utilization=0.3, async_scheduling=async_scheduling)
    try:
        assert llm.model_runner.decode_graphs and llm.model_runner.piecewise_graphs
        outs, records = generate(path, prompts, llm=llm)
    finally:
        llm.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    assert [o["token_ids"] for o in outs] == [hf_greedy(path, p, MAX_NEW, hf) for p in prompts]
    assert any(r.num_decode_seqs and r.num_prefill_tokens for r in records)
    assert any(r.phase == "decode" for r in records) and outs[-1]["num_cached_tokens"] == 64
