"""The LLM API: validation errors, stop strings, seeds, chat prompts, preemption under a tiny KV cache."""
import pytest

from engine import LLM, SamplingParams
from engine.config import Config
from tests.conftest import hf_greedy


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=128)


def test_bad_prompts_name_index_and_reason(llm):
    greedy = SamplingParams(temperature=0, max_tokens=2)
    cases = [(["ok", ""], "prompt 1: prompt is empty"), (["ok", None], "prompt 1: prompt must be"),
             ([[1] * 200], "prompt 0: prompt has 200 tokens, more than max_model_len=128"),
             ([[{"role": "user"}]], "prompt 0: chat message 0 needs"), ([[10**6]], "outside the vocabulary")]
    for prompts, msg in cases:
        with pytest.raises(ValueError, match=msg.replace("(", r"\(")):
            llm.generate(prompts, greedy, use_tqdm=False)
    with pytest.raises(ValueError, match="2 sampling params for 1 prompts"):
        llm.generate(["a"], [greedy, greedy], use_tqdm=False)
    assert llm.is_finished()  # nothing was queued by the failed calls


def test_bad_engine_arguments_name_the_setting(tiny_models):
    """Out of range or of the wrong type: a ValueError naming the setting, before anything loads."""
    cases = {"kvcache_block_size": (48, "must be a power of two"), "max_num_seqs": ("many", "must be None or from 1"),
             "max_prefill_tokens_with_decodes": (0, "must be None or >= 1")}
    for name, (value, why) in cases.items():
        with pytest.raises(ValueError, match=f"{name}={value!r} {why}"):
            LLM(tiny_models["qwen3"], device="cpu", **{name: value})


def test_stop_strings_and_stop_tokens(llm):
    base = llm.generate(["the red river"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    stop = base["text"][4:7]
    out = llm.generate(["the red river"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop]),
                       use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["text"] == base["text"][:base["text"].find(stop)]
    assert out["token_ids"] == base["token_ids"][:len(out["token_ids"])]
    tok = base["token_ids"][3]
    out = llm.generate(["the red river"], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                         stop_token_ids=[tok]), use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["token_ids"][-1] == tok
    assert len(out["token_ids"]) == base["token_ids"].index(tok) + 1


def test_seeded_sampling_reproducible_and_result_fields(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=10, seed=123, ignore_eos=True)
    a = llm.generate(["a story", "a song"], params, use_tqdm=False)
    b = llm.generate(["a song", "x", "a story"], params, use_tqdm=False)
    assert a[0]["token_ids"] == b[2]["token_ids"] and a[1]["token_ids"] == b[0]["token_ids"]
    r = a[0]
    assert set(r) == {"text", "token_ids", "finish_reason", "num_prompt_tokens", "num_cached_tokens",
                      "ttft_s", "latency_s"}
    assert 0 < r["ttft_s"] <= r["latency_s"] and r["num_prompt_tokens"] == len(llm.tokenizer.encode("a story"))


def test_seeded_positions_stepped_in_place_equal_rebuilt(llm):
    """Decode steps step the cached seeded positions on the device; rebuilding them every step gives the same
    tokens (rows finish at different steps, so both paths run)."""
    params = [SamplingParams(temperature=1.0, max_tokens=n, seed=s, ignore_eos=True)
              for n, s in ((12, 1), (5, 2), (9, 3))]
    prompts = ["a story", "a song", "the river"]
    stepped = llm.generate(prompts, params, use_tqdm=False)
    runner = llm.model_runner
    calls = []
    rebuild = lambda record: (calls.append(1), setattr(runner, "_sampling_cache", None))  # noqa: E731
    llm.step_callbacks.append(rebuild)
    try:
        rebuilt = llm.generate(prompts, params, use_tqdm=False)
    finally:
        llm.step_callbacks.remove(rebuild)
    assert len(calls) >= 12 and [r["token_ids"] for r in stepped] == [r["token_ids"] for r in rebuilt]


def test_chat_prompt_uses_template(llm):
    msgs = [{"role": "user", "content": "hello"}]
    ids = llm.encode_prompt(msgs)
    text = llm.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ids == llm.tokenizer.encode(text, add_special_tokens=False)
    assert llm.generate([msgs], SamplingParams(max_tokens=3), use_tqdm=False)[0]["num_prompt_tokens"] == len(ids)


def test_preemption_under_tiny_cache_matches_hf(tiny_models):
    path = tiny_models["llama"]
    llm = LLM(path, device="cpu", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=6, max_num_seqs=4)
    records = []
    llm.add_step_callback(records.append)
    prompts = [[5 + i + j for j in range(20)] for i in range(4)]
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    assert sum(r.num_preempted for r in records) > 0
    assert [o["token_ids"] for o in out] == [hf_greedy(path, p, 30) for p in prompts]


def test_request_that_can_never_fit_fails_clearly(tiny_models):
    llm = LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=2)
    with pytest.raises(ValueError, match=r"prompt 0: request needs up to 3 KV-cache blocks .* only 2 blocks"):
        llm.generate([[3] * 20], SamplingParams(max_tokens=20), use_tqdm=False)


def test_step_records_match_schedule(llm):
    records = []
    llm.add_step_callback(records.append)
    llm.generate([[4] * 40, [4] * 40 + [5]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                 use_tqdm=False)
    llm.step_callbacks.clear()
    assert [r.phase for r in records] == ["prefill", "decode", "decode"]
    assert records[0].batch_size == 2 and records[0].prefix_cache_hit_tokens in (32, 64)
    assert records[0].num_tokens == 81 - records[0].prefix_cache_hit_tokens
    assert [r.num_finished for r in records] == [0, 0, 2] and records[-1].num_running == 0
    assert all(r.kv_blocks_used + r.kv_blocks_free == llm.model_runner.num_blocks for r in records)
    assert all(0 <= r.wait_time_s <= r.step_time_s for r in records)
    assert [r.step for r in records] == list(range(records[0].step, records[0].step + 3))


def test_step_records_split_the_wait_for_the_device_from_host_work(llm, monkeypatch):
    """``wait_time_s`` is the time a step spends reading its tokens (on a GPU: waiting for the device); here the
    read is made to take 50 ms."""
    import time
    from engine.model_runner import SampledTokens
    read = SampledTokens.tolist
    monkeypatch.setattr(SampledTokens, "tolist", lambda self: time.sleep(0.05) or read(self))
    records = []
    llm.add_step_callback(records.append)
    llm.generate([[4] * 10], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    llm.step_callbacks.clear()
    assert records and all(0.05 <= r.wait_time_s <= r.step_time_s < r.wait_time_s + 1 for r in records)


@pytest.mark.parametrize("shape,break_even", [
    (dict(hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128), 3840),
    (dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64), 3072)])
def test_attention_break_even_from_the_layer_shapes(tmp_path, shape, break_even):
    """Qwen3-0.6B's and SmolLM2-135M's: the keys at which a token's attention FLOPs equal its linear layers'."""
    from transformers import Qwen3Config

    Qwen3Config(num_hidden_layers=2, **shape).save_pretrained(tmp_path)
    assert Config(str(tmp_path), device="cpu").attention_break_even == break_even


def test_invalid_engine_arguments():
    with pytest.raises(ValueError, match="kvcache_block_size"):
        LLM("demo-random", device="cpu", kvcache_block_size=24)
    with pytest.raises(ValueError, match="neither a local model directory nor"):
        LLM("/no/such/model", device="cpu")
    with pytest.raises(TypeError, match="unknown LLM arguments"):
        LLM("demo", device="cpu", max_batch=3)


def test_attention_backend_selection_falls_back(monkeypatch):
    import importlib.util

    import torch

    from engine.layers.attention import select_backend
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("NANOVLLM_ATTENTION_BACKEND", raising=False)
    assert select_backend(cuda, 256) == "triton" and select_backend(cpu, 256) == "torch"
    monkeypatch.setenv("NANOVLLM_ATTENTION_BACKEND", "triton")
    assert select_backend(cpu, 16) == "torch"            # kernels need CUDA
    monkeypatch.setenv("NANOVLLM_ATTENTION_BACKEND", "nonsense")
    assert select_backend(cuda, 16) == "triton"
    monkeypatch.setenv("NANOVLLM_ATTENTION_BACKEND", "flash-attn")
    if importlib.util.find_spec("flash_attn") is None:
        assert select_backend(cuda, 256) == "triton"     # not installed
    assert select_backend(cuda, 16) == "triton"          # paged flash-attn needs 256-token blocks



def test_start_freezes_existing_objects_out_of_full_collections(tiny_models):
    """The engine leaves the objects of its start-up (imports, model) out of Python's full garbage collections
    (they stalled running batches on the GPU machine) and gives them back at shutdown."""
    import gc
    gc.unfreeze()
    engine = LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=128)
    try:
        assert gc.get_freeze_count() > 10_000
    finally:
        engine.shutdown()
    assert gc.get_freeze_count() == 0


def test_admitted_requests_are_frozen_out_of_full_collections(tiny_models):
    """Requests added since the last step (their token lists hold a reference per token) are left out of full
    collections from the next step on, and still freed by reference counting once finished."""
    import gc
    import weakref
    engine = LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=256)
    try:
        seqs = [engine.add_request(list(range(1, 30 + i)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
                for i in range(8)]
        tracked = {id(o) for o in gc.get_objects()}
        assert all(id(s) in tracked and id(s.token_ids) in tracked for s in seqs)
        engine.step()
        tracked = {id(o) for o in gc.get_objects()}
        assert not any(id(s) in tracked or id(s.token_ids) in tracked for s in seqs)
        while not engine.is_finished():
            engine.step()
        refs = [weakref.ref(s) for s in seqs]
        del seqs
        assert all(r() is None for r in refs)  # no reference cycle kept them: nothing waits for shutdown
    finally:
        engine.shutdown()


def test_a_decode_step_allocates_no_tracked_object_per_row(tiny_models):
    """Every container object a step allocates and keeps counts toward Python's next collection: one per row (a
    list per row in ``new_tokens`` and in the batch's ``token_ids``) made W5's ~1,000-row steps trigger a
    collection every step or two (1,900 per run on the GPU machine). What a decode step adds must not grow with
    its rows."""
    engine = LLM(tiny_models["qwen3"], device="cpu", kvcache_block_size=16, max_model_len=128, max_num_seqs=96)
    try:
        few, many = (_objects_a_decode_step_adds(engine, rows) for rows in (16, 96))
        assert many - few < 16, f"a decode step adds {few} objects at 16 rows, {many} at 96"
    finally:
        engine.shutdown()


def _objects_a_decode_step_adds(engine: LLM, rows: int) -> int:
    """Python's gen-0 count (container objects allocated less those freed) over one decode step of ``rows``."""
    import gc
    for i in range(rows):
        engine.add_request([1 + i % 50, 2, 3], SamplingParams(temperature=0.6, max_tokens=8, ignore_eos=True))
    engine.step()
    engine.step()  # every row decodes from here on
    gc.collect()
    gc.disable()
    try:
        before = gc.get_count()[0]
        out = engine.step()
        added = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert out.record.phase == "decode" and len(out.new_tokens) == rows
    while not engine.is_finished():
        engine.step()
    return added


def test_importing_the_engine_leaves_transformers_auto_classes_unloaded():
    """A job's driver imports the engine to check its settings before any actor starts: transformers' auto
    tokenizer and model classes (seconds to import with some versions) load only with a model."""
    import subprocess
    import sys
    code = ("import sys, engine, engine.loader, engine.config; "
            "print([m for m in sys.modules if m.startswith('transformers.models.auto.') and "
            "m.rsplit('.', 1)[1] in ('auto_factory', 'tokenization_auto', 'modeling_auto')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
