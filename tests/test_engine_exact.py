"""Greedy outputs equal HF transformers token for token (fp32, CPU) through the paged cache and prefix cache."""
import logging
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


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])
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


def test_sliding_window_caps_max_model_len_and_stays_exact(tmp_path):
    """Mistral v0.1 attends over a 4,096-token sliding window, which the engine does not implement: it caps
    max_model_len at the window, where HF's windowed attention and full attention agree, says so, and rejects a
    prompt past it by name."""
    from engine.demo import build_tiny_model
    path = build_tiny_model(str(tmp_path / "mistral"), "mistral", sliding_window=48)
    said, config_logger, handler = [], logging.getLogger("nanovllm.engine.config"), logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(record.getMessage())
    config_logger.addHandler(handler)
    try:
        llm = LLM(path, device="cpu", kvcache_block_size=16, max_model_len=256)
    finally:
        config_logger.removeHandler(handler)
    assert llm.config.max_model_len == 48
    assert any("sliding window of 48 tokens" in s and "max_model_len 256 -> 48" in s for s in said), said
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 200) for _ in range(n)] for n in (5, 20, 36)]
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert [o["token_ids"] for o in outs] == [hf_greedy(path, p, MAX_NEW) for p in prompts]
    with pytest.raises(ValueError, match="prompt 0: prompt has 49 tokens, more than max_model_len=48"):
        llm.generate([[5] * 49], params, use_tqdm=False)


@pytest.mark.parametrize("config_class, fields, window", [
    ("MistralConfig", {}, 4096), ("MistralConfig", dict(sliding_window=None), None), ("LlamaConfig", {}, None),
    ("Qwen2Config", {}, None), ("Qwen3Config", {}, None),
    ("Qwen2Config", dict(use_sliding_window=True, sliding_window=64, max_window_layers=1), 64)])
def test_attention_window_from_hf_configs(config_class, fields, window):
    import transformers

    from engine.config import attention_window
    assert attention_window(getattr(transformers, config_class)(**fields)) == window
