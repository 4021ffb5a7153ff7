"""Async scheduling (the next step launched before the current one's tokens are read) must give the same
tokens and finish reasons as stepping synchronously: through stop tokens found one step late, stop strings,
length limits, seeded sampling, preemption under a small KV cache and chunked prefills mixed with decodes; and
with rows whose sampling needs the previous token on the host (grammars, token penalties), whose steps launch
their forward pass ahead and queue their sampling once that token is postprocessed (deferred sampling)."""
import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine.model_runner import SampledTokens


def run(path: str, prompts, params, async_scheduling: bool, device: str = "cpu", **kwargs):
    llm = LLM(path, device=device, kvcache_block_size=16, max_model_len=128, async_scheduling=async_scheduling,
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
    return [(o["token_ids"], o["finish_reason"], o["text"], o.get("token_logprobs"), o.get("logprobs"))
            for o in out], sum(ahead), records, llm


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


# ----- rows with a grammar or a token penalty: deferred sampling ----------------------------------------------------
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CHOICES = ["red", "green", "blue"]


@pytest.fixture(scope="module")
def mixed(tiny_models):
    """Prompts and rows of every kind, greedy and seeded: grammars (one that ends after a few tokens, one with
    logprobs, one with a penalty and a stop string), token penalties (one with logprobs), min_tokens + logit_bias,
    logprobs alone, a stop string, none."""
    path = tiny_models["qwen3"]
    prompts = [[5 + i + j for j in range(10 + 3 * i)] for i in range(9)]
    text = run(path, prompts[5:6], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
               async_scheduling=False)[0][0][2]
    stop = text[len(text) // 2:][:3]
    assert stop.strip() and text.find(stop) > 0
    params = [
        SamplingParams(temperature=0, max_tokens=40, json_schema=SCHEMA),
        SamplingParams(temperature=0.9, seed=3, max_tokens=30, regex=r"[a-z]{2,6}( [a-z]{2,6}){1,3}\.", logprobs=2),
        SamplingParams(temperature=0, max_tokens=30, choice=CHOICES, ignore_eos=True),  # its grammar ends it
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1.5, presence_penalty=0.5),
        SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True, frequency_penalty=1.0, logprobs=3),
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2, stop=[stop]),
        SamplingParams(temperature=0.7, seed=5, max_tokens=30, json_object=True, repetition_penalty=1.2, stop=["}"]),
        SamplingParams(temperature=0, max_tokens=20, min_tokens=5, logit_bias={7: 3.0}),
        SamplingParams(temperature=0.8, top_k=20, seed=9, max_tokens=20, ignore_eos=True),
    ]
    return path, prompts, params, text[:text.find(stop)]


def assert_same_outputs(out, sync):
    """Tokens, finish reasons and texts equal; logprobs equal to rounding (the batches differ by late rows)."""
    assert [o[:3] for o in out] == [o[:3] for o in sync]
    for o, s in zip(out, sync):
        assert (o[3] is None) == (s[3] is None)
        if o[3] is not None:
            assert o[3] == pytest.approx(s[3], abs=1e-5)
            assert all(a == pytest.approx(b, abs=1e-5) for a, b in zip(o[4], s[4]))


@pytest.mark.parametrize("engine_args", [{}, dict(num_kvcache_blocks=9, max_num_seqs=6, max_num_batched_tokens=24)],
                         ids=["roomy", "preemption+chunks"])
def test_grammar_and_penalty_rows_launch_ahead_and_equal_sync(mixed, engine_args):
    path, prompts, params, stopped_text = mixed
    sync, sync_ahead, _, _ = run(path, prompts, params, async_scheduling=False, **engine_args)
    out, ahead, records, llm = run(path, prompts, params, async_scheduling=True, **engine_args)
    assert sync_ahead == 0 and ahead > 10  # steps with constrained and penalized rows launched ahead too
    assert_same_outputs(out, sync)
    if engine_args:
        assert sum(r.num_preempted for r in records) > 0 and any(r.num_decode_seqs and r.num_prefill_tokens
                                                                 for r in records)
    assert not llm.host_token_seq_ids
    tokens, reason, text = out[2][:3]
    assert text in CHOICES and reason == "stop" and tokens[-1] == llm.tokenizer.eos_token_id
    if out[0][1] == "stop":  # (strict=False: the tiny tokenizer's odd bytes can make control characters)
        assert set(json.loads(out[0][2], strict=False)) == {"name", "age"}
    assert out[5][2] == stopped_text and out[5][1] == "stop"
    assert len(out[4][0]) == 24 and len(out[4][3]) == 24 and len(out[4][4]) == 24  # one logprob entry per token


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deferred_sampling_on_gpu_equals_sync(mixed):
    """Deferred sampling's CUDA paths (pinned uploads of penalty tensors and grammar bitmasks, sampling queued
    behind a forward pass already on the stream, CUDA graphs) in fp32: the synchronous run's outputs."""
    path, prompts, params, _ = mixed
    outputs = {}
    for async_scheduling in (False, True):
        out, ahead, _, llm = run(path, prompts, params, async_scheduling, device="cuda", dtype="float32",
                                 gpu_memory_utilization=0.3)
        llm.shutdown()
        outputs[async_scheduling] = out
    assert ahead > 10
    assert_same_outputs(outputs[True], outputs[False])
    assert outputs[True][2][2] in CHOICES


def call_order(llm, monkeypatch) -> list[str]:
    """Record the runner's forward passes ("F") and samplings ("S") and the reads of sampled tokens ("R")."""
    events, runner = [], llm.model_runner
    forward, sample, tolist = runner.forward, runner.sample, SampledTokens.tolist
    monkeypatch.setattr(runner, "forward", lambda batch: events.append("F") or forward(batch))
    monkeypatch.setattr(runner, "sample", lambda step: events.append("S") or sample(step))
    monkeypatch.setattr(SampledTokens, "tolist", lambda tokens: events.append("R") or tolist(tokens))
    return events


def test_deferred_sampling_is_queued_after_the_previous_tokens_are_read(tiny_models, monkeypatch):
    """With a constrained or penalized row, a step's forward pass is queued before the previous step's tokens
    are read, its sampling after; without one, forward and sampling are queued back to back, as before."""
    llm = LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=128)
    events = call_order(llm, monkeypatch)
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    for row in (SamplingParams(temperature=0, max_tokens=12, regex="[a-z ]{80}"),
                SamplingParams(temperature=0, max_tokens=12, repetition_penalty=1.3, ignore_eos=True)):
        events.clear()
        llm.generate(prompts, [row, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)], use_tqdm=False)
        order = "".join(events)
        assert order.startswith("FSFRS") and order.count("FRS") >= 10, order
    events.clear()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    order = "".join(events)
    assert order.count("FS") == order.count("F") >= 12 and order.count("FSR") >= 10, order


def stream(llm, prompts, params) -> tuple[list[dict], list[list[int]], int]:
    """Step through the requests: results, each request's streamed tokens, and the steps that ended with a step
    in flight whose batch has a constrained row."""
    seqs = [llm.add_request(p, sp, index=i) for i, (p, sp) in enumerate(zip(prompts, params))]
    streamed, results, ahead = {s.seq_id: [] for s in seqs}, {}, 0
    while not llm.is_finished():
        out = llm.step()
        for seq_id, token in out.new_tokens.items():
            streamed[seq_id].append(token)
        results.update({s.seq_id: llm.result(s) for s in out.finished})
        flight = llm.in_flight
        ahead += flight is not None and flight.tokens is not None and any(s.grammar for s in flight.batch.seqs)
    return [results[s.seq_id] for s in seqs], [streamed[s.seq_id] for s in seqs], ahead


@pytest.mark.parametrize("mask", [True, False], ids=["grammar-ends", "token-outside-grammar"])
def test_a_grammar_finished_one_step_late_leaves_no_extra_token(tiny_models, monkeypatch, mask):
    """A constrained sequence that ends on a token (its grammar terminated, or, with the mask off, a token the
    grammar rejects) while the next step is launched: that step's token for it is dropped from its result and
    from the streamed tokens, and its terminated matcher is never asked for a mask (xgrammar would raise)."""
    import engine.structured
    if not mask:  # sample freely; the bias picks "x", which the regex rejects
        monkeypatch.setattr(engine.structured, "apply_bitmask", lambda logits, bitmask: logits.float())
    constrained = (SamplingParams(temperature=0, max_tokens=20, choice=CHOICES, ignore_eos=True) if mask else
                   SamplingParams(temperature=0, max_tokens=20, regex="[0-9]{3}", logit_bias={90: 100.0}))
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13]]
    params = [constrained, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1.2),
              SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)]
    got = {}
    for async_scheduling in (False, True):
        llm = LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=128,
                  async_scheduling=async_scheduling)
        got[async_scheduling] = stream(llm, prompts, params)
    (results, streamed, ahead), (sync, _, _) = got[True], got[False]
    assert [r["token_ids"] for r in results] == [r["token_ids"] for r in sync] == streamed
    assert ahead > 0 and results[0]["finish_reason"] == "stop"
    if mask:
        assert results[0]["text"] in CHOICES and results[0]["token_ids"][-1] == llm.tokenizer.eos_token_id
    else:
        assert results[0]["token_ids"] == [90]
