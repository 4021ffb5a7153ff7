"""Where does an engine step's time go? Wraps the step's phases with synchronising timers and prints the
mean time per phase, then a torch.profiler table of the top GPU kernels, for a decode-heavy workload.

    python benchmarks/profile_step.py [--batch 256] [--ctx 512] [--steps 64] [--shared-prefix 0] [--logprobs 0]

With ``--shared-prefix N`` every prompt starts with the same N tokens (W3's shape), served from the prefix cache;
with ``--logprobs K`` every row asks for its tokens' logprobs and top K.

Only decode steps of the whole batch are measured. A large batch is admitted over many steps (the token budget,
the cap on prompt work beside decode rows), so a first run counts those admission steps and every measured run then
asks for enough tokens that the rows admitted first are still decoding when the last one starts. Choose
``--batch`` x (``--ctx`` + those tokens) that the KV cache holds.
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


def wrap(obj, name: str, totals: dict, steps_seen: list) -> None:
    """Time each call of ``obj.name`` (synchronising), filed under the engine step it ran in."""
    fn = getattr(obj, name)

    def timed(*args, **kwargs):
        step = len(steps_seen)  # records so far: this call belongs to the step after them
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        torch.cuda.synchronize()
        totals[name].append((step, time.perf_counter() - start))
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
    admission = len(run_recorded(llm, prompts, params)[0]) - args.steps  # steps beyond the decode steps asked for
    # the measured runs have more decode rows beside the prompts (none finishes during admission), which can slow
    # admission a little (the cap on prompt work is larger beside fewer than 32 of them): a quarter more, to spare,
    # and no more than that, so that the batch's K/V (rows x (ctx + max_tokens)) still fits the cache
    params = replace(params, max_tokens=admission + admission // 4 + args.steps + 2)
    records, wall = run_recorded(llm, make(1), params)
    full = whole_batch_decode_steps(records, args.batch)
    times = [r.step_time_s for r in full]
    print(f"admission: {sum(r.num_prefill_tokens > 0 for r in records)} prompt-carrying steps; "
          f"{len(records)} steps in {wall:.3f}s")
    print(f"decode steps of all {args.batch} rows: {len(times)}, mean {1e3 * sum(times) / max(1, len(times)):.2f} ms "
          f"= {args.batch * len(times) / max(sum(times), 1e-9):.0f} tok/s")
    totals: dict = collections.defaultdict(list)
    whole_batch: list[bool] = []  # per step: did it decode every row of the batch?
    runner, sched = llm.model_runner, llm.scheduler
    for obj, name in [(sched, "schedule"), (runner, "_prepare_decode"), (runner, "_prepare_sampling"),
                      (runner, "_forward"), (runner.sampler, "forward"), (sched, "postprocess"), (llm, "_apply_stop_strings"),
                      (llm, "step")]:
        wrap(obj, name, totals, whole_batch)

    def mark(record) -> None:
        whole_batch.append(is_whole_batch_decode(record, args.batch))
    llm.add_step_callback(mark)
    llm.generate(make(2), params, use_tqdm=False)
    llm.step_callbacks.remove(mark)
    for name, calls in totals.items():
        times = [t for step, t in calls if step < len(whole_batch) and whole_batch[step]]
        print(f"{name:22s} mean {1e3 * sum(times) / max(1, len(times)):7.3f} ms  (n={len(times)})")
    print_decode_kernels(llm, make(3), params)


def run_recorded(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[list, float]:
    """Generate and return the step records and the wall time."""
    records: list = []
    llm.add_step_callback(records.append)
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    llm.step_callbacks.remove(records.append)
    return records, wall


def is_whole_batch_decode(record, batch: int) -> bool:
    return record.phase == "decode" and record.batch_size == batch and record.num_waiting == 0


def whole_batch_decode_steps(records: list, batch: int) -> list:
    """The decode-only steps in which every row of the batch is running."""
    full = [r for r in records if is_whole_batch_decode(r, batch)]
    if not full:
        print(f"warning: no decode step ran all {batch} rows (the KV cache holds fewer, or admission outlasted them)")
    return full


def print_decode_kernels(llm: LLM, prompts: list[list[int]], params: SamplingParams, steps: int = 10) -> None:
    """Profile ``steps`` decode steps of the whole batch and list the top GPU kernels."""
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CUDA])
    seen = []

    def on_step(record) -> None:  # the profiler starts after the first whole-batch step, so covers the next ones
        if not is_whole_batch_decode(record, len(prompts)) or len(seen) > steps:
            return
        seen.append(record.step)
        if len(seen) == 1:
            prof.start()
        elif len(seen) == steps + 1:
            torch.cuda.synchronize()
            prof.stop()
    llm.add_step_callback(on_step)
    llm.generate(prompts, params, use_tqdm=False)
    llm.step_callbacks.remove(on_step)
    if len(seen) <= steps:
        if seen:
            prof.stop()
        print(f"warning: only {len(seen)} whole-batch decode steps, no kernel table")
        return
    print(f"GPU kernels over {steps} decode steps (batch {len(prompts)}):")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))


if __name__ == "__main__":
    main()
