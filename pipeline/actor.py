"""The engine actor: one Ray actor owns one engine, loads the model once, and runs shards until stopped.

The driver keeps up to :data:`MAX_SHARDS_IN_FLIGHT` shards at each actor so that its engine never drains
between shards. The actor is threaded: each ``run_shard`` call runs in a Ray thread of its own, validates its
rows and hands the requests to the *engine loop*, the one thread that touches the engine. The loop adds new
requests between steps, so the next shard's rows join the running batch while the previous shard finishes,
and hands each finished row back to the shard it came from.
"""
import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.logs import actor_logger, tag_logger
from pipeline.metrics import ActorMetrics
from pipeline.rows import RowSpec, build_result_table, prepare_requests

MAX_SHARDS_IN_FLIGHT = 2   # per actor: the one running and the next, already waiting at the actor


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
    results: pa.Table        # the OUTPUT_SCHEMA columns, one row per input row, in order
    steps: pa.Table          # the engine steps attributed to this shard, tagged with actor_id and shard_id
    stats: dict[str, Any]    # the counters of pipeline.stats.SHARD_COUNTERS


@dataclass(eq=False)
class ShardRun:
    """One shard's requests in the engine: filled in by the engine loop, awaited by ``run_shard``."""
    prompts: list[list[int]] = field(default_factory=list)
    params: list[Any] = field(default_factory=list)
    outputs: list[dict | None] = field(default_factory=list)   # by request index, as LLMEngine.generate
    remaining: int = 0
    steps: list[dict[str, Any]] = field(default_factory=list)  # the step records attributed to this shard
    times: dict[str, float | int] = field(default_factory=lambda: dict(prefill_time_s=0.0, decode_time_s=0.0,
                                                                      steps=0))
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def finish(self, error: BaseException | None = None) -> None:
        self.error = error
        self.done.set()


class EngineActor:
    """Wrapped with ``ray.remote`` by the driver: ``num_gpus = tensor_parallel_size`` on GPU, one CPU on CPU, and
    ``max_concurrency = MAX_SHARDS_IN_FLIGHT``.

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
        self.make_params = SamplingParams
        with _engine_log_tag(actor_id):
            self.llm = LLM(**engine_kwargs)
        self.load_time_s = time.perf_counter() - started
        self.metrics = ActorMetrics(job_id, actor_id)
        self.inbox: queue.Queue[ShardRun | None] = queue.Queue()   # None stops the engine loop
        self.inbox_lock = threading.Lock()      # orders submissions against the loop stopping
        self.loop_error: BaseException | None = None
        self.current = threading.local()        # .run: the ShardRun of the run_shard call in this thread
        self.loop = threading.Thread(target=self._engine_loop, name=f"engine-loop-{actor_id}", daemon=True)
        self.loop.start()
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
        requests, errors = prepare_requests(table, self.row_spec, self.llm.encode_prompt, self.make_params)
        run = self.current.run = ShardRun()
        outputs: dict[int, dict] = {}
        if requests:
            generated = self._generate([r.prompt_ids for r in requests], [r.params for r in requests])
            outputs = {r.index: out for r, out in zip(requests, generated, strict=True)}
        results = build_result_table(table.num_rows, outputs, errors, self.actor_id, shard_id)
        busy_s = time.perf_counter() - started
        stats = dict(rows=table.num_rows, rows_ok=len(outputs), rows_failed=len(errors),
                     prompt_tokens=sum(o["num_prompt_tokens"] for o in outputs.values()),
                     generated_tokens=sum(len(o["token_ids"]) for o in outputs.values()), busy_s=busy_s, **run.times)
        self.metrics.on_shard(len(outputs), len(errors))
        steps = pa.Table.from_pylist(run.steps)
        if steps.num_rows:
            steps = steps.append_column("actor_id", pa.array([self.actor_id] * steps.num_rows, pa.string()))
            steps = steps.append_column("shard_id", pa.array([shard_id] * steps.num_rows, pa.int64()))
        self.log.info("shard %d: %d rows (%d failed), %d tokens in %.2fs", shard_id, table.num_rows, len(errors),
                      stats["generated_tokens"], busy_s)
        return ShardResult(results, steps, stats)

    def _generate(self, prompts: list[list[int]], params: list[Any]) -> list[dict]:
        """The shard's one call into the engine (tests override it to inject faults): hand the requests to the
        engine loop and wait for all of them. Its signature predates the loop, so the shard's ``ShardRun``
        comes through ``self.current``, set by ``run_shard`` in this thread."""
        run = self.current.run
        run.prompts, run.params, run.outputs, run.remaining = prompts, params, [None] * len(prompts), len(prompts)
        with self.inbox_lock:
            if self.loop_error is not None:
                raise self.loop_error
            self.inbox.put(run)
        run.done.wait()
        if run.error is not None:
            raise run.error
        return run.outputs

    # ----- the engine loop ---------------------------------------------------------------------------------------
    def _engine_loop(self) -> None:
        """Admit new shards' requests between steps, step, hand finished rows back to their shards.

        Each step is recorded once, under the shard with the most sequences in its batch (the older shard on
        a tie), and its time counts toward that shard's prefill or decode time. If the engine raises, every
        shard in flight here fails with that exception (the driver then replaces the actor and retries them),
        and so does every later one.
        """
        owners: dict[int, tuple[ShardRun, Any]] = {}   # seq_id -> (its shard, the engine Sequence), by arrival
        error: BaseException = RuntimeError(f"{self.actor_id}'s engine was shut down")
        try:
            while True:
                for run in self._take_new(wait=not owners):
                    if run is None:
                        return
                    for i, (prompt_ids, params) in enumerate(zip(run.prompts, run.params)):
                        seq = self.llm.add_request(prompt_ids, params, i)
                        owners[seq.seq_id] = (run, seq)
                if not owners:
                    continue
                out = self.llm.step()
                # Count the sequences that got tokens this step per shard (a step of prompt chunks alone gets
                # none: it goes to the oldest shard).
                in_batch = Counter(run for seq_id, (run, _) in owners.items() if seq_id in out.new_tokens)
                oldest = next(iter(owners.values()))[0]
                self._attribute(out.record.to_dict(), max(in_batch, key=in_batch.__getitem__, default=oldest))
                for seq in out.finished:
                    run, _ = owners.pop(seq.seq_id)
                    run.outputs[seq.index] = self.llm.result(seq)
                    run.remaining -= 1
                    if not run.remaining:
                        run.finish()
        except BaseException as e:
            error = e
            self.log.error("engine loop failed: %s: %s", type(e).__name__, e)
        finally:
            with self.inbox_lock:
                self.loop_error = error
                pending = self._take_new(wait=False)
            for run in {run for run, _ in owners.values()} | {run for run in pending if run is not None}:
                run.finish(error)

    def _take_new(self, wait: bool) -> list[ShardRun | None]:
        """Everything in the inbox; with ``wait``, block until there is something."""
        items = [self.inbox.get()] if wait else []
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                return items

    def _attribute(self, record: dict[str, Any], run: ShardRun) -> None:
        self.metrics.on_step(record)
        run.steps.append(record)
        run.times["steps"] += 1
        run.times[f"{record['phase']}_time_s"] += record["step_time_s"]

    def shutdown(self) -> None:
        self.log.info("shutting down")
        self.inbox.put(None)
        self.loop.join()
        self.llm.shutdown()
