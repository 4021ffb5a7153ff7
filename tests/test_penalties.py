"""Logits processors (repetition / presence / frequency penalties, min_tokens, logit_bias) against HF's
processors where HF has them, and against their definitions otherwise."""
import pytest
import torch
from transformers import (LogitsProcessor, MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          SequenceBiasLogitsProcessor)

from engine import SamplingParams
from engine.logits_processors import ProcessorRow, apply_penalties, build_penalty_batch

VOCAB, EOS = 64, 3


def process(logits: torch.Tensor, rows: list[ProcessorRow]) -> torch.Tensor:
    return apply_penalties(logits, build_penalty_batch(rows, [EOS], VOCAB, logits.device))


@pytest.fixture
def logits() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(3, VOCAB) * 3


def test_repetition_penalty_equals_hf_over_prompt_and_output(logits):
    prompt, output = [5, 6, 7, 5], [9, 6, 11]
    got = process(logits, [ProcessorRow(1, SamplingParams(repetition_penalty=1.3), prompt, output, len(output))])
    want = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output]), logits[1:2].clone())
    assert torch.equal(got[1], want[0])
    assert torch.equal(got[[0, 2]], logits[[0, 2]])  # other rows untouched


def test_presence_and_frequency_penalties_count_output_tokens_only(logits):
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = process(logits, [ProcessorRow(0, params, [1, 2, 2], [4, 4, 4, 8], 4)])
    want = logits[0].clone()
    want[4] -= 0.5 + 3 * 0.25
    want[8] -= 0.5 + 0.25
    assert torch.allclose(got[0], want, atol=1e-6)


def test_min_tokens_equals_hf_until_reached(logits):
    params = SamplingParams(min_tokens=3, stop_token_ids=[7])
    hf = MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=3, eos_token_id=[EOS, 7])
    for output in ([], [1], [1, 2], [1, 2, 4]):
        got = process(logits, [ProcessorRow(2, params, [5, 6], output, len(output))])
        want = hf(torch.tensor([[5, 6] + output]), logits[2:3].clone())
        assert torch.equal(got[2], want[0]), output


def test_min_tokens_with_ignore_eos_holds_back_stop_token_ids_only(logits):
    params = SamplingParams(min_tokens=2, stop_token_ids=[7], ignore_eos=True)
    got = process(logits, [ProcessorRow(0, params, [5], [], 0)])
    assert got[0, 7] == float("-inf") and got[0, EOS] == logits[0, EOS]


def test_logit_bias_equals_hf_sequence_bias(logits):
    bias = {4: 5.0, 10: -2.5, 63: 100.0}
    got = process(logits, [ProcessorRow(0, SamplingParams(logit_bias=bias), [1], [2], 1)])
    hf = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    assert torch.allclose(got[0], hf(torch.tensor([[1, 2]]), logits[:1].clone())[0])


def test_all_processors_on_several_rows_match_one_by_one(logits):
    rows = [ProcessorRow(0, SamplingParams(repetition_penalty=0.8, logit_bias={3: 1.0}), [1, 2], [2, 5], 2),
            ProcessorRow(2, SamplingParams(frequency_penalty=-1.0, min_tokens=1), [9], [], 0)]
    together = process(logits, rows)
    for row in rows:
        assert torch.equal(together[row.row], process(logits, [row])[row.row])
    assert torch.equal(together[1], logits[1])


def test_bf16_logits_are_processed_in_float32(logits):
    got = process(logits.bfloat16(), [ProcessorRow(0, SamplingParams(logit_bias={1: 0.001}), [1], [], 0)])
    assert got.dtype == torch.float32 and got[0, 1] == logits.bfloat16()[0, 1].float() + 0.001


@pytest.mark.parametrize("field,value", [("repetition_penalty", 0), ("presence_penalty", 2.5),
                                         ("frequency_penalty", -3), ("min_tokens", -1),
                                         ("logit_bias", {1: 101.0}), ("logit_bias", {-1: 1.0})])
def test_invalid_penalties_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_min_tokens_above_max_tokens_is_rejected():
    with pytest.raises(ValueError, match=r"min_tokens=9 must be an int in \[0, max_tokens\]"):
        SamplingParams(min_tokens=9, max_tokens=8)


# ----- the real model (SmolLM2-135M-Instruct, fp32 on CPU): greedy under processors equals HF generate --------------
class PresenceFrequency(LogitsProcessor):
    """vLLM's presence / frequency penalties over the generated tokens, as an HF logits processor."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        counts = torch.zeros_like(scores).scatter_add_(1, input_ids[:, self.prompt_len:],
                                                       torch.ones_like(input_ids[:, self.prompt_len:], dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


def test_greedy_with_processors_equals_hf_generate(hf_gguf_model):
    from engine import LLM
    from engine.demo import smollm2_gguf_file
    llm = LLM("demo", device="cpu", max_model_len=128, max_num_seqs=4)
    model = hf_gguf_model(smollm2_gguf_file())
    chat = [{"role": "user", "content": "What is 2 + 2?"}]  # answered in 11 tokens and <|im_end|>
    cases = [(chat, SamplingParams(temperature=0, max_tokens=14, min_tokens=13), dict(min_new_tokens=13)),
             (chat, SamplingParams(temperature=0, max_tokens=6, repetition_penalty=1.3, logit_bias={28: 2.0}),
              dict(repetition_penalty=1.3, sequence_bias=[[[28], 2.0]])),
             ("The quick brown fox", SamplingParams(temperature=0, max_tokens=6, presence_penalty=0.8,
                                                    frequency_penalty=0.5), dict(presence_frequency=(0.8, 0.5)))]
    ahead = []  # steps after which a step with penalized rows was in flight (its sampling deferred, not synchronous)
    llm.add_step_callback(lambda record: ahead.append(llm.in_flight is not None and any(
        s.params.has_penalties for s in llm.in_flight.batch.seqs)))
    outs = llm.generate([prompt for prompt, _, _ in cases], [params for _, params, _ in cases], use_tqdm=False)
    assert sum(ahead) >= 4
    im_end = llm.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert len(outs[0]["token_ids"]) == 14 and im_end not in outs[0]["token_ids"][:12]
    for out, (prompt, params, hf_args) in zip(outs, cases):
        ids = llm.encode_prompt(prompt)
        if "presence_frequency" in hf_args:
            hf_args = dict(logits_processor=[PresenceFrequency(len(ids), *hf_args["presence_frequency"])])
        hf = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=params.max_tokens, do_sample=False, eos_token_id=im_end, **hf_args)
        assert out["token_ids"] == hf[0, len(ids):].tolist()
    llm.shutdown()
