"""Rows → engine requests, and engine outputs → result columns.

Pure functions over Arrow tables: the engine's ``encode_prompt`` and ``SamplingParams`` are passed in,
so this module runs (and is tested) without a loaded engine (only :func:`check_defaults` imports it). A row
that cannot become a request gets an error instead; it never stops the other rows of its shard.
"""
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

# Per-row columns that override the job's sampling settings (null: the job's setting), by the kind of Arrow
# column each takes (pipeline.inputs checks the types): SamplingParams fields of the same names.
OVERRIDE_COLUMNS = {
    **dict.fromkeys(("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "min_tokens", "logprobs",
                     "prompt_logprobs", "repetition_penalty", "presence_penalty", "frequency_penalty"), "number"),
    **dict.fromkeys(("json_schema", "regex", "grammar"), "text"),   # json_schema: the schema as a JSON string
    "json_object": "bool",
    "choice": "texts",
    "stop": "text or texts",
}
# A per-row struct (or map) of any SamplingParams fields, as ray.data.llm's ``sampling_params``; the override
# columns above win over its fields.
SAMPLING_PARAMS_COLUMN = "sampling_params"
INTEGER_FIELDS = ("max_tokens", "seed", "top_k", "n", "min_tokens", "logprobs", "prompt_logprobs")
# At most one of these constrains a request; a row's own constraint replaces the job's.
STRUCTURED_FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")

# Columns appended after the input's own, in this order, in every part file (see OutputSpec for the variants).
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
COMPLETION_COLUMNS = ("generated_text", "generated_token_ids", "num_generated_tokens", "finish_reason")
TOP_LOGPROBS = pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))
GENERATED_LOGPROB_FIELDS = [pa.field("generated_logprobs", pa.list_(pa.float32())),
                            pa.field("generated_top_logprobs", TOP_LOGPROBS)]
PROMPT_LOGPROB_FIELDS = [pa.field("prompt_token_logprobs", pa.list_(pa.float32())),
                         pa.field("prompt_top_logprobs", TOP_LOGPROBS)]


@dataclass(frozen=True)
class OutputSpec:
    """Which result columns a job writes; the same for every shard of a job, so its part files share one schema.

    ``completions``: rows may ask for n > 1 completions, so the per-completion columns (COMPLETION_COLUMNS and the
    generated logprobs) are lists with one item per completion, for every row. ``logprobs`` / ``prompt_logprobs``:
    rows may ask for them, so their columns are there (null for rows that did not ask)."""
    completions: bool = False
    logprobs: bool = False
    prompt_logprobs: bool = False

    def schema(self) -> pa.Schema:
        fields = [pa.field(f.name, pa.list_(f.type)) if self.completions and f.name in COMPLETION_COLUMNS else f
                  for f in OUTPUT_SCHEMA]
        if self.logprobs:
            fields += [pa.field(f.name, pa.list_(f.type)) if self.completions else f for f in GENERATED_LOGPROB_FIELDS]
        if self.prompt_logprobs:
            fields += PROMPT_LOGPROB_FIELDS
        return pa.schema(fields)


ALL_RESULT_COLUMNS = OutputSpec(completions=True, logprobs=True, prompt_logprobs=True).schema().names


def output_spec(schema: pa.Schema, defaults: dict[str, Any]) -> OutputSpec:
    """The columns a job over inputs of ``schema`` writes, given the job's sampling ``defaults``: whatever any row
    could ask for (through an override column, a ``sampling_params`` field, or the defaults)."""
    per_row = set(schema.names)
    if SAMPLING_PARAMS_COLUMN in per_row:
        t = schema.field(SAMPLING_PARAMS_COLUMN).type
        per_row |= {t.field(i).name for i in range(t.num_fields)} if pa.types.is_struct(t) else set(OVERRIDE_COLUMNS)

    def asked(name: str, off: object) -> bool:
        return name in per_row or defaults.get(name, off) != off

    return OutputSpec(completions=asked("n", 1), logprobs=asked("logprobs", None),
                      prompt_logprobs=asked("prompt_logprobs", None))


@dataclass(frozen=True)
class RowSpec:
    """How to read a row: where its prompt is, the job-wide SamplingParams defaults, and the columns to write."""
    prompt_column: str
    defaults: dict[str, Any]
    outputs: OutputSpec = OutputSpec()


def check_defaults(defaults: dict[str, Any]) -> None:
    """ValueError naming the field when the job's SamplingParams defaults are invalid, checked by the engine's own
    rules before any engine loads (an output constraint is parsed, which needs no tokenizer)."""
    from engine import SamplingParams
    from engine.structured import parse_spec
    try:
        params = SamplingParams(**defaults)
    except TypeError as e:  # a field SamplingParams does not have
        raise ValueError(f"unknown sampling parameter: {e}") from None
    if params.structured is not None:
        parse_spec(params.structured)


@dataclass
class Request:
    index: int              # row index within the table
    prompt_ids: list[int]
    params: Any             # engine.SamplingParams


def prepare_requests(table: pa.Table, spec: RowSpec, encode: Callable[[Any, int], list[int]],
                     make_params: Callable[..., Any]) -> tuple[list[Request], dict[int, str]]:
    """Validate each row; return the runnable requests and ``{row index: error}`` for the rest.

    ``encode(prompt, max_tokens)`` is the engine's ``encode_prompt``: it raises ValueError for a null, empty,
    non-text, too long or never-fitting prompt and for broken chat messages. ``make_params(**kwargs)`` raises
    ValueError for settings the engine cannot run (a bad value, an output constraint that does not compile).
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
            params = make_params(**sampling_kwargs(fields, spec.defaults))
        except (ValueError, TypeError) as e:  # TypeError: a sampling_params field SamplingParams does not have
            errors[i] = f"invalid sampling params: {e}"
            continue
        try:
            requests.append(Request(i, encode(prompt, params.max_tokens), params))
        except ValueError as e:
            errors[i] = f"invalid prompt: {e}"
        except Exception as e:  # the tokenizer itself broke on this row: fail the row, not the shard
            errors[i] = f"prompt could not be tokenized: {type(e).__name__}: {e}"
    return requests, errors


def sampling_kwargs(overrides: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """SamplingParams keyword arguments: the row's non-null overrides on top of the job's defaults.

    A row's output constraint replaces the job's. Integer fields read from float columns (pandas turns int
    columns with nulls into floats) are converted when they hold whole numbers; anything else is left for
    SamplingParams to reject.
    """
    given = {name: value for name, value in overrides.items() if value is not None}
    kwargs = dict(defaults)
    if any(name in given for name in STRUCTURED_FIELDS):
        kwargs = {name: value for name, value in kwargs.items() if name not in STRUCTURED_FIELDS}
    for name, value in given.items():
        if name in INTEGER_FIELDS and isinstance(value, float) and value.is_integer():
            value = int(value)
        kwargs[name] = value
    return kwargs


def build_result_table(num_rows: int, outputs: dict[int, list[dict]], errors: dict[int, str], actor_id: str | None,
                       shard_id: int, spec: OutputSpec = OutputSpec()) -> pa.Table:
    """The ``spec.schema()`` columns for ``num_rows`` rows: each row has an error, or its completions' engine
    results (one, or any number when ``spec.completions``)."""
    missing = set(range(num_rows)) - outputs.keys() - errors.keys()
    if missing:
        raise ValueError(f"rows {sorted(missing)[:5]} have neither an output nor an error")
    schema = spec.schema()
    cols: dict[str, list] = {name: [] for name in schema.names}
    for i in range(num_rows):
        if i in outputs:
            row = _result_row(outputs[i], spec)
        else:  # with lists of completions a failed row has none: its finish_reason is null, not a list
            row = dict(finish_reason=None if spec.completions else "error", error=errors[i])
        row.update(actor_id=actor_id, shard_id=shard_id)
        for name in schema.names:
            cols[name].append(row.get(name))
    return pa.table(cols, schema=schema)


def _result_row(completions: list[dict], spec: OutputSpec) -> dict[str, Any]:
    """One row's result columns; the prompt's own (token counts, prompt logprobs) come from its first completion.
    With several completions the row's ttft is the first completion's first token, its latency the last one's."""
    if len(completions) > 1 and not spec.completions:
        raise ValueError(f"a row has {len(completions)} completions but the result columns hold one")
    each = [dict(generated_text=c["text"], generated_token_ids=c["token_ids"], num_generated_tokens=len(c["token_ids"]),
                 finish_reason=c["finish_reason"], generated_logprobs=c.get("token_logprobs"),
                 generated_top_logprobs=_alternatives(c.get("logprobs"))) for c in completions]
    row = {name: [c[name] for c in each] for name in each[0]} if spec.completions else each[0]
    first = completions[0]
    row.update(num_prompt_tokens=first["num_prompt_tokens"], num_cached_tokens=first["num_cached_tokens"],
               ttft_s=min(c["ttft_s"] for c in completions), latency_s=max(c["latency_s"] for c in completions),
               prompt_token_logprobs=first.get("prompt_token_logprobs"),
               prompt_top_logprobs=_alternatives(first.get("prompt_logprobs")))
    return row


def _alternatives(per_token: list[dict[int, float] | None] | None) -> list[list[dict]] | None:
    """The engine's ``{token id: logprob}`` per token as lists of ``{token_id, logprob}``, most likely first."""
    if per_token is None:
        return None
    return [None if alts is None else [dict(token_id=t, logprob=lp) for t, lp in
                                       sorted(alts.items(), key=lambda item: -item[1])] for alts in per_token]


def error_result_table(num_rows: int, error: str, actor_id: str | None, shard_id: int,
                       spec: OutputSpec = OutputSpec()) -> pa.Table:
    """Result columns that mark every row failed with the same ``error``."""
    return build_result_table(num_rows, {}, {i: error for i in range(num_rows)}, actor_id, shard_id, spec)
