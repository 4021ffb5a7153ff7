"""The benchmark workloads as plain data (token-id prompts and sampling settings), shared by the engine benchmark,
the vLLM baseline (which must not import the engine) and the pipeline's dataset writer.

A request is ``(prompt_token_ids, dict(temperature=..., max_tokens=..., ignore_eos=...))``.

* W1: nano-vllm's benchmark: 256 prompts of 100-1024 random tokens, 100-1024 new tokens each, T=0.6,
  ``ignore_eos``.
* W1-HF: W1's first 32 prompts with exactly 256 new tokens each, the work HF transformers' baseline can afford.
* W5: a deep queue: 2048 W1-like rows (``random.Random(1)``), no ``ignore_eos`` (each stops at EOS or its limit).
* W6: 32 prompts of 16k-24k tokens mixed with 512 W1-like short rows, at ``max_model_len=32768``; the short
  rows' inter-token latency tells whether long prefills stall the decodes around them.
"""
import random

Request = tuple[list[int], dict]
TOKEN_RANGE = 10000        # prompt token ids are drawn from [0, TOKEN_RANGE]
W6_MAX_MODEL_LEN = 32768


def _w1_like(rng: random.Random, n: int, ignore_eos: bool) -> list[Request]:
    prompts = [[rng.randint(0, TOKEN_RANGE) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    return [(p, dict(temperature=0.6, max_tokens=rng.randint(100, 1024), ignore_eos=ignore_eos)) for p in prompts]


def w1(n: int = 256) -> list[Request]:
    return _w1_like(random.Random(0), n, ignore_eos=True)


def w1_hf() -> list[Request]:
    return [(p, dict(temperature=0.6, max_tokens=256, ignore_eos=True)) for p, _ in w1()[:32]]


def w5(n: int = 2048) -> list[Request]:
    return _w1_like(random.Random(1), n, ignore_eos=False)


def w6() -> list[Request]:
    """Long prompts first in the list (they arrive together with the short rows, in one queue)."""
    rng = random.Random(2)
    long = [([rng.randint(0, TOKEN_RANGE) for _ in range(rng.randint(16384, 24576))],
             dict(temperature=0.6, max_tokens=256, ignore_eos=True)) for _ in range(32)]
    return long + _w1_like(rng, 512, ignore_eos=True)


WORKLOADS = {"W1": w1, "W1-HF": w1_hf, "W5": w5, "W6": w6}


def fresh(requests: list[Request], run: int) -> list[Request]:
    """The same lengths and settings with other token ids, so a repeated run finds nothing in the prefix cache."""
    return [([(t + 10007 * run) % 100000 for t in p], params) for p, params in requests]
