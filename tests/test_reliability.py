"""Reliability (issue 7): bad inputs and flags fail early with one line; a killed actor, a killed or interrupted
driver, a poisoned row and a full disk each leave every row exactly once (docs/reliability.md maps each fault
to its test here)."""
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from ray.util.state import list_actors

from pipeline.actor import EngineActor
from pipeline.checks import check_settings_apart
from pipeline.cli import main
from pipeline.config import parse_config
from pipeline.driver import run_job
from pipeline.errors import JobFailed, UsageError
from test_pipeline_support import (REPO, JobInThread, assert_each_id_once, free_port, job_argv, part_files,
                                   read_results, start_ray_cluster, subprocess_env, wait_for, write_prompts)

ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)

PROMPTS = [f"Prompt number {i} about the sea" for i in range(8)]
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+\s+(INFO|WARNING) \w+\.py:\d+ -- ")  # Ray's own logger


# ----- bad inputs and flags: one line, non-zero exit, nothing started ---------------------------------------------
def _bad_inputs(tmp_path):
    """name -> (argv, expected message, exit code). Each case gets its own files."""
    ok = write_prompts(tmp_path / "ok.parquet", PROMPTS)
    (tmp_path / "corrupt.parquet").write_bytes(b"this is not parquet")
    (tmp_path / "prompts.txt").write_text("hello\n")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "fine"}\n{"prompt": \n')
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "no_prompt.parquet")
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "int_prompt.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "max_tokens": ["lots"]}), tmp_path / "str_override.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "n": ["two"]}), tmp_path / "str_n.parquet")
    pq.write_table(pa.table({"prompt": ["a"], "choice": ["yes"]}), tmp_path / "str_choice.parquet")
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "stale" / "results").mkdir(parents=True)
    out = str(tmp_path / "out")
    return {
        "missing file": (["--input", str(tmp_path / "nope.parquet"), "--output", out], "input not found", 2),
        "unreadable file": (["--input", str(tmp_path / "corrupt.parquet"), "--output", out],
                            "cannot read .*corrupt.parquet as parquet", 2),
        "unsupported format": (["--input", str(tmp_path / "prompts.txt"), "--output", out],
                               "unsupported input file", 2),
        "malformed jsonl": (["--input", str(tmp_path / "broken.jsonl"), "--output", out], "as json", 2),
        "missing prompt column": (["--input", str(tmp_path / "no_prompt.parquet"), "--output", out],
                                  "no column 'prompt' \\(columns: text\\)", 2),
        "missing custom column": (["--input", str(ok), "--prompt-column", "question", "--output", out],
                                  "no column 'question'", 2),
        "wrong prompt type": (["--input", str(tmp_path / "int_prompt.parquet"), "--output", out],
                              "column 'prompt' has type int64", 2),
        "wrong override type": (["--input", str(tmp_path / "str_override.parquet"), "--output", out],
                                "column 'max_tokens' .* has type string", 2),
        "wrong n type": (["--input", str(tmp_path / "str_n.parquet"), "--output", out],
                         "column 'n' \\(a per-row override\\) has type string; expected number", 2),
        "choice not a list": (["--input", str(tmp_path / "str_choice.parquet"), "--output", out],
                              "column 'choice' .* has type string; expected texts", 2),
        "empty dataset": (["--input", str(tmp_path / "empty.parquet"), "--output", out], "has no rows", 2),
        "empty directory": (["--input", str(tmp_path / "empty_dir"), "--output", out], "has no data files", 2),
        "output is a file": (["--input", str(ok), "--output", str(tmp_path / "a_file")], "not a directory", 2),
        "output under a file": (["--input", str(ok), "--output", str(tmp_path / "a_file" / "sub")],
                                "cannot create directory", 2),
        "foreign results": (["--input", str(ok), "--output", str(tmp_path / "stale")], "no manifest.json", 2),
        "resume nothing": (["--input", str(ok), "--output", out, "--resume"], "nothing to resume", 2),
        "shard size 0": (["--shard-size", "0"], "--shard-size=0 must be >= 1", 2),
        "shard size text": (["--shard-size", "many"], "argument --shard-size: invalid int value", 2),
        "negative temperature": (["--temperature", "-1"], "--temperature=-1.0", 2),
        "top-p 0": (["--top-p", "0"], "--top-p=0.0 must be in", 2),
        "max tokens 0": (["--max-tokens", "0"], "--max-tokens=0", 2),
        "no actors": (["--num-actors", "0"], "--num-actors=0", 2),
        "negative retries": (["--max-shard-retries", "-1"], "--max-shard-retries=-1", 2),
        "unknown device": (["--device", "tpu"], "invalid choice: 'tpu'", 2),
        "unknown engine arg": (["--engine-arg", "warp_speed=9"], "--engine-arg 'warp_speed=9'", 2),
        "resume and overwrite": (["--resume", "--overwrite"], "contradict", 2),
        "bad job id": (["--job-id", "../escape"], "--job-id", 2),
        "json schema not JSON": (["--json-schema", str(tmp_path / "prompts.txt")],
                                 "argument --json-schema: .*prompts.txt is not JSON", 2),
        "json schema missing": (["--json-schema", str(tmp_path / "nope.json")],
                                "argument --json-schema: cannot read .*nope.json", 2),
        "two constraints": (["--regex", "a+", "--choice", "a"], "--choice: not allowed with argument --regex", 2),
    }


def test_bad_inputs_and_flags_fail_early_with_one_line(tmp_path, capsys, monkeypatch):
    def no_ray(*_):
        raise AssertionError("Ray must not be started for a bad input")

    monkeypatch.setattr("pipeline.driver.connect_ray", no_ray)
    for name, (argv, message, code) in _bad_inputs(tmp_path).items():
        assert main(argv) == code, name
        err = capsys.readouterr().err.strip().splitlines()
        lines = [line for line in err if not line.startswith("[pipeline]")]
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert re.search(message, lines[0]), (name, lines[0])
    assert not (tmp_path / "out").exists()  # nothing was written for any of them


@pytest.fixture(params=["in place", "apart"])
def settings_checked(request, monkeypatch):
    """The driver's settings check as a process that has imported the engine runs it (in place), and as a fresh
    driver does (in a child process: pipeline.checks.check_settings_apart)."""
    if request.param == "apart":
        monkeypatch.setattr("pipeline.driver.check_settings_somewhere", check_settings_apart)


def test_models_that_cannot_be_resolved_fail_with_one_line_before_any_actor(tmp_path, capfd, monkeypatch,
                                                                            settings_checked):
    """The engine's own rule (engine.loader.resolve_model_path) decides, while Ray starts: a path that does not
    exist, a directory without config.json, a hub id without its org/ (gpt2) that every actor would refuse."""
    (tmp_path / "model_without_config").mkdir()
    cases = {"/no/such/model": "neither a local model directory", str(tmp_path / "model_without_config"):
             "has no config.json", "gpt2": "neither a local model directory"}
    monkeypatch.setattr("pipeline.driver.connect_ray", lambda address: None)  # Ray may start meanwhile; not here
    monkeypatch.setattr("pipeline.driver.make_runner", lambda *a: pytest.fail("no actor may start"))
    ok = write_prompts(tmp_path / "ok.parquet", PROMPTS)
    for model, message in cases.items():
        assert main(["--input", str(ok), "--model", model, "--output", str(tmp_path / "out")]) == 2, model
        lines = [line for line in capfd.readouterr().err.strip().splitlines() if not line.startswith("[pipeline]")]
        assert len(lines) == 1 and lines[0].startswith(f"error: --model {model}: ") and message in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_bad_sampling_and_engine_flags_fail_with_one_line_before_any_actor(tmp_path, capfd, monkeypatch,
                                                                           settings_checked):
    """The engine's own rules (SamplingParams, engine.config for --engine-arg values, and xgrammar for a
    constraint, which needs no tokenizer), checked by the driver: a flag every row or actor would fail on stops the
    job in one line naming it, exit 2."""
    (tmp_path / "bogus.json").write_text('{"type": "bogus"}')
    cases = {("--json-schema", str(tmp_path / "bogus.json")):
             'error: --json-schema: json_schema does not compile: Unsupported type "bogus"',
             ("--top-k", "0"): "error: --top-k: SamplingParams.top_k=0 must be -1 (off) or an int >= 1",
             ("--min-tokens", "9"): "error: --min-tokens: SamplingParams.min_tokens=9 must be an int in [0, max_",
             ("--regex", "(unclosed"): "error: --regex: regex does not compile: ",
             ("--engine-arg", "max_prefill_tokens_with_decodes=0"):
             "error: --engine-arg max_prefill_tokens_with_decodes=0 must be None or >= 1",
             ("--engine-arg", "max_num_seqs=many"): "error: --engine-arg max_num_seqs='many' must be None or from 1"}
    monkeypatch.setattr("pipeline.driver.connect_ray", lambda address: None)
    monkeypatch.setattr("pipeline.driver.make_runner", lambda *a: pytest.fail("no actor may start"))
    ok = write_prompts(tmp_path / "ok.parquet", PROMPTS)
    for flags, message in cases.items():
        assert main(["--input", str(ok), "--max-tokens", "4", *flags, "--output", str(tmp_path / "out")]) == 2, flags
        lines = [line for line in capfd.readouterr().err.strip().splitlines() if not line.startswith("[pipeline]")]
        assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "out").exists()


def test_a_driver_without_the_engine_checks_settings_in_a_child_process():
    """The job's driver imports neither torch, transformers nor the engine for its checks (pipeline.checks)."""
    code = ("import sys; from pipeline.config import parse_config; from pipeline.checks import check_settings_somewhere; "
            "check_settings_somewhere(parse_config(['--model', 'demo-random', '--top-k', '5'])); "
            "print([m for m in ('torch', 'transformers', 'engine') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_cli_exit_status_and_message(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "offline_batch.py"), "--input",
                           str(tmp_path / "missing.parquet")], env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: input not found: {tmp_path / 'missing.parquet'}"]


@pytest.mark.parametrize("flag, name, message", [
    ("--model", "Qwen/Qwen3-0.6B", "--model Qwen/Qwen3-0.6B: could not download model"),
    ("--input", "someone/prompts", "input someone/prompts: not a local path, and the Hugging Face hub cannot be reached"),
], ids=["model", "dataset"])
def test_what_cannot_be_fetched_fails_fast_in_one_line(tmp_path, flag, name, message):
    """A hub that refuses connections and an empty cache: one line, exit 2, no retries, no actor, nothing written
    (the model is resolved while Ray starts, so for it a local Ray may start and stop meanwhile)."""
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{free_port()}", HF_HOME=str(tmp_path / "hf-home"))
    other = ["--input", str(write_prompts(tmp_path / "in.parquet", PROMPTS))] if flag == "--model" else []
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "offline_batch.py"), flag, name, *other, "--output",
                           str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=180)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and lines[-1].startswith(f"error: {message}"), proc.stderr[-3000:]
    ours = [line for line in lines if not line.startswith("[pipeline]") and not RAY_LOG_LINE.match(line)]
    assert ours == lines[-1:], ours  # besides Ray's own start-up lines, the error alone: no retries, no actor
    assert time.monotonic() - started < 90 and not (tmp_path / "out").exists()


def test_model_that_cannot_load_fails_the_job_in_one_line(ray_cluster, tmp_path):
    model = tmp_path / "broken_model"
    model.mkdir()
    (model / "config.json").write_text("{}")  # looks like a model directory, is not one
    with pytest.raises(JobFailed, match="engine actor actor-0 failed to start: .*Error") as info:
        run_job(parse_config(job_argv(write_prompts(tmp_path / "in.parquet", PROMPTS), tmp_path / "out",
                                      "--model", str(model))))
    assert "\n" not in str(info.value) and "resume with:" in str(info.value)


# ----- faults during a job ----------------------------------------------------------------------------------------
def test_killed_actor_shard_is_retried_and_every_row_comes_back_once(ray_cluster, tmp_path):
    n = 64
    config = parse_config(job_argv(write_prompts(tmp_path / "in.parquet", [f"kill test {i}" for i in range(n)]),
                                   tmp_path / "out", "--job-id", "kill-actor", actors=2, shard_size=4, max_tokens=32))
    job = JobInThread(config)
    first = wait_for(lambda: part_files(tmp_path / "out"), 120, "the first part file")[0]
    victim = pq.read_table(first).column("actor_id")[0].as_py()  # an actor that is running shards
    alive = list_actors(address=ray_cluster.address, filters=[("state", "=", "ALIVE")], detail=True, limit=1000)
    (state,) = [a for a in alive if a.repr_name == f"EngineActor[{victim}]"]
    os.kill(state.pid, signal.SIGKILL)
    stats = job.result(timeout=240).stats
    assert stats["status"] == "completed"
    assert stats["actors"][victim]["status"] == "died"
    assert stats["this_run"]["shard_retries"] >= 1 and stats["this_run"]["actors_replaced"] >= 1
    results = read_results(tmp_path / "out")
    assert_each_id_once(results, n)
    assert results.column("error").null_count == n  # the retried shard succeeded: no row was given up
    assert stats["rows_ok"] == n


class PoisonedActor(EngineActor):
    """Breaks inside ``generate`` on poisoned rows: 'CRASH' kills the process (like a segfault), 'RAISE'
    raises. Either way the whole batch fails, so only splitting the shard can isolate the row."""

    async def _generate(self, prompts, params):
        texts = [self.llm.tokenizer.decode(p) for p in prompts]
        if any("CRASH" in t for t in texts):
            os._exit(1)
        if any("RAISE" in t for t in texts):
            raise RuntimeError("poisoned row broke the batch")
        return await super()._generate(prompts, params)


def test_poisoned_rows_are_isolated_and_the_rest_complete(ray_cluster, tmp_path):
    prompts = [f"clean row {i}" for i in range(12)]
    prompts[5], prompts[10] = "CRASH please", "RAISE please"
    report = run_job(parse_config(job_argv(write_prompts(tmp_path / "in.parquet", prompts), tmp_path / "out",
                                           "--max-shard-retries", "0", actors=2, shard_size=4)),
                     actor_cls=PoisonedActor)
    rows = read_results(tmp_path / "out").sort_by("id").to_pylist()
    assert [r["id"] for r in rows] == list(range(12))
    assert [i for i, r in enumerate(rows) if r["finish_reason"] == "error"] == [5, 10]
    assert "died" in rows[5]["error"] and "RuntimeError: poisoned row broke the batch" in rows[10]["error"]
    assert all(r["generated_token_ids"] for i, r in enumerate(rows) if i not in (5, 10))
    # Each poisoned shard of 4: fails whole, its bad half of 2 fails, the bad row fails alone: 2 splits, 3 failures.
    this_run = report.stats["this_run"]
    assert this_run["shard_splits"] == 4 and this_run["actors_replaced"] == 6


def test_disk_full_stops_the_job_clearly_and_keeps_written_shards(ray_cluster, tmp_path, monkeypatch):
    real_write = pq.write_table

    def fill_disk_at_part_2(table, where, *args, **kwargs):
        if "part-00002" in str(where):
            raise OSError(28, "No space left on device")
        return real_write(table, where, *args, **kwargs)

    monkeypatch.setattr("pipeline.output.pq.write_table", fill_disk_at_part_2)
    out = tmp_path / "out"
    with pytest.raises(JobFailed, match="cannot write .*part-00002.parquet: No space left on device .* of 4 shards "
                                        "are written.*resume with: python jobs/offline_batch.py") as failed:
        run_job(parse_config(job_argv(write_prompts(tmp_path / "in.parquet", PROMPTS), out, shard_size=2,
                                      max_tokens=2)))
    # All four shards are in the engine at once, so any of the others may be written before shard 2's write
    # fails; none is partial, and shard 2 is not there.
    written = sorted(p.name for p in (out / "results").iterdir())
    assert set(written) <= {"part-00000.parquet", "part-00001.parquet", "part-00003.parquet"}
    assert f"({len(written)} of 4 shards are written" in str(failed.value)
    assert json.loads((out / "stats.json").read_text())["status"] == "failed"


# ----- the driver dies or is stopped ------------------------------------------------------------------------------
# jobs/offline_batch.py with ray.shutdown announced by a marker file and followed by a pause, so that a signal sent
# when the marker appears lands while the driver shuts Ray down.
SLOW_SHUTDOWN = """
import pathlib, runpy, sys, time
import ray
marker, real_shutdown = pathlib.Path(sys.argv[1]), ray.shutdown
sys.argv = sys.argv[2:]  # [offline_batch.py, its flags...]
def slow_shutdown(*args, **kwargs):
    marker.touch()
    real_shutdown(*args, **kwargs)
    time.sleep(2)
ray.shutdown = slow_shutdown
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _start_driver(ray_cluster, argv, shutdown_marker=None):
    script = [str(REPO / "jobs" / "offline_batch.py")]
    if shutdown_marker is not None:
        script = ["-c", SLOW_SHUTDOWN, str(shutdown_marker), *script]
    return subprocess.Popen([sys.executable, *script, "--address", ray_cluster.address, *argv], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _snapshot(output):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in part_files(output)}


def test_killed_driver_resumes_without_redoing_shards(ray_cluster, tmp_path):
    n = 48
    input_path = write_prompts(tmp_path / "in.parquet", [f"resume test {i}" for i in range(n)])
    out = tmp_path / "out"
    argv = job_argv(input_path, out, shard_size=4, max_tokens=32)
    proc = _start_driver(ray_cluster, argv)
    wait_for(lambda: len(part_files(out)) >= 2, 120, "two part files")
    proc.kill()
    proc.communicate(timeout=60)
    before = _snapshot(out)
    assert 2 <= len(before) < 12

    report = run_job(parse_config(argv))  # the same command again
    assert report.status == "completed" and report.stats["this_run"]["shards_skipped"] == len(before)
    assert_each_id_once(read_results(out), n)
    assert {name: _snapshot(out)[name] for name in before} == before  # finished shards were not rewritten
    assert report.stats["rows_done"] == n
    _check_resumed_numbers(report.stats, out, n, rows_before=4 * len(before))

    complete = _snapshot(out)
    again = run_job(parse_config(argv))  # a finished job: nothing to do, nothing touched
    assert again.status == "nothing to do" and _snapshot(out) == complete

    write_prompts(input_path, [f"another input {i}" for i in range(n)])
    with pytest.raises(UsageError, match="different input fingerprint .*refusing to resume"):
        run_job(parse_config(argv))
    assert main([*argv, "--overwrite", "--shard-size", "48", "--max-tokens", "2"]) == 0
    results = read_results(out)
    assert_each_id_once(results, n)
    assert len(part_files(out)) == 1
    assert results.column("prompt")[0].as_py() == "another input 0"


# Where the signal lands: while the settings are checked (in the driver's child process, pipeline.checks), once the
# manifest is written (the actors are starting, nothing ran yet), once the first shard is written (while shards run
# and are written), and while Ray shuts down at the end of a finished job (``ray.shutdown`` slowed down and
# announced by a marker file, see _start_driver).
STOP_POINTS = {
    "checks": lambda proc, out: subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "pipeline.checks"],
                                               capture_output=True).returncode == 0,
    "start": lambda proc, out: (out / "manifest.json").exists(), "middle": lambda proc, out: part_files(out),
    "end": lambda proc, out: (out / "shutting-down").exists()}


def _check_resumed_numbers(stats, out, n, rows_before):
    """The final line and the report keep this run's numbers apart from the totals over both runs: this run's
    rows, tokens and throughput; the actors of this run; plots over this run's steps only (no idle gap)."""
    from pipeline.cli import done_line
    from pipeline.report import actor_rows, load_job, summary
    run = stats["this_run"]
    assert run["rows"] == n - rows_before
    line = done_line(stats, str(out))
    assert line.startswith(f"done: this run {n - rows_before} rows, {run['generated_tokens']} tokens, "
                           f"{stats['output_tokens_per_s']:.1f} tok/s") and f"; all runs {n} rows (0 failed)" in line
    job = load_job(out)
    numbers = dict(summary(job))
    assert numbers["rows (all runs)"].startswith(f"{n} of {n} done") and numbers["rows (this run)"].startswith(
        f"{n - rows_before} (")
    assert sum(int(row[3]) for row in actor_rows(job)[1:]) == n - rows_before
    assert min(s["timestamp"].min() for s in job.steps.values()) >= run["started_at"]
    assert sum(len(s["step"]) for s in job.steps.values()) == sum(a["steps"] for a in stats["actors"].values())


@pytest.mark.parametrize("sig, point", [(signal.SIGINT, "checks"), (signal.SIGTERM, "start"),
                                        (signal.SIGTERM, "middle"), (signal.SIGTERM, "end"), (signal.SIGINT, "middle")],
                         ids=["ctrl-c-checks", "sigterm-start", "sigterm-middle", "sigterm-end", "ctrl-c-middle"])
def test_a_stopped_driver_exits_cleanly_and_prints_how_to_resume(ray_cluster, tmp_path, sig, point):
    """Wherever the signal lands: exit 128 + signal, "interrupted" in stats.json, the steps merged, no _tmp/, no
    traceback, and the printed command finishes the job without redoing written shards."""
    out = tmp_path / "out"
    proc = _start_driver(ray_cluster, job_argv(None, out, shard_size=4, max_tokens=32),  # the 64 sample prompts
                         shutdown_marker=out / "shutting-down" if point == "end" else None)
    wait_for(lambda: STOP_POINTS[point](proc, out), 180, f"the {point} of the job")
    if point == "checks":
        os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C: to the driver's whole process group
    else:
        proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err and "SystemError" not in err, err[-3000:]
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "interrupted" and stats["rows_done"] == sum(pq.read_metadata(p).num_rows
                                                                           for p in part_files(out))
    assert not (out / "_tmp").exists() and (out / "steps.parquet").exists()
    command = err.split("resume with: ")[1].splitlines()[0]
    assert command.startswith("python jobs/offline_batch.py ") and f"--output {out} --resume" in command
    if point == "middle":
        assert 0 < stats["rows_done"] < 64
        before = _snapshot(out)
        assert main(shlex.split(command)[2:]) == 0  # the printed command finishes the job
        assert_each_id_once(read_results(out), 64)
        assert {name: _snapshot(out)[name] for name in before} == before


def test_local_cluster_starts_without_prestarted_workers_unless_asked(monkeypatch):
    """The raylet a job starts reads RAY_prestart_worker_first_driver from the driver's environment: off by
    default (the job's actors are its only workers), a value the caller set is kept."""
    import pipeline.driver as driver
    seen = []
    monkeypatch.setattr(driver.ray, "init",
                        lambda **_: seen.append(os.environ.get("RAY_prestart_worker_first_driver")))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_prestart_worker_first_driver", raising=False)
    driver.connect_ray(None)
    monkeypatch.setenv("RAY_prestart_worker_first_driver", "1")
    driver.connect_ray(None)
    assert seen == ["0", "1"]
