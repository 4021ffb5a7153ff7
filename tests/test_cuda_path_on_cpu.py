"""The engine's CUDA code path run on the CPU: its Triton kernels (paged prefill and decode attention, the attention
prologue that stores K/V, the fused norms and SiLU, the split-K products, the sampler's Gumbel kernel) executed by the
Triton interpreter inside a whole engine: greedy output equal to HF transformers' fp32 token for token, seeded
samples equal to the PyTorch path's.

The kernel tests check each kernel alone; a real model once gave wrong text on the GPU while all of them passed. These
run what a CUDA engine runs between the scheduler and the logits, on the head layouts of real checkpoints (GQA groups
3, 5 and 7, head_dim 64/80/96/256, sizes that are not powers of two) with chunked prefill, decodes in the same steps,
prefix-cache hits and preemption, in fp32 and in fp16 (which adds the split-K products), and on the real demo model.
Not covered here: CUDA graphs, pinned staging and bf16 (the interpreter's bf16 products are not the GPU's), which the
GPU tier tests. Skipped on a GPU, where test_gpu.py runs the same paths for real.
"""
import collections
import copy
import functools
import importlib
import sys

import pytest
import torch

from tests.triton_tiers import ON_GPU, in_fresh_interpreter, run_in_fresh_interpreter, small  # before Triton

from engine import LLM, SamplingParams, model_runner
from engine.demo import build_tiny_model, smollm2_gguf_file
from engine.layers import fusion
from tests.conftest import hf_model
from tests.test_chunked_prefill import MAX_NEW, expected, generate, random_prompts
from tests.test_gpu import hf_last_logits, near_tie_report

pytestmark = pytest.mark.skipif(ON_GPU, reason="on a GPU these paths run for real (test_gpu.py)")
KERNELS = {"engine.kernels.triton_attention": ("paged_prefill_attention", "paged_decode_attention"),
           "engine.kernels.triton_fused": ("qk_norm_rotary_store", "add_rms_norm", "silu_and_mul", "gumbel_argmax"),
           "engine.kernels.triton_gemm": ("split_k_linear",)}
EVERY_STEP_KERNELS = {"paged_prefill_attention", "paged_decode_attention", "qk_norm_rotary_store", "add_rms_norm",
                      "silu_and_mul"}  # split_k_linear runs in half precision only, gumbel_argmax when sampling


@in_fresh_interpreter
def test_small_tier_in_fresh_interpreter():
    run_in_fresh_interpreter(__file__)


@pytest.fixture
def kernel_calls(monkeypatch) -> collections.Counter:
    """Send the CPU engine down its CUDA path: every engine module's ``use_triton_kernels`` says yes on any device and
    the runner picks the triton attention backend. Returns a count of the calls each Triton entry point gets, so
    a test can show they ran."""
    real = fusion.use_triton_kernels
    for module in [m for name, m in sys.modules.items() if name.startswith("engine.")]:
        if getattr(module, "use_triton_kernels", None) is real:
            monkeypatch.setattr(module, "use_triton_kernels", lambda x: True)
    monkeypatch.setattr(model_runner, "select_backend", lambda device, block_size: "triton")
    calls = collections.Counter()
    for module_name, names in KERNELS.items():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, _counted(getattr(module, name), name, calls))
    return calls


def _counted(kernel, name: str, calls: collections.Counter):
    @functools.wraps(kernel)
    def run(*args, **kwargs):
        calls[name] += 1
        return kernel(*args, **kwargs)
    return run


def ran(calls: collections.Counter) -> set[str]:
    return {name for name, count in calls.items() if count}


# (arch, heads, KV heads, head_dim, hidden): Qwen3 with SmolLM2's heads, GQA groups 5 and 7, head_dim 80 and 256
SHAPES = [("qwen3", 9, 3, 64, 144), ("qwen2", 10, 2, 96, 160), ("llama", 14, 2, 64, 196),
          ("mistral", 7, 7, 80, 112), ("qwen3", 8, 1, 256, 96)]


@pytest.fixture(scope="module")
def shaped_models(tmp_path_factory) -> dict[tuple, str]:
    root = tmp_path_factory.mktemp("shaped")
    return {shape: build_tiny_model(str(root / "-".join(map(str, shape))), shape[0], seed=i, hidden_size=shape[4],
                                    num_attention_heads=shape[1], num_key_value_heads=shape[2], head_dim=shape[3],
                                    intermediate_size=224)
            for i, shape in enumerate(SHAPES)}


@small
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "{}-{}-{}-{}".format(*s[:4]))
def test_chunks_decodes_and_prefix_hits_match_hf(shaped_models, kernel_calls, shape):
    """Prompts sharing 20 tokens, some longer than the 32-token budget, arrive together: chunks beside decode rows,
    later prompts starting after the block the first computed, and a one-token prompt."""
    path = shaped_models[shape]
    shared = random_prompts(500, (20,), seed=7)[0]
    prompts = random_prompts(500, (45, 5, 20), seed=8, prefix=shared) + random_prompts(500, (1, 40), seed=9)
    outs, records = generate(path, prompts, async_scheduling=shape[1] % 2 == 1)
    assert [o["token_ids"] for o in outs] == [expected(path, p) for p in prompts]
    assert any(r.num_decode_seqs and r.num_prefill_tokens for r in records)
    assert sum(o["num_cached_tokens"] for o in outs) >= 16
    assert ran(kernel_calls) >= EVERY_STEP_KERNELS, kernel_calls


@small
def test_preemption_under_a_small_cache_matches_hf(shaped_models, kernel_calls):
    path = shaped_models[SHAPES[0]]
    prompts = random_prompts(500, (50, 45, 40, 12), seed=10)
    outs, records = generate(path, prompts, max_new=10, num_kvcache_blocks=10, max_num_seqs=4)
    assert sum(r.num_preempted for r in records) > 0
    assert [o["token_ids"] for o in outs] == [expected(path, p, 10) for p in prompts]
    assert ran(kernel_calls) >= EVERY_STEP_KERNELS, kernel_calls


@small
def test_half_precision_with_split_k_products_near_hf(shaped_models, kernel_calls):
    """fp16 (the interpreter's bf16 products are not the GPU's), so decode-sized batches take the split-K products
    too: greedy equal to HF fp32 except where fp32 itself is within twice HF fp16's own logit error of a tie."""
    path = shaped_models[SHAPES[0]]
    prompts = random_prompts(500, (45, 5, 20, 1, 40), seed=11)
    outs, _ = generate(path, prompts, dtype="float16")
    hf32 = hf_model(path)
    hf16 = copy.deepcopy(hf32).half()
    hf_err = max((hf_last_logits(hf16, p) - hf_last_logits(hf32, p)).abs().max().item() for p in prompts)
    equal, _ = near_tie_report(hf32, prompts, [expected(path, p) for p in prompts],
                               [o["token_ids"] for o in outs], 2 * hf_err)
    print(f"fp16: {equal}/{MAX_NEW * len(prompts)} greedy steps equal, HF fp16 error {hf_err:.4f}")
    assert equal >= 0.8 * MAX_NEW * len(prompts)
    assert ran(kernel_calls) >= EVERY_STEP_KERNELS | {"split_k_linear"}, kernel_calls


@small
def test_a_long_row_split_alone_among_short_ones_matches_hf(shaped_models, kernel_calls, monkeypatch):
    """A 300-token row decoding among eight short ones gets its keys split by the step's plan (``long_row_split_plan``,
    its floor lowered from 1,024 keys so the row stands out on the interpreter's 4 SMs), the short rows one part
    each; greedy still equals HF."""
    from engine.kernels import triton_attention
    monkeypatch.setattr(triton_attention, "LONG_ROW_MIN_KEYS", 64)
    plans = []
    decode = triton_attention.paged_decode_attention

    def spy(*args, split_plan=None, **kwargs):
        plans.append(split_plan)
        return decode(*args, split_plan=split_plan, **kwargs)
    monkeypatch.setattr(triton_attention, "paged_decode_attention", spy)
    path = shaped_models[SHAPES[0]]
    prompts = random_prompts(500, (300,) + (10,) * 8, seed=13)
    outs, _ = generate(path, prompts, max_new=8)
    assert (1, 5) in plans, set(plans)
    assert [o["token_ids"] for o in outs] == [expected(path, p, 8) for p in prompts]


SEEDED = [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=7),
          SamplingParams(temperature=0.7, top_k=20, top_p=0.9, max_tokens=8, ignore_eos=True, seed=3),
          SamplingParams(temperature=1.0, max_tokens=12, seed=5, choice=["red", "green", "blue"]),
          SamplingParams(temperature=0.9, max_tokens=12, seed=6, regex=r"[0-9]{3}-[a-z]{2}")]


def seeded_samples(path: str) -> list[list[list[int]]]:
    llm = LLM(path, device="cpu", kvcache_block_size=16, max_num_batched_tokens=32, max_model_len=512)
    prompts = random_prompts(500, (45, 1, 20), seed=12)
    return [[o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)] for sp in SEEDED]


@pytest.fixture(scope="module")
def seeded_on_cpu_path(shaped_models) -> list[list[list[int]]]:
    """The PyTorch path's samples (module scope: computed before ``kernel_calls`` reroutes the engine)."""
    return seeded_samples(shaped_models[SHAPES[0]])


@small
def test_seeded_sampling_equals_the_cpu_path(shaped_models, seeded_on_cpu_path, kernel_calls):
    """A seeded request draws its noise from a hash of (seed, position, token id), in the Gumbel kernel as in PyTorch,
    so it samples the same tokens on either path: plain temperature, top-k/top-p masks before the kernel, and grammar
    bitmasks, which the kernel applies itself."""
    assert seeded_samples(shaped_models[SHAPES[0]]) == seeded_on_cpu_path
    assert ran(kernel_calls) >= EVERY_STEP_KERNELS | {"gumbel_argmax"}, kernel_calls


@small
def test_real_model_matches_hf(kernel_calls, hf_gguf_model):
    """SmolLM2-135M-Instruct (9 heads, 3 KV heads, head_dim 64): the model whose text went wrong on the GPU. Plain
    text prompts of different lengths, so its decode rows have different contexts."""
    llm = LLM("demo", device="cpu", enforce_eager=True, max_model_len=256)
    prompts = ["The capital of France is", "Water boils at a temperature of one hundred degrees"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    model = hf_gguf_model(smollm2_gguf_file())
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([llm.encode_prompt(prompt)])
        hf = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        assert out["token_ids"] == hf[0, ids.shape[1]:].tolist(), prompt
    assert ran(kernel_calls) >= EVERY_STEP_KERNELS, kernel_calls
