"""Async scheduling (the next decode step launched before the current one's tokens are read) must give the
same tokens and finish reasons as stepping synchronously: through stop tokens found one step late, stop
strings, length limits, seeded sampling and preemption under a small KV cache."""
import pytest

from engine import LLM, SamplingParams


def run(path: str, prompts, params, async_scheduling: bool, **kwargs):
    llm = LLM(path, device="cpu", kvcache_block_size=16, max_model_len=128, async_scheduling=async_scheduling,
              **kwargs)
    overlapped, records = [], []
    schedule_next = llm.scheduler.schedule_next_decode

    def counting(current):
        batch = schedule_next(current)
        overlapped.append(batch is not None)
        return batch
    llm.scheduler.schedule_next_decode = counting
    llm.add_step_callback(records.append)
    out = llm.generate(prompts, params, use_tqdm=False)
    assert llm.is_finished() and llm.scheduler.block_manager.num_used_blocks == 0
    return [(o["token_ids"], o["finish_reason"], o["text"]) for o in out], sum(overlapped), records, llm


@pytest.fixture(scope="module")
def prompts_and_params(tiny_models):
    path = tiny_models["qwen3"]
    prompts = [[5 + i + j for j in range(12 + 3 * i)] for i in range(6)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    base, *_ = run(path, prompts, greedy, async_scheduling=False)
    params = [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[base[0][0][3]]),
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, max_tokens=20, seed=7, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[base[3][2][2:5]] if base[3][2][2:5] else None),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[base[4][0][10]]),
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),
    ]
    return path, prompts, params


def test_async_equals_sync(prompts_and_params):
    path, prompts, params = prompts_and_params
    sync, sync_overlaps, _, _ = run(path, prompts, params, async_scheduling=False)
    out, overlaps, records, llm = run(path, prompts, params, async_scheduling=True)
    assert sync_overlaps == 0 and overlaps > 10  # the async run really launched steps ahead
    assert out == sync
    assert [o[1] for o in out][:2] == ["stop", "length"]
    assert llm.stats["generated_tokens"] == sum(len(o[0]) for o in out)  # tokens past a late stop not counted


def test_async_equals_sync_with_preemption(prompts_and_params):
    path, prompts, params = prompts_and_params
    sync, _, _, _ = run(path, prompts, params, async_scheduling=False, num_kvcache_blocks=8)
    out, overlaps, records, _ = run(path, prompts, params, async_scheduling=True, num_kvcache_blocks=8)
    assert overlaps > 0 and sum(r.num_preempted for r in records) > 0
    assert out == sync
