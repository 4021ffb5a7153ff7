"""GGUF checkpoints (llama.cpp's one-file format): ``LLM("model.gguf")`` or a directory holding one .gguf.

A GGUF file is resolved once into a small cache directory that looks like an HF checkpoint to the rest of the
engine: ``config.json`` and the tokenizer files (chat template included), both made by transformers' own GGUF
support from the file's metadata, plus ``gguf_source.json``: the .gguf's path, architecture, tensor table
(name, type, offset) and the GGUF-to-HF name map. The weights are not copied: :func:`gguf_tensors` dequantizes
them straight from the memory-mapped .gguf at every load, without parsing the file again (gguf-py's reader takes
seconds on the vocabulary alone). They are renamed to HF names with that map (gguf-py's); llama.cpp's converter
permutes Llama q/k rows for its rotary layout, and transformers' Llama tensor processor, run on every tensor,
undoes that.
"""
import hashlib
import json
import os
from collections.abc import Iterator

import numpy as np
import torch
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, dequantize, get_tensor_name_map
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

from engine.loader import build_once
from engine.logger import get_logger
from engine.models.decoder import ARCHITECTURES

logger = get_logger(__name__)
SOURCE_FILE = "gguf_source.json"   # in a resolved directory: see _read_source
CACHE_FORMAT = "v3"                # bump when the resolved directory's contents change
Q = GGMLQuantizationType
SUPPORTED_TYPES = (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
                   Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)
# GGUF architecture (general.architecture: "llama", "qwen2", "qwen3") -> the engine's architecture class. Mistral
# has no GGUF architecture of its own: llama.cpp writes its checkpoints as "llama".
SUPPORTED_ARCHS = {name: cls for cls in ARCHITECTURES
                   if (name := cls.removesuffix("ForCausalLM").lower()) in MODEL_ARCH_NAMES.values()}


def find_gguf(path: str) -> str | None:
    """The .gguf file ``path`` names: the file itself, or the only .gguf in a directory without config.json.

    None when ``path`` is neither. ValueError for a directory without config.json holding several .gguf files.
    """
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path) or os.path.isfile(os.path.join(path, "config.json")):
        return None
    files = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if len(files) > 1:
        raise ValueError(f"model directory {path!r} holds {len(files)} .gguf files ({', '.join(files)}); "
                         f"pass the path of one of them")
    return os.path.join(path, files[0]) if files else None


def resolve_gguf(gguf_file: str) -> str:
    """The cache directory with config.json and the tokenizer of ``gguf_file``, made on first use.

    It lives under the engine cache (``$NANOVLLM_CACHE`` or ``~/.cache/nanovllm``), keyed by the file's path,
    size and mtime, so an edited or replaced file gets a fresh directory.
    """
    gguf_file = os.path.abspath(gguf_file)
    stat = os.stat(gguf_file)
    key = hashlib.sha256(f"{gguf_file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = os.path.basename(gguf_file).removesuffix(".gguf")
    name = os.path.join(f"gguf-{CACHE_FORMAT}", f"{stem}-{key}")
    path = build_once(name, lambda tmp: _write_hf_files(gguf_file, tmp))
    logger.info("GGUF checkpoint %s (config and tokenizer in %s)", gguf_file, path)
    return path


def gguf_source(path: str) -> dict | None:
    """The record of the .gguf behind a directory made by :func:`resolve_gguf`; None for any other directory."""
    source = os.path.join(path, SOURCE_FILE)
    if not os.path.isfile(source):
        return None
    with open(source) as fh:
        return json.load(fh)


def gguf_tensors(source: dict, config: PretrainedConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF parameter name, dequantized float32 tensor) for every weight of the .gguf that ``source`` describes.

    Tensors with no HF name (llama.cpp extras such as ``rope_freqs``) are skipped, as transformers does.
    """
    gguf_file, arch = source["gguf"], source["architecture"]
    if os.path.getsize(gguf_file) != source["size"]:
        raise ValueError(f"{gguf_file} changed since it was resolved; load the .gguf file itself again")
    blob = np.memmap(gguf_file, dtype=np.uint8, mode="r")
    processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=config.to_dict())
    names = source["hf_names"]
    for name, type_name, shape, offset, nbytes in source["tensors"]:
        if name not in names:
            logger.debug("GGUF tensor %s has no HF name; skipped", name)
            continue
        qtype = Q[type_name]
        # the array gguf-py's reader would give: values for F32/F16, rows of quantized blocks as bytes otherwise
        stored = blob[offset:offset + nbytes].view({Q.F32: np.float32, Q.F16: np.float16}.get(qtype, np.uint8))
        weights = processor.process(weights=dequantize(stored.reshape(shape), qtype), name=name).weights
        logger.debug("GGUF tensor %s (%s, %s) -> %s", name, type_name, list(weights.shape), names[name])
        yield names[name], torch.from_numpy(np.array(weights, dtype=np.float32))


def _gguf_to_hf_names(arch: str, config: PretrainedConfig) -> dict[str, str]:
    """{GGUF tensor name: HF parameter name}, from gguf-py's name map applied to a meta-device HF model's names.

    The top level of transformers' ``get_gguf_hf_weights_map``, which also walks every submodule building the
    map again (5 s for 30 layers); the models the engine runs need only the top level. Made once, when the file is
    resolved: building the meta model imports transformers' modeling code, ~3 s of an 8 s ``LLM("demo")`` start on
    the 2-core CPU machine when it ran at every load.
    """
    from transformers import AutoModelForCausalLM  # the auto classes take seconds to import: only for GGUF
    arch_id = next(key for key, name in MODEL_ARCH_NAMES.items() if name == arch)
    name_map = get_tensor_name_map(arch_id, config.num_hidden_layers)
    with torch.device("meta"):
        hf_names = AutoModelForCausalLM.from_config(config).state_dict()
    names = {}
    for hf_name in hf_names:
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = name_map.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _write_hf_files(gguf_file: str, out: str) -> None:
    """Check that the engine can run ``gguf_file``, then write its config, tokenizer and source record (with the
    name map) to ``out``."""
    from transformers import AutoTokenizer
    source = _read_source(gguf_file)
    folder, name = os.path.split(gguf_file)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    config.architectures = [SUPPORTED_ARCHS[source["architecture"]]]
    config.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    source["hf_names"] = _gguf_to_hf_names(source["architecture"], config)
    with open(os.path.join(out, SOURCE_FILE), "w") as fh:
        json.dump(source, fh)


def _read_source(gguf_file: str) -> dict:
    """``{"gguf", "size", "architecture", "tensors": [[name, type, array shape, offset, bytes], ...]}``.

    ValueError naming the file and the architecture or quantization type that the engine cannot load.
    """
    reader = GGUFReader(gguf_file)
    field = reader.get_field("general.architecture")
    if field is None:
        raise ValueError(f"{gguf_file}: GGUF metadata has no 'general.architecture'")
    arch = field.contents()
    _engine_architecture(arch, gguf_file)
    for tensor in reader.tensors:
        if tensor.tensor_type not in SUPPORTED_TYPES:
            raise ValueError(f"{gguf_file}: tensor {tensor.name!r} has quantization type {tensor.tensor_type.name}, "
                             f"which is not supported (supported: {', '.join(t.name for t in SUPPORTED_TYPES)})")
    tensors = [[t.name, t.tensor_type.name, list(t.data.shape), int(t.data_offset), int(t.n_bytes)]
               for t in reader.tensors]
    return dict(gguf=gguf_file, size=os.path.getsize(gguf_file), architecture=arch, tensors=tensors)


def _engine_architecture(model_type: str, gguf_file: str) -> str:
    if model_type not in SUPPORTED_ARCHS:
        raise ValueError(f"{gguf_file}: GGUF architecture {model_type!r} is not supported "
                         f"(supported: {', '.join(sorted(SUPPORTED_ARCHS))})")
    return SUPPORTED_ARCHS[model_type]
