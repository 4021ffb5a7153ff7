"""The engine actor: one Ray actor owns one engine, loads the model once, and runs shards until stopped."""
import os
import time
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.logs import actor_logger, tag_logger
from pipeline.metrics import ActorMetrics
from pipeline.rows import RowSpec, build_result_table, prepare_requests


@dataclass
class ShardResult:
    results: pa.Table        # the OUTPUT_SCHEMA columns, one row per input row, in order
    steps: pa.Table          # the engine's step records while running it, tagged with actor_id and shard_id
    stats: dict[str, Any]    # the counters of pipeline.stats.SHARD_COUNTERS


class EngineActor:
    """Wrapped with ``ray.remote`` by the driver: ``num_gpus = tensor_parallel_size`` on GPU, one CPU on CPU.

    The engine is imported here, in the actor's process, after Ray applied the actor's ``runtime_env``
    (which sets ``NANOVLLM_LOG_LEVEL``), so the engine's loggers start at the job's level.
    """

    def __init__(self, actor_id: str, job_id: str, engine_kwargs: dict[str, Any], row_spec: RowSpec,
                 log_level: str):
        self.actor_id = actor_id
        self.row_spec = row_spec
        self.log = actor_logger(actor_id, log_level)
        started = time.perf_counter()
        from engine import LLM, SamplingParams
        tag_logger("nanovllm", actor_id)
        self.make_params = SamplingParams
        self.llm = LLM(**engine_kwargs)
        self.load_time_s = time.perf_counter() - started
        self.metrics = ActorMetrics(job_id, actor_id)
        self.step_records: list[dict[str, Any]] = []
        self.llm.add_step_callback(self._on_step)
        self.log.info("engine ready in %.1fs: model=%s device=%s pid=%d", self.load_time_s,
                      engine_kwargs.get("model"), self.llm.config.device, os.getpid())

    def __repr__(self) -> str:  # Ray's prefix for this actor's forwarded log lines, and its dashboard name
        return f"EngineActor[{self.actor_id}]"

    def ready(self) -> dict[str, Any]:
        import ray
        return dict(actor_id=self.actor_id, pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                    load_time_s=self.load_time_s)

    def run_shard(self, shard_id: int, table: pa.Table) -> ShardResult:
        """Generate for every row of ``table``; rows that cannot run get an error instead of a result."""
        started = time.perf_counter()
        before = dict(self.llm.stats)
        self.step_records = []
        requests, errors = prepare_requests(table, self.row_spec, self.llm.encode_prompt, self.make_params)
        outputs: dict[int, dict] = {}
        if requests:
            generated = self._generate([r.prompt_ids for r in requests], [r.params for r in requests])
            outputs = {r.index: out for r, out in zip(requests, generated, strict=True)}
        results = build_result_table(table.num_rows, outputs, errors, self.actor_id, shard_id)
        busy_s = time.perf_counter() - started
        after = self.llm.stats
        stats = dict(rows=table.num_rows, rows_ok=len(outputs), rows_failed=len(errors),
                     prompt_tokens=sum(o["num_prompt_tokens"] for o in outputs.values()),
                     generated_tokens=sum(len(o["token_ids"]) for o in outputs.values()), busy_s=busy_s,
                     **{k: after[k] - before[k] for k in ("prefill_time_s", "decode_time_s", "steps")})
        self.metrics.on_shard(len(outputs), len(errors))
        steps = pa.Table.from_pylist(self.step_records)
        if steps.num_rows:
            steps = steps.append_column("actor_id", pa.array([self.actor_id] * steps.num_rows, pa.string()))
            steps = steps.append_column("shard_id", pa.array([shard_id] * steps.num_rows, pa.int64()))
        self.log.info("shard %d: %d rows (%d failed), %d tokens in %.2fs", shard_id, table.num_rows, len(errors),
                      stats["generated_tokens"], busy_s)
        return ShardResult(results, steps, stats)

    def _generate(self, prompts: list[list[int]], params: list[Any]) -> list[dict]:
        """The shard's one call into the engine (tests override it to inject faults)."""
        return self.llm.generate(prompts, params, use_tqdm=False)

    def _on_step(self, record) -> None:
        row = record.to_dict()
        self.step_records.append(row)
        self.metrics.on_step(row)

    def shutdown(self) -> None:
        self.log.info("shutting down")
        self.llm.shutdown()
