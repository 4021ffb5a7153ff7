"""Shared fixtures: tiny random-weight checkpoints built with transformers (no downloads)."""
import os

import pytest
import torch

from engine.demo import build_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several workers: a core each, not every core each
    torch.set_num_threads(1)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (the README's test command): a worker per core, at most four; one on a GPU machine, whose tests
    each take most of the GPU's memory."""
    return 1 if torch.cuda.is_available() else max(1, min(4, os.cpu_count() or 1))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(items) -> None:
    """Under pytest-xdist (``--dist loadgroup``), the modules that start Ray clusters and jobs run one after another on
    one worker: with two local clusters up at once, the second's job agent accepted no submission in 300 s."""
    for item in items:
        if hasattr(item.module, "ray") or hasattr(item.module, "ray_cluster"):
            item.add_marker(pytest.mark.xdist_group("ray"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """Paths of tiny Qwen3 (tied), Qwen2 (qkv bias, untied), Llama 3 (rope scaling) and Mistral checkpoints."""
    root = tmp_path_factory.mktemp("models")
    archs = ["qwen3", "qwen2", "llama", "mistral"]
    return {arch: build_tiny_model(str(root / arch), arch, seed=i) for i, arch in enumerate(archs)}


def hf_greedy(path: str, prompt_ids: list[int], max_new_tokens: int, model=None) -> list[int]:
    """Reference greedy continuation: full HF forward each step, no cache, EOS ignored (fp32 CPU by default)."""
    model = model if model is not None else hf_model(path)
    ids = torch.tensor([prompt_ids], device=model.device)
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            next_id = int(model(ids).logits[0, -1].argmax())
            out.append(next_id)
            ids = torch.cat([ids, torch.tensor([[next_id]], device=ids.device)], dim=1)
    return out


_HF_MODELS: dict = {}


def hf_model(path: str):
    from transformers import AutoModelForCausalLM
    if path not in _HF_MODELS:
        _HF_MODELS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _HF_MODELS[path]


@pytest.fixture(scope="session")
def hf_gguf_model():
    """``load(gguf_file)``: the file through transformers' own GGUF loader (fp32, CPU), loaded once per session."""
    from transformers import AutoModelForCausalLM
    models = {}

    def load(gguf_file: str):
        if gguf_file not in models:
            folder, name = os.path.split(gguf_file)
            models[gguf_file] = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        return models[gguf_file]
    return load
