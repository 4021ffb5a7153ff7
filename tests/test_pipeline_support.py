"""Shared helpers for the pipeline and reliability tests (no tests here): a local Ray cluster per test
module, job flags for the tiny demo model, and readers for a job's output."""
import asyncio
import os
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.actor import EngineActor

REPO = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
MODEL = "demo-random"   # the tiny random-weight model: fast, no download
MAX_NUM_SEQS = 4


@dataclass
class Cluster:
    address: str        # GCS address, for drivers started as subprocesses (--address)
    metrics_port: int   # Prometheus endpoint of the node: http://127.0.0.1:<port>/metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray_cluster():
    """One local Ray instance per test module (``ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)``),
    with the dashboard (state API, logs) and a metrics port.

    Workers import ``pipeline`` and the test modules (for fault-injecting actor subclasses) from
    ``code_search_path``; metrics are exported every second instead of every ten.
    """
    port = free_port()
    ctx = ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False, _metrics_export_port=port,
                   _system_config={"metrics_report_interval_ms": 1000},
                   job_config=ray.job_config.JobConfig(code_search_path=[str(REPO), str(TESTS)]))
    yield Cluster(ctx.address_info["gcs_address"], port)
    ray.shutdown()


class PacedActor(EngineActor):
    """The real actor, slowed by 0.4 s per shard: long enough that both actors of a small job overlap even when
    one loads its engine seconds after the other, and that a test can act while shards are still running."""

    async def _generate(self, prompts, params):
        await asyncio.sleep(0.4)
        return await super()._generate(prompts, params)


def job_argv(input_path, output, *extra: str, actors: int = 1, shard_size: int = 4, max_tokens: int = 4) -> list[str]:
    """Flags for a small CPU job on the tiny random model (kv blocks of 16 tokens, max_model_len 256, at most 4
    sequences in a batch, so an actor holds 8 rows: small jobs still spread over several actors)."""
    args = ["--output", str(output), "--model", MODEL, "--device", "cpu", "--num-actors", str(actors),
            "--shard-size", str(shard_size), "--max-tokens", str(max_tokens), "--max-model-len", "256",
            "--engine-arg", "kvcache_block_size=16", "--engine-arg", f"max_num_seqs={MAX_NUM_SEQS}",
            "--progress-interval", "5"]
    if input_path is not None:
        args = ["--input", str(input_path), *args]
    return [*args, *extra]


def write_prompts(path: Path, prompts: list, **columns: list) -> Path:
    """A Parquet input with an ``id`` column, ``prompt`` and any extra columns."""
    table = pa.table({"id": list(range(len(prompts))), "prompt": prompts, **columns})
    pq.write_table(table, path)
    return path


def read_results(output: Path) -> pa.Table:
    parts = sorted((Path(output) / "results").glob("part-*.parquet"))
    return pa.concat_tables([pq.read_table(p) for p in parts])


def assert_each_id_once(results: pa.Table, num_rows: int) -> None:
    ids = results.column("id").to_pylist()
    assert sorted(ids) == list(range(num_rows)), f"rows missing or duplicated: {sorted(ids)}"


# The Arrow type of generated_top_logprobs (one completion): per token, its alternatives.
TOP_LOGPROBS = pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))


def check_logprobs(token_ids: list[int], logprobs: list[float], top: list[list[dict]], k: int) -> None:
    """One completion's logprob columns: one entry per generated token; each token's alternatives are the k most
    likely, most likely first, plus the chosen token (with its own logprob) when it is not among them."""
    assert 1 <= len(token_ids) == len(logprobs) == len(top)
    for token, logprob, alternatives in zip(token_ids, logprobs, top):
        assert logprob <= 0 and k <= len(alternatives) <= k + 1
        values = [a["logprob"] for a in alternatives]
        assert values == sorted(values, reverse=True)
        assert {a["token_id"]: a["logprob"] for a in alternatives}[token] == logprob


def part_files(output: Path) -> list[Path]:
    return sorted((Path(output) / "results").glob("part-*.parquet"))


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def scrape_metrics(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) for every sample on the Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = []
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def subprocess_env() -> dict[str, str]:
    """Environment for a driver started as a subprocess (unbuffered, quiet tokenizers)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


class JobInThread:
    """``run_job`` on a thread, so a test can hurt the cluster while the job runs; ``result()`` joins it and
    returns the report, or raises what the job raised."""

    def __init__(self, config, actor_cls=None):
        from pipeline.driver import run_job
        self._outcome: dict = {}

        def run():
            try:
                self._outcome["report"] = run_job(config, actor_cls=actor_cls or PacedActor)
            except BaseException as e:  # re-raised by result()
                self._outcome["error"] = e

        self._thread = threading.Thread(target=run)
        self._thread.start()

    def result(self, timeout: float):
        self._thread.join(timeout=timeout)
        assert not self._thread.is_alive(), f"the job did not end within {timeout} s"
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["report"]
