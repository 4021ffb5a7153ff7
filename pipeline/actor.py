"""The engine actor: one Ray actor owns one engine, loads the model once, and runs shards until stopped.

It is an async actor: any number of ``run_shard`` calls can be in flight. Each validates its rows (in one
worker thread, off the event loop) and submits the requests to the actor's :class:`EngineLoop`, which admits
them between steps, so rows of the next shards join the running batch as earlier rows finish. The driver
keeps every actor supplied (:meth:`EngineActor.wait_for_capacity`): about ``FEED_FACTOR`` x the engine's
``max_num_seqs`` rows outstanding, a full batch running and as many waiting to replace the rows that finish.
"""
import asyncio
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.engine_loop import BatchOutput, EngineLoop
from pipeline.logs import actor_logger, tag_logger
from pipeline.metrics import ActorMetrics
from pipeline.rows import RowSpec, build_result_table, prepare_requests

FEED_FACTOR = 2   # outstanding rows per actor, in multiples of the engine's max_num_seqs


@contextmanager
def _engine_log_tag(actor_id: str) -> Iterator[None]:
    """Tag the engine's log lines with the actor id while it starts: ``NANOVLLM_LOG_TAG`` reaches its own handler
    (re-configured here, as the engine may have been imported before) and the tensor-parallel worker ranks it
    spawns; the variable is restored afterwards, so an in-process user (``pipeline.data``) keeps its environment."""
    previous = os.environ.get("NANOVLLM_LOG_TAG")
    os.environ["NANOVLLM_LOG_TAG"] = actor_id
    try:
        from engine.logger import configure
        configure()
        if logging.getLogger().handlers:  # the application's handlers format the engine's lines: tag those
            tag_logger("nanovllm", actor_id)
        yield
    finally:
        if previous is None:
            del os.environ["NANOVLLM_LOG_TAG"]
        else:
            os.environ["NANOVLLM_LOG_TAG"] = previous


@dataclass
class ShardResult:
    results: pa.Table        # the result columns (RowSpec.outputs), one row per input row, in order
    steps: pa.Table          # the engine steps attributed to this shard, tagged with actor_id and shard_id
    stats: dict[str, Any]    # the counters of pipeline.stats.SHARD_COUNTERS
    rows_finished: int       # rows this actor has finished so far (all shards): the driver's view of its load


class EngineActor:
    """Wrapped with ``ray.remote`` by the driver: ``num_gpus = tensor_parallel_size`` on GPU, one CPU on CPU.

    The engine is imported here, in the actor's process, after Ray applied the actor's ``runtime_env``
    (which sets ``NANOVLLM_LOG_LEVEL``), so the engine's loggers start at the job's level. Used in-process by
    :mod:`pipeline.data` too.
    """

    def __init__(self, actor_id: str, job_id: str, engine_kwargs: dict[str, Any], row_spec: RowSpec,
                 log_level: str):
        self.actor_id = actor_id
        self.row_spec = row_spec
        self.log = actor_logger(actor_id, log_level)
        self.started_at = time.time()  # the job's start-up timeline (stats.json) places the actor's start by it
        started = time.perf_counter()
        from engine import LLM, SamplingParams
        self.params_class = SamplingParams
        with _engine_log_tag(actor_id):
            self.llm = LLM(**engine_kwargs)
        self.load_time_s = time.perf_counter() - started
        self.metrics = ActorMetrics(job_id, actor_id)
        self.engine = EngineLoop(self.llm, f"engine-loop-{actor_id}", self.metrics.on_step)
        self.validator = ThreadPoolExecutor(1, thread_name_prefix=f"rows-{actor_id}")  # one tokenizer user at a time
        # pyarrow imports pandas (if installed) on its first table: half a second that would otherwise stall the
        # actor's event loop, and so the feeding of its engine, at the first shard.
        build_result_table(0, {}, {}, actor_id, 0, row_spec.outputs)
        self.log.info("engine ready in %.1fs: model=%s device=%s pid=%d", self.load_time_s,
                      engine_kwargs.get("model"), self.llm.config.device, os.getpid())

    def __repr__(self) -> str:  # Ray's prefix for this actor's forwarded log lines, and its dashboard name
        return f"EngineActor[{self.actor_id}]"

    async def ready(self) -> dict[str, Any]:
        import ray
        return dict(actor_id=self.actor_id, pid=os.getpid(), node_id=ray.get_runtime_context().get_node_id(),
                    started_at=self.started_at, load_time_s=self.load_time_s,
                    target_rows=FEED_FACTOR * self.llm.config.max_num_seqs)

    async def run_shard(self, shard_id: int, table: pa.Table, row_spec: RowSpec | None = None) -> ShardResult:
        """Generate for every row of ``table``; rows that cannot run get an error instead of a result.
        ``row_spec`` overrides the actor's own (a Ray Data batch may name its prompt column differently)."""
        started = time.perf_counter()
        spec = row_spec or self.row_spec
        requests, errors = await asyncio.get_running_loop().run_in_executor(
            self.validator, prepare_requests, table, spec, self.llm.encode_prompt, self._make_params)
        self.engine.finished_rows.add(len(errors))
        generated = await self._generate([r.prompt_ids for r in requests], [r.params for r in requests])
        outputs = {r.index: out for r, out in zip(requests, generated.outputs, strict=True)}
        results = build_result_table(table.num_rows, outputs, errors, self.actor_id, shard_id, spec.outputs)
        busy_s = time.perf_counter() - started
        stats = dict(rows=table.num_rows, rows_ok=len(outputs), rows_failed=len(errors),
                     prompt_tokens=sum(out[0]["num_prompt_tokens"] for out in outputs.values()),
                     generated_tokens=sum(len(c["token_ids"]) for out in outputs.values() for c in out),
                     busy_s=busy_s, **generated.times)
        self.metrics.on_shard(len(outputs), len(errors), stats["generated_tokens"])
        self.log.info("shard %d: %d rows (%d failed), %d tokens in %.2fs", shard_id, table.num_rows, len(errors),
                      stats["generated_tokens"], busy_s)
        return ShardResult(results, self._tag_steps(generated.steps, shard_id), stats, self.engine.finished_rows.count)

    def _make_params(self, **kwargs: Any) -> Any:
        """A row's SamplingParams, checked against the model (its output constraint compiled, in this worker
        thread while the engine runs), so that a bad one fails its row instead of the engine's step."""
        params = self.params_class(**kwargs)
        self.llm.check_params(params)
        return params

    async def _generate(self, prompts: list[list[int]], params: list[Any]) -> BatchOutput:
        """The shard's one call into the engine (tests override it to inject faults)."""
        return await asyncio.wrap_future(self.engine.submit(prompts, params))

    async def wait_for_capacity(self, rows_finished: int) -> int:
        """Return once this actor has finished ``rows_finished`` rows (at once if it has): how many it has."""
        return await asyncio.wrap_future(self.engine.finished_rows.when_at_least(rows_finished))

    def _tag_steps(self, records: list[dict[str, Any]], shard_id: int) -> pa.Table:
        steps = pa.Table.from_pylist(records)
        if steps.num_rows:
            steps = steps.append_column("actor_id", pa.array([self.actor_id] * steps.num_rows, pa.string()))
            steps = steps.append_column("shard_id", pa.array([shard_id] * steps.num_rows, pa.int64()))
        return steps

    def shutdown(self) -> None:
        self.log.info("shutting down")
        self.engine.stop()
        self.validator.shutdown(wait=False, cancel_futures=True)
        self.llm.shutdown()
