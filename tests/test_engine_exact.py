"""Greedy outputs equal HF transformers token for token (fp32, CPU) through the paged cache and prefix cache."""
import random

import pytest

from engine import LLM, SamplingParams
from tests.conftest import hf_greedy

MAX_NEW = 12


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]  # 2.5 blocks of 16: shared full blocks + a partial one
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (1, 5, 16, 17, 33)]
    prompts += [shared + [rng.randrange(3, vocab) for _ in range(n)] for n in (1, 9, 24)]
    prompts.append(list(shared[:32]))  # exactly two full shared blocks
    return prompts


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_greedy_matches_hf(tiny_models, arch):
    path = tiny_models[arch]
    llm = LLM(path, device="cpu", kvcache_block_size=16, max_model_len=256)
    prompts = make_prompts(llm.config.hf_config.vocab_size)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    expected = [hf_greedy(path, p, MAX_NEW) for p in prompts]

    first = llm.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in first] == expected
    assert all(o["finish_reason"] == "length" and len(o["token_ids"]) == MAX_NEW for o in first)
    # Prompts 5-8 share a prefix; the later ones in the same batch hit the first one's full blocks.
    assert [o["num_cached_tokens"] for o in first[5:]] == [0, 32, 32, 16]

    second = llm.generate(prompts, params, use_tqdm=False)  # every shared full block is now cached
    assert [o["token_ids"] for o in second] == expected
    assert second[4]["num_cached_tokens"] == 32 and second[3]["num_cached_tokens"] == 16
    assert second[0]["num_cached_tokens"] == 0  # a 1-token prompt always computes its token


def test_text_prompts_and_block_sizes(tiny_models):
    path = tiny_models["qwen3"]
    outs = {}
    for block_size in (16, 64, 256):
        llm = LLM(path, device="cpu", kvcache_block_size=block_size, max_model_len=512)
        res = llm.generate(["the river and the mountain", "a blue book"] * 2,
                           SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        outs[block_size] = [r["token_ids"] for r in res]
        expected = hf_greedy(path, llm.tokenizer.encode("a blue book"), 8)
        assert outs[block_size][1] == expected
    assert outs[16] == outs[64] == outs[256]
