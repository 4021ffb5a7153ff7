"""Structured outputs: grammar compilation (cached, errors), the token bitmask, and SamplingParams' rules."""
import os

import pytest
import torch

from engine import SamplingParams
from engine.demo import smollm2_gguf_file

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    folder, name = os.path.split(smollm2_gguf_file())
    return AutoTokenizer.from_pretrained(folder, gguf_file=name)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    from engine.structured import GrammarCompiler
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    yield compiler
    compiler.shutdown()


def allowed_tokens(compiler, spec: tuple[str, str], prefix: str = "") -> set[int]:
    from engine.structured import TokenBitmask
    matcher = compiler.matcher(compiler.submit(spec).result())
    assert matcher.accept_string(prefix) if prefix else True
    bitmask = TokenBitmask(compiler.vocab_size, torch.device("cpu")).fill([(1, matcher)], 2)
    logits = torch.zeros(2, compiler.vocab_size)
    from engine.structured import apply_bitmask
    masked = apply_bitmask(logits, bitmask)
    assert bool(torch.isfinite(masked[0]).all())  # row 0 has no grammar: every token allowed
    return set(torch.isfinite(masked[1]).nonzero().squeeze(1).tolist())


def test_choice_allows_only_the_choices_prefixes(compiler, tokenizer):
    spec = SamplingParams(choice=["Paris", "London"]).structured
    for token in allowed_tokens(compiler, spec):
        text = tokenizer.decode([token])
        assert "Paris".startswith(text) or "London".startswith(text), text
    assert allowed_tokens(compiler, spec, "Paris") == {tokenizer.eos_token_id}  # done: only the stop token


def test_token_bitmask_rows_equal_single_matcher_fills_and_grow(compiler):
    """The threaded batch fill writes each constrained row as a lone matcher would, into buffers that grow; the
    other rows allow every token, also a row a matcher filled in an earlier step."""
    import xgrammar as xgr
    from engine.structured import TokenBitmask
    specs = [SamplingParams(choice=["Paris", "London"]).structured, SamplingParams(regex=r"[0-9]{2,4}").structured]
    matchers = [compiler.matcher(compiler.submit(spec).result()) for spec in specs]
    buffers = TokenBitmask(compiler.vocab_size, torch.device("cpu"))
    buffers.fill([(0, matchers[0])], 1)
    mask = buffers.fill([(0, matchers[0]), (2, matchers[1])], 3)
    assert mask.shape == (3, -(-compiler.vocab_size // 32))
    for row, matcher in zip([0, 2], matchers):
        alone = xgr.allocate_token_bitmask(1, compiler.vocab_size)
        matcher.fill_next_token_bitmask(alone, 0)
        assert torch.equal(mask[row], alone[0])
    assert not torch.equal(mask[0], mask[2]) and bool((mask[1] == -1).all())  # row 1: no grammar, all allowed
    mask = buffers.fill([(2, matchers[1])], 3)  # row 0's sequence has no grammar any more: all allowed again
    assert bool((mask[:2] == -1).all()) and not bool((mask[2] == -1).all())


def test_equal_specs_compile_once(compiler):
    a = compiler.submit(SamplingParams(json_schema=SCHEMA).structured)
    b = compiler.submit(SamplingParams(json_schema=dict(reversed(SCHEMA.items()))).structured)
    assert a is b


@pytest.mark.parametrize("params,kind", [(dict(json_schema={"type": "bogus"}), "json_schema"),
                                         (dict(grammar="root ::= undefined_rule"), "grammar"),
                                         (dict(regex="(unclosed"), "regex")])
def test_specs_that_do_not_compile_raise_value_error(compiler, params, kind):
    with pytest.raises(ValueError, match=f"{kind} does not compile"):
        compiler.submit(SamplingParams(**params).structured).result()


def test_at_most_one_constraint():
    with pytest.raises(ValueError, match="at most one of .* got json_schema, regex"):
        SamplingParams(json_schema=SCHEMA, regex="a+")
    with pytest.raises(ValueError, match="got json_object, choice"):
        SamplingParams(json_object=True, choice=["a"])


@pytest.mark.parametrize("field,value", [("json_schema", "{not json"), ("choice", []), ("choice", ["a", ""]),
                                         ("regex", ""), ("grammar", "  "), ("json_object", 1)])
def test_invalid_constraints_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


# ----- the real model (SmolLM2-135M-Instruct, fp32 on CPU) -------------------------------------------------------
def ask(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def demo():
    from engine import LLM
    llm = LLM("demo", device="cpu", max_model_len=256, max_num_seqs=8)
    yield llm
    llm.shutdown()


def test_json_schema_outputs_parse_and_validate(demo):
    import json

    import jsonschema
    params = [SamplingParams(temperature=0.9, top_p=0.95, seed=s, max_tokens=40, json_schema=SCHEMA) for s in range(4)]
    outs = demo.generate([ask("Describe a person as JSON.")] * 4, params, use_tqdm=False)
    for out in outs:
        assert out["finish_reason"] == "stop", out["text"]
        jsonschema.validate(json.loads(out["text"]), SCHEMA)


def test_choice_and_regex_with_sampling_and_a_stop_string(demo):
    import re
    choices = ["Paris", "London", "Berlin"]
    params = [SamplingParams(temperature=1.0, min_p=0.05, seed=s, max_tokens=10, choice=choices) for s in range(3)]
    params += [SamplingParams(temperature=0.8, top_k=40, seed=s, max_tokens=16, regex=r"\(\d{3}\) \d{3}-\d{4}")
               for s in range(2)]
    params += [SamplingParams(temperature=0, max_tokens=30, regex=r"[a-z ]+\.", stop=" ")]
    prompts = [ask("What is the capital of France?")] * 3 + [ask("Give me a phone number.")] * 2 + [ask("Say hi.")]
    outs = demo.generate(prompts, params, use_tqdm=False)
    assert all(out["text"] in choices for out in outs[:3])
    assert all(re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", out["text"]) for out in outs[3:5])
    assert outs[5]["finish_reason"] == "stop" and " " not in outs[5]["text"]


def test_constrained_rows_in_an_async_batch_match_their_runs_alone(demo):
    """A constrained row and an unconstrained one batched together sample what each samples alone."""
    free = SamplingParams(temperature=0.7, seed=5, max_tokens=8)
    constrained = SamplingParams(temperature=0.7, seed=6, max_tokens=8, choice=["yes", "no"])
    prompts = [ask("Is the sky blue?"), "The quick brown fox"]
    together = demo.generate(prompts, [constrained, free], use_tqdm=False)
    alone = [demo.generate([p], [params], use_tqdm=False)[0] for p, params in zip(prompts, [constrained, free])]
    assert [o["token_ids"] for o in together] == [o["token_ids"] for o in alone]
    assert demo.async_scheduling and together[0]["text"] in ("yes", "no")


def test_greedy_with_a_grammar_equals_hf_generate_with_xgrammar(demo, hf_gguf_model):
    from xgrammar.contrib.hf import LogitsProcessor
    model = hf_gguf_model(smollm2_gguf_file())
    prompt = ask("Who are you? Answer as JSON.")
    params = SamplingParams(temperature=0, max_tokens=24, json_schema=SCHEMA)
    out = demo.generate([prompt], params, use_tqdm=False)[0]
    ids = demo.encode_prompt(prompt)
    grammar = demo.grammars.compiler.submit(params.structured).result()
    hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=24, do_sample=False, logits_processor=[LogitsProcessor(grammar)],
                        eos_token_id=demo.tokenizer.convert_tokens_to_ids("<|im_end|>"))
    assert out["token_ids"] == hf[0, len(ids):].tolist()


def test_a_spec_that_does_not_compile_names_the_request(demo):
    bad = SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "nope"}}})
    with pytest.raises(ValueError, match="prompt 1: json_schema does not compile"):
        demo.generate(["hi", "hello"], [SamplingParams(max_tokens=2), bad], use_tqdm=False)
    demo.add_request("hi", bad, index=7)
    with pytest.raises(ValueError, match=r"request 7 \(seq \d+\): json_schema does not compile"):
        while not demo.is_finished():
            demo.step()
    assert demo.is_finished()  # the request was dropped; the engine still works
    assert demo.generate(["hi"], SamplingParams(max_tokens=2, choice=["ok"]), use_tqdm=False)[0]["text"] == "ok"


def test_mixed_batch_async_equals_sync_through_preemption(hf_gguf_model):
    """Grammar rows (JSON schema greedy and seeded, a regex, a choice that ends after one word), penalized rows,
    logprobs rows, a stop string and plain rows, in a KV cache small enough to preempt: launched ahead with
    deferred sampling, they give the synchronous run's tokens; the constrained outputs parse and match."""
    import json
    import re

    import jsonschema
    from engine import LLM
    llm = LLM("demo", device="cpu", max_model_len=256, max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=8)
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    rows = [(ask("Describe a person as JSON."), SamplingParams(temperature=0, max_tokens=32, json_schema=SCHEMA)),
            (ask("Describe a person as JSON."), SamplingParams(temperature=0.9, seed=1, max_tokens=32, logprobs=2,
                                                               json_schema=SCHEMA)),
            (ask("What is the capital of France?"), SamplingParams(temperature=0, max_tokens=12,
                                                                   choice=["Paris", "London"])),
            (ask("Give me a phone number."), SamplingParams(temperature=0.8, seed=2, max_tokens=16, regex=phone)),
            ("The quick brown fox", SamplingParams(temperature=0, max_tokens=16, repetition_penalty=1.3,
                                                   presence_penalty=0.5, logprobs=3)),
            (ask("Count from 1 to 20, separated by commas."), SamplingParams(temperature=0, max_tokens=24,
                                                                             stop=["\n3"], logprobs=1)),
            ("The capital of France is", SamplingParams(temperature=0.8, seed=3, max_tokens=16))]
    records, ahead = [], []  # ahead: after each step, whether the next one is in flight
    llm.add_step_callback(lambda record: records.append(record) or ahead.append(llm.in_flight is not None))
    runs = {}
    try:
        for async_scheduling in (False, True):
            llm.async_scheduling = async_scheduling
            del ahead[:]
            runs[async_scheduling] = llm.generate([p for p, _ in rows], [sp for _, sp in rows], use_tqdm=False)
    finally:
        llm.shutdown()
    sync, out = runs[False], runs[True]
    assert sum(r.num_preempted for r in records) > 0 and sum(ahead) > 10
    assert [o["token_ids"] for o in out] == [o["token_ids"] for o in sync]
    assert [o["finish_reason"] for o in out] == [o["finish_reason"] for o in sync]
    for o, s in zip(out, sync):
        assert o.get("token_logprobs") == pytest.approx(s.get("token_logprobs"), abs=1e-4)
    for o in out[:2]:
        assert o["finish_reason"] == "stop", o["text"]
        jsonschema.validate(json.loads(o["text"]), SCHEMA)
    assert out[2]["text"] in ("Paris", "London") and out[2]["token_ids"][-1] in llm.scheduler.eos_token_ids
    assert re.fullmatch(phone, out[3]["text"])
    assert out[5]["finish_reason"] == "stop" and "3" not in out[5]["text"]
