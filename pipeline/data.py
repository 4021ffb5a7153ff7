"""Generation as one step of your own data pipeline: a Ray Data ``map_batches`` class (:class:`Generate`), a
processor built like ray.data.llm's (:func:`build_processor`), and a function on in-memory tables for code
without Ray (:func:`generate_table`).

All turn rows into results exactly as an ``offline_batch`` job does (the same prompt column rules, per-row
overrides, row errors and result columns (:class:`pipeline.rows.OutputSpec`) appended after the input's own),
because all drive the job's :class:`pipeline.actor.EngineActor` in-process. ``Generate.__call__`` is async:
with ``ActorPoolStrategy(max_concurrent_calls_per_actor=k)``, k batches are in one actor's engine at once
(one engine loop per actor), so the next batch's rows start as the previous batch's finish, as in a job. What a job adds on top
(sharding, retries, resumable output files, stats) is left to the surrounding pipeline.

Ray Data::

    processor = build_processor(ProcessorConfig(model_source="Qwen/Qwen3-0.6B", batch_size=64, concurrency=4),
                                preprocess=lambda row: dict(prompt=row["question"],
                                                            sampling_params=dict(max_tokens=128)),
                                postprocess=lambda row: dict(id=row["id"], answer=row["generated_text"]))
    processor(ray.data.read_parquet("s3://bucket/prompts/")).write_parquet("s3://bucket/results/")

Without Ray::

    table = generate_table(pa.table({"prompt": ["Hello"]}), model="demo", max_tokens=8)
"""
import asyncio
import dataclasses
import itertools
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pyarrow as pa

from pipeline.actor import EngineActor
from pipeline.inputs import resolve_prompt_column
from pipeline.rows import RowSpec, check_defaults, output_spec

Batch = pa.Table | dict[str, Any] | Any   # an Arrow table, a dict of NumPy arrays, or a pandas DataFrame
Rows = TypeVar("Rows")                    # pa.Table or datasets.Dataset
Row = dict[str, Any]
PROMPT_COLUMN_OPTION = "prompt_column="   # how the prompt column is named in this module's Python API


class Generate:
    """A Ray Data callable class: ``ds.map_batches(Generate, fn_constructor_kwargs=..., compute=..., ...)``.

    Ray Data creates ``concurrency`` instances (one per actor); each loads the engine once in ``__init__``
    and then appends the result columns to every batch it gets. Give each actor its GPUs with
    ``num_gpus=tensor_parallel_size``; without GPUs the engine runs on CPU. ``__call__`` is a coroutine: with
    ``compute=ray.data.ActorPoolStrategy(size=N, max_concurrent_calls_per_actor=k)`` up to ``k`` batches share
    the actor's engine, their rows in one running batch.

    Constructor keyword arguments: ``model`` and every other ``engine.LLM`` argument (``max_model_len``,
    ``tensor_parallel_size``, ``device``, ``kvcache_block_size``, ...) go to the engine; ``prompt_column``,
    ``max_tokens``, ``temperature`` and ``top_p`` mean what the offline_batch flags of the same names mean;
    ``default_sampling_params`` sets any SamplingParams field for every row (``n``, ``logprobs``,
    ``json_schema``, ``choice``, penalties, ...; it wins over those three). An unknown field or a bad value
    raises ValueError here, before the engine loads. Per-row columns of the same names, ``seed``, or a
    ``sampling_params`` struct override them. ``log_level`` is the actor's own log level (INFO logs a line
    per batch).

    In the results, ``actor_id`` names this instance and ``shard_id`` numbers the batches it has run.
    """

    def __init__(self, model: str = "demo", *, prompt_column: str = "prompt", max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, default_sampling_params: dict[str, Any] | None = None,
                 log_level: str = "WARNING", **engine_kwargs: Any):
        actor_id, job_id = _identity()
        self.prompt_column = prompt_column
        defaults = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p) | (default_sampling_params or {})
        check_defaults(defaults)
        self.engine = EngineActor(actor_id, job_id, dict(model=model, **engine_kwargs),
                                  RowSpec(prompt_column, defaults), log_level=log_level)
        self.batch_ids = itertools.count()

    async def __call__(self, batch: Batch) -> pa.Table:
        """The batch's columns followed by the result columns, row for row."""
        table = to_arrow(batch)
        # Resolved per batch: the column rules (``messages`` when ``prompt`` is absent) and the result columns (a
        # batch whose rows may ask for n > 1 or logprobs) need the batch's schema.
        column = resolve_prompt_column(table.schema, self.prompt_column, PROMPT_COLUMN_OPTION)
        spec = self.engine.row_spec
        spec = dataclasses.replace(spec, prompt_column=column, outputs=output_spec(table.schema, spec.defaults))
        results = (await self.engine.run_shard(next(self.batch_ids), table, spec)).results
        return pa.Table.from_arrays([*table.columns, *results.columns],
                                    names=[*table.column_names, *results.column_names])

    def shutdown(self) -> None:
        """Free the engine now rather than when the instance is garbage-collected."""
        self.engine.shutdown()


# ----- a processor, as ray.data.llm builds them ------------------------------------------------------------------
@dataclass(frozen=True)
class ProcessorConfig:
    """What :func:`build_processor` needs; the fields named as in ray.data.llm's ``vLLMEngineProcessorConfig``
    mean the same here (docs/pipeline.md has the two side by side).

    ``model_source``: a model name as ``--model`` takes it. ``batch_size``: rows per ``__call__``.
    ``concurrency``: engine actors. ``max_concurrent_batches``: batches in one actor's engine at once.
    ``engine_kwargs``: other ``engine.LLM`` arguments (``max_model_len``, ``device``, ``tensor_parallel_size``,
    ...). Ours: ``prompt_column``; ``default_sampling_params`` (any SamplingParams fields) for rows whose
    ``sampling_params`` lack them; ``num_gpus`` per actor (default: ``tensor_parallel_size`` on a cluster with
    GPUs, else 0).
    """
    model_source: str = "demo"
    batch_size: int = 64
    concurrency: int = 1
    max_concurrent_batches: int = 4
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    prompt_column: str = "prompt"
    default_sampling_params: dict[str, Any] = field(default_factory=dict)
    num_gpus: float | None = None

    def __post_init__(self) -> None:
        for name in ("batch_size", "concurrency", "max_concurrent_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"ProcessorConfig.{name}={getattr(self, name)!r} must be >= 1")
        if self.default_sampling_params:  # checked here, not in each Ray Data actor as it starts
            check_defaults(self.default_sampling_params)

    def generate_kwargs(self) -> dict[str, Any]:
        """``Generate``'s constructor arguments."""
        return dict(model=self.model_source, prompt_column=self.prompt_column,
                    default_sampling_params=self.default_sampling_params, **self.engine_kwargs)

    def gpus_per_actor(self) -> float:
        if self.num_gpus is not None:
            return self.num_gpus
        if self.engine_kwargs.get("device") == "cpu":
            return 0.0
        import ray
        has_gpus = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1
        return float(self.engine_kwargs.get("tensor_parallel_size", 1)) if has_gpus else 0.0


@dataclass(frozen=True)
class Processor:
    """``processor(ds)``: ``preprocess`` (row → row), generation, ``postprocess`` (row → row) on a Ray Dataset."""
    config: ProcessorConfig
    preprocess: Callable[[Row], Row] | None = None
    postprocess: Callable[[Row], Row] | None = None

    def __call__(self, ds: Any) -> Any:
        import ray.data
        c = self.config
        if self.preprocess is not None:
            ds = ds.map(self.preprocess)
        ds = ds.map_batches(
            Generate, fn_constructor_kwargs=c.generate_kwargs(), batch_size=c.batch_size, batch_format="pyarrow",
            # As ray.data.llm: max_concurrent_batches calls at once per actor (its Ray max_concurrency), and twice as
            # many tasks in flight, so that a next batch is always at hand.
            compute=ray.data.ActorPoolStrategy(size=c.concurrency,
                                               max_tasks_in_flight_per_actor=2 * c.max_concurrent_batches,
                                               max_concurrent_calls_per_actor=c.max_concurrent_batches),
            num_gpus=c.gpus_per_actor())
        if self.postprocess is not None:
            ds = ds.map(self.postprocess)
        return ds


def build_processor(config: ProcessorConfig, preprocess: Callable[[Row], Row] | None = None,
                    postprocess: Callable[[Row], Row] | None = None) -> Processor:
    """As ``ray.data.llm.build_processor``: ``preprocess`` makes each row's ``prompt`` (or ``messages``) and
    optional ``sampling_params`` (a dict of SamplingParams fields); ``postprocess`` sees every column plus
    the result columns (``generated_text``, ``generated_token_ids``, ``num_generated_tokens``, ...)."""
    return Processor(config, preprocess, postprocess)


# ----- without Ray -----------------------------------------------------------------------------------------------
def generate_table(rows: Rows, model: str = "demo", **kwargs: Any) -> Rows:
    """Generate for every row of a ``pyarrow.Table`` or Hugging Face ``datasets.Dataset``, in this process.

    Returns the same kind of object with the result columns appended. ``kwargs`` are :class:`Generate`'s.
    The columns are checked before the engine loads; the engine is loaded for this call and freed after it.
    To run several tables on one loaded engine, call a ``Generate(...)`` instance on each table instead.
    """
    table, hf_dataset = _as_table(rows)
    resolve_prompt_column(table.schema, kwargs.get("prompt_column", "prompt"), PROMPT_COLUMN_OPTION)
    generate = Generate(model, **kwargs)
    try:
        results = run_sync(generate(table))
    finally:
        generate.shutdown()
    return type(rows)(results) if hf_dataset else results


def run_sync(coroutine: Coroutine) -> Any:
    """Run ``coroutine`` to its end from synchronous code, also where an event loop already runs (a notebook)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _as_table(rows: Any) -> tuple[pa.Table, bool]:
    """(rows as an Arrow table, whether they came as a ``datasets.Dataset``)."""
    if isinstance(rows, pa.Table):
        return rows, False
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(rows, datasets.Dataset):
        return rows.with_format("arrow")[:], True  # [:] applies a select/shuffle's indices
    raise TypeError(f"expected a pyarrow.Table or datasets.Dataset, got {type(rows).__name__}")


def to_arrow(batch: Batch) -> pa.Table:
    """An Arrow table from any Ray Data batch format. NaN in NumPy/pandas columns becomes null, as pandas
    means it (an integer column with missing values arrives as floats with NaN)."""
    if isinstance(batch, pa.Table):
        return batch
    if isinstance(batch, dict):
        return pa.table({name: pa.array(values, from_pandas=True) for name, values in batch.items()})
    return pa.Table.from_pandas(batch, preserve_index=False)


def _identity() -> tuple[str, str]:
    """(actor id, job id) for the result rows and metric tags: Ray's ids inside a Ray actor, else local ones."""
    import ray
    if ray.is_initialized():
        context = ray.get_runtime_context()
        if context.get_actor_id():
            return f"data-{context.get_actor_id()[:8]}", context.get_job_id()
    return f"local-{os.getpid()}", "local"
