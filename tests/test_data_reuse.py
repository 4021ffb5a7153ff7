"""Generation inside other data pipelines (issue 6, issue 15): the ``pipeline.data.Generate`` class as a Ray Data
``map_batches`` step between a user's own steps, a processor built like ray.data.llm's (``build_processor``) from
Parquet to Parquet, and ``generate_table`` on a pyarrow Table or a Hugging Face Dataset without Ray. All add
exactly the columns of an offline_batch job, with the same row rules."""
import asyncio
import os
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data import Generate, ProcessorConfig, build_processor, generate_table, run_sync, to_arrow
from pipeline.errors import UsageError
from pipeline.rows import OUTPUT_SCHEMA
from test_pipeline_support import TOP_LOGPROBS, check_logprobs, start_ray_cluster

ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)

# The demo model on CPU with a short context and 16-token KV blocks; greedy, so every path must agree.
ENGINE = dict(model="demo-random", device="cpu", max_model_len=256, kvcache_block_size=16, max_tokens=4, temperature=0.0)
TOPICS = ["rivers", "harbours", None, "stars", "bridges", "", "forests", "rain"]   # None and "" become errors
BAD = {2: "invalid prompt", 5: "invalid prompt"}


def topics_table() -> pa.Table:
    return pa.table({"id": pa.array(range(len(TOPICS)), pa.int64()), "topic": pa.array(TOPICS, pa.string()),
                     "max_tokens": pa.array([2 if i == 3 else None for i in range(len(TOPICS))], pa.int64())})


def add_prompt(batch: pa.Table) -> pa.Table:
    """A user's step before generation: build the prompt from another column."""
    prompts = [None if t is None else (f"Tell me about {t}" if t else "") for t in batch["topic"].to_pylist()]
    return batch.append_column("prompt", pa.array(prompts, pa.string()))


def add_length(batch: pa.Table) -> pa.Table:
    """A user's step after generation: it sees the result columns."""
    lengths = [None if t is None else len(t) for t in batch["generated_text"].to_pylist()]
    return batch.append_column("text_chars", pa.array(lengths, pa.int64()))


@pytest.fixture(scope="module")
def local_results() -> pa.Table:
    """The same rows through generate_table, in this process (no Ray)."""
    return generate_table(add_prompt(topics_table()), **ENGINE)


def check_results(table: pa.Table, input_columns: list[str]) -> None:
    assert table.column_names[:len(input_columns) + len(OUTPUT_SCHEMA)] == input_columns + OUTPUT_SCHEMA.names
    assert table.select(OUTPUT_SCHEMA.names).schema == OUTPUT_SCHEMA
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == list(range(len(TOPICS)))
    for r in rows:
        if r["id"] in BAD:
            assert r["finish_reason"] == "error" and BAD[r["id"]] in r["error"] and r["generated_token_ids"] is None
        else:
            assert r["error"] is None and r["num_generated_tokens"] == len(r["generated_token_ids"]) == \
                (2 if r["id"] == 3 else 4)     # row 3 overrides max_tokens
            assert r["num_prompt_tokens"] > 0 and 0 < r["ttft_s"] <= r["latency_s"]


def test_generate_class_runs_between_ray_data_steps(ray_cluster, local_results):
    import ray.data
    ds = (ray.data.from_arrow(topics_table())
          .map_batches(add_prompt, batch_format="pyarrow")
          .map_batches(Generate, fn_constructor_kwargs=ENGINE, concurrency=1, num_cpus=1, num_gpus=0, batch_size=3,
                       batch_format="pyarrow")
          .map_batches(add_length, batch_format="pyarrow"))
    table = pa.concat_tables(ray.get(ds.to_arrow_refs())).sort_by("id")
    check_results(table, ["id", "topic", "max_tokens", "prompt"])
    assert table.column_names[-1] == "text_chars"
    # The same tokens as without Ray (greedy), one Ray actor, and its batches numbered as shards.
    assert table["generated_token_ids"].to_pylist() == local_results["generated_token_ids"].to_pylist()
    (actor_id,) = set(table["actor_id"].to_pylist())
    assert actor_id.startswith("data-") and set(table["shard_id"].to_pylist()) == {0, 1, 2}


def test_generate_table_takes_and_returns_a_pyarrow_table(local_results):
    assert isinstance(local_results, pa.Table)
    check_results(local_results, ["id", "topic", "max_tokens", "prompt"])
    assert set(local_results["actor_id"].to_pylist()) == {f"local-{os.getpid()}"}


def test_generate_table_takes_and_returns_a_hf_dataset(local_results):
    import datasets
    rows = datasets.Dataset(add_prompt(topics_table()).remove_column(1)).shuffle(seed=1)  # shuffled: an indices map
    out = generate_table(rows, **ENGINE)
    assert isinstance(out, datasets.Dataset) and out.num_rows == len(TOPICS)
    table = out.with_format("arrow")[:].sort_by("id")
    check_results(table, ["id", "max_tokens", "prompt"])
    assert table["generated_token_ids"].to_pylist() == local_results["generated_token_ids"].to_pylist()


def test_generate_instance_reuses_its_engine_and_follows_the_job_column_rules():
    """A chat ``messages`` column is used when ``prompt`` is absent; columns that clash with results are refused."""
    generate = Generate(**ENGINE)
    try:
        chat = pa.table({"messages": [[{"role": "user", "content": "Hi there"}]]})
        first = run_sync(generate(chat))
        assert first["finish_reason"].to_pylist() == ["length"] and first["shard_id"].to_pylist() == [0]
        assert run_sync(generate(chat))["shard_id"].to_pylist() == [1]
        with pytest.raises(UsageError, match="clash"):
            run_sync(generate(pa.table({"prompt": ["Hi"], "error": ["mine"]})))
    finally:
        generate.shutdown()


def test_other_batch_formats_become_arrow_with_nulls_for_nan():
    """Ray Data's default batch format (dict of NumPy arrays) and pandas batches: NaN means a missing value."""
    numpy_batch = {"prompt": np.array(["a", "b"], dtype=object), "max_tokens": np.array([3.0, np.nan])}
    for batch in (numpy_batch, pd.DataFrame(numpy_batch)):
        table = to_arrow(batch)
        assert table.column_names == ["prompt", "max_tokens"]
        assert table["prompt"].to_pylist() == ["a", "b"] and table["max_tokens"].to_pylist() == [3.0, None]


def test_generate_table_rejects_other_types_before_loading_a_model():
    with pytest.raises(TypeError, match="pyarrow.Table or datasets.Dataset"):
        generate_table([{"prompt": "hi"}], model="/no/such/model")


def test_generate_table_checks_the_prompt_column_before_loading_the_engine():
    """The error names the Python argument (not the job's flag), and comes before any model is loaded."""
    with pytest.raises(UsageError, match=r"no column 'prompt' \(columns: text\); choose one with prompt_column="):
        generate_table(pa.table({"text": ["hi"]}), model="/no/such/model")


def test_concurrent_batches_share_one_engine():
    """Two batches awaited together (as Ray Data does with max_concurrency > 1) run in one engine batch."""
    generate = Generate(**ENGINE)
    batch_sizes = []
    generate.engine.llm.add_step_callback(lambda record: batch_sizes.append(record.batch_size))
    table = add_prompt(topics_table())
    first, second = table.slice(0, 4), table.slice(4)

    async def both():
        return await asyncio.gather(generate(first), generate(second))

    try:
        results = run_sync(both())
    finally:
        generate.shutdown()
    assert [r.num_rows for r in results] == [4, 4]
    assert max(batch_sizes) > 3  # each batch has 3 rows that can run (one is bad): both were in one step


def test_build_processor_runs_a_parquet_to_parquet_pipeline(ray_cluster, local_results, tmp_path):
    """ray.data.llm's shape: a config with model_source, batch_size, concurrency, engine_kwargs; preprocess makes
    each row's prompt and sampling_params; postprocess keeps what the user wants."""
    import ray.data
    pq.write_table(topics_table().drop_columns(["max_tokens"]), tmp_path / "in.parquet")
    config = ProcessorConfig(model_source="demo-random", batch_size=3, concurrency=1, max_concurrent_batches=2,
                             engine_kwargs=dict(device="cpu", max_model_len=256, kvcache_block_size=16))

    def preprocess(row):
        topic = row["topic"]
        return dict(id=row["id"], prompt=None if topic is None else (f"Tell me about {topic}" if topic else ""),
                    sampling_params=dict(max_tokens=2 if row["id"] == 3 else 4, temperature=0.0))

    def postprocess(row):
        return dict(id=row["id"], answer=row["generated_text"], token_ids=row["generated_token_ids"],
                    error=row["error"])

    processor = build_processor(config, preprocess=preprocess, postprocess=postprocess)
    processor(ray.data.read_parquet(str(tmp_path / "in.parquet"))).write_parquet(str(tmp_path / "out"))
    rows = sorted(pq.read_table(tmp_path / "out").to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == list(range(len(TOPICS)))
    assert all(BAD[r["id"]] in r["error"] for r in rows if r["id"] in BAD)
    assert all(r["error"] is None and r["answer"] is not None for r in rows if r["id"] not in BAD)
    # Greedy, with the same per-row max_tokens: the same tokens as generate_table.
    assert [r["token_ids"] for r in rows] == local_results["generated_token_ids"].to_pylist()


def test_processor_config_rejects_what_it_cannot_honour():
    with pytest.raises(ValueError, match="batch_size=0"):
        ProcessorConfig(batch_size=0)
    with pytest.raises(ValueError, match="unknown sampling parameter: .*'top_kk'"):
        ProcessorConfig(default_sampling_params=dict(top_kk=5))
    with pytest.raises(ValueError, match="SamplingParams.top_k=0"):
        ProcessorConfig(default_sampling_params=dict(top_k=0))
    assert ProcessorConfig(default_sampling_params=dict(top_k=5, n=2)).generate_kwargs()["default_sampling_params"] \
        == dict(top_k=5, n=2)


# ----- sampling parameters (issue 14) -----------------------------------------------------------------------------
def test_generate_table_takes_default_sampling_params_and_per_row_columns():
    """The defaults constrain every row (choice) and ask for logprobs; a row's regex replaces the choice, its ``n``
    asks for more completions (so every row's generated columns are lists), and a bad ``n`` fails that row alone."""
    table = pa.table({"prompt": ["a b c", "d e f", "g h i", "j k l"], "regex": [None, "[0-9]{2}", None, None],
                      "n": [None, 3, 1, 0]})
    out = generate_table(table, **ENGINE, default_sampling_params=dict(choice=["yes", "no"], logprobs=1))
    rows = out.to_pylist()
    assert [r["error"] for r in rows[:3]] == [None] * 3
    assert rows[3]["error"] == "invalid sampling params: SamplingParams.n=0 must be an int >= 1"
    assert rows[3]["finish_reason"] is None and rows[3]["generated_text"] is None
    assert [len(r["generated_text"]) for r in rows[:3]] == [1, 3, 1]
    assert all(text in ("yes", "no") for r in (rows[0], rows[2]) for text in r["generated_text"])
    assert all(re.fullmatch("[0-9]{2}", text) for text in rows[1]["generated_text"]), rows[1]["generated_text"]
    for r in rows[:3]:
        assert r["finish_reason"] == ["stop"] * len(r["generated_text"])  # each completion ended by its constraint
        for ids, logprobs, top in zip(r["generated_token_ids"], r["generated_logprobs"], r["generated_top_logprobs"]):
            check_logprobs(ids, logprobs, top, k=1)


def test_generate_table_with_logprobs_and_one_completion_keeps_scalar_columns():
    out = generate_table(add_prompt(topics_table()), **ENGINE, default_sampling_params=dict(logprobs=3))
    assert out.schema.field("generated_text").type == pa.string()
    assert out.schema.field("generated_logprobs").type == pa.list_(pa.float32())
    assert out.schema.field("generated_top_logprobs").type == TOP_LOGPROBS
    for r in out.to_pylist():
        if r["id"] in BAD:
            assert r["generated_logprobs"] is None and r["generated_top_logprobs"] is None
        else:
            check_logprobs(r["generated_token_ids"], r["generated_logprobs"], r["generated_top_logprobs"], k=3)


def test_bad_default_sampling_params_fail_before_a_model_loads():
    """A model that does not exist: an error about it would mean the engine was loaded before the check."""
    rows = pa.table({"prompt": ["hi"]})
    with pytest.raises(ValueError, match="unknown sampling parameter: .*'top_kk'"):
        generate_table(rows, model="/no/such/model", default_sampling_params=dict(top_kk=5))
    with pytest.raises(ValueError, match="SamplingParams.n=0"):
        Generate(model="/no/such/model", default_sampling_params=dict(n=0))
    with pytest.raises(ValueError, match="regex does not compile"):
        Generate(model="/no/such/model", default_sampling_params=dict(regex="(unclosed"))
