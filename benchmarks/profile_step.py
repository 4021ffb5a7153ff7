"""Where does an engine step's time go? Wraps the step's phases with synchronising timers and prints the
mean time per phase, then a torch.profiler table of the top GPU kernels, for a decode-heavy workload.

    python benchmarks/profile_step.py [--batch 256] [--ctx 512] [--steps 64] [--shared-prefix 0] [--logprobs 0]

With ``--shared-prefix N`` every prompt starts with the same N tokens (W3's shape), served from the prefix cache;
with ``--logprobs K`` every row asks for its tokens' logprobs and top K.
"""
import argparse
import collections
import os
import random
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import build_checkpoint  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.logger import configure  # noqa: E402


def wrap(obj, name: str, totals: dict) -> None:
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        totals[name].append(time.perf_counter() - start)
        return out
    setattr(obj, name, timed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-random")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--shared-prefix", type=int, default=0)
    ap.add_argument("--logprobs", type=int, default=None)
    args = ap.parse_args()
    configure("WARNING")
    llm = LLM(build_checkpoint(args.model_dir), max_model_len=4096)
    rng = random.Random(0)
    prefix = [rng.randint(0, 10000) for _ in range(args.shared_prefix)]
    unique = [[rng.randint(0, 10000) for _ in range(args.ctx - args.shared_prefix)] for _ in range(args.batch)]

    def make(shift: int) -> list[list[int]]:
        return [prefix + [t + shift for t in u] for u in unique]
    prompts = make(0)
    params = SamplingParams(temperature=0.6, max_tokens=args.steps, ignore_eos=True, logprobs=args.logprobs)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)  # also caches the shared prefix
    records = []
    llm.add_step_callback(records.append)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    llm.step_callbacks.remove(records.append)
    for phase in ("prefill", "decode"):
        times = [r.step_time_s for r in records if r.phase == phase]
        print(f"{phase} steps: {len(times)}, total {sum(times):.3f}s, mean {1e3 * sum(times) / max(1, len(times)):.2f} ms")
    print(f"unwrapped: {args.batch} x {args.steps} tokens in {wall:.3f}s = {args.batch * args.steps / wall:.0f} tok/s, "
          f"{1e3 * wall / args.steps:.2f} ms/step (incl. prefill)")
    totals: dict = collections.defaultdict(list)
    runner, sched = llm.model_runner, llm.scheduler
    for obj, name in [(sched, "schedule"), (runner, "_prepare_decode"), (runner, "_prepare_sampling"),
                      (runner, "_forward"), (runner.sampler, "forward"), (sched, "postprocess"), (llm, "_apply_stop_strings"),
                      (llm, "step")]:
        wrap(obj, name, totals)
    llm.generate(make(1), params, use_tqdm=False)
    for name, times in totals.items():
        times = times[2:] if len(times) > 4 else times  # skip prefill-ish first steps
        print(f"{name:22s} mean {1e3 * sum(times) / len(times):7.3f} ms  (n={len(times)})")
    print_decode_kernels(llm, make(2), params)


def print_decode_kernels(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int = 10) -> None:
    """Profile only decode steps (the profiler starts after the prefill step) and list the top GPU kernels."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CUDA])
    seen = []

    def on_step(record) -> None:  # profile the `steps` decode steps after the last prefill
        if record.phase == "prefill":
            return
        seen.append(record.phase)
        if len(seen) == 1:
            prof.start()
        elif len(seen) == steps + 1:
            torch.cuda.synchronize()
            prof.stop()
    llm.add_step_callback(on_step)
    llm.generate(prompts, replace(params, max_tokens=steps + 3), use_tqdm=False)
    print(f"GPU kernels over {steps} decode steps (batch {len(prompts)}):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
