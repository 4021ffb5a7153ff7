"""Replay the benchmark workloads through the real scheduler with a step-cost model instead of a GPU, to compare
scheduling policies without device time. Each step costs

    COST_MS = fixed + per_row * rows + per_kv_token * (tokens every row attends to) + per_prompt_token * prompt
              tokens + per_pair * (query-key pairs of prompt chunks beyond 1024 keys)

fitted (least squares, median error 12 %) to the step records of W1, W5 and W6 on one H200 on 2026-12-03
(Qwen3-0.6B shape, bf16; ``throughput.py --steps-dir``). Every sequence runs to its ``max_tokens``. Prints
throughput and, for W6, the short rows' inter-token latency p50/p99 as the benchmark defines them.

    python benchmarks/schedule_sim.py [--workloads W1,W5,W6] [--shares 1,0.25,0.125]

``--shares`` overrides ``engine.scheduler.PROMPT_SHARE_WITH_DECODES``, the part of the step budget that prompt
tokens may take beside decode rows.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("NANOVLLM_LOG_LEVEL", "ERROR")
import engine.scheduler as scheduler  # noqa: E402
from benchmarks.workloads import W6_MAX_MODEL_LEN, w1, w5, w6  # noqa: E402
from engine import SamplingParams  # noqa: E402
from engine.sequence import Sequence  # noqa: E402

COST_MS = dict(fixed=0.705, per_row=4.27e-3, per_kv_token=3.115e-5, per_prompt_token=2.47e-3, per_pair=4.5e-7)
KV_BLOCKS, BLOCK_SIZE, MAX_NUM_SEQS = 8086, 128, 1010  # what the engine chose on the H200 for this model


class SimConfig:
    max_num_seqs = MAX_NUM_SEQS
    max_num_batched_tokens = 16384
    kvcache_block_size = BLOCK_SIZE
    enable_prefix_caching = False

    def __init__(self, max_model_len: int):
        self.max_model_len = max_model_len


def step_ms(out) -> float:
    kv = prompt = pairs = 0
    for row, (start, n) in enumerate(zip(out.num_computed_tokens, out.num_scheduled_tokens)):
        kv += start + n
        if row >= out.num_decode_rows:
            prompt += n
            pairs += n * start + n * n / 2
    c = COST_MS
    return (c["fixed"] + c["per_row"] * out.num_rows + c["per_kv_token"] * kv + c["per_prompt_token"] * prompt
            + c["per_pair"] * max(0.0, pairs - prompt * 1024))


def simulate(requests, max_model_len: int, short_prompt_tokens: int = 0) -> dict:
    """Run ``requests`` to completion; latency gaps of sequences whose prompts have at most
    ``short_prompt_tokens`` tokens are collected (every decode step is one gap)."""
    sch = scheduler.Scheduler(SimConfig(max_model_len), KV_BLOCKS, eos_token_ids=set())
    seqs = [Sequence(p, SamplingParams(max_tokens=kw["max_tokens"], ignore_eos=True), BLOCK_SIZE) for p, kw in requests]
    for seq in seqs:
        sch.add(seq)
    short = {s.seq_id for s in seqs if s.num_prompt_tokens <= short_prompt_tokens}
    total_ms, tokens, steps, gaps = 0.0, 0, 0, []
    while not sch.is_finished():
        out = sch.schedule()
        ms = step_ms(out)
        total_ms, steps = total_ms + ms, steps + 1
        gaps += [ms] * sum(s.seq_id in short for s in out.seqs[:out.num_decode_rows])
        sampling = out.sampling_seqs
        sch.postprocess(sampling, [1] * len(sampling))
        tokens += len(sampling)
    result = dict(steps=steps, seconds=round(total_ms / 1e3, 2), tok_per_s=round(tokens / total_ms * 1e3))
    if gaps:
        gaps.sort()
        p50, p99 = gaps[len(gaps) // 2], gaps[int(len(gaps) * 0.99)]
        result.update(itl_p50_ms=round(p50, 1), itl_p99_ms=round(p99, 1), p99_over_p50=round(p99 / p50, 2))
    return result


WORKLOADS = {"W1": lambda: simulate(w1(), 4096), "W5": lambda: simulate(w5(), 4096),
             "W6": lambda: simulate(w6(), W6_MAX_MODEL_LEN, short_prompt_tokens=1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="W1,W5,W6")
    ap.add_argument("--shares", default=str(scheduler.PROMPT_SHARE_WITH_DECODES))
    args = ap.parse_args()
    for share in map(float, args.shares.split(",")):
        scheduler.PROMPT_SHARE_WITH_DECODES = share
        for name in args.workloads.split(","):
            print(f"share {share}: {name} {WORKLOADS[name]()}", flush=True)


if __name__ == "__main__":
    main()
