"""The Ray batch pipeline (issue 5): input reading and sharding, row validation, atomic output, and end-to-end
jobs on a local Ray cluster with the tiny demo model (CPU). Several assertions share one job's output."""
import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest
from ray.util.state import get_log, list_actors

from pipeline.config import parse_config
from pipeline.driver import run_job
from pipeline.errors import JobFailed, UsageError
from pipeline.inputs import cut_shards, open_input, resolve_prompt_column
from pipeline.logs import tag_logger
from pipeline.output import OutputDir, make_manifest, manifest_differences
from pipeline.progress import Progress
from pipeline.rows import OUTPUT_SCHEMA, RowSpec, build_result_table, prepare_requests
from test_pipeline_support import (MAX_NUM_SEQS, REPO, PacedActor, assert_each_id_once, job_argv, part_files,
                                   read_results, scrape_metrics, start_ray_cluster, subprocess_env, wait_for,
                                   write_prompts)

ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)

ROWS = [{"id": i, "prompt": f"Row {i}: tell me about the river", "meta": f"m{i}"} for i in range(5)]


# ----- config -----------------------------------------------------------------------------------------------------
def test_flags_become_a_config():
    c = parse_config(["--input", "x.parquet", "--shard-size", "8", "--num-actors", "3", "--temperature", "0",
                      "--engine-arg", "kvcache_block_size=16", "--engine-arg", "dtype=float32", "--log-level", "info",
                      "--job-id", "j1"])
    assert (c.input, c.output, c.shard_size, c.num_actors, c.temperature, c.log_level) == \
        ("x.parquet", "results/j1", 8, 3, 0.0, "INFO")
    assert c.engine_kwargs("cpu") == dict(model="demo", device="cpu", tensor_parallel_size=1, max_model_len=4096,
                                          kvcache_block_size=16, dtype="float32")
    assert parse_config([]).input is None and parse_config(["--input", "sample"]).input is None
    assert parse_config([]).job_id != "" and parse_config([]).output.startswith("results/")


def test_sampling_flags_become_the_rows_defaults_and_result_settings(tmp_path):
    (tmp_path / "schema.json").write_text('{"type": "object"}')
    c = parse_config(["--n", "2", "--top-k", "5", "--presence-penalty", "0.5", "--stop", "x", "--stop", "y",
                      "--json-schema", str(tmp_path / "schema.json"), "--max-tokens", "8"])
    assert c.sampling == dict(top_k=5, n=2, presence_penalty=0.5, stop=["x", "y"], json_schema='{"type": "object"}')
    assert c.sampling_defaults() == dict(max_tokens=8, temperature=1.0, top_p=1.0, **c.sampling)
    assert c.result_settings()["json_schema"] == '{"type": "object"}' and c.result_settings()["n"] == 2
    assert parse_config(["--choice", "a", "b"]).sampling == dict(choice=["a", "b"])
    assert parse_config([]).sampling == {} and "n" not in parse_config([]).result_settings()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--model", "--device", "--num-actors", "--tensor-parallel-size",
                 "--shard-size", "--max-tokens", "--temperature", "--top-p", "--max-model-len", "--prompt-column",
                 "--address", "--log-level", "--job-id", "--max-shard-retries", "--resume", "--overwrite",
                 "--top-k", "--min-p", "--min-tokens", "--n", "--repetition-penalty", "--presence-penalty",
                 "--frequency-penalty", "--logprobs", "--prompt-logprobs", "--stop", "--json-schema", "--json-object",
                 "--regex", "--choice", "--grammar"):
        assert flag in text


# ----- input ------------------------------------------------------------------------------------------------------
def _write_every_format(tmp_path: Path) -> dict[str, Path]:
    table = pa.Table.from_pylist(ROWS)
    paths = {"parquet": tmp_path / "p.parquet", "dir": tmp_path / "pdir", "jsonl": tmp_path / "p.jsonl",
             "csv": tmp_path / "p.csv", "arrow": tmp_path / "p.arrow", "hf": tmp_path / "hf"}
    pq.write_table(table, paths["parquet"])
    paths["dir"].mkdir()
    pq.write_table(table.slice(0, 2), paths["dir"] / "a.parquet")
    pq.write_table(table.slice(2), paths["dir"] / "b.parquet")
    (paths["dir"] / "_SUCCESS").write_text("")  # ignored, like Spark's marker files
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    pacsv.write_csv(table, paths["csv"])
    feather.write_feather(table, paths["arrow"])
    import datasets
    datasets.Dataset.from_list(ROWS).save_to_disk(str(paths["hf"]))
    return paths


def test_every_input_format_reads_the_same_rows_in_order(tmp_path):
    for name, path in _write_every_format(tmp_path).items():
        source = open_input(str(path))
        assert source.num_rows == 5, name
        shards = list(source.shards(2))
        assert [sid for sid, _ in shards] == [0, 1, 2], name
        assert [t.num_rows for _, t in shards] == [2, 2, 1], name
        rows = [r for _, t in shards for r in t.to_pylist()]
        assert [(r["id"], r["prompt"], r["meta"]) for r in rows] == [(r["id"], r["prompt"], r["meta"]) for r in ROWS]
        assert shards[0][1].schema == source.schema, name


def test_fingerprint_follows_content(tmp_path):
    a = write_prompts(tmp_path / "a.parquet", ["x", "y"])
    b = write_prompts(tmp_path / "b.parquet", ["x", "y"])
    c = write_prompts(tmp_path / "c.parquet", ["x", "z"])
    fp = {p: open_input(str(p)).fingerprint for p in (a, b, c)}
    assert fp[a] == fp[b] != fp[c]


def test_cut_shards_regroups_any_batch_sizes():
    schema = pa.schema([("i", pa.int64())])
    batches = [pa.record_batch([pa.array(range(s, e))], schema=schema) for s, e in [(0, 3), (3, 4), (4, 11), (11, 12)]]
    shards = list(cut_shards(batches, 5, schema))
    assert [(sid, t.column("i").to_pylist()) for sid, t in shards] == \
        [(0, [0, 1, 2, 3, 4]), (1, [5, 6, 7, 8, 9]), (2, [10, 11])]


def test_prompt_column_rules():
    chat = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))
    assert resolve_prompt_column(pa.schema([("prompt", pa.string())]), "prompt") == "prompt"
    assert resolve_prompt_column(pa.schema([("messages", chat)]), "prompt") == "messages"
    assert resolve_prompt_column(pa.schema([("q", pa.large_string()), ("max_tokens", pa.float64())]), "q") == "q"
    assert resolve_prompt_column(pa.schema([("ids", pa.list_(pa.int32()))]), "ids") == "ids"
    overrides = pa.schema([("prompt", pa.string()), ("n", pa.int8()), ("choice", pa.list_(pa.large_string())),
                           ("stop", pa.string()), ("json_object", pa.bool_()), ("regex", pa.null())])
    assert resolve_prompt_column(overrides, "prompt") == "prompt"
    bad = [(pa.schema([("text", pa.string())]), "no column 'prompt'"),
           (pa.schema([("prompt", pa.int64())]), "type int64"),
           (pa.schema([("prompt", pa.string()), ("max_tokens", pa.string())]), "'max_tokens'"),
           (pa.schema([("prompt", pa.string()), ("json_schema", pa.struct([("type", pa.string())]))]),
            r"'json_schema' \(a per-row override\) has type struct<type: string>; expected text"),
           (pa.schema([("prompt", pa.string()), ("stop", pa.int64())]), "'stop' .*expected text or texts"),
           (pa.schema([("prompt", pa.string()), ("generated_logprobs", pa.string())]), "clash"),
           (pa.schema([("prompt", pa.string()), ("error", pa.string())]), "clash")]
    for schema, message in bad:
        with pytest.raises(UsageError, match=message):
            resolve_prompt_column(schema, "prompt")


# ----- rows -------------------------------------------------------------------------------------------------------
def test_rows_become_requests_or_errors():
    from engine import SamplingParams

    def encode(prompt, max_tokens):
        if prompt == "boom":
            raise KeyError("tokenizer bug")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt is empty")
        return [len(prompt)]

    table = pa.table({"prompt": ["ok", None, "boom", "ok", "ok", "ok"],
                      "max_tokens": [None, None, None, 0, 3.0, None],
                      "temperature": [None, None, None, None, None, float("nan")]})
    spec = RowSpec("prompt", dict(max_tokens=8, temperature=0.5, top_p=1.0))
    requests, errors = prepare_requests(table, spec, encode, SamplingParams)
    assert [r.index for r in requests] == [0, 4]
    assert (requests[0].params.max_tokens, requests[0].params.temperature) == (8, 0.5)
    assert requests[1].params.max_tokens == 3  # whole floats from pandas-style columns become ints
    assert set(errors) == {1, 2, 3, 5}
    assert errors[1] == "invalid prompt: prompt is empty"
    assert "could not be tokenized: KeyError" in errors[2]
    assert "max_tokens" in errors[3] and "temperature" in errors[5]


def test_result_table_has_one_row_per_input_row():
    out = dict(text="hi", token_ids=[5, 6], finish_reason="stop", num_prompt_tokens=3, num_cached_tokens=0,
               ttft_s=0.1, latency_s=0.2)
    table = build_result_table(3, {0: [out], 2: [out]}, {1: "bad"}, "actor-0", 7)
    assert table.schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    assert [r["finish_reason"] for r in rows] == ["stop", "error", "stop"]
    assert rows[1]["error"] == "bad" and rows[1]["generated_text"] is None
    assert rows[0]["num_generated_tokens"] == 2 and rows[0]["shard_id"] == 7 and rows[0]["actor_id"] == "actor-0"
    with pytest.raises(ValueError, match="neither"):
        build_result_table(2, {0: [out]}, {}, "actor-0", 0)


# ----- output -----------------------------------------------------------------------------------------------------
def test_failed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    out = OutputDir(tmp_path / "job")
    out.prepare(make_manifest("j", {"num_rows": 1}, 4, 1, {}), overwrite=False)

    def disk_full(table, path):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("pipeline.output.pq.write_table", disk_full)
    with pytest.raises(JobFailed, match="cannot write .*part-00000.parquet: No space left on device"):
        out.write_shard(0, pa.table({"x": [1]}), None)
    assert list(out.results.iterdir()) == [] and list(out.tmp.iterdir()) == []


def test_manifest_differences_name_what_changed():
    identity = dict(path="/a", num_rows=3, schema="prompt: string", fingerprint="xxh3_128:1")
    old = make_manifest("j", identity, 4, 1, {"model": "demo", "max_tokens": 4})
    assert manifest_differences(old, make_manifest("k", {**identity, "path": "/moved"}, 4, 1,
                                                   {"model": "demo", "max_tokens": 4})) == []
    diffs = manifest_differences(old, make_manifest("j", {**identity, "fingerprint": "xxh3_128:2"}, 8, 1,
                                                    {"model": "demo", "max_tokens": 5}))
    assert [d.split(" (")[0] for d in diffs] == ["input fingerprint", "--shard-size", "max_tokens"]


def test_progress_prints_plain_lines_off_a_terminal(tmp_path):
    with open(tmp_path / "log", "w+") as stream:
        progress = Progress(total_rows=10, done_rows=2, interval_s=1e-9, stream=stream)
        progress.advance(4, 100)
        progress.close()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines and lines[-1].startswith("[progress] 6/10 rows (60.0%)")
    assert "tok/s" in lines[-1] and "ETA" in lines[-1]


# ----- end to end -------------------------------------------------------------------------------------------------
JOB_A_ID = "pipeline-test-a"
JOB_A_ROWS = 44
# Greedy, the tiny random model stops these prompts on a sampled EOS: async scheduling then samples one more token
# for them, which it drops (and which no token count may include).
JOB_A_EOS = {42: "Row 48: tell me about rivers", 43: "Row 54: tell me about cities"}
JOB_A_ERRORS = {2: "invalid prompt: prompt must be a string", 7: "prompt is empty", 12: "more than max_model_len",
                17: "KV-cache blocks", 22: "SamplingParams.max_tokens=0", 27: "SamplingParams.temperature=-1.0",
                32: "SamplingParams.top_p=1.5"}


class MetricNamesSeen:
    """The metric names a job's series had on the Prometheus endpoint, scraped twice a second while in the block
    (Ray stops exporting an actor's gauges once the actor is gone)."""

    def __init__(self, port: int, job_id: str):
        self.port, self.job_id, self.names = port, job_id, set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "MetricNamesSeen":
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            try:
                self.names |= {n for n, labels, _ in scrape_metrics(self.port) if labels.get("job_id") == self.job_id}
            except OSError:  # the endpoint is not up yet
                pass


def _prompt_of_tokens(tokenizer, n: int) -> str:
    words = []
    while len(tokenizer.encode(" ".join(words))) < n:
        words.append("river")
    return " ".join(words)


@pytest.fixture(scope="module")
def job_a(ray_cluster, tmp_path_factory):
    """44 rows (7 of them bad, see JOB_A_ERRORS; 2 that stop on EOS, JOB_A_EOS) in 9 shards on 2 actors; a KV cache
    of 6 blocks of 16 tokens, so the engine queues and preempts, and a 140-token prompt can never fit."""
    from transformers import AutoTokenizer

    from engine.demo import random_demo_path
    tokenizer = AutoTokenizer.from_pretrained(random_demo_path())
    n = JOB_A_ROWS
    prompts = [f"Row {i}: tell me about {['rivers', 'cities', 'stars'][i % 3]}" for i in range(n)]
    max_tokens, temperature, top_p, seed = [None] * n, [None] * n, [None] * n, [None] * n
    prompts[2], prompts[7] = None, ""
    prompts[12], prompts[17] = _prompt_of_tokens(tokenizer, 300), _prompt_of_tokens(tokenizer, 140)
    max_tokens[22], temperature[27], top_p[32] = 0, -1.0, 1.5
    prompts[35] = prompts[36] = "Greedy twins"
    temperature[35] = temperature[36] = 0.0
    max_tokens[38] = 2
    prompts[40] = prompts[41] = "Seeded twins"
    seed[40] = seed[41] = 7
    for i, prompt in JOB_A_EOS.items():
        prompts[i], temperature[i], max_tokens[i] = prompt, 0.0, 32
    root = tmp_path_factory.mktemp("job_a")
    table = pa.table({"id": pa.array(range(n), pa.int64()), "prompt": pa.array(prompts, pa.string()),
                      "meta": [f"meta-{i}" for i in range(n)], "max_tokens": pa.array(max_tokens, pa.int64()),
                      "temperature": pa.array(temperature, pa.float64()), "top_p": pa.array(top_p, pa.float64()),
                      "seed": pa.array(seed, pa.int64())})
    pq.write_table(table, root / "input.parquet")
    output = root / "out"
    with MetricNamesSeen(ray_cluster.metrics_port, JOB_A_ID) as names_seen:  # gauges last only while actors live
        report = run_job(parse_config(job_argv(root / "input.parquet", output, "--log-level", "INFO", "--job-id",
                                               JOB_A_ID, "--engine-arg", "num_kvcache_blocks=6", actors=2,
                                               shard_size=5)),
                         actor_cls=PacedActor)
    assert report.status == "completed" and report.exit_code == 0
    return dict(input=table, output=output, results=read_results(output).sort_by("id"), report=report,
                metric_names=names_seen.names,
                stats=json.loads((output / "stats.json").read_text()), steps=pq.read_table(output / "steps.parquet"))


def test_every_row_comes_back_exactly_once_with_its_input_columns(job_a):
    results = job_a["results"]
    assert_each_id_once(results, JOB_A_ROWS)
    assert results.column_names == job_a["input"].column_names + OUTPUT_SCHEMA.names
    assert results.select(job_a["input"].column_names).equals(job_a["input"])


def test_bad_rows_carry_errors_and_their_shards_still_run(job_a):
    rows = job_a["results"].to_pylist()
    for i, message in JOB_A_ERRORS.items():
        assert rows[i]["finish_reason"] == "error" and message in rows[i]["error"], rows[i]
        assert rows[i]["generated_text"] is None and rows[i]["generated_token_ids"] is None
    good = [r for r in rows if r["id"] not in JOB_A_ERRORS]
    assert len(good) == JOB_A_ROWS - len(JOB_A_ERRORS)
    for r in good:
        assert r["error"] is None and r["finish_reason"] in ("stop", "length"), r
        assert 1 <= r["num_generated_tokens"] == len(r["generated_token_ids"]) <= (r["max_tokens"] or 4)
        assert r["num_prompt_tokens"] > 0 and 0 < r["ttft_s"] <= r["latency_s"]
    assert rows[38]["num_generated_tokens"] <= 2
    assert rows[35]["generated_token_ids"] == rows[36]["generated_token_ids"]  # temperature 0 override: greedy
    assert rows[40]["generated_token_ids"] == rows[41]["generated_token_ids"]  # seed override


def test_two_actors_both_receive_work(job_a):
    assert set(job_a["results"].column("actor_id").to_pylist()) == {"actor-0", "actor-1"}
    assert all(a["rows"] > 0 and a["shards"] > 0 for a in job_a["stats"]["actors"].values())


def test_output_is_complete_parts_only(job_a):
    out = job_a["output"]
    assert sorted(p.name for p in out.iterdir()) == ["_steps", "manifest.json", "results", "stats.json",
                                                      "steps.parquet"]
    assert [p.name for p in sorted((out / "results").iterdir())] == [f"part-{i:05d}.parquet" for i in range(9)]
    for i, path in enumerate(part_files(out)):
        part = pq.read_table(path)
        assert set(part.column("shard_id").to_pylist()) == {i}
        assert part.column("id").to_pylist() == list(range(5 * i, min(5 * i + 5, JOB_A_ROWS)))


def test_stats_agree_with_the_rows(job_a):
    stats, results = job_a["stats"], job_a["results"]
    gen = sum(results.column("num_generated_tokens").drop_null().to_pylist())
    assert stats["job_id"] == JOB_A_ID and stats["status"] == "completed"
    assert (stats["rows_total"], stats["rows_done"], stats["rows_ok"], stats["rows_failed"]) == \
        (JOB_A_ROWS, JOB_A_ROWS, JOB_A_ROWS - len(JOB_A_ERRORS), len(JOB_A_ERRORS))
    assert stats["prompt_tokens"] == sum(results.column("num_prompt_tokens").drop_null().to_pylist())
    assert stats["generated_tokens"] == gen == stats["this_run"]["generated_tokens"]
    assert stats["output_tokens_per_s"] == pytest.approx(gen / stats["wall_time_s"])
    assert 0 < stats["time_to_first_result_s"] <= stats["wall_time_s"]
    actors = stats["actors"].values()
    assert sum(a["rows"] for a in actors) == JOB_A_ROWS
    assert sum(a["rows_failed"] for a in actors) == len(JOB_A_ERRORS)
    assert sum(a["generated_tokens"] for a in actors) == gen
    assert all(a["busy_s"] > 0 and a["prefill_time_s"] > 0 and a["steps"] > 0 and a["load_time_s"] > 0
               for a in actors)
    for a in actors:  # the start-up timeline, in seconds from the launch
        assert 0 <= stats["time_to_ray_s"] < a["started_s"] < a["started_s"] + a["load_time_s"] <= a["ready_s"] + 0.1
    # the first result comes from a ready actor (another may still be loading: on a busy 2-core machine one took
    # 0.3 s longer than the first shard)
    assert min(a["ready_s"] for a in actors) < stats["time_to_first_result_s"]
    assert stats["config"]["shard_size"] == 5 and stats["resources"]["device"] == "cpu"


def test_steps_agree_with_the_rows_and_stats(job_a):
    steps, stats = job_a["steps"], job_a["stats"]
    per_actor = {a: steps.filter(pa.compute.equal(steps["actor_id"], a)).num_rows for a in stats["actors"]}
    assert per_actor == {a: s["steps"] for a, s in stats["actors"].items()}
    # num_new_tokens: the tokens appended in the step (batch_size also counts a token sampled for a sequence that
    # had already stopped, which async scheduling drops).
    assert sum(steps.column("num_new_tokens").to_pylist()) == stats["generated_tokens"]
    assert set(steps.column("phase").to_pylist()) == {"prefill", "decode"}
    assert set(steps.column("shard_id").to_pylist()) == set(range(9))
    assert max(steps.column("num_preempted").to_pylist()) > 0 or max(steps.column("num_waiting").to_pylist()) > 0


def test_next_shard_joins_the_running_batch(ray_cluster, tmp_path):
    """One actor, shards of 2 rows: the driver keeps two shards at the actor, and the engine runs the next one's
    rows beside the current one's, so some steps batch more sequences than a shard has."""
    prompts = [f"Overlap row {i}: tell me about the sea" for i in range(8)]
    report = run_job(parse_config(job_argv(write_prompts(tmp_path / "in.parquet", prompts), tmp_path / "out",
                                           "--temperature", "0", actors=1, shard_size=2, max_tokens=12)))
    assert report.status == "completed"
    steps = pq.read_table(tmp_path / "out" / "steps.parquet")
    assert max(steps.column("batch_size").to_pylist()) > 2
    # Each step is recorded once (under one shard): the records still add up to the actor's steps and tokens.
    actor = report.stats["actors"]["actor-0"]
    assert steps.num_rows == actor["steps"] and sum(steps.column("num_new_tokens").to_pylist()) == \
        actor["generated_tokens"]
    assert_each_id_once(read_results(tmp_path / "out"), len(prompts))


def test_running_batch_stays_full_across_shard_boundaries(ray_cluster, tmp_path):
    """Issue 13: one actor (at most 4 sequences a batch), 20 shards of 2 rows of different lengths. The driver keeps
    8 rows at the actor and sends more as rows finish, so from the first admission to the last the engine never
    drains at a shard boundary, and its batch stays (nearly) full."""
    n = 40
    path = write_prompts(tmp_path / "in.parquet", [f"Feed row {i}: tell me about the sea" for i in range(n)],
                         max_tokens=[6 + (7 * i) % 11 for i in range(n)])
    report = run_job(parse_config(job_argv(path, tmp_path / "out", "--temperature", "0", actors=1, shard_size=2,
                                           max_tokens=16)))
    assert report.status == "completed" and len(part_files(tmp_path / "out")) == n // 2
    assert_each_id_once(read_results(tmp_path / "out"), n)
    steps = pq.read_table(tmp_path / "out" / "steps.parquet").sort_by("step").to_pylist()
    admissions = [i for i, step in enumerate(steps) if step["phase"] == "prefill"]
    between = steps[admissions[0]:admissions[-1]]
    assert min(step["num_running"] for step in between) > 0, [s["num_running"] for s in between]
    assert sum(step["batch_size"] for step in between) / len(between) >= 0.75 * MAX_NUM_SEQS


def test_actor_logs_are_readable_through_the_state_api(job_a, ray_cluster):
    actors = list_actors(address=ray_cluster.address, filters=[("class_name", "=", "PacedActor")], detail=True,
                         limit=1000)
    for actor_id, info in job_a["stats"]["actors"].items():
        (state,) = [a for a in actors if a.pid == info["pid"]]
        assert state.repr_name == f"EngineActor[{actor_id}]"
        text = "".join(get_log(address=ray_cluster.address, actor_id=state.actor_id, suffix="err", tail=100000))
        engine_lines = [line for line in text.splitlines() if "[nanovllm." in line]
        assert engine_lines and all(f"[{actor_id}] " in line for line in engine_lines)  # INFO: --log-level reached it
        assert f"[pipeline.actor] [INFO] [{actor_id}] shard " in text


def test_metrics_reach_the_prometheus_endpoint(job_a, ray_cluster):
    stats = job_a["stats"]

    def job_samples():
        samples = [s for s in scrape_metrics(ray_cluster.metrics_port) if s[1].get("job_id") == JOB_A_ID]
        done = sum(v for name, _, v in samples if name == "ray_pipeline_rows_done_total")
        return samples if done == JOB_A_ROWS else None

    samples = wait_for(job_samples, 30, f"rows_done metric to reach {JOB_A_ROWS}", interval=1)

    def total(name):
        return sum(v for n, _, v in samples if n == name)

    assert {labels["actor_id"] for _, labels, _ in samples} == {"actor-0", "actor-1"}
    assert total("ray_pipeline_rows_failed_total") == len(JOB_A_ERRORS)
    rows = job_a["results"].to_pylist()
    assert [rows[i]["finish_reason"] for i in JOB_A_EOS] == ["stop"] * len(JOB_A_EOS)
    assert total("ray_nanovllm_generated_tokens_total") == stats["generated_tokens"]
    assert total("ray_nanovllm_step_time_s_count") == sum(a["steps"] for a in stats["actors"].values())
    names = {n for n, _, _ in samples} | job_a["metric_names"]
    assert {"ray_nanovllm_running_seqs", "ray_nanovllm_waiting_seqs", "ray_nanovllm_kv_cache_usage",
            "ray_nanovllm_prefix_cache_hit_rate"} <= names
    # The names the README lists are the names Prometheus shows (a histogram as its _count, _sum, _bucket).
    dashboard = (REPO / "README.md").read_text().split("**Dashboard.**")[1].split("\n## ")[0]
    listed = set(re.findall(r"`(ray_\w+)`", dashboard))
    assert {"ray_nanovllm_generated_tokens_total", "ray_nanovllm_step_time_s"} <= listed
    assert all(name in names or f"{name}_count" in names for name in listed), listed - names


def test_chat_messages_from_a_saved_hf_dataset(ray_cluster, tmp_path):
    import datasets
    conversations = [[{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Question {i}?"}]
                     for i in range(4)]
    conversations.insert(2, [{"role": "user", "content": None}])  # broken: no content
    conversations.append([])                                     # broken: no messages
    datasets.Dataset.from_dict({"messages": conversations}).save_to_disk(str(tmp_path / "chat"))
    report = run_job(parse_config(job_argv(tmp_path / "chat", tmp_path / "out", shard_size=3)))
    assert report.status == "completed"
    rows = read_results(tmp_path / "out").to_pylist()
    assert [r["messages"] for r in rows] == conversations
    assert [r["finish_reason"] == "error" for r in rows] == [False, False, True, False, False, True]
    assert "chat message 0 needs string 'role' and 'content'" in rows[2]["error"]
    assert "prompt is empty" in rows[5]["error"]
    # The template wraps each message in <|im_start|>role ... <|im_end|>: many more tokens than the words.
    assert all(r["num_prompt_tokens"] > 10 for r in rows if r["error"] is None)


def test_cli_runs_the_sample_from_any_directory(ray_cluster, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "offline_batch.py"), "--address", ray_cluster.address,
                           *job_argv(None, out, max_tokens=2, shard_size=32)],
                          cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "done: 64 rows (0 failed)" in proc.stdout
    assert (out / "sample_prompts.parquet").exists()
    assert_each_id_once(read_results(out), 64)
    assert "[progress] 64/64 rows" in proc.stderr
    # At the default --log-level WARNING, neither the actors' per-shard lines nor engine INFO lines are forwarded.
    assert "[INFO]" not in proc.stderr, [line for line in proc.stderr.splitlines() if "[INFO]" in line][:5]


def test_actor_tags_mark_only_the_tagged_loggers_lines():
    """In-process (pipeline.data), the engine's lines go through the application's root handlers: tagging them
    must leave the application's own lines alone."""
    stream, root = io.StringIO(), logging.getLogger()
    handler = logging.StreamHandler(stream)
    root.addHandler(handler)
    try:
        tag_logger("some_engine", "local-1")  # a logger without handlers of its own, as the engine's in-process
        logging.getLogger("some_engine.scheduler").warning("engine line")
        logging.getLogger("myapp").warning("application line")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["[local-1] engine line", "application line"]


def test_driver_log_lines_go_above_the_progress_bar():
    """On a terminal, a log line of the driver is written above the bar, not glued onto it."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal, message = Terminal(), "actor-1 died while running shard 3"
    with contextlib.redirect_stderr(terminal):
        handler = logging.StreamHandler()  # stderr, as the command line's logging.basicConfig
        logging.getLogger().addHandler(handler)
        try:
            progress = Progress(total_rows=10, done_rows=0, interval_s=1.0, stream=terminal)
            progress.advance(4, 100)
            logging.getLogger("pipeline").warning(message)
            progress.close()
        finally:
            logging.getLogger().removeHandler(handler)
    text = terminal.getvalue()
    assert text[text.index(message) - 1] in "\r\n" and "4/10" in text.split(message)[1], repr(text)
