"""Generation as one step of your own data pipeline: a Ray Data ``map_batches`` class, and a function on
in-memory tables for code without Ray.

Both turn rows into results exactly as an ``offline_batch`` job does (the same prompt column rules,
per-row overrides, row errors and :data:`pipeline.rows.OUTPUT_SCHEMA` columns appended after the input's
own), because both drive the job's :class:`pipeline.actor.EngineActor` in-process. What a job adds on
top (sharding, retries, resumable output files, stats) is left to the surrounding pipeline.

Ray Data::

    ds = ray.data.read_parquet("s3://bucket/prompts/")
    ds = ds.map_batches(Generate, fn_constructor_kwargs=dict(model="Qwen/Qwen3-0.6B", max_tokens=128),
                        concurrency=4, num_gpus=1, batch_size=256, batch_format="pyarrow")
    ds.write_parquet("s3://bucket/results/")

Without Ray::

    table = generate_table(pa.table({"prompt": ["Hello"]}), model="demo", max_tokens=8)
"""
import dataclasses
import os
from typing import Any, TypeVar

import pyarrow as pa

from pipeline.actor import EngineActor
from pipeline.inputs import resolve_prompt_column
from pipeline.rows import OUTPUT_SCHEMA, RowSpec

Batch = pa.Table | dict[str, Any] | Any   # an Arrow table, a dict of NumPy arrays, or a pandas DataFrame
Rows = TypeVar("Rows")                    # pa.Table or datasets.Dataset


class Generate:
    """A Ray Data callable class: ``ds.map_batches(Generate, fn_constructor_kwargs=..., concurrency=N, ...)``.

    Ray Data creates ``concurrency`` instances (one per actor); each loads the engine once in ``__init__``
    and then appends the result columns to every batch it gets. Give each actor its GPUs with
    ``num_gpus=tensor_parallel_size``; without GPUs the engine runs on CPU. ``batch_size`` rows are
    generated together, so a larger batch keeps the engine's running batch fuller.

    Constructor keyword arguments: ``model`` and every other ``engine.LLM`` argument (``max_model_len``,
    ``tensor_parallel_size``, ``device``, ``kvcache_block_size``, ...) go to the engine; ``prompt_column``,
    ``max_tokens``, ``temperature`` and ``top_p`` mean what the offline_batch flags of the same names mean,
    and per-row ``max_tokens``/``temperature``/``top_p``/``seed`` columns override them.

    In the results, ``actor_id`` names this instance and ``shard_id`` counts the batches it has run.
    """

    def __init__(self, model: str = "demo", *, prompt_column: str = "prompt", max_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, **engine_kwargs: Any):
        actor_id, job_id = _identity()
        self.prompt_column = prompt_column
        self.engine = EngineActor(actor_id, job_id, dict(model=model, **engine_kwargs),
                                  RowSpec(prompt_column, max_tokens, temperature, top_p), log_level="INFO")
        self.batches_run = 0

    def __call__(self, batch: Batch) -> pa.Table:
        """The batch's columns followed by the :data:`~pipeline.rows.OUTPUT_SCHEMA` columns, row for row."""
        table = to_arrow(batch)
        # Resolved per batch: the column rules (``messages`` when ``prompt`` is absent) need the batch's schema.
        column = resolve_prompt_column(table.schema, self.prompt_column)
        self.engine.row_spec = dataclasses.replace(self.engine.row_spec, prompt_column=column)
        results = self.engine.run_shard(self.batches_run, table).results
        self.batches_run += 1
        return pa.Table.from_arrays([*table.columns, *results.columns],
                                    names=[*table.column_names, *OUTPUT_SCHEMA.names])

    def shutdown(self) -> None:
        """Free the engine now rather than when the instance is garbage-collected."""
        self.engine.shutdown()


def generate_table(rows: Rows, model: str = "demo", **kwargs: Any) -> Rows:
    """Generate for every row of a ``pyarrow.Table`` or Hugging Face ``datasets.Dataset``, in this process.

    Returns the same kind of object with the result columns appended. ``kwargs`` are :class:`Generate`'s.
    The engine is loaded for this call and freed after it; to run several tables on one loaded engine,
    call a ``Generate(...)`` instance on each table instead.
    """
    table, hf_dataset = _as_table(rows)
    generate = Generate(model, **kwargs)
    try:
        results = generate(table)
    finally:
        generate.shutdown()
    return type(rows)(results) if hf_dataset else results


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
