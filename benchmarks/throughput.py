"""Throughput benchmark on one GPU (random-weight Qwen3-0.6B shape, bf16). Workloads (``benchmarks/workloads.py``):

* W1 (nano-vllm's) and W5 (a 2048-row deep queue): the median of ``--runs`` timed runs (default 3) after a warm-up,
  fresh token ids every run; W6 (long prompts mixed with short rows): one run after a warm-up, its throughput and
  the short rows' inter-token latency p50/p99;
* W1-HF: the same 32 prompts x 256 tokens through the engine and through HF transformers' ``generate_batch``;
* W5-job: W5 through ``jobs/offline_batch.py`` on one GPU actor (needs Ray): wall time from launch, the rate from
  the first engine step to the last result, and the time to the first written shard;
* W2 (single-stream decode latency), W3 (prefix-heavy, caching on/off), W4 (startup), LOG (W1 at INFO vs WARNING);
* OUT (output options): the decode step time of 256 rows under a JSON schema, and with ``logprobs=5``, against the
  same 256 rows unconstrained (same weights, a byte-level vocabulary so that grammars have text to work with).

W1, W5 and W6 also report ``host_events`` (``HostEvents``: the CUDA caching allocator's device allocations, frees and
out-of-memory retries, Triton kernels loaded onto the device, and the garbage collector's collections and time), per
timed run (``benchmarks/host_profile.py --workload W6`` reads them every step).

``--baseline vllm`` runs W1, W5 and W6 through vLLM too (``benchmarks/vllm_baseline.py``, in a subprocess) and the
table shows both and the ratio: the same requests, measured in the same run of this script.

    python benchmarks/throughput.py --out results/bench.json [--workloads W1,W5,W6,HF,JOB,W2,W3,W4,LOG]
                                    [--baseline vllm]
"""
import argparse
import collections
import gc
import glob
import json
import os
import random
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.workloads import TOKEN_RANGE, W6_MAX_MODEL_LEN, Request, fresh, w1, w1_hf, w5, w6  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.logger import configure  # noqa: E402

QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                 max_position_embeddings=40960, eos_token_id=151645)
DEFAULT_WORKLOADS = "HF,W4,W1,W5,W6,LOG,W2,W3,OUT"
ENGINE_WORKLOADS = {"W4", "W1", "W5", "HF", "LOG", "W2", "W3"}  # run on one engine at max_model_len=4096


def build_checkpoint(path: str) -> str:
    """A random-weight Qwen3-0.6B-shaped bf16 checkpoint (speed does not depend on the values) with a word-level
    tokenizer covering every id (vLLM detokenizes what it generates)."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen3Config
    vocab = {f"t{i}": i for i in range(QWEN3_06B["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = f"t{QWEN3_06B['eos_token_id']}"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos).save_pretrained(path)
    with torch.device("cuda"):
        AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_06B), dtype=torch.bfloat16).save_pretrained(path)
    return path


def text_checkpoint(path: str) -> str:
    """``path``'s weights beside a byte-level BPE vocabulary of letter and digit strings: grammars constrain text,
    and the word-level ``t<id>`` vocabulary spells no JSON."""
    out = path.rstrip("/") + "-bytes"
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith((".safetensors", ".json")) and "token" not in name:
            os.symlink(os.path.join(path, name), os.path.join(out, name))
    byte_chars = list(pre_tokenizers.ByteLevel.alphabet())
    vocab, rng, letters = dict.fromkeys(sorted(byte_chars)), random.Random(3), "abcdefghijklmnopqrstuvwxyz0123456789 "
    eos, size = QWEN3_06B["eos_token_id"], QWEN3_06B["vocab_size"]
    while len(vocab) < size - 1:
        vocab.setdefault("".join(rng.choice(letters) for _ in range(rng.randint(2, 6))).replace(" ", "\u0120"))
    words = list(vocab)
    words.insert(eos, "<|eos|>")
    tok = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, []))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|eos|>").save_pretrained(out)
    return out


OUT_SCHEMA = json.dumps({"type": "object", "properties": {"id": {"type": "integer"}, "note": {"type": "string"}},
                         "required": ["id", "note"]})


def full_batch_step_ms(records: list, batch: int) -> float:
    """The median wall time between consecutive decode-only steps of ``batch`` rows (host work included)."""
    gaps = sorted(b.timestamp - a.timestamp for a, b in zip(records, records[1:])
                  if a.phase == b.phase == "decode" and a.batch_size == b.batch_size == batch)
    return 1e3 * gaps[len(gaps) // 2]


def output_options(path: str) -> dict:
    """256 rows x 256 tokens unconstrained, under OUT_SCHEMA and with logprobs=5; a warm-up of each, then the
    median of 3 runs' full-batch decode step times."""
    llm = LLM(text_checkpoint(path), max_model_len=4096)
    records: list = []
    llm.add_step_callback(records.append)
    rng = random.Random(3)
    prompts = [[rng.randint(0, TOKEN_RANGE) for _ in range(256)] for _ in range(256)]
    variants = dict(plain={}, json_schema=dict(json_schema=OUT_SCHEMA), logprobs5=dict(logprobs=5))
    step_ms: dict[str, list[float]] = {name: [] for name in variants}
    for run in range(4):
        for name, extra in variants.items():
            records.clear()
            requests = [(p, dict(temperature=0.6, max_tokens=256, ignore_eos=True, seed=i, **extra))
                        for i, p in enumerate(prompts)]
            timed_generate(llm, fresh(requests, 20 + run))
            if run:
                step_ms[name].append(full_batch_step_ms(records, len(prompts)))
    free(llm)
    median = {name: sorted(v)[1] for name, v in step_ms.items()}
    return dict(step_ms=median, runs_step_ms=step_ms, json_schema_over_plain=median["json_schema"] / median["plain"],
                logprobs5_over_plain=median["logprobs5"] / median["plain"])


def as_engine(requests: list[Request]) -> tuple[list[list[int]], list[SamplingParams]]:
    return [p for p, _ in requests], [SamplingParams(**kw) for _, kw in requests]


def timed_generate(llm: LLM, requests: list[Request]) -> tuple[float, list[dict]]:
    prompts, params = as_engine(requests)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, outs


StepRow = collections.namedtuple("StepRow", "phase step_time_s num_decode_seqs num_prefill_tokens")


STEPS_DIR: str | None = None  # --steps-dir: each workload's step records of its last run, as JSON
ENGINE_ARGS: dict = {}        # --engine-arg: extra LLM arguments for W1, W5, W1-HF's engine run, W2, W3, W4 and LOG


def dump_steps(name: str, records: list) -> None:
    if STEPS_DIR and records:
        os.makedirs(STEPS_DIR, exist_ok=True)
        with open(os.path.join(STEPS_DIR, f"{name}.steps.json"), "w") as f:
            json.dump({k: [getattr(r, k) for r in records] for k in records[0].to_dict()}, f)


ALLOCATOR_COUNTERS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")


class HostEvents:
    """What can hold the host up between two points of a run: the CUDA caching allocator's device allocations,
    frees and out-of-memory retries (a retry synchronises the device before freeing its cache), Triton kernels
    loaded onto the device (at a compiled variant's first launch in the process: a module load, which CUDA may
    make wait for the whole device), and Python's garbage collections with their time, by generation.
    ``sample()`` gives the totals so far."""

    def __init__(self) -> None:
        from triton.compiler.compiler import CompiledKernel
        self.gc_count, self.gc_ms, self._gc_started = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        self.kernel_loads, self.kernel_load_ms = 0, 0.0
        self._allocator_start = self._allocator()
        gc.callbacks.append(self._on_gc)
        self._compiled, self._init_handles = CompiledKernel, CompiledKernel._init_handles
        CompiledKernel._init_handles = lambda kernel: self._load(kernel)

    @staticmethod
    def _allocator() -> dict:
        stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
        return {k: stats.get(k, 0) for k in ALLOCATOR_COUNTERS}

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            self.gc_count[info["generation"]] += 1
            self.gc_ms[info["generation"]] += 1e3 * (time.perf_counter() - self._gc_started)

    def _load(self, kernel) -> None:
        if kernel.module is not None:  # (called at every launch of a kernel not yet run: only loads count)
            return self._init_handles(kernel)
        started = time.perf_counter()
        try:
            return self._init_handles(kernel)
        finally:
            self.kernel_loads += 1
            self.kernel_load_ms += 1e3 * (time.perf_counter() - started)

    def sample(self) -> dict:
        now = self._allocator()
        return dict(**{k: now[k] - self._allocator_start[k] for k in ALLOCATOR_COUNTERS},
                    kernel_loads=self.kernel_loads, kernel_load_ms=round(self.kernel_load_ms, 3),
                    gc_collections=list(self.gc_count), gc_ms=[round(ms, 3) for ms in self.gc_ms])

    def close(self) -> dict:
        gc.callbacks.remove(self._on_gc)
        self._compiled._init_handles = self._init_handles
        return self.sample()


def step_mix(records: list) -> dict:
    """Per phase ("prefill": steps with prompt tokens, "decode": decode-only): steps, their total time, and the
    mean step time, decode rows and prompt tokens per step."""
    mix = {}
    for phase in ("prefill", "decode"):
        steps = [r for r in records if r.phase == phase]
        n = max(1, len(steps))
        mix[phase] = dict(steps=len(steps), time_s=sum(r.step_time_s for r in steps),
                          mean_ms=1e3 * sum(r.step_time_s for r in steps) / n,
                          mean_decode_rows=sum(r.num_decode_seqs for r in steps) / n,
                          mean_prompt_tokens=sum(r.num_prefill_tokens for r in steps) / n)
    return mix


def engine_rate(llm: LLM, requests: list[Request], timed_runs: int = 3, name: str = "") -> dict:
    """A warm-up run (of at most the first 256 requests), then the median of the timed runs, each on fresh token
    ids (no prefix-cache hits); the step mix of the last run."""
    timed_generate(llm, fresh(requests[:256], 1))
    runs, records = [], []
    for run in range(2, 2 + timed_runs):
        records.clear()
        llm.add_step_callback(records.append)
        events = HostEvents()
        try:
            wall, outs = timed_generate(llm, fresh(requests, run))
        finally:
            host_events = events.close()
        llm.step_callbacks.remove(records.append)
        runs.append(dict(wall_s=wall, generated_tokens=sum(len(o["token_ids"]) for o in outs),
                         host_events=host_events))
    rates = sorted(r["generated_tokens"] / r["wall_s"] for r in runs)
    dump_steps(name, records)
    return dict(prompts=len(requests), generated_tokens=runs[0]["generated_tokens"], tok_per_s=rates[len(rates) // 2],
                runs_tok_per_s=rates, step_mix=step_mix(records), host_events=[r["host_events"] for r in runs])


def w6_with_latency(llm: LLM, name: str = "W6") -> dict:
    """W6 through the step API, timing every token of the short rows (inter-token latency)."""
    requests = fresh(w6(), 1)
    prompts, params = as_engine(requests)
    seqs = [llm.add_request(p, sp, i) for i, (p, sp) in enumerate(zip(prompts, params))]
    short = {seq.seq_id for seq in seqs if seq.num_prompt_tokens <= 1024}
    last_seen: dict[int, float] = {}
    gaps, tokens, records = [], 0, []
    events = HostEvents()
    start = time.perf_counter()
    try:
        while not llm.is_finished():
            out = llm.step()
            now = time.perf_counter()
            records.append(out.record)
            tokens += len(out.new_tokens)
            for seq_id in short.intersection(out.new_tokens):
                if seq_id in last_seen:
                    gaps.append(now - last_seen[seq_id])
                last_seen[seq_id] = now
    finally:
        host_events = events.close()
    wall = time.perf_counter() - start
    dump_steps(name, records)
    gaps.sort()
    p50, p99 = gaps[len(gaps) // 2], gaps[int(len(gaps) * 0.99)]
    return dict(generated_tokens=tokens, wall_s=wall, tok_per_s=tokens / wall, short_itl_p50_ms=1e3 * p50,
                short_itl_p99_ms=1e3 * p99, p99_over_p50=p99 / p50, step_mix=step_mix(records),
                preempted=sum(r.num_preempted for r in records), host_events=host_events)


class Results(dict):
    """The benchmark's results, printed and written to ``path`` as each workload finishes."""

    def __init__(self, path: str, **fields):
        super().__init__(**fields)
        self.path = path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def record(self, name: str, value) -> None:
        self[name] = value
        print(name, value, flush=True)
        with open(self.path, "w") as f:
            json.dump(self, f, indent=2)


def free(llm: LLM | None = None) -> None:
    if llm is not None:
        llm.shutdown()
    gc.collect()
    torch.cuda.empty_cache()


def run_hf(path: str, requests: list[Request]) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="paged|sdpa").cuda()
    max_new = requests[0][1]["max_tokens"]
    assert all(kw["max_tokens"] == max_new and kw["ignore_eos"] for _, kw in requests)
    cfg = GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=0.6, top_k=0, top_p=1.0,
                           eos_token_id=-1, pad_token_id=0)
    prompts = [p for p, _ in requests]
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


def run_w5_job(path: str, env: dict[str, str] | None = None) -> dict:
    """W5 through the batch job (its own process, one GPU actor, ``env`` added to its environment), timed from
    launch."""
    from benchmarks.dataset import write_dataset
    work = tempfile.mkdtemp(prefix="w5-job-")
    data, out = os.path.join(work, "w5.parquet"), os.path.join(work, "out")
    write_dataset(w5(), data)
    cmd = [sys.executable, os.path.join(ROOT, "jobs", "offline_batch.py"), "--input", data, "--model", path,
           "--device", "cuda", "--temperature", "0.6", "--output", out]
    launched = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, **(env or {})})
    wall = time.time() - launched
    import pyarrow.parquet as pq
    steps = pq.read_table(os.path.join(out, "steps.parquet")).to_pydict()
    first_step = min(t - s for t, s in zip(steps["timestamp"], steps["step_time_s"]))
    last_step = max(steps["timestamp"])
    parts = glob.glob(os.path.join(out, "results", "*.parquet"))
    tokens = sum(n or 0 for f in parts for n in pq.read_table(f, columns=["num_generated_tokens"]).column(0).to_pylist())
    with open(os.path.join(out, "stats.json")) as f:
        stats = json.load(f)
    actors = stats["actors"]
    records = [StepRow(*row) for row in zip(*(steps[k] for k in StepRow._fields))]
    return dict(rows=len(w5()), generated_tokens=tokens, wall_s=wall, tok_per_s_end_to_end=tokens / wall,
                tok_per_s_steps=tokens / (last_step - first_step),
                first_result_s=min(os.path.getmtime(f) for f in parts) - launched,
                first_step_s=first_step - launched, ray_ready_s=stats["time_to_ray_s"],
                actor_started_s=[a["started_s"] for a in actors.values()],
                actor_load_s=[a["load_time_s"] for a in actors.values()],
                actor_ready_s=[a["ready_s"] for a in actors.values()],
                step_mix=step_mix(records))


def run_vllm(path: str, workloads: list[str]) -> dict:
    out = tempfile.mktemp(suffix=".json")
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "vllm_baseline.py"), path, ",".join(workloads),
           "--out", out]
    subprocess.run(cmd, check=True, cwd=ROOT)
    with open(out) as f:
        return json.load(f)


def run_engine_workloads(path: str, wanted: list[str], res: Results, timed_runs: int) -> None:
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    llm = LLM(path, max_model_len=4096, **ENGINE_ARGS)
    res.record("W4", dict(startup_s=time.perf_counter() - start, kv_blocks=llm.model_runner.num_blocks,
                     kv_block_size=llm.config.kvcache_block_size, max_num_seqs=llm.config.max_num_seqs,
                     kv_cache_gb=llm.model_runner.kv_cache.numel() * 2 / 2**30,
                     cuda_graphs=llm.model_runner.num_cuda_graphs))
    for key, name, requests in (("W1", "W1", w1), ("W5", "W5", w5), ("HF", "W1-HF-engine", w1_hf)):
        if key in wanted:
            res.record(name, engine_rate(llm, requests(), timed_runs, name))
    if "LOG" in wanted:
        res.record("LOG", log_level_cost(llm))
    if "W2" in wanted:
        res.record("W2", single_stream(llm))
    if "W3" in wanted:
        on = prefix_heavy(llm)
        free(llm)
        llm = LLM(path, max_model_len=4096, **{**ENGINE_ARGS, "enable_prefix_caching": False})
        off = prefix_heavy(llm)
        res.record("W3", dict(on=on, off=off, speedup=on["tok_per_s"] / off["tok_per_s"]))
    res.record("peak_gpu_memory_gb", torch.cuda.max_memory_allocated() / 2**30)
    free(llm)


def run_w6(path: str, prefill_cap: int | None = None) -> dict:
    """W6 after a warm-up; ``prefill_cap`` is the engine's ``max_prefill_tokens_with_decodes`` (None: its default)."""
    cap = {} if prefill_cap is None else dict(max_prefill_tokens_with_decodes=prefill_cap)
    llm = LLM(path, max_model_len=W6_MAX_MODEL_LEN, **cap)
    timed_generate(llm, fresh(w6()[28:40], 90))  # warm-up: long-prompt chunks and mixed steps
    result = w6_with_latency(llm, f"W6-cap{prefill_cap}" if cap else "W6")
    free(llm)
    return result


def log_level_cost(llm: LLM) -> dict:
    """W1 at INFO vs WARNING in back-to-back pairs of alternating order (drift and order cancel)."""
    pairs = []
    for i in range(6):
        rate = {}
        for j, level in enumerate((("INFO", "WARNING"), ("WARNING", "INFO"))[i % 2]):
            configure(level)
            wall, outs = timed_generate(llm, fresh(w1(), 10 + 2 * i + j))
            rate[level] = sum(len(o["token_ids"]) for o in outs) / wall
        pairs.append(rate)
    configure("WARNING")
    costs = sorted(100 * (1 - p["INFO"] / p["WARNING"]) for p in pairs)
    return dict(pairs_tok_per_s=pairs, info_cost_pct_per_pair=costs, info_vs_warning_pct=(costs[2] + costs[3]) / 2)


def single_stream(llm: LLM) -> dict:
    import random
    rng = random.Random(1)
    prompt = [rng.randint(0, 10000) for _ in range(512)]
    one = dict(temperature=0.0, max_tokens=256, ignore_eos=True)
    timed_generate(llm, [(prompt, one)])
    _, outs = timed_generate(llm, [([t + 1 for t in prompt], one)])
    o = outs[0]
    return dict(ms_per_token=1e3 * (o["latency_s"] - o["ttft_s"]) / (len(o["token_ids"]) - 1), ttft_ms=1e3 * o["ttft_s"])


def prefix_heavy(llm: LLM) -> dict:
    """256 prompts of one 900-token shared prefix + 100 own tokens: a warm-up, then the median of 3 runs."""
    import random
    rng = random.Random(2)
    prefix = [rng.randint(0, 10000) for _ in range(900)]
    p3 = dict(temperature=0.6, max_tokens=64, ignore_eos=True)
    w3 = [(prefix + [rng.randint(0, 10000) for _ in range(100)], p3) for _ in range(256)]
    runs = [timed_generate(llm, fresh(w3, run)) for run in range(4)][1:]
    walls = sorted(wall for wall, _ in runs)
    return dict(wall_s=walls[1], runs_wall_s=walls, tok_per_s=256 * 64 / walls[1],
                cached_tokens=sum(o["num_cached_tokens"] for o in runs[0][1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/bench.json")
    ap.add_argument("--model-dir", default="/tmp/qwen3-0.6b-random")
    ap.add_argument("--workloads", default=DEFAULT_WORKLOADS)
    ap.add_argument("--baseline", choices=["vllm"], default=None, help="also run W1, W5, W6 through vLLM")
    ap.add_argument("--runs", type=int, default=3, help="timed runs of W1, W5 and W1-HF (the median is reported)")
    ap.add_argument("--steps-dir", default=None, help="write each workload's step records (last run) here")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="NAME=INT",
                    help="an extra integer engine argument for the W1/W5/W2/W3/W4/LOG engine (repeatable)")
    ap.add_argument("--job-env", action="append", default=[], metavar="NAME=VALUE[,NAME=VALUE]",
                    help="run W5-job once per occurrence, with these variables in its environment (none: once as is)")
    ap.add_argument("--w6-prefill-caps", default="", help="also run W6 with these max_prefill_tokens_with_decodes "
                    "(comma-separated)")
    args = ap.parse_args()
    global STEPS_DIR
    STEPS_DIR = args.steps_dir
    ENGINE_ARGS.update((name, int(value)) for name, value in (arg.split("=", 1) for arg in args.engine_arg))
    wanted = args.workloads.split(",")
    configure("WARNING")
    path = build_checkpoint(args.model_dir)
    res = Results(args.out, device=torch.cuda.get_device_name(), torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d %H:%M:%S"), engine_args=ENGINE_ARGS)
    if "HF" in wanted:
        res.record("W1-HF", run_hf(path, w1_hf()))
    if ENGINE_WORKLOADS & set(wanted):
        run_engine_workloads(path, wanted, res, args.runs)
    if "W6" in wanted:
        res.record("W6", run_w6(path))
        for cap in filter(None, args.w6_prefill_caps.split(",")):
            res.record(f"W6-cap{cap}", run_w6(path, int(cap)))
    if "JOB" in wanted:
        for i, env in enumerate(args.job_env or [""]):  # W5-job, W5-job#1 <env>, ...
            res.record(f"W5-job#{i} {env}".strip() if i else "W5-job",
                       run_w5_job(path, dict(v.split("=", 1) for v in env.split(",") if v)))
    if "OUT" in wanted:
        res.record("OUT", output_options(path))
    if args.baseline == "vllm":
        res.record("vllm", run_vllm(path, [w for w in ("W1", "W5", "W6") if w in wanted]))
    print_table(res)


def print_table(res: dict) -> None:
    vllm = res.get("vllm", {})
    print(f"\n{res['device']}, {res['date']}\n\n| workload | this engine | vLLM | ratio |\n|---|---|---|---|")
    for name in ("W1", "W5", "W6"):
        if name in res:
            ours = res[name]["tok_per_s"]
            theirs = vllm.get(name, {}).get("tok_per_s")
            print(f"| {name} tok/s | {ours:.0f} | {f'{theirs:.0f}' if theirs else '-'} | "
                  f"{f'{ours / theirs:.2f}x' if theirs else '-'} |")
    if "W6" in res:
        print(f"| W6 short rows ITL p50 / p99 (ms) | {res['W6']['short_itl_p50_ms']:.1f} / "
              f"{res['W6']['short_itl_p99_ms']:.1f} ({res['W6']['p99_over_p50']:.2f}x) | - | - |")
    if "W1-HF" in res and "W1-HF-engine" in res:
        ours, hf = res["W1-HF-engine"]["tok_per_s"], res["W1-HF"]["tok_per_s"]
        print(f"| W1-HF tok/s (32 prompts x 256 tokens; HF generate_batch) | {ours:.0f} | HF {hf:.0f} | "
              f"{ours / hf:.1f}x |")
    for name in (k for k in res if k.startswith("W5-job")):
        j = res[name]
        print(f"| {name} tok/s end to end / steps | {j['tok_per_s_end_to_end']:.0f} / {j['tok_per_s_steps']:.0f} "
              f"(Ray {j['ray_ready_s']:.1f} s, actor from {min(j['actor_started_s']):.1f} s, ready "
              f"{min(j['actor_ready_s']):.1f} s, first step {j['first_step_s']:.1f} s, first result "
              f"{j['first_result_s']:.1f} s) | - | - |")
    if "W2" in res:
        print(f"| W2 decode latency (ms/token) | {res['W2']['ms_per_token']:.2f} | - | - |")
    if "W3" in res:
        print(f"| W3 caching on / off (tok/s) | {res['W3']['on']['tok_per_s']:.0f} / {res['W3']['off']['tok_per_s']:.0f}"
              f" = {res['W3']['speedup']:.2f}x | - | - |")
    if "W4" in res:
        startup = vllm.get("vllm_startup_s")
        print(f"| W4 startup (s) | {res['W4']['startup_s']:.1f} | {f'{startup:.0f}' if startup else '-'} | - |")
    if "OUT" in res:
        o = res["OUT"]
        print(f"| OUT decode step, 256 rows: plain / JSON schema / logprobs=5 (ms) | {o['step_ms']['plain']:.2f} / "
              f"{o['step_ms']['json_schema']:.2f} ({o['json_schema_over_plain']:.2f}x) / {o['step_ms']['logprobs5']:.2f}"
              f" ({o['logprobs5_over_plain']:.2f}x) | - | - |")
    if "LOG" in res:
        print(f"| INFO vs WARNING cost | {res['LOG']['info_vs_warning_pct']:.2f}% | - | - |")
    if "peak_gpu_memory_gb" in res:
        print(f"| peak GPU memory (GB) | {res['peak_gpu_memory_gb']:.1f} | - | - |")


if __name__ == "__main__":
    main()
