"""Where an engine's start-up goes, as a job's actor sees it (CUDA): this fresh process imports torch, initialises
CUDA, imports the engine and builds ``LLM`` (its slowest calls listed by cProfile); then it runs W5's rows (or W6's,
at W6's ``max_model_len``) and lists
every Triton kernel variant first used during start-up and during the run, with the time it took to compile or
load. Run it with an empty ``TRITON_CACHE_DIR`` to see what a fresh machine compiles, and again to see it warm:

    TRITON_CACHE_DIR=$(mktemp -d) python benchmarks/startup_profile.py [--model-dir /tmp/qwen3-0.6b-random]
    python benchmarks/startup_profile.py [--rows 2048] [--top 30]   # --top 0: LLM(...) timed without cProfile
    python benchmarks/startup_profile.py --workload W6 --top 0      # the variants W6's long prompts first use
"""
import time

T0 = time.perf_counter()
import argparse  # noqa: E402
import collections  # noqa: E402
import cProfile  # noqa: E402
import os  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class KernelUses:
    """Triton's compile hooks: each kernel variant's first use in this process (a compile, or a load from the
    on-disk cache), when it happened and how long it took."""

    def __init__(self):
        self.phase = "start-up"
        self.started: dict = {}
        # (phase, kernel, seconds since T0, duration, {argument or option: how this variant is specialised})
        self.uses: list[tuple[str, str, float, float, dict]] = []

    def install(self) -> None:
        from triton import knobs
        knobs.runtime.jit_cache_hook = self.before
        knobs.runtime.jit_post_compile_hook = self.after

    def before(self, *, key, **_) -> None:
        self.started[str(key)] = time.perf_counter()
        return None  # a true value would skip the compile

    def after(self, *, key, fn, compile, **_) -> None:
        now = time.perf_counter()
        try:
            spec = specialization(fn.jit_function.arg_names, compile)
        except Exception as e:  # a hook must not fail the launch it reports on
            spec = {"unreadable": repr(e)}
        self.uses.append((self.phase, fn.name.split(".")[-1], now - T0, now - self.started.pop(str(key), now), spec))

    def report(self) -> None:
        """Per phase, each variant's cost and what sets it apart from the kernel's other variants."""
        specs = collections.defaultdict(list)
        for use in self.uses:
            specs[use[1]].append(use[4])
        by_phase = collections.defaultdict(list)
        for use in self.uses:
            by_phase[use[0]].append(use)
        for phase, uses in by_phase.items():
            print(f"\n{len(uses)} kernel variants first used during {phase}, "
                  f"{sum(u[3] for u in uses):.2f} s compiling or loading them:")
            for _, kernel, at, took, spec in sorted(uses, key=lambda u: (u[1], u[2])):
                varying = {k: v for k, v in spec.items() if any(other.get(k) != v for other in specs[kernel])}
                print(f"  {took * 1e3:7.1f} ms at {at:6.1f} s  {kernel} {varying}")


def specialization(arg_names: list[str], compile: dict) -> dict:
    """What Triton specialised a variant on: constexpr values, argument types and alignment/divisibility
    attributes, launch options."""
    spec = {name: f"={value}" for name, value in compile["constants"].items()}
    spec.update({name: str(kind) for name, kind in compile["signature"].items() if name not in spec})
    for attrs in compile["configs"]:
        for where, values in dict(attrs).items():
            index = where[0] if isinstance(where, tuple) else where
            name = arg_names[index] if isinstance(index, int) and index < len(arg_names) else str(where)
            spec[name] = spec.get(name, "") + f" {values}"
    spec.update(num_warps=compile["num_warps"], num_stages=compile["num_stages"])
    return spec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-random")
    ap.add_argument("--workload", choices=("W5", "W6"), default="W5", help="the rows to run after start-up")
    ap.add_argument("--rows", type=int, default=2048, help="the workload's first rows to run (0: none)")
    ap.add_argument("--top", type=int, default=30, help="cProfile rows to print (by cumulative time; 0: no profile)")
    args = ap.parse_args()
    marks = [("interpreter and argparse", time.perf_counter() - T0)]

    def mark(name: str) -> None:
        marks.append((name, time.perf_counter() - T0 - sum(m[1] for m in marks)))

    import torch
    mark("import torch")
    torch.zeros(1, device="cuda")
    mark("CUDA context")
    uses = KernelUses()
    uses.install()
    mark("import triton")
    import transformers  # noqa: F401
    mark("import transformers")
    from benchmarks.throughput import as_engine, build_checkpoint
    from benchmarks.workloads import W6_MAX_MODEL_LEN, w5, w6
    from engine import LLM
    mark("import engine and benchmarks")
    path = build_checkpoint(args.model_dir)
    mark("checkpoint (built if missing)")
    profile = cProfile.Profile() if args.top else None
    max_model_len = W6_MAX_MODEL_LEN if args.workload == "W6" else 4096
    llm = profile.runcall(LLM, path, max_model_len=max_model_len) if profile else LLM(path, max_model_len=max_model_len)
    mark("LLM(...)" + (" under cProfile" if profile else ""))
    for name, seconds in marks:
        print(f"{name:32s} {seconds:6.2f} s")
    print(f"{'total':32s} {sum(m[1] for m in marks):6.2f} s")
    if profile:
        pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)
    if args.rows:
        requests = w6()[:args.rows] if args.workload == "W6" else w5(args.rows)
        uses.phase = f"{args.workload} ({len(requests)} rows)"
        prompts, params = as_engine(requests)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        print(f"{uses.phase}: {sum(len(o['token_ids']) for o in outs)} tokens in {wall:.1f} s")
    uses.report()


if __name__ == "__main__":
    main()
