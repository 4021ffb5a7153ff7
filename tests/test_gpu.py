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
    """bf16 logits close to HF's; greedy tokens equal HF's for 8 steps, except where HF itself sees a tie
    within bf16 noise (its top two logits closer than the logit tolerance), which is counted and printed."""
    from transformers import AutoModelForCausalLM
    path = tiny_models[arch]
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (7, 16, 33, 100, 250)]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    llm = LLM(path, dtype="bfloat16", kvcache_block_size=16, max_model_len=512, gpu_memory_utilization=0.3)
    try:
        ours = engine_prefill_logits(llm, prompts)
        with torch.no_grad():
            ref = torch.stack([hf(torch.tensor([p], device="cuda")).logits[0, -1].float() for p in prompts])
        err, scale = (ours - ref).abs().max().item(), ref.abs().max().item()
        assert err < 0.05 * scale
        steps, tol = 8, 2 * max(err, 0.05)
        out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    exact = near_ties = 0
    for p, o in zip(prompts, out):
        expected = hf_greedy(path, p, steps, hf)
        first_diff = next((i for i, (a, b) in enumerate(zip(o["token_ids"], expected)) if a != b), steps)
        exact += first_diff
        if first_diff < steps:  # allowed only if HF's own choice was a bf16-level tie with ours
            with torch.no_grad():
                ids = torch.tensor([p + expected[:first_diff]], device="cuda")
                logits = hf(ids).logits[0, -1].float()
            margin = (logits[expected[first_diff]] - logits[o["token_ids"][first_diff]]).item()
            assert margin < tol, f"{arch}: greedy differs at step {first_diff} with HF margin {margin:.3f}"
            near_ties += 1
    print(f"\n[{arch}] bf16 logits max abs error vs HF = {err:.4f} (logit scale {scale:.1f}); greedy: "
          f"{exact}/{steps * len(prompts)} steps equal before any divergence, {near_ties} divergence(s) at HF near-ties")


def test_cascade_decode_fp32_matches_hf(tiny_models, monkeypatch):
    """20 sequences sharing 3 cached blocks decode through the cascade path (inside CUDA graphs); in fp32 the
    greedy tokens must equal HF's exactly."""
    from transformers import AutoModelForCausalLM
    import engine.model_runner as model_runner
    shared_counts = []
    original = model_runner.shared_prefix_blocks
    monkeypatch.setattr(model_runner, "shared_prefix_blocks",
                        lambda *a: shared_counts.append(original(*a)) or shared_counts[-1])
    path = tiny_models["qwen3"]
    rng = random.Random(1)
    prefix = [rng.randrange(3, 500) for _ in range(50)]
    prompts = [prefix + [rng.randrange(3, 500) for _ in range(rng.randint(3, 20))] for _ in range(20)]
    llm = LLM(path, dtype="float32", kvcache_block_size=16, max_model_len=512, gpu_memory_utilization=0.3)
    try:
        llm.generate([prefix], SamplingParams(max_tokens=1), use_tqdm=False)  # caches the prefix blocks
        out = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    assert max(shared_counts) == 3, shared_counts
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    for p, o in zip(prompts, out):
        assert o["token_ids"] == hf_greedy(path, p, 12, hf)


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
    try:
        assert llm.model_runner.graphs, "CUDA graphs were not captured"
        rng = random.Random(0)
        prompts = [[rng.randrange(0, 151936) for _ in range(rng.randint(100, 1024))] for _ in range(64)]
        outs = llm.generate(prompts, SamplingParams(temperature=0.6, max_tokens=128, ignore_eos=True),
                            use_tqdm=False)
        assert all(len(o["token_ids"]) == 128 for o in outs)
    finally:
        llm.shutdown()
