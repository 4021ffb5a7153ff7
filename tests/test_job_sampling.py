"""Sampling parameters and structured outputs in the job (issue 14): per-row columns and flags for SamplingParams
fields, list columns for n > 1 completions, logprob columns, and resumes that must keep the same sampling
settings (bad flags and column types: test_reliability.py; the same through pipeline.data: test_data_reuse.py).
The mixed job runs the real demo model, whose answers can be checked against their constraints; the other job
the tiny random one."""
import json
import re

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import parse_config
from pipeline.driver import run_job
from pipeline.errors import UsageError
from pipeline.report import load_job, summary
from pipeline.rows import OUTPUT_SCHEMA
from test_pipeline_support import (TOP_LOGPROBS, assert_each_id_once, check_logprobs, job_argv, part_files,
                                   read_results, start_ray_cluster)

ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]},
                                         "visited": {"type": "boolean"}}, "required": ["city", "visited"]}
# id -> (question, json_schema column, choice column, regex column)
MIXED_ROWS = {
    0: ("Describe a person.", json.dumps(PERSON), None, None),
    1: ("Is the sky blue?", None, ["yes", "no"], None),
    2: ("Give me a phone number.", None, None, r"[0-9]{3}-[0-9]{4}"),
    3: ("Describe a city.", '{"type": "bogus"}', None, None),
    4: ("What is the capital of France?", None, None, None),
    5: ("Which of these cities is in Italy?", json.dumps(CITY), None, None),
    6: ("Name a primary colour.", None, ["red", "green", "blue"], None),
    7: ("Tell me about rivers.", None, None, None),
    8: ("Describe a dog.", "not json", None, None),
}
MIXED_ERRORS = {3: 'invalid sampling params: json_schema does not compile: Unsupported type "bogus"',
                8: "invalid sampling params: SamplingParams.json_schema='not json' must be None, a dict or a JSON"}


def _write_mixed_input(path) -> None:
    """Chat rows (so that the real model answers the unconstrained ones), with per-row constraint columns."""
    ids = sorted(MIXED_ROWS)
    columns = list(zip(*(MIXED_ROWS[i] for i in ids)))
    table = pa.table({"id": ids, "messages": [[{"role": "user", "content": q}] for q in columns[0]],
                      "json_schema": pa.array(columns[1], pa.string()),
                      "choice": pa.array(columns[2], pa.list_(pa.string())),
                      "regex": pa.array(columns[3], pa.string())})
    pq.write_table(table, path)


@pytest.fixture(scope="module")
def mixed_job(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    _write_mixed_input(root / "in.parquet")
    argv = job_argv(root / "in.parquet", root / "out", "--model", "demo", shard_size=4, max_tokens=32)
    report = run_job(parse_config(argv))
    assert report.status == "completed"
    return dict(argv=argv, root=root, report=report, results=read_results(root / "out").sort_by("id"))


def test_mixed_rows_each_get_their_own_constraint_and_bad_ones_fail_alone(mixed_job):
    results = mixed_job["results"]
    assert_each_id_once(results, len(MIXED_ROWS))
    assert len(part_files(mixed_job["root"] / "out")) == 3
    assert results.select(OUTPUT_SCHEMA.names).schema == OUTPUT_SCHEMA  # n = 1, no logprobs: the plain columns
    for row in results.to_pylist():
        i, text = row["id"], row["generated_text"]
        if i in MIXED_ERRORS:
            assert (row["finish_reason"], text) == ("error", None) and MIXED_ERRORS[i] in row["error"], row
            continue
        assert row["error"] is None and text, row
        _, schema, choice, regex = MIXED_ROWS[i]
        if schema is not None:
            jsonschema.validate(json.loads(text), json.loads(schema))
        if choice is not None:
            assert text in choice
        if regex is not None:
            assert re.fullmatch(regex, text), text
        if schema or choice or regex:
            assert row["finish_reason"] == "stop"  # the constraint ended the row, not max_tokens
    plain = [r["generated_text"] for r in results.to_pylist() if r["id"] in (4, 7)]
    assert all(not t.startswith(("{", "yes", "no")) for t in plain), plain  # no constraint leaked onto them
    stats = mixed_job["report"].stats
    assert (stats["rows_ok"], stats["rows_failed"]) == (len(MIXED_ROWS) - 2, 2)


def test_resume_with_other_sampling_flags_is_refused(mixed_job):
    argv, root = mixed_job["argv"], mixed_job["root"]
    (root / "schema.json").write_text(json.dumps(CITY))
    with pytest.raises(UsageError, match=r"different json_schema \(was None, now '\{.*refusing to resume"):
        run_job(parse_config([*argv, "--json-schema", str(root / "schema.json")]))
    assert run_job(parse_config(argv)).status == "nothing to do"  # the same flags: the finished job stands


@pytest.fixture(scope="module")
def n_job(ray_cluster, tmp_path_factory):
    """Two completions with logprobs per row (the random model, sampled), one row bad."""
    root = tmp_path_factory.mktemp("n")
    prompts = [f"Row {i} about the sea" for i in range(5)]
    prompts[3] = ""
    pq.write_table(pa.table({"id": list(range(5)), "prompt": prompts}), root / "in.parquet")
    argv = job_argv(root / "in.parquet", root / "out", "--n", "2", "--logprobs", "2", shard_size=2, max_tokens=5)
    report = run_job(parse_config(argv))
    assert report.status == "completed"
    return dict(argv=argv, output=root / "out", report=report, results=read_results(root / "out").sort_by("id"))


def test_n_completions_are_lists_of_n_with_logprobs_per_token(n_job):
    results = n_job["results"]
    assert_each_id_once(results, 5)
    types = {name: results.schema.field(name).type for name in results.column_names}
    assert types["generated_text"] == pa.list_(pa.string())
    assert types["generated_token_ids"] == pa.list_(pa.list_(pa.int32()))
    assert types["finish_reason"] == pa.list_(pa.string()) and types["num_prompt_tokens"] == pa.int32()
    assert types["generated_logprobs"] == pa.list_(pa.list_(pa.float32()))
    assert types["generated_top_logprobs"] == pa.list_(TOP_LOGPROBS)
    for row in results.to_pylist():
        if row["id"] == 3:  # a failed row has no completions, not a list of errors
            assert row["finish_reason"] is None and row["generated_text"] is None and "prompt is empty" in row["error"]
            continue
        assert row["error"] is None and len(row["generated_text"]) == len(row["finish_reason"]) == 2
        for j in range(2):
            check_logprobs(row["generated_token_ids"][j], row["generated_logprobs"][j],
                           row["generated_top_logprobs"][j], k=2)
            assert row["num_generated_tokens"][j] == len(row["generated_token_ids"][j])


def test_stats_count_every_completion_and_failures_by_their_error(n_job):
    stats, results = n_job["report"].stats, n_job["results"]
    tokens = sum(sum(counts) for counts in results["num_generated_tokens"].to_pylist() if counts)
    assert (stats["rows_done"], stats["rows_ok"], stats["rows_failed"]) == (5, 4, 1)
    assert stats["generated_tokens"] == tokens == stats["this_run"]["generated_tokens"] > 8
    numbers = dict(summary(load_job(n_job["output"])))  # the report reads the prompt's columns, single in list mode
    assert numbers["rows"] == "5 of 5 done, 1 failed" and numbers["generated tokens"] == f"{tokens:,}"


def test_resume_without_a_flag_given_before_is_refused(n_job):
    """Dropping --n would write scalar columns beside the list columns already written."""
    argv = n_job["argv"]
    at = argv.index("--n")
    argv = argv[:at] + argv[at + 2:]
    with pytest.raises(UsageError, match=r"different n \(was 2, now None\)"):
        run_job(parse_config(argv))
