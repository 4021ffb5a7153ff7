"""Where the host's time goes in the engine's steps (CUDA): 256 rows x 256 tokens (by default) of Qwen3-0.6B's
shape, plain and under a JSON schema, with per-step totals of the engine's host phases (wall time, not
synchronised: the device runs on meanwhile) and of the time spent waiting for sampled tokens. A step whose wait is
near zero is bound by the host.

    python benchmarks/host_profile.py [--model-dir /tmp/qwen3-0.6b-random] [--runs 3] [--fill-threads auto,4,15]
    python benchmarks/host_profile.py --workload W6 [--slow-ms 28]

``--workload W6`` runs W6 (after the benchmark's warm-up) with the same timers read every step, and with the
staging rings' uploads and downloads, ``throughput.HostEvents`` (device allocations, frees, allocator retries,
Triton kernel loads, garbage collection) and each step's time on the device (``DeviceTimes``): it prints, for the
steps with prompt tokens beside decode rows, the phases of the slow ones (no wait for the device, over
``--slow-ms``) against the median of the others. A step's phases are those of its ``step()`` call, which launches
the next batch before it completes this one; its device times are those of the batch it completes.

Phases nest (``_launch_ahead`` includes ``schedule`` and ``forward`` or ``launch``; ``forward`` includes
``_prepare_decode`` and ``_forward``, the graph replay; ``_sample_deferred`` includes ``_prepare_sampling``, which
makes the sampling settings and fills the grammar bitmask, and ``_sample``), so their times do not add up to the
step.
"""
import argparse
import collections
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import (ALLOCATOR_COUNTERS, OUT_SCHEMA, TOKEN_RANGE, HostEvents, as_engine,  # noqa: E402
                                   build_checkpoint, text_checkpoint, timed_generate)
from benchmarks.workloads import W6_MAX_MODEL_LEN, fresh, w6  # noqa: E402
from engine import LLM, SamplingParams, structured  # noqa: E402
from engine.model_runner import SampledTokens  # noqa: E402

PHASES = {"engine": ("_launch_ahead", "_sample_deferred", "_advance_grammars", "_admit_compiled", "_record_logprobs",
                     "_apply_stop_strings"),
          "scheduler": ("schedule", "postprocess"),
          "runner": ("forward", "launch", "_prepare_decode", "_prepare_prefill", "_forward", "_sample",
                     "_prepare_sampling", "_sampling_settings", "_grammar_bitmask")}


def timed(totals: dict, name: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - start
    return wrapper


def instrument(llm: LLM, totals: dict) -> None:
    owners = {"engine": llm, "scheduler": llm.scheduler, "runner": llm.model_runner}
    for owner, names in PHASES.items():
        for name in names:
            setattr(owners[owner], name, timed(totals, name, getattr(owners[owner], name)))
    SampledTokens.tolist = timed(totals, "wait_for_tokens", SampledTokens.tolist)


class DeviceTimes:
    """Each step's time on the device, from CUDA events queued before its forward pass and after its sampling:
    ``busy`` from its first kernel to its last (idle gaps inside it included), ``idle`` the device's wait for it
    after the step before it ended. Read against the host's step time, they tell a step the host holds (the device
    idles) from one whose host time is spent blocked on the device (the device busy throughout)."""

    def __init__(self, llm: LLM):
        self.marks: dict[int, list] = {}  # id(batch) -> [batch (kept alive: ids stay unique), start, end]
        self.order: list[int] = []
        runner, engine = llm.model_runner, llm
        forward, sample, record = runner.forward, runner._sample, engine._record

        def mark(batch, i: int) -> None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.setdefault(id(batch), [batch, None, None])[1 + i] = event

        def timed_forward(batch):
            mark(batch, 0)
            return forward(batch)

        def timed_sample(batch, *args):
            out = sample(batch, *args)
            mark(batch, 1)
            return out

        def in_order(batch, *args):
            self.order.append(id(batch))
            return record(batch, *args)
        runner.forward, runner._sample, engine._record = timed_forward, timed_sample, in_order

    def read(self) -> list[tuple[float, float]]:
        """(busy ms, idle ms before it) per completed step, in the engine's step order."""
        torch.cuda.synchronize()
        out, previous_end = [], None
        for key in self.order:
            _, start, end = self.marks[key]
            busy = start.elapsed_time(end) if start and end else float("nan")
            idle = previous_end.elapsed_time(start) if previous_end and start else float("nan")
            out.append((busy, idle))
            previous_end = end or previous_end
        return out


def w6_slow_steps(model_dir: str, slow_ms: float) -> None:
    """W6's steps with prompt tokens beside decode rows: the host phases of the slow ones against the others'."""
    llm = LLM(build_checkpoint(model_dir), max_model_len=W6_MAX_MODEL_LEN)
    timed_generate(llm, fresh(w6()[28:40], 90))  # the benchmark's warm-up
    totals: dict[str, float] = collections.defaultdict(float)
    instrument(llm, totals)
    runner = llm.model_runner
    if hasattr(runner, "uploads"):  # (CUDA)
        runner.uploads.upload = timed(totals, "upload", runner.uploads.upload)
        runner.downloads.download = timed(totals, "download", runner.downloads.download)
    for i, (prompt, params) in enumerate(zip(*as_engine(fresh(w6(), 1)))):
        llm.add_request(prompt, params, i)
    device_times = DeviceTimes(llm) if torch.cuda.is_available() else None
    events, steps = HostEvents(), []
    try:
        while not llm.is_finished():
            totals.clear()
            before = events.sample()
            record = llm.step().record
            after = events.sample()
            host = {k: after[k] - before[k] for k in (*ALLOCATOR_COUNTERS, "kernel_loads")}
            host["kernel_load_ms"] = round(after["kernel_load_ms"] - before["kernel_load_ms"], 2)
            host["gc_ms"] = round(sum(after["gc_ms"]) - sum(before["gc_ms"]), 2)
            steps.append((record, {k: 1e3 * v for k, v in totals.items()}, host))
    finally:
        events.close()
    for (_, phases, _), (busy, idle) in zip(steps, device_times.read() if device_times else []):
        phases["device_busy"], phases["device_idle_before"] = busy, idle
    mixed = [s for s in steps if s[0].num_prefill_tokens and s[0].num_decode_seqs]
    slow = [s for s in mixed if s[0].wait_time_s < 1e-3 and 1e3 * s[0].step_time_s > slow_ms]
    others = [s for s in mixed if s not in slow]
    names = sorted({k for s in mixed for k in s[1]}, key=lambda k: -sum(s[1].get(k, 0.0) for s in mixed))
    print(f"W6: {len(steps)} steps, {len(mixed)} with prompt tokens beside decode rows, {len(slow)} of them slow")
    if others:
        print("others, median ms: " + ", ".join(f"{k} {statistics.median(s[1].get(k, 0.0) for s in others):.2f}"
                                               for k in names))
    for record, phases, host in slow:
        print(f"step {record.step}: {1e3 * record.step_time_s:.1f} ms, {record.num_decode_seqs} decode rows, "
              f"{record.num_prefill_tokens} prompt tokens; "
              + ", ".join(f"{k} {phases[k]:.2f}" for k in names if phases.get(k, 0.0) >= 0.05) + f"; {host}")
    llm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-random")
    ap.add_argument("--workload", choices=("rows", "W6"), default="rows",
                    help="rows: --rows rows plain and under a JSON schema; W6: its slow mixed steps")
    ap.add_argument("--slow-ms", type=float, default=28.0, help="W6: a step without waiting longer than this is slow")
    ap.add_argument("--runs", type=int, default=2, help="runs of each variant after a warm-up of each")
    ap.add_argument("--fill-threads", default="auto", help="comma-separated xgrammar fill threads to compare")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256, help="prompt and output tokens of each row")
    args = ap.parse_args()
    print(f"{os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable", flush=True)
    if args.workload == "W6":
        w6_slow_steps(args.model_dir, args.slow_ms)
        return
    llm = LLM(text_checkpoint(build_checkpoint(args.model_dir)), max_model_len=4096)
    totals: dict[str, float] = collections.defaultdict(float)
    instrument(llm, totals)
    rng = random.Random(3)
    prompts = [[rng.randint(0, TOKEN_RANGE) for _ in range(args.tokens)] for _ in range(args.rows)]
    variants = [("plain", {}, None)] + [(f"json_schema ({t} fill threads)", dict(json_schema=OUT_SCHEMA), t)
                                        for t in args.fill_threads.split(",")]
    for run in range(args.runs + 1):
        for name, extra, threads in variants:
            if threads is not None:  # a fresh bitmask filler with these threads
                structured.FILL_THREADS = threads if threads == "auto" else int(threads)
                llm.model_runner._bitmask = None
            for i, prompt in enumerate(prompts):
                params = SamplingParams(temperature=0.6, max_tokens=args.tokens, ignore_eos=True, seed=i, **extra)
                llm.add_request([(t + 997 * run) % 100000 for t in prompt], params)
            totals.clear()
            walls = []
            while not llm.is_finished():
                start = time.perf_counter()
                llm.step()
                walls.append(time.perf_counter() - start)
            if run:
                full = sorted(walls[20:200])  # full-batch decode steps
                print(f"{name}: {len(walls)} steps, median full-batch step {1e3 * full[len(full) // 2]:.2f} ms; "
                      "per step (ms): " + ", ".join(f"{k} {1e3 * v / len(walls):.2f}"
                                                   for k, v in sorted(totals.items(), key=lambda kv: -kv[1])),
                      flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
