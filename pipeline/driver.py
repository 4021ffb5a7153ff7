"""The driver: check everything that can be checked before Ray starts, plan the job, then run it.

Order matters for the user: flags (pipeline.config), output directory, model, input and its columns are
all checked first, so a mistake costs one line and no actor. Only then is Ray joined and the dispatch
loop (:mod:`pipeline.dispatch`) started.
"""
import logging
import math
import os
import re
import shlex
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline.actor import EngineActor
from pipeline.config import JobConfig
from pipeline.dispatch import ActorPlan, JobRunner
from pipeline.errors import JobFailed, UsageError, root_cause
from pipeline.inputs import is_hub_id, open_input, resolve_prompt_column
from pipeline.output import OutputDir, make_manifest
from pipeline.rows import OVERRIDE_COLUMNS, RowSpec
from pipeline.sample import sample_prompts
from pipeline.stats import JobStats

log = logging.getLogger("pipeline")
REPO_ROOT = Path(__file__).resolve().parent.parent
CONNECT_TIMEOUT_S = 10.0


@dataclass
class JobReport:
    status: str                 # completed | nothing to do | interrupted
    exit_code: int
    output: Path
    stats: dict[str, Any] = field(default_factory=dict)


def run_job(config: JobConfig, actor_cls: type = EngineActor) -> JobReport:
    """Plan, run and report a job. Raises :class:`~pipeline.errors.PipelineError` subclasses for the user.

    ``actor_cls`` is :class:`EngineActor` or a subclass (tests inject faults through one).
    """
    started = time.monotonic()
    out = OutputDir(config.output)
    out.check(config.resume, config.overwrite)
    check_model(config.model)
    if config.input is None and not out.sample_path.exists():
        out.write_parquet(out.sample_path, sample_prompts())
    source = open_input(config.input or str(out.sample_path), config.split)
    if source.num_rows == 0:
        raise UsageError(f"input {source.location} has no rows")
    prompt_column = resolve_prompt_column(source.schema, config.prompt_column)
    num_shards = math.ceil(source.num_rows / config.shard_size)
    manifest, done = out.prepare(
        make_manifest(config.job_id, source.identity(), config.shard_size, num_shards, config.result_settings()),
        config.overwrite)
    job_id = manifest["job_id"]
    log.info("job %s: %s (%s, %d rows) -> %s, %d shards of %d rows, %d already written", job_id, source.location,
             source.format, source.num_rows, out.root, num_shards, config.shard_size, len(done))
    if len(done) == num_shards:
        log.info("all %d shards are already written in %s; nothing to do (--overwrite recomputes)", num_shards,
                 out.results)
        return JobReport("nothing to do", 0, out.root)

    connect_ray(config.address)
    device, num_actors, gpus = resolve_resources(config, num_shards - len(done))
    row_spec = RowSpec(prompt_column, config.max_tokens, config.temperature, config.top_p)
    actors = ActorPlan(actor_cls, (job_id, config.engine_kwargs(device), row_spec, config.log_level), num_actors,
                       gpus, env_vars={"NANOVLLM_LOG_LEVEL": config.log_level})  # read by the engine at import
    stats = JobStats(job_id, started, resources=dict(device=device, num_actors=num_actors, gpus_per_actor=gpus))
    runner = JobRunner(config, source, out, done, num_shards, actors,
                       [prompt_column, *(c for c in OVERRIDE_COLUMNS if c in source.schema.names)], stats,
                       resume_command(config))
    status, exit_code, summary = runner.run()
    return JobReport(status, exit_code, out.root, summary)


def check_model(model: str) -> None:
    """Reject a model that is certainly missing (a path that does not exist), before any actor starts.

    ``demo`` and existing directories pass; so does a name shaped like a hub id (``org/name``), which each
    actor resolves itself; if that fails, the job stops with the actor's error.
    """
    if model == "demo":
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {model}: directory has no config.json (not a Hugging Face model)")
        return
    if path.exists():
        raise UsageError(f"--model {model}: is a file; expected a model directory, hub id, or 'demo'")
    if not is_hub_id(model):
        raise UsageError(f"--model {model}: no such model directory (pass a local HF model directory, a hub id, "
                         f"or 'demo')")


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


def connect_ray(address: str | None) -> None:
    """Join the cluster at ``address`` (or RAY_ADDRESS), else a local one (started if none is running).

    ``code_search_path`` puts the repo root on the workers' path so they import ``pipeline`` and ``engine``
    however the driver was started (under ``ray job submit --working-dir .`` the working dir does it too).
    Does nothing when Ray is already initialised (a caller embedding the pipeline, or tests).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and re.fullmatch(r"[\w.-]+:\d+", address):  # a GCS host:port: Ray would retry it forever
        host, port = address.rsplit(":", 1)
        try:
            socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
        except OSError as e:
            raise JobFailed(f"cannot reach the Ray cluster at {address}: {e.strerror or e}") from e
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
