"""Time the Triton paged-attention kernels on CUDA (Qwen3-0.6B heads: 16 q, 8 kv, dim 128, bf16).

    python benchmarks/kernels.py --out results/kernels.json [--sweep]

Checks the kernels against the reference first, then reports decode as GB/s of KV bytes read
(vs. a measured device-to-device copy, bytes read + written) and prefill as TFLOP/s (vs. torch
SDPA on dense K/V where there is no prefix). ``--sweep`` also times alternative tile configs.
Times are triton.testing.do_bench medians; do_bench clears L2 before every repetition. Decode
is timed as CUDA-graph replays (how the engine runs it); ``eager_ms`` adds the launch cost.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from engine.kernels import reference  # noqa: E402
from engine.kernels.triton_attention import (DecodeConfig, PrefillConfig,  # noqa: E402
                                             paged_decode_attention, paged_prefill_attention)
from engine.model_runner import longest_first  # noqa: E402

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE = 16, 8, 128, torch.bfloat16
SCALE = HEAD_DIM ** -0.5


def copy_bandwidth() -> float:
    """GB/s of a 2 GiB device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(2 ** 30, dtype=DTYPE, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() * src.element_size() / ms / 1e6


def paged_problem(context_lens: list[int], block_size: int, gen: torch.Generator):
    """Random bf16 caches holding exactly these sequences, blocks shuffled over the pool."""
    needed = [triton.cdiv(n, block_size) for n in context_lens]
    num_blocks = sum(needed)
    shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    v_cache = torch.randn(shape, dtype=DTYPE, device="cuda")
    perm = torch.randperm(num_blocks, generator=gen).int()
    tables = torch.zeros(len(context_lens), max(needed), dtype=torch.int32)
    start = 0
    for row, count in enumerate(needed):
        tables[row, :count] = perm[start:start + count]
        start += count
    lens = torch.tensor(context_lens, dtype=torch.int32, device="cuda")
    return k_cache, v_cache, tables.cuda(), lens


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def check_correctness(gen: torch.Generator) -> dict:
    errors = {}
    for block_size in (16, 256):
        lens = torch.randint(1, 4097, (24,), generator=gen).tolist() + [1, 8192]
        k_cache, v_cache, tables, ctx = paged_problem(lens, block_size, gen)
        q = torch.randn(len(lens), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        out = paged_decode_attention(q, k_cache, v_cache, tables, ctx, SCALE)
        ref = reference.paged_decode_attention_ref(q, k_cache, v_cache, tables, ctx, SCALE)
        errors[f"decode_bs{block_size}"] = rel_error(out, ref)
        q_lens = [min(n, 700) for n in lens]
        cu = torch.tensor([0] + q_lens).cumsum(0).int().cuda()
        q = torch.randn(sum(q_lens), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
        out = paged_prefill_attention(q, k_cache, v_cache, cu, ctx, tables, SCALE, max(q_lens))
        ref = reference.paged_prefill_attention_ref(q, k_cache, v_cache, cu, ctx, tables, SCALE)
        errors[f"prefill_bs{block_size}"] = rel_error(out, ref)
    bad = {name: err for name, err in errors.items() if not err < 1.5e-2}
    if bad:
        raise SystemExit(f"correctness check failed: {bad}")
    return errors


def capture_graph(step):
    """Run ``step`` once on a side stream (compiling its kernels), then capture it in a CUDA graph as the
    engine's decode step is; returns the graph and what the captured call returned (rewritten by replays)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def time_decode(context_lens: list[int], block_size: int, gen: torch.Generator,
                configs: dict[str, DecodeConfig | None], unordered: tuple[str, ...] = ()
                ) -> dict[str, tuple[float, float | None]]:
    """Per config, median ms of one decode step replayed from a CUDA graph (as the engine runs
    it: rows started longest first, except for the configs named in ``unordered``) and, for the
    default config, launched eagerly (adds the host launch cost when the GPU work is shorter
    than it)."""
    k_cache, v_cache, tables, lens = paged_problem(context_lens, block_size, gen)
    q = torch.randn(len(context_lens), NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
    longest = torch.from_numpy(longest_first(np.array(context_lens))).cuda()
    times = {}
    for name, config in configs.items():
        def step(config=config, order=None if name in unordered else longest):
            paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE, order=order, config=config)
        try:
            graph, _ = capture_graph(step)
        except Exception as err:  # a sweep config the chip cannot run (shared memory, ...)
            print(f"  decode config {name} failed: {type(err).__name__}: {err}"[:300])
            continue
        graph_ms = do_bench(graph.replay, warmup=10, rep=60, return_mode="median")
        eager_ms = (do_bench(step, warmup=10, rep=60, return_mode="median")
                    if name == "default" else None)
        times[name] = (graph_ms, eager_ms)
    return times


def kv_bytes(context_lens: list[int]) -> int:
    return 2 * sum(context_lens) * NUM_KV_HEADS * HEAD_DIM * torch.finfo(DTYPE).bits // 8


def decode_benchmarks(gen: torch.Generator, copy_gbs: float, sweep: bool) -> list[dict]:
    cases = [(batch, ctx, f"{ctx}") for batch in (1, 64, 256) for ctx in (512, 1024, 2048, 8192)]
    mixed = torch.randint(100, 2049, (256,), generator=gen).tolist()
    rows = []
    for block_size in (16, 256):
        for batch, ctx, label in cases + [(256, None, "100..2048")]:
            lens = mixed if ctx is None else [ctx] * batch
            configs = {"default": None}
            if sweep and (block_size, batch, label) in DECODE_SWEEP_CASES:
                configs.update(decode_sweep_configs(batch))
            times = time_decode(lens, block_size, gen, configs)
            for name, (ms, eager_ms) in times.items():
                gbs = kv_bytes(lens) / ms / 1e6
                rows.append(dict(block_size=block_size, batch=batch, ctx=label, config=name,
                                 ms=ms, kv_gb_s=gbs, frac_copy=gbs / copy_gbs, eager_ms=eager_ms))
                print(f"  decode {rows[-1]}", flush=True)
            torch.cuda.empty_cache()
    return rows


DECODE_SWEEP_CASES = {(256, 256, "100..2048"), (256, 256, "1024"), (256, 1, "8192"),
                      (256, 64, "512"), (256, 64, "2048")}


def deep_queue_decode(gen: torch.Generator, copy_gbs: float) -> list[dict]:
    """W5's steady state: 1,008 rows of contexts uniform in 100..1,600 at the engine's block size (128), the
    default config against a sweep of tile sizes, warps and stages."""
    lens = torch.randint(100, 1601, (1008,), generator=gen).tolist()
    configs = {"default": None}
    configs.update({f"n{n}_w{w}_s{s}": DecodeConfig(block_n=n, num_warps=w, num_stages=s)
                    for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)})
    rows = []
    for name, (ms, _) in time_decode(lens, 128, gen, configs).items():
        gbs = kv_bytes(lens) / ms / 1e6
        rows.append(dict(block_size=128, batch=len(lens), ctx="100..1600", config=name, ms=ms, kv_gb_s=gbs,
                         frac_copy=gbs / copy_gbs))
    return rows


def uneven_decode(gen: torch.Generator) -> list[dict]:
    """Batches whose programs are few or uneven, at the engine's block size (128), against split counts: W1's
    shrinking tail (16-256 rows of contexts 600-2,048) and W6's mix (short rows beside 16k-24k-token rows)."""
    def lens(n: int, lo: int, hi: int) -> list[int]:
        return torch.randint(lo, hi + 1, (n,), generator=gen).tolist()
    cases = {f"tail{n}": lens(n, 600, 2048) for n in (16, 32, 48, 64, 80, 96, 112, 128, 160, 192, 256)}
    cases["w6_512+32long"] = lens(512, 100, 2048) + lens(32, 16384, 24576)
    cases["w6_128+32long"] = lens(128, 100, 2048) + lens(32, 16384, 24576)
    cases["w6_32long"] = lens(32, 16384, 24576)
    configs = {"default": None, "default_unordered": None}
    configs |= {f"splits{k}": DecodeConfig(num_splits=k) for k in (1, 2, 3, 4, 6, 8, 16)}
    rows = []
    for label, case in cases.items():
        for name, (ms, _) in time_decode(case, 128, gen, configs, unordered=("default_unordered",)).items():
            rows.append(dict(batch=len(case), ctx=label, config=name, ms=ms, kv_gb_s=kv_bytes(case) / ms / 1e6))
            print(f"  uneven {rows[-1]}", flush=True)
        torch.cuda.empty_cache()
    return rows


def read_bandwidth() -> float:
    """GB/s of reading 4 GiB once (a sum), the ceiling of a kernel that only reads."""
    src = torch.randn(2 ** 31, dtype=DTYPE, device="cuda")
    ms = do_bench(lambda: src.sum(dtype=torch.float32), warmup=25, rep=200, return_mode="median")
    return src.numel() * src.element_size() / ms / 1e6


def decode_sweep_configs(batch: int) -> dict[str, DecodeConfig]:
    configs = {f"n{n}_w4_s{s}": DecodeConfig(block_n=n, num_warps=4, num_stages=s)
               for n in (32, 64, 128) for s in (2, 3, 5)}
    splits = (16, 32, 64) if batch == 1 else (1, 2, 4)
    configs.update({f"splits{k}": DecodeConfig(num_splits=k) for k in splits})
    return configs


def prefill_benchmarks(gen: torch.Generator, sweep: bool) -> list[dict]:
    """(batch, new tokens, cached prefix) per case; FLOPs count the causal pairs only."""
    cases = [(1, 4096, 0), (4, 2048, 0), (16, 512, 0), (8, 512, 1536), (64, 1, 1023)]
    rows = []
    for block_size in (16, 256):
        for batch, q_len, prefix in cases:
            lens = [prefix + q_len] * batch
            k_cache, v_cache, tables, ctx = paged_problem(lens, block_size, gen)
            q = torch.randn(batch * q_len, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device="cuda")
            cu = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda") * q_len
            pairs = batch * (q_len * prefix + q_len * (q_len + 1) // 2)
            flops = 4 * pairs * NUM_HEADS * HEAD_DIM
            configs = {"default": None}
            if sweep and (block_size, batch, q_len, prefix) == (256, 4, 2048, 0):
                configs.update({f"m{m}_n{n}_w{w}_s{s}": PrefillConfig(m, n, w, s)
                                for m, n, w, s in ((64, 64, 4, 3), (128, 64, 8, 2),
                                                   (128, 64, 8, 3), (128, 128, 8, 2),
                                                   (128, 128, 8, 3), (128, 128, 4, 2))})
            for name, config in configs.items():
                def step(config=config):
                    paged_prefill_attention(q, k_cache, v_cache, cu, ctx, tables, SCALE, q_len,
                                            config=config)
                try:
                    ms = do_bench(step, warmup=10, rep=60, return_mode="median")
                except Exception as err:
                    print(f"  prefill config {name} failed: {type(err).__name__}: {err}"[:300])
                    continue
                rows.append(dict(block_size=block_size, batch=batch, q_len=q_len, prefix=prefix,
                                 config=name, ms=ms, tflops=flops / ms / 1e9))
                print(f"  prefill {rows[-1]}", flush=True)
            if block_size == 256 and prefix == 0:
                rows.append(sdpa_baseline(batch, q_len, flops))
            torch.cuda.empty_cache()
    return rows


def sdpa_baseline(batch: int, q_len: int, flops: int) -> dict:
    """torch SDPA (flash backend), causal, dense K/V expanded to all heads: a reference rate."""
    shape = (batch, NUM_HEADS, q_len, HEAD_DIM)
    q, k, v = (torch.randn(shape, dtype=DTYPE, device="cuda") for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    ms = do_bench(lambda: sdpa(q, k, v, is_causal=True), warmup=10, rep=60, return_mode="median")
    return dict(block_size=None, batch=batch, q_len=q_len, prefix=0, config="torch_sdpa", ms=ms,
                tflops=flops / ms / 1e9)


def print_table(title: str, rows: list[dict], keys: list[str]) -> None:
    print(f"\n{title}")
    print(" | ".join(f"{k:>10}" for k in keys))
    for row in rows:
        cells = [f"{row[k]:10.4f}" if isinstance(row[k], float) else f"{str(row[k]):>10}"
                 for k in keys]
        print(" | ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path")
    parser.add_argument("--sweep", action="store_true", help="also time alternative configs")
    parser.add_argument("--deep-queue", action="store_true",
                        help="only decode at W5's steady state (1,008 rows), with a config sweep")
    parser.add_argument("--uneven", action="store_true",
                        help="only decode of few or uneven rows (W1's tail, W6's mix) against split counts")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA")
    gen = torch.Generator().manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    result = dict(device=props.name, sms=props.multi_processor_count, torch=torch.__version__,
                  triton=triton.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"))
    result["correctness"] = check_correctness(gen)
    print("correctness (rel. error vs reference):", result["correctness"])
    result["copy_gb_s"] = copy_bandwidth()
    print(f"device-to-device copy: {result['copy_gb_s']:.0f} GB/s (read + write)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.uneven:
        result["read_gb_s"] = read_bandwidth()
        result["decode"] = uneven_decode(gen)
        args.out.write_text(json.dumps(result, indent=1))
        print_table(f"uneven decode (read ceiling {result['read_gb_s']:.0f} GB/s)", result["decode"],
                    ["batch", "ctx", "config", "ms", "kv_gb_s"])
        return
    if args.deep_queue:
        result["read_gb_s"] = read_bandwidth()
        result["decode"] = deep_queue_decode(gen, result["copy_gb_s"])
        args.out.write_text(json.dumps(result, indent=1))
        print_table(f"deep-queue decode (read ceiling {result['read_gb_s']:.0f} GB/s)", result["decode"],
                    ["batch", "config", "ms", "kv_gb_s", "frac_copy"])
        return
    result["decode"] = decode_benchmarks(gen, result["copy_gb_s"], args.sweep)
    args.out.write_text(json.dumps(result, indent=1))  # keep the decode numbers if prefill dies
    result["prefill"] = prefill_benchmarks(gen, args.sweep)
    args.out.write_text(json.dumps(result, indent=1))
    if args.sweep:
        print_table("decode sweep", [r for r in result["decode"] if r["config"] != "default"],
                    ["block_size", "batch", "ctx", "config", "ms", "kv_gb_s", "frac_copy"])
        sweep = [r for r in result["prefill"] if r["config"] not in ("default", "torch_sdpa")]
        print_table("prefill sweep", sweep,
                    ["block_size", "batch", "q_len", "prefix", "config", "ms", "tflops"])
    defaults = [r for r in result["decode"] if r["config"] == "default"]
    print_table("decode (default config)", defaults,
                ["block_size", "batch", "ctx", "ms", "kv_gb_s", "frac_copy", "eager_ms"])
    defaults = [r for r in result["prefill"] if r["config"] in ("default", "torch_sdpa")]
    print_table("prefill", defaults,
                ["block_size", "batch", "q_len", "prefix", "config", "ms", "tflops"])
    print(f"\ncopy {result['copy_gb_s']:.0f} GB/s; {result['device']}; wrote {args.out}")


if __name__ == "__main__":
    main()
