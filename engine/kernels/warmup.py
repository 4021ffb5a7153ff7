"""Compiling Triton kernel variants before a run needs them, several at once.

Triton compiles a kernel for each variant it meets (constexpr values, argument dtypes, 16-byte pointer
alignment, integers equal to 1 or divisible by 16) at that variant's first launch: about a second each on a
machine whose Triton cache is cold, during which the GPU idles. Inside :func:`ahead_of_time`, launches made through
:func:`launch` only compile, on a thread pool (Triton's ``AsyncCompileMode``; on the H200 machine 8 variants took
2.2 s this way, 9.4 s one by one); the block ends when every variant is built. With a warm cache each variant is
loaded from disk in milliseconds. The model runner uses it for the variants that depend on the batch
(``ModelRunner._compile_ahead``); the forward pass's own kernels compile in the start-up's first runs.
"""
import contextvars
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import triton

_COMPILED = contextvars.ContextVar("nanovllm_compiled", default=None)  # inside ahead_of_time: what it compiled


def launch(kernel: triton.JITFunction, grid: tuple[int, ...]) -> Callable[..., object]:
    """``kernel[grid]``; inside :func:`ahead_of_time`, its compilation only (nothing runs on the device)."""
    compiled = _COMPILED.get()
    if compiled is None:
        return kernel[grid]
    return lambda *args, **kwargs: compiled.append(kernel.warmup(*args, grid=grid, **kwargs))


@contextmanager
def ahead_of_time(threads: int | None = None) -> Iterator[None]:
    """Launches through :func:`launch` in this block compile without running, ``threads`` at a time (default:
    the CPUs this process may use, at most 16); when the block ends all are compiled and loaded onto the device.
    (Triton loads a compiled kernel at its first launch otherwise: a module load in the middle of a run, which CUDA
    may make wait for the whole device.) Outputs of the skipped launches are left unwritten."""
    compiled = []
    token = _COMPILED.set(compiled)
    try:
        async_mode = getattr(triton, "AsyncCompileMode", None)  # one at a time in a Triton without it
        if async_mode is None:
            yield
        else:
            threads = threads or min(16, len(os.sched_getaffinity(0)))
            with ThreadPoolExecutor(threads, thread_name_prefix="triton-compile") as pool, async_mode(pool):
                yield
    finally:
        _COMPILED.reset(token)
    for kernel in compiled:
        if hasattr(kernel, "result"):  # the async mode's future (Triton 3.6's does not pass attributes on)
            kernel = kernel.result()
        load = getattr(kernel, "_init_handles", None)
        if load is not None:
            load()
