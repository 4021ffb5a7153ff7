"""Find a model's files (local dir, GGUF file, HF hub id, or a built-in demo) and load its weights into the model."""
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig

from engine.logger import get_logger

logger = get_logger(__name__)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve_model_path(model: str) -> str:
    """Return a local directory holding config.json, weights and tokenizer for ``model``.

    ``model`` is "demo" or "demo-random" (:mod:`engine.demo`), a .gguf file or a directory holding exactly
    one (resolved to a cache directory, :mod:`engine.gguf`), an HF model directory, or a hub id.
    """
    from engine.demo import DEMO_MODELS
    from engine.gguf import find_gguf, resolve_gguf
    if model in DEMO_MODELS:
        return DEMO_MODELS[model]()
    expanded = os.path.expanduser(model)
    gguf_file = find_gguf(expanded)
    if gguf_file:
        return resolve_gguf(gguf_file)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(f"model directory {model!r} has no config.json (and no .gguf file)")
        return expanded
    if os.path.exists(expanded) or expanded.startswith((".", "/", "~")) or expanded.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a local model directory nor a .gguf file nor a "
                         f"Hugging Face hub id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, allow_patterns=HUB_FILES)
    except Exception as e:  # network, auth, or unknown repo: say which model
        raise ValueError(f"could not download model {model!r} from the Hugging Face hub: {e}") from e


def cache_root() -> str:
    """Where built or converted models are kept: ``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``."""
    return os.environ.get("NANOVLLM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "nanovllm"))


def build_once(name: str, build: Callable[[str], None]) -> str:
    """``cache_root()/name``, made by ``build(tmp_dir)`` on first use and renamed into place atomically.

    Concurrent builders (several Ray actors starting at once) are safe: the first rename wins, the others
    find the finished directory and drop their own.
    """
    path = os.path.join(cache_root(), name)
    if os.path.isdir(path):
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".build-", dir=os.path.dirname(path))
    try:
        build(tmp)
        os.rename(tmp, path)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_weights(model: nn.Module, path: str) -> None:
    """Copy every checkpoint tensor into its parameter, through the parameter's ``weight_loader``.

    The tensors come from the ``*.safetensors`` files in ``path`` or, for a directory resolved from a GGUF
    file, dequantized from that file.
    """
    from engine.gguf import gguf_source, gguf_tensors
    source = gguf_source(path)
    tensors = gguf_tensors(source, AutoConfig.from_pretrained(path)) if source else _safetensors(path)
    origin = source["gguf"] if source else path
    tied = getattr(model, "tie_word_embeddings", False)
    packed = getattr(model, "packed_modules", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for name, tensor in tensors:
        if name == "lm_head.weight" and tied:
            continue
        target, shard = _packed_target(name, packed)
        if target not in params:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in the model")
        param = params[target]
        loader = getattr(param, "weight_loader", _default_loader)
        loader(param, tensor) if shard is None else loader(param, tensor, shard)
        loaded.add(target)
    missing = set(params) - loaded - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ValueError(f"checkpoint in {origin!r} lacks weights for {sorted(missing)[:5]}")
    logger.debug("Loaded %d weight tensors from %s", len(loaded), origin)


def _safetensors(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path!r}")
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _packed_target(name: str, packed: dict) -> tuple[str, object]:
    for part, (packed_name, shard) in packed.items():
        if f".{part}." in name:
            return name.replace(part, packed_name), shard
    return name, None


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    param.data.copy_(loaded)
