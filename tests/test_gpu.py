"""GPU checks (run on the device machine with `pytest -m gpu -s`): bf16 logits close to HF, equal greedy prefixes,
and a Qwen3-0.6B-shaped model generating with CUDA graphs. Skipped without CUDA."""
import random

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sequence import Sequence
from tests.conftest import hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def engine_prefill_logits(llm: LLM, prompts: list[list[int]]) -> torch.Tensor:
    """Last-token logits of each prompt through the engine's real prefill path (paged cache, kernels)."""
    runner, bm = llm.model_runner, llm.scheduler.block_manager
    seqs = [Sequence(p, SamplingParams(), llm.config.kvcache_block_size) for p in prompts]
    for s in seqs:
        bm.allocate(s)
    try:
        with torch.inference_mode():
            ids, pos = runner._prepare_prefill(seqs)
            return runner.model.compute_logits(runner.model(ids, pos)).float()
    finally:
        for s in seqs:
            bm.deallocate(s)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama"])
def test_bf16_logits_and_greedy_match_hf(tiny_models, arch):
    from transformers import AutoModelForCausalLM
    path = tiny_models[arch]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (7, 16, 33, 100, 250)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(path, dtype="bfloat16", kvcache_block_size=16, max_model_len=512, gpu_memory_utilization=0.3)
    ours = engine_prefill_logits(llm, prompts)
    with torch.no_grad():
        ref = torch.stack([hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts])
    err = (ours - ref).abs().max().item()
    print(f"\n[{arch}] bf16 last-token logits: max abs error vs HF = {err:.4f} (logit scale {ref.abs().max():.1f})")
    assert err < 0.05 * ref.abs().max().item()

    steps = 8
    out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, out):
        assert o["token_ids"] == hf_greedy(path, p, steps, hf), f"{arch}: greedy differs for a {len(p)}-token prompt"
    llm.shutdown()


def test_qwen3_06b_shape_generates_with_cuda_graphs(tmp_path):
    from transformers import AutoModelForCausalLM, Qwen3Config
    from engine.demo import build_tokenizer
    cfg = Qwen3Config(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                      max_position_embeddings=4096)
    build_tokenizer(str(tmp_path))
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(str(tmp_path))
    llm = LLM(str(tmp_path), max_model_len=2048)
    assert llm.model_runner.graphs, "CUDA graphs were not captured"
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 151936) for _ in range(rng.randint(100, 1024))] for _ in range(64)]
    outs = llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=128, ignore_eos=True), use_tqdm=False)
    assert all(len(o["token_ids"]) == 128 for o in outs)
    llm.shutdown()
