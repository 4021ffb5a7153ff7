"""Logging for the engine: `NANOVLLM_LOG_LEVEL`, one format, loggers named `nanovllm.<package>.<module>`.

Every DEBUG line in the hot path is guarded by ``logger.isEnabledFor`` (or uses lazy ``%`` formatting),
so a disabled level costs one integer comparison. Only :func:`timed` synchronises the GPU, and only at DEBUG.
"""
import logging
import os
import resource
import sys
import time
from contextlib import contextmanager
from typing import Iterator

import torch

ROOT = "nanovllm"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMAT = "[%(asctime)s] [%(name)s] [%(levelname)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"
_HANDLER_ATTR = "_nanovllm_handler"


def get_logger(module_name: str) -> logging.Logger:
    """Map ``engine.scheduler`` → ``nanovllm.engine.scheduler`` and ``engine.layers.x`` → ``nanovllm.layers.x``."""
    parts = module_name.split(".")
    if parts[0] == "engine":
        parts = parts[1:]
    if not parts or parts[0] not in ("layers", "models", "kernels"):
        parts = ["engine", *parts]
    return logging.getLogger(".".join([ROOT, *parts]))


def configure(level: str | None = None) -> None:
    """Set the `nanovllm` logger from ``level`` or ``NANOVLLM_LOG_LEVEL`` (default INFO).

    If the application configured logging before (the root logger has handlers), no handler is added
    and records propagate to the application's handlers and format. ``NANOVLLM_LOG_TAG`` (e.g. a Ray actor's
    id) is put in front of every message; tensor-parallel worker processes inherit it with the environment.
    """
    root = logging.getLogger(ROOT)
    raw = level if level is not None else os.environ.get("NANOVLLM_LOG_LEVEL")
    name = (raw or "INFO").strip().upper()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_ATTR, False)]:
        root.removeHandler(handler)
    app_configured = bool(logging.getLogger().handlers)
    if app_configured:
        root.propagate = True
    else:
        handler = logging.StreamHandler(sys.stderr)
        tag = os.environ.get("NANOVLLM_LOG_TAG")
        fmt = FORMAT.replace("%(message)s", f"[{tag.replace('%', '%%')}] %(message)s") if tag else FORMAT
        handler.setFormatter(logging.Formatter(fmt, DATEFMT))
        setattr(handler, _HANDLER_ATTR, True)
        root.addHandler(handler)
        root.propagate = False
    if name not in LEVELS:
        root.setLevel(logging.INFO)
        root.warning("Unknown NANOVLLM_LOG_LEVEL=%r; using INFO (choose one of %s)", raw, ", ".join(LEVELS))
    elif raw is None and app_configured:
        root.setLevel(logging.NOTSET)  # follow the application's configuration
    else:
        root.setLevel(getattr(logging, name))


def memory_summary(device: torch.device) -> str:
    """GPU memory (allocated/reserved) on CUDA, process peak RSS on CPU."""
    if device.type == "cuda":
        gib = 1024**3
        return (f"GPU Memory [Device {device.index or 0}]: "
                f"Allocated={torch.cuda.memory_allocated(device) / gib:.2f}GB, "
                f"Reserved={torch.cuda.memory_reserved(device) / gib:.2f}GB")
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"CPU Memory: MaxRSS={rss_kib / 1024**2:.2f}GB"


@contextmanager
def timed(logger: logging.Logger, device: torch.device, label: str, *args: object) -> Iterator[None]:
    """At DEBUG: log ``[START] label`` / ``[END] label - Elapsed: X.XXms`` (synchronises CUDA); ``label % args``
    is formatted only then. Otherwise free."""
    if not logger.isEnabledFor(logging.DEBUG):
        yield
        return
    label = label % args
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    logger.debug("[START] %s", label)
    sync()
    start = time.perf_counter()
    yield
    sync()
    logger.debug("[END] %s - Elapsed: %.2fms", label, (time.perf_counter() - start) * 1e3)
