"""bf16 precision on a real checkpoint (CPU, so CI runs it): the engine's bf16 logits must be closer to an fp32
run than HF transformers' own bf16 run is.

SmolLM2-135M-Instruct carries massive activations (a few residual channels at ~25,000 from layer 11 on, where
a bf16 step is 128). Random-weight models have none, which is how a bf16 residual stream went unnoticed: on
the GPU it made the engine's greedy answers flip at near-ties more often than HF's (the France prompt said
"L'Étoile" instead of Paris). The decoder now keeps the residual stream in fp32; with a bf16 stream this test
fails (the engine's mean error on these prompts was 0.47, above the bound of 0.8 x HF's 0.45)."""
import copy

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer

from engine.context import reset_context, set_context
from engine.demo import smollm2_demo_path, smollm2_gguf_file
from engine.loader import load_weights
from engine.models import build_model

QUESTIONS = ["What is the capital of France?", "Name three primary colors.", "What is 12 times 12?",
             "Who wrote Romeo and Juliet?", "Explain photosynthesis in one sentence.",
             "What is the boiling point of water in Celsius?", "Translate 'thank you' into Spanish.",
             "What is the largest planet in the solar system?"]


def engine_model(path: str, dtype: torch.dtype) -> torch.nn.Module:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = build_model(AutoConfig.from_pretrained(path))
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, path)
    return model.eval()


@torch.inference_mode()
def engine_last_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """One prefill through the engine's model code (no KV cache: the exact torch attention)."""
    n = len(prompt)
    set_context(is_prefill=True, cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32), max_seqlen_q=n, max_seqlen_k=n)
    try:
        return model.compute_logits(model(torch.tensor(prompt), torch.arange(n)))[0].float()
    finally:
        reset_context()


@torch.inference_mode()
def hf_last_logits(model, prompt: list[int]) -> torch.Tensor:
    return model(torch.tensor([prompt])).logits[0, -1].float()


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_demo_path())
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False) for q in QUESTIONS]
    return [tokenizer.encode(t, add_special_tokens=False) for t in texts]


def test_bf16_logits_closer_to_fp32_than_hf_bf16(prompts, hf_gguf_model):
    hf32 = hf_gguf_model(smollm2_gguf_file())
    hf16 = copy.deepcopy(hf32).to(torch.bfloat16)
    ours = engine_model(smollm2_demo_path(), torch.bfloat16)
    ref = torch.stack([hf_last_logits(hf32, p) for p in prompts])
    hf_err = (torch.stack([hf_last_logits(hf16, p) for p in prompts]) - ref).abs().amax(1)
    our_err = (torch.stack([engine_last_logits(ours, p) for p in prompts]) - ref).abs().amax(1)
    print(f"\nmax |logit - fp32| per prompt: engine bf16 {our_err.tolist()}, HF bf16 {hf_err.tolist()}")
    assert our_err.mean() <= 0.8 * hf_err.mean(), (our_err.mean().item(), hf_err.mean().item())
    assert our_err.max() <= hf_err.max(), (our_err.max().item(), hf_err.max().item())
