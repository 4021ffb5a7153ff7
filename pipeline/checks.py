"""What the engine will say about a job's model, engine arguments and sampling flags, said once, before any actor
starts: a bad one stops the job in one line naming it instead of failing every actor or every row.

The checks import torch, transformers and the engine, seconds of imports that a driver otherwise never needs. A
driver that has not imported them yet runs the checks in a child process (:func:`check_settings_apart`): run in a
thread beside ``ray.init``, those imports hold the driver's GIL while Ray starts the cluster (on a 2-core machine
``ray.init`` took 3.2-4.3 s beside them against 2.6 s alone), and the driver would carry them to its exit
(~0.3 s of interpreter shutdown). A process that has imported the engine already (a test, a notebook) checks in
place.

Run as ``python -m pipeline.checks``: a pickled :class:`~pipeline.config.JobConfig` on stdin; exit status 0 (good),
2 with the :class:`UsageError`'s message on stdout, or 1 with a traceback on stderr.
"""
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

from pipeline.config import JobConfig
from pipeline.errors import JobFailed, UsageError, one_line
from pipeline.rows import check_defaults

REPO_ROOT = Path(__file__).resolve().parent.parent


def check_settings_somewhere(config: JobConfig) -> None:
    """:func:`check_settings`, in this process if it has imported the engine already, else in a child process."""
    (check_settings if "engine" in sys.modules else check_settings_apart)(config)


def check_settings_apart(config: JobConfig) -> None:
    """:func:`check_settings` in a child process, its UsageError raised here. A stop never interrupts the child
    mid-check (it finishes in seconds and exits): it inherits the driver's blocked SIGINT and SIGTERM
    (:mod:`pipeline.signals`), and runs in a session of its own, out of reach of signals sent to the driver's
    process group (a terminal's Ctrl-C) whoever the caller is."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen([sys.executable, "-m", "pipeline.checks"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=env, start_new_session=True)
    verdict, _ = child.communicate(pickle.dumps(config))
    if child.returncode == 2:
        raise UsageError(verdict.decode())
    if child.returncode != 0:
        raise JobFailed(f"checking the job's settings failed (exit status {child.returncode}; its error is above)")


def check_settings(config: JobConfig) -> None:
    """The model, the engine arguments and the sampling flags, checked in this process (it imports the engine)."""
    check_model(config.model, config.log_level)
    from engine.config import check_engine_args
    try:
        check_engine_args(**config.engine_args)
    except ValueError as e:
        raise UsageError(f"--engine-arg {e}") from None
    check_sampling(config)


def check_sampling(config: JobConfig) -> None:
    """Each sampling flag by the engine's rules (:func:`pipeline.rows.check_defaults`)."""
    for name, value in config.sampling.items():
        try:
            check_defaults({"max_tokens": config.max_tokens, name: value})
        except ValueError as e:
            raise UsageError(f"--{name.replace('_', '-')}: {e}") from None


def check_model(model: str, log_level: str = "WARNING") -> None:
    """Resolve ``model`` with the engine's own rule (``engine.loader.resolve_model_path``: a built-in demo, a local
    HF directory, a .gguf file, or a Hugging Face hub id, fetched into the local cache), so that a model that
    cannot be found or fetched stops the job in one line before any actor starts. A hub model is downloaded
    here once; actors on this node then find it in the cache (other nodes fetch their own copy). The engine
    logs at the job's ``--log-level`` here too."""
    from engine.loader import resolve_model_path
    logging.getLogger("nanovllm").setLevel(log_level)
    try:
        resolve_model_path(model)
    except Exception as e:  # ValueError for a bad name or path; OSError, hub errors while fetching
        raise UsageError(f"--model {model}: {one_line(e)}") from e


def _main() -> int:
    config = pickle.load(sys.stdin.buffer)
    verdict = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # anything the checks print goes with their logs, to stderr
    try:
        check_settings(config)
    except UsageError as e:
        verdict.write(str(e))
        return 2
    finally:
        verdict.close()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
