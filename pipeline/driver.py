"""The driver: check everything that can be checked before Ray starts, start Ray and the actors, run the job.

Order matters for the user. Flags (pipeline.config), the output directory, the input and its columns are
checked first, so such a mistake costs one line and nothing is started. The model is resolved exactly as
the actors will resolve it, and the engine and sampling settings checked by the engine's rules
(:mod:`pipeline.checks`, in a child process), while the input is read and Ray starts (or is joined): a bad one
fails the job in one line before any actor starts. The actors then load their
engines while the input is fingerprinted and the manifest checked; then the dispatch loop
(:mod:`pipeline.dispatch`) runs, and Ray is left as it was found.
"""
import logging
import math
import os
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.actor import EngineActor
from pipeline.checks import REPO_ROOT, check_settings_somewhere
from pipeline.config import JobConfig
from pipeline.dispatch import ActorPlan, JobRunner
from pipeline.errors import JobFailed, UsageError, root_cause
from pipeline.inputs import InputSource, open_input, resolve_prompt_column
from pipeline.output import OutputDir, make_manifest
from pipeline.rows import OVERRIDE_COLUMNS, SAMPLING_PARAMS_COLUMN, RowSpec, output_spec
from pipeline.sample import sample_prompts
from pipeline.signals import StopRequest
from pipeline.stats import JobStats

log = logging.getLogger("pipeline")
CONNECT_TIMEOUT_S = 10.0


@dataclass
class JobReport:
    status: str                 # completed | nothing to do | interrupted
    exit_code: int
    output: Path
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobPlan:
    """What planning found, before anything is written or started."""
    out: OutputDir
    source: InputSource
    prompt_column: str
    job_id: str                 # the job already in --output keeps its id (metrics, stats)
    num_shards: int
    shards_left: int            # not written yet (by the part files present; the manifest is checked later)


def run_job(config: JobConfig, actor_cls: type = EngineActor, stop: StopRequest | None = None) -> JobReport:
    """Plan, run and report a job. Raises :class:`~pipeline.errors.PipelineError` subclasses for the user.

    ``actor_cls`` is :class:`EngineActor` or a subclass (tests inject faults through one). ``stop`` receives
    Ctrl-C and SIGTERM (the command line installs it first thing); by default the job installs its own.
    """
    started = time.monotonic()
    with nullcontext(stop) if stop is not None else StopRequest() as stop:
        settings = in_background(check_settings_somewhere, config)  # while the input is read, Ray starts
        plan = plan_job(config)
        if plan.shards_left == 0 and plan.out.manifest_path.exists():
            prepare_output(config, plan)  # a finished job: the input must still be the same one
            log.info("all %d shards are already written in %s; nothing to do (--overwrite recomputes)",
                     plan.num_shards, plan.out.results)
            return JobReport("nothing to do", 0, plan.out.root)
        fingerprint = in_background(fingerprint_input, plan.source)  # while Ray and the actors start
        with ray_session(config.address):
            ray_ready_s = time.monotonic() - started
            settings.result()  # a model that cannot be resolved stops the job here, before any actor starts
            runner = make_runner(config, plan, actor_cls, stop, started)
            runner.stats.ray_ready_s = ray_ready_s
            try:
                runner.start_actors()     # they load their engines while the input is fingerprinted
                fingerprint.result()
                runner.run(prepare_output(config, plan))
            finally:
                runner.stop_actors()
        runner.finish_late_stop()
    exit_code = stop.exit_code if runner.status == "interrupted" else 0
    return JobReport(runner.status, exit_code, plan.out.root, runner.summary)


def plan_job(config: JobConfig) -> JobPlan:
    """The checks that need no Ray: output directory, input, columns; writes only the sample input."""
    out = OutputDir(config.output)
    out.check(config.resume, config.overwrite)
    if config.input is None and not out.sample_path.exists():
        out.write_parquet(out.sample_path, sample_prompts())
    source = open_input(config.input or str(out.sample_path), config.split)
    if source.num_rows == 0:
        raise UsageError(f"input {source.location} has no rows")
    prompt_column = resolve_prompt_column(source.schema, config.prompt_column)
    num_shards = math.ceil(source.num_rows / config.shard_size)
    previous = out.previous_manifest(config.overwrite)
    written = set() if config.overwrite else out.finished_shards()
    plan = JobPlan(out, source, prompt_column, previous["job_id"] if previous else config.job_id, num_shards,
                   num_shards - len(written & set(range(num_shards))))
    log.info("job %s: %s (%s, %d rows) -> %s, %d shards of %d rows, %d already written", plan.job_id,
             source.location, source.format, source.num_rows, out.root, num_shards, config.shard_size,
             num_shards - plan.shards_left)
    return plan


def prepare_output(config: JobConfig, plan: JobPlan) -> set[int]:
    """Write (or check) the manifest and return the shards already written."""
    manifest = make_manifest(plan.job_id, plan.source.identity(), config.shard_size, plan.num_shards,
                             config.result_settings())
    _, done = plan.out.prepare(manifest, config.overwrite)
    return done


def make_runner(config: JobConfig, plan: JobPlan, actor_cls: type, stop: StopRequest, started: float) -> JobRunner:
    device, num_actors, gpus = resolve_resources(config, plan.shards_left)
    defaults = config.sampling_defaults()
    row_spec = RowSpec(plan.prompt_column, defaults, output_spec(plan.source.schema, defaults))
    actors = ActorPlan(actor_cls, (plan.job_id, config.engine_kwargs(device), row_spec, config.log_level),
                       num_actors, gpus, env_vars={"NANOVLLM_LOG_LEVEL": config.log_level})  # read at engine import
    stats = JobStats(plan.job_id, started, resources=dict(device=device, num_actors=num_actors, gpus_per_actor=gpus))
    row_columns = [plan.prompt_column, *OVERRIDE_COLUMNS, SAMPLING_PARAMS_COLUMN]
    return JobRunner(config, plan.source, plan.out, plan.num_shards, actors, row_spec.outputs,
                     [c for c in row_columns if c in plan.source.schema.names], stats, resume_command(config), stop)


def in_background(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` in a daemon thread (a job that stops does not wait for it); its future has the result."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:
            future.set_exception(e)

    threading.Thread(target=run, name=f"driver-{fn.__name__}", daemon=True).start()
    return future


def fingerprint_input(source: InputSource) -> str:
    try:
        return source.fingerprint
    except OSError as e:
        raise UsageError(f"cannot read input {source.location}: {e.strerror or e}") from e


def resume_command(config: JobConfig) -> str:
    """The command that continues this job: the original flags, with --output pinned and --overwrite dropped."""
    args, skip = [], False
    for arg in config.command:
        if skip:
            skip = False
        elif arg in ("--output", "--job-id"):
            skip = True
        elif not arg.startswith(("--output=", "--job-id=")) and arg not in ("--overwrite", "--resume"):
            args.append(arg)
    return shlex.join(["python", "jobs/offline_batch.py", *args, "--output", config.output, "--resume"])


@contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Ray for the block: joined (or started) here and shut down at its end. A caller's own session (Ray
    already initialised: an embedding program, tests) is left alone."""
    if ray.is_initialized():
        yield
        return
    connect_ray(address)
    try:
        yield
    finally:
        ray.shutdown()


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else a local one (started if none is running).

    ``code_search_path`` puts the repo root on the workers' path so they import ``pipeline`` and ``engine``
    however the driver was started (under ``ray job submit --working-dir .`` the working dir does it too).
    """
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and re.fullmatch(r"[\w.-]+:\d+", address):  # a GCS host:port: Ray would retry it forever
        host, port = address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise JobFailed(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from e
    # A local cluster started here skips Ray's prestarted workers (one per CPU, each importing Ray while the engine
    # actor starts): the job uses only its actors. W5-job on one H200: first engine step 24.9 s after launch
    # against 27.2-28.4 s. Only a raylet started now reads it; the caller's own value wins.
    os.environ.setdefault("RAY_prestart_worker_first_driver", "0")
    try:
        ray.init(address=address, log_to_driver=True,
                 job_config=ray.job_config.JobConfig(code_search_path=[str(REPO_ROOT)]))
    except Exception as e:  # ConnectionError, AuthenticationError, RuntimeError, ...: one line for the user
        where = f" at {address}" if address else ""
        raise JobFailed(f"cannot start or join a Ray cluster{where}: {root_cause(e)}") from e


def resolve_resources(config: JobConfig, num_shards: int) -> tuple[str, int, float]:
    """(device, number of actors, GPUs per actor) from the flags and the cluster's resources."""
    gpus = ray.cluster_resources().get("GPU", 0.0)
    tp = config.tensor_parallel_size
    device = config.device if config.device != "auto" else ("cuda" if gpus >= 1 else "cpu")
    if device == "cuda" and gpus < tp:
        raise UsageError(f"--device cuda with --tensor-parallel-size {tp} needs {tp} GPU(s); the cluster has "
                         f"{gpus:g}")
    default = int(gpus // tp) if device == "cuda" else 1
    num_actors = min(config.num_actors or default, num_shards)
    if device == "cuda" and num_actors * tp > gpus:
        log.warning("%d actors x %d GPUs exceed the cluster's %g GPUs: the rest start when GPUs free up",
                    num_actors, tp, gpus)
    return device, num_actors, float(tp) if device == "cuda" else 0.0
