"""The same workloads through vLLM's offline ``LLM`` (run by ``throughput.py --baseline vllm`` in a subprocess, so
the two engines never share a process or GPU memory). vLLM keeps its defaults except ``max_model_len``, which W6
needs (32768), and the settings that keep it off the network. Prints one JSON line per workload, then exits.

    python benchmarks/vllm_baseline.py MODEL_DIR W1,W5 --out vllm.json
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")  # flashinfer is not shipped with the bundle
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.workloads import W6_MAX_MODEL_LEN, WORKLOADS, fresh  # noqa: E402


def run(llm, requests) -> dict:
    from vllm import SamplingParams
    prompts = [{"prompt_token_ids": p} for p, _ in requests]
    params = [SamplingParams(**kw) for _, kw in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(generated_tokens=tokens, wall_s=wall, tok_per_s=tokens / wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("workloads")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from vllm import LLM
    start = time.perf_counter()
    llm = LLM(args.model, max_model_len=W6_MAX_MODEL_LEN)
    res = dict(vllm_startup_s=time.perf_counter() - start)
    for name in args.workloads.split(","):
        requests = WORKLOADS[name]()
        run(llm, fresh(requests[:256], 50))  # warm-up (as the engine's) on other token ids
        runs = sorted((run(llm, fresh(requests, 51 + i)) for i in range(3)), key=lambda r: r["tok_per_s"])
        res[name] = dict(runs[1], runs_tok_per_s=[r["tok_per_s"] for r in runs])
        print(json.dumps({name: res[name]}), flush=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
