"""Rows → engine requests, and engine outputs → result columns.

Pure functions over Arrow tables: the engine's ``encode_prompt`` and ``SamplingParams`` are passed in,
so this module runs (and is tested) without the engine. A row that cannot become a request gets an
error instead; it never stops the other rows of its shard.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

# Per-row columns that override the job's sampling flags (null: use the flag).
OVERRIDE_COLUMNS = ("max_tokens", "temperature", "top_p", "seed")
# A per-row struct (or map) of any SamplingParams fields, as ray.data.llm's ``sampling_params``; the override
# columns above win over its fields.
SAMPLING_PARAMS_COLUMN = "sampling_params"
INTEGER_FIELDS = ("max_tokens", "seed", "top_k")   # whole floats (pandas: int columns with nulls) become ints

# Columns appended after the input's own, in this order, in every part file.
OUTPUT_SCHEMA = pa.schema([
    ("generated_text", pa.string()),
    ("generated_token_ids", pa.list_(pa.int32())),
    ("num_prompt_tokens", pa.int32()),
    ("num_cached_tokens", pa.int32()),
    ("num_generated_tokens", pa.int32()),
    ("finish_reason", pa.string()),      # "stop" | "length" | "error"
    ("error", pa.string()),              # null, or why the row failed
    ("ttft_s", pa.float64()),
    ("latency_s", pa.float64()),
    ("actor_id", pa.string()),
    ("shard_id", pa.int64()),
])


@dataclass(frozen=True)
class RowSpec:
    """How to read a row: where its prompt is and the job-wide sampling defaults."""
    prompt_column: str
    max_tokens: int
    temperature: float
    top_p: float


@dataclass
class Request:
    index: int              # row index within the table
    prompt_ids: list[int]
    params: Any             # engine.SamplingParams


def prepare_requests(table: pa.Table, spec: RowSpec, encode: Callable[[Any, int], list[int]],
                     make_params: Callable[..., Any]) -> tuple[list[Request], dict[int, str]]:
    """Validate each row; return the runnable requests and ``{row index: error}`` for the rest.

    ``encode(prompt, max_tokens)`` is the engine's ``encode_prompt``: it raises ValueError for a null, empty,
    non-text, too long or never-fitting prompt and for broken chat messages.
    """
    prompts = table.column(spec.prompt_column).to_pylist()
    overrides = {name: table.column(name).to_pylist() for name in OVERRIDE_COLUMNS if name in table.column_names}
    row_params = (table.column(SAMPLING_PARAMS_COLUMN).to_pylist() if SAMPLING_PARAMS_COLUMN in table.column_names
                  else [None] * table.num_rows)
    requests: list[Request] = []
    errors: dict[int, str] = {}
    for i, prompt in enumerate(prompts):
        try:
            fields = {**dict(row_params[i] or {}), **{name: values[i] for name, values in overrides.items()}}
            params = make_params(**sampling_kwargs(fields, spec))
        except (ValueError, TypeError) as e:  # TypeError: a sampling_params field SamplingParams does not have
            errors[i] = f"invalid sampling override: {e}"
            continue
        try:
            requests.append(Request(i, encode(prompt, params.max_tokens), params))
        except ValueError as e:
            errors[i] = f"invalid prompt: {e}"
        except Exception as e:  # the tokenizer itself broke on this row: fail the row, not the shard
            errors[i] = f"prompt could not be tokenized: {type(e).__name__}: {e}"
    return requests, errors


def sampling_kwargs(overrides: dict[str, Any], spec: RowSpec) -> dict[str, Any]:
    """SamplingParams keyword arguments: the row's non-null overrides on top of the job's defaults.

    Integer fields read from float columns (pandas turns int columns with nulls into floats) are
    converted when they hold whole numbers; anything else is left for SamplingParams to reject.
    """
    kwargs: dict[str, Any] = dict(max_tokens=spec.max_tokens, temperature=spec.temperature, top_p=spec.top_p)
    for name, value in overrides.items():
        if value is None:
            continue
        if name in INTEGER_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        kwargs[name] = value
    return kwargs


def build_result_table(num_rows: int, outputs: dict[int, dict], errors: dict[int, str], actor_id: str | None,
                       shard_id: int) -> pa.Table:
    """The :data:`OUTPUT_SCHEMA` columns for ``num_rows`` rows: each row has an engine output or an error."""
    missing = set(range(num_rows)) - outputs.keys() - errors.keys()
    if missing:
        raise ValueError(f"rows {sorted(missing)[:5]} have neither an output nor an error")
    cols: dict[str, list] = {name: [] for name in OUTPUT_SCHEMA.names}
    for i in range(num_rows):
        out = outputs.get(i)
        if out is None:
            row = dict(finish_reason="error", error=errors[i])
        else:
            row = dict(generated_text=out["text"], generated_token_ids=out["token_ids"],
                       num_prompt_tokens=out["num_prompt_tokens"], num_cached_tokens=out["num_cached_tokens"],
                       num_generated_tokens=len(out["token_ids"]), finish_reason=out["finish_reason"],
                       ttft_s=out["ttft_s"], latency_s=out["latency_s"])
        row.update(actor_id=actor_id, shard_id=shard_id)
        for name in OUTPUT_SCHEMA.names:
            cols[name].append(row.get(name))
    return pa.table(cols, schema=OUTPUT_SCHEMA)


def error_result_table(num_rows: int, error: str, actor_id: str | None, shard_id: int) -> pa.Table:
    """Result columns that mark every row failed with the same ``error``."""
    return build_result_table(num_rows, {}, {i: error for i in range(num_rows)}, actor_id, shard_id)
