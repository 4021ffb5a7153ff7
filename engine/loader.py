"""Find a model's files (local dir, HF hub id, or the demo) and load safetensors weights into the model."""
import glob
import os

import torch
from safetensors import safe_open
from torch import nn

from engine.logger import get_logger

logger = get_logger(__name__)
HUB_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


def resolve_model_path(model: str) -> str:
    """Return a local directory holding config.json, weights and tokenizer for ``model``."""
    if model == "demo":
        from engine.demo import demo_model_path
        return demo_model_path()
    expanded = os.path.expanduser(model)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ValueError(f"model directory {model!r} has no config.json")
        return expanded
    if os.path.exists(expanded) or expanded.startswith((".", "/", "~")) or expanded.count("/") != 1:
        raise ValueError(f"model {model!r} is neither a local model directory nor a Hugging Face hub id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(model, allow_patterns=HUB_FILES)
    except Exception as e:  # network, auth, or unknown repo: say which model
        raise ValueError(f"could not download model {model!r} from the Hugging Face hub: {e}") from e


def load_weights(model: nn.Module, path: str) -> None:
    """Copy every checkpoint tensor into its parameter, through the parameter's ``weight_loader``."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ValueError(f"no *.safetensors weights in {path!r}")
    packed = getattr(model, "packed_modules", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = set()
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name == "lm_head.weight" and getattr(model, "tie_word_embeddings", False):
                    continue
                target, shard = _packed_target(name, packed)
                if target not in params:
                    if name.endswith("rotary_emb.inv_freq"):
                        continue
                    raise ValueError(f"checkpoint tensor {name!r} has no matching parameter in the model")
                param = params[target]
                loader = getattr(param, "weight_loader", _default_loader)
                tensor = f.get_tensor(name)
                loader(param, tensor) if shard is None else loader(param, tensor, shard)
                loaded.add(target)
    tied = {"lm_head.weight"} if getattr(model, "tie_word_embeddings", False) else set()
    missing = set(params) - loaded - tied
    if missing:
        raise ValueError(f"checkpoint in {path!r} lacks weights for {sorted(missing)[:5]}")


def _packed_target(name: str, packed: dict) -> tuple[str, object]:
    for part, (packed_name, shard) in packed.items():
        if f".{part}." in name:
            return name.replace(part, packed_name), shard
    return name, None


def _default_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    param.data.copy_(loaded)
