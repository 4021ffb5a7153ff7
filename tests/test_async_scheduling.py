"""Async scheduling (the next step launched before the current one's tokens are read) must give the same
tokens and finish reasons as stepping synchronously: through stop tokens found one step late, stop strings,
length limits, seeded sampling, preemption under a small KV cache and chunked prefills mixed with decodes."""
import pytest

from engine import LLM, SamplingParams


def run(path: str, prompts, params, async_scheduling: bool, **kwargs):
    llm = LLM(path, device="cpu", kvcache_block_size=16, max_model_len=128, async_scheduling=async_scheduling,
              **kwargs)
    ahead, records = [], []
    launch_ahead = llm._launch_ahead

    def counting():
        launched = launch_ahead()
        ahead.append(launched is not None)
        return launched
    llm._launch_ahead = counting
    llm.add_step_callback(records.append)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert llm.is_finished() and llm.scheduler.block_manager.num_used_blocks == 0
    return [(o["token_ids"], o["finish_reason"], o["text"]) for o in out], sum(ahead), records, llm


@pytest.fixture(scope="module")
def prompts_and_params(tiny_models):
    path = tiny_models["qwen3"]
    prompts = [[5 + i + j for j in range(12 + 3 * i)] for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base, *_ = run(path, prompts, greedy, async_scheduling=False)
    text = base[3][2]
    stop = text[len(text) // 2:][:3]
    assert stop.strip() and text.find(stop) > 0  # a stop string that cuts prompt 3's text short
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[base[0][0][3]]),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=20, seed=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[base[4][0][10]]),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    return path, prompts, params, text[:text.find(stop)]


def test_async_equals_sync(prompts_and_params):
    path, prompts, params, stopped_text = prompts_and_params
    sync, sync_ahead, _, _ = run(path, prompts, params, async_scheduling=False)
    out, ahead, records, llm = run(path, prompts, params, async_scheduling=True)
    assert sync_ahead == 0 and ahead > 10  # the async run really launched steps ahead
    assert out == sync
    assert [o[1] for o in out][:2] == ["stop", "length"]
    assert out[3][1] == "stop" and out[3][2] == stopped_text and len(out[3][0]) < 24
    assert llm.stats["generated_tokens"] == sum(len(o[0]) for o in out)  # tokens past a late stop not counted


def test_async_equals_sync_with_preemption(prompts_and_params):
    path, prompts, params, _ = prompts_and_params
    small = dict(num_kvcache_blocks=8, max_num_seqs=6)
    sync, _, _, _ = run(path, prompts, params, async_scheduling=False, **small)
    out, ahead, records, _ = run(path, prompts, params, async_scheduling=True, **small)
    assert ahead > 0 and sum(r.num_preempted for r in records) > 0
    assert out == sync


def test_async_equals_sync_with_chunked_prefill(prompts_and_params):
    """Prompt chunks of a 16-token budget, mixed with decodes, also launch ahead of the step in flight."""
    path, prompts, params, _ = prompts_and_params
    sync, _, _, _ = run(path, prompts, params, async_scheduling=False, max_num_batched_tokens=16)
    out, ahead, records, _ = run(path, prompts, params, async_scheduling=True, max_num_batched_tokens=16)
    mixed = [r for r in records if r.num_decode_seqs and r.num_prefill_tokens]
    assert ahead > 10 and mixed and all(r.num_tokens <= 16 for r in records)
    assert out == sync
