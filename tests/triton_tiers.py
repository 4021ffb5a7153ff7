"""The two tiers of the Triton kernel tests (test_kernels.py, test_fused_kernels.py).

* small sizes (unmarked, ``@small``): on CPU through the Triton interpreter, or on the GPU when there is one;
* ``gpu``-marked (``@gpu @needs_cuda``): real sizes; skipped without CUDA.

Import this module before Triton. The interpreter only works if TRITON_INTERPRET=1 was set before Triton
was first imported (Triton decorates its own helpers such as ``tl.sum`` at import), so this sets it when
there is no GPU. If something imported Triton earlier (torch._dynamo does, through transformers), the small
tier cannot run in this process: each file's ``test_small_tier_in_fresh_interpreter`` reruns it in a fresh
one through :func:`run_in_fresh_interpreter`.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")


def interpreter_active() -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    return isinstance(triton.language.cdiv, InterpretedFunction)


def patch_language_once_per_launch() -> None:
    """Make the interpreter patch each ``triton.language`` module once per kernel launch, not on every call of a
    ``@triton.jit`` helper.

    Triton's interpreter (3.9, as installed for the CPU tests) re-patches the language modules a helper's globals name
    (``inspect.getmembers`` over each) every time the helper is called, in every program of the grid: about a third
    of an interpreted engine step. Within one launch a module patched once stays patched until the launch ends, so
    a helper call whose modules this launch has already patched skips the patching."""
    from triton.runtime import interpreter
    if not all(hasattr(interpreter, name) for name in ("_patch_lang", "_LangPatchScope", "GridExecutor")):
        return  # another Triton: its interpreter runs as it is
    tl = triton.language
    launch, patch_lang = interpreter.GridExecutor.__call__, interpreter._patch_lang
    launches: list[set[int]] = []  # per launch in progress: the ids of the language modules it has patched

    def launch_tracking_patches(self, *args, **kwargs):
        launches.append(set())
        try:
            return launch(self, *args, **kwargs)
        finally:
            launches.pop()

    def patch_lang_once(fn):
        if launches:
            modules = {id(m) for m in fn.__globals__.values() if m is tl or m is tl.core}
            if modules <= launches[-1]:
                return interpreter._LangPatchScope()
            launches[-1] |= modules
        return patch_lang(fn)
    interpreter.GridExecutor.__call__, interpreter._patch_lang = launch_tracking_patches, patch_lang_once


IN_PROCESS = ON_GPU or interpreter_active()
if IN_PROCESS and not ON_GPU:
    patch_language_once_per_launch()
small = pytest.mark.skipif(not IN_PROCESS, reason="Triton was imported before TRITON_INTERPRET "
                           "was set: test_small_tier_in_fresh_interpreter runs this")
in_fresh_interpreter = pytest.mark.skipif(IN_PROCESS, reason="the small tier runs in this process")
DEVICE = "cuda" if ON_GPU else "cpu"
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs CUDA")


@pytest.fixture(autouse=True)  # a test module that imports it gets it for every test
def rne_bf16_casts(monkeypatch):
    """Make the interpreter round fp32 -> bf16 to nearest even, as the GPU does."""
    if ON_GPU or not interpreter_active():
        return
    import numpy as np
    from triton.runtime import interpreter
    convert = interpreter._convert_float

    def rne(data, src, dst, rounding_mode):
        if src == triton.language.float32 and dst == triton.language.bfloat16:
            values = torch.from_numpy(np.ascontiguousarray(data).view(np.float32).copy())
            return values.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return convert(data, src, dst, rounding_mode)
    monkeypatch.setattr(interpreter, "_convert_float", rne)


def run_in_fresh_interpreter(test_file: str) -> None:
    """Run ``test_file``'s small tier in a new process with TRITON_INTERPRET=1 set from the start."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-x", "-p", "no:cacheprovider",
           "-k", "not fresh_interpreter"]
    result = subprocess.run(cmd, env=env, cwd=Path(__file__).resolve().parents[1],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout, result.stdout[-3000:]

