"""Throughput benchmark on one GPU: W1 (nano-vllm's workload), W1-HF (transformers baseline, same run),
W2 (single-stream decode latency), W3 (prefix-heavy, caching on/off), W4 (startup), plus the log-level cost
(W1 at WARNING vs INFO). Random-weight checkpoints of real shapes, bf16. Prints a table and writes JSON.

    python benchmarks/throughput.py --out results/bench.json [--workloads W1,HF,W2,W3,W4,LOG]
"""
import argparse
import gc
import json
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from engine import LLM, SamplingParams  # noqa: E402
from engine.demo import build_tokenizer  # noqa: E402
from engine.logger import configure  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=40960)


def build_checkpoint(path: str) -> str:
    """A random-weight Qwen3-0.6B-shaped bf16 checkpoint (speed does not depend on the values)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from transformers import AutoModelForCausalLM, Qwen3Config
    build_tokenizer(path)
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_06B), dtype=torch.bfloat16).save_pretrained(path)
    return path


def w1_requests(n: int = 256) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024)) for _ in range(n)]
    return prompts, params


def fresh(prompts: list[list[int]], run: int) -> list[list[int]]:
    """The same prompt lengths with other token ids, so a repeated run finds nothing in the prefix cache."""
    return [[(t + 10007 * run) % 100000 for t in p] for p in prompts]


def timed_generate(llm: LLM, prompts, params) -> tuple[float, list[dict]]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outs


def free(llm: LLM | None = None) -> None:
    if llm is not None:
        llm.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


def run_hf(path: str, prompts, params) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda()
    max_new = 256  # a cap that keeps the baseline's wall time affordable; tok/s is what is compared
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
                           eos_token_id=-1, pad_token_id=0)
    model.generate_batch(prompts[:2], generation_config=cfg, progress_bar=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = model.generate_batch(prompts, generation_config=cfg, progress_bar=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in outs.values())
    del model
    free()
    return dict(prompts=len(prompts), max_new_tokens=max_new, generated_tokens=tokens, wall_s=wall,
                tok_per_s=tokens / wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-random")
    ap.add_argument("--workloads", default="HF,W4,W1,LOG,W2,W3")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=None, help="kvcache_block_size (default: the engine's)")
    args = ap.parse_args()
    engine_args = dict(max_model_len=4096)
    if args.block_size:
        engine_args["kvcache_block_size"] = args.block_size
    wanted = args.workloads.split(",")
    configure("WARNING")
    path = build_checkpoint(args.model_dir)
    prompts, params = w1_requests(args.num_prompts)
    res: dict = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                     date=time.strftime("%Y-%m-%d %H:%M:%S"))
    if "HF" in wanted:
        res["W1-HF"] = run_hf(path, prompts[:32], params[:32])
        print("W1-HF", res["W1-HF"], flush=True)

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(path, **engine_args)
    res["W4"] = dict(startup_s=time.perf_counter() - start, kv_blocks=llm.model_runner.num_blocks,
                     kv_block_size=llm.config.kvcache_block_size,
                     kv_cache_gb=llm.model_runner.kv_cache.numel() * 2 / 2**30,
                     cuda_graphs=len(llm.model_runner.graphs))
    print("W4", res["W4"], flush=True)
    if "W1" in wanted:
        first_wall, _ = timed_generate(llm, prompts, params)  # warm-up: compiles kernels for every shape seen
        runs = [timed_generate(llm, fresh(prompts, run), params) for run in (1, 2, 3)]
        tokens = sum(len(o["token_ids"]) for o in runs[0][1])
        rates = sorted(tokens / wall for wall, _ in runs)
        res["W1"] = dict(prompts=len(prompts), generated_tokens=tokens, tok_per_s=rates[1], runs_tok_per_s=rates,
                         first_run_tok_per_s=tokens / first_wall)
        print("W1", res["W1"], flush=True)
    if "LOG" in wanted:  # back-to-back pairs in alternating order, so drift and order cancel; median of pairs
        pairs = []
        for i in range(6):
            rate = {}
            for j, level in enumerate((("INFO", "WARNING"), ("WARNING", "INFO"))[i % 2]):
                configure(level)
                wall, outs = timed_generate(llm, fresh(prompts, 4 + 2 * i + j), params)
                rate[level] = sum(len(o["token_ids"]) for o in outs) / wall
            pairs.append(rate)
        configure("WARNING")
        costs = sorted(100 * (1 - p["INFO"] / p["WARNING"]) for p in pairs)
        mean = {level: sum(p[level] for p in pairs) / len(pairs) for level in ("INFO", "WARNING")}
        res["LOG"] = dict(pairs_tok_per_s=pairs, info_cost_pct_per_pair=costs,
                          info_vs_warning_pct=(costs[2] + costs[3]) / 2,
                          info_vs_warning_pct_of_means=100 * (1 - mean["INFO"] / mean["WARNING"]))
        print("LOG", res["LOG"], flush=True)
    if "W2" in wanted:
        rng = random.Random(1)
        prompt = [[rng.randint(0, 10000) for _ in range(512)]]
        one = SamplingParams(temperature=0.0, max_tokens=256, ignore_eos=True)
        timed_generate(llm, prompt, one)
        _, outs = timed_generate(llm, [[t + 1 for t in prompt[0]]], one)
        o = outs[0]
        res["W2"] = dict(ms_per_token=1e3 * (o["latency_s"] - o["ttft_s"]) / (len(o["token_ids"]) - 1),
                         ttft_ms=1e3 * o["ttft_s"])
        print("W2", res["W2"], flush=True)
    if "W3" in wanted:
        rng = random.Random(2)
        prefix = [rng.randint(0, 10000) for _ in range(900)]
        w3 = [prefix + [rng.randint(0, 10000) for _ in range(100)] for _ in range(256)]
        p3 = SamplingParams(temperature=0.6, max_tokens=64, ignore_eos=True)
        res["W3"] = {}
        for caching in (True, False):  # a warm-up run, then 3 timed runs, each with its own shared prefix
            if not caching:
                free(llm)
                llm = LLM(path, **engine_args, enable_prefix_caching=False)
            runs = [timed_generate(llm, fresh(w3, run), p3) for run in range(4)][1:]
            walls = sorted(wall for wall, _ in runs)
            res["W3"]["on" if caching else "off"] = dict(
                wall_s=walls[1], runs_wall_s=walls, tok_per_s=256 * 64 / walls[1],
                cached_tokens=sum(o["num_cached_tokens"] for o in runs[0][1]))
        res["W3"]["speedup"] = res["W3"]["on"]["tok_per_s"] / res["W3"]["off"]["tok_per_s"]
        print("W3", res["W3"], flush=True)
    res["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    free(llm)
    if "W1" in res and "W1-HF" in res:
        res["W1_vs_HF"] = res["W1"]["tok_per_s"] / res["W1-HF"]["tok_per_s"]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print_table(res)


def print_table(res: dict) -> None:
    rows = [("device", res["device"])]
    if "W1" in res:
        rows.append(("W1 throughput (tok/s, median of 3)", f"{res['W1']['tok_per_s']:.0f} "
                     f"(runs: {', '.join(f'{r:.0f}' for r in res['W1']['runs_tok_per_s'])})"))
    if "W1-HF" in res:
        rows.append(("W1-HF throughput (tok/s)", f"{res['W1-HF']['tok_per_s']:.0f}"))
    if "W1_vs_HF" in res:
        rows.append(("W1 / W1-HF", f"{res['W1_vs_HF']:.1f}x"))
    if "W2" in res:
        rows.append(("W2 decode latency (ms/token)", f"{res['W2']['ms_per_token']:.2f}"))
    if "W3" in res:
        rows.append(("W3 caching on / off (tok/s)", f"{res['W3']['on']['tok_per_s']:.0f} / "
                     f"{res['W3']['off']['tok_per_s']:.0f} = {res['W3']['speedup']:.2f}x"))
    if "W4" in res:
        rows.append(("W4 startup (s)", f"{res['W4']['startup_s']:.1f}"))
        rows.append(("W4 KV cache", f"{res['W4']['kv_blocks']} blocks x {res['W4']['kv_block_size']} tokens "
                     f"= {res['W4']['kv_cache_gb']:.1f} GB"))
    if "LOG" in res:
        rows.append(("INFO vs WARNING throughput cost", f"{res['LOG']['info_vs_warning_pct']:.2f}%"))
    rows.append(("peak GPU memory (GB)", f"{res['peak_gpu_memory_gb']:.1f}"))
    width = max(len(k) for k, _ in rows)
    print("\n| metric | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k.ljust(width)} | {v} |")


if __name__ == "__main__":
    main()
