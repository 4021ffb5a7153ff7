"""GGUF checkpoints: tiny random models written with gguf-py's GGUFWriter (as llama.cpp's converter writes
them, Llama q/k permuted) load in the engine and generate what transformers generates from the same file."""
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGML_QUANT_SIZES, GGUFWriter
from gguf.quants import quantize
from safetensors.numpy import load_file
from transformers import AutoConfig

from engine import LLM, SamplingParams
from engine.demo import CHAT_TEMPLATE, SPECIAL_TOKENS, build_tiny_model
from tests.conftest import hf_greedy

MAX_NEW = 8
PROMPTS = [[5, 17, 42], [100, 3, 250, 7, 9, 64, 11], [300] * 20]
# HF names -> llama.cpp's (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), written out here so that
# the test does not share the engine's name map.
TOP_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
               "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def gguf_name(hf_name: str) -> str:
    base, suffix = hf_name.rsplit(".", 1)
    layer = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base)
    return (f"blk.{layer[1]}.{LAYER_NAMES[layer[2]]}" if layer else TOP_NAMES[base]) + "." + suffix


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What convert_hf_to_gguf.py does to Llama q/k rows (interleaved rotary halves); the loader must undo it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
    """(data, raw_dtype) for GGUFWriter.add_tensor; norms and biases stay F32, as llama.cpp keeps them."""
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    return quantize(w.astype(np.float32), qtype), qtype


def write_gguf(path: Path, hf_dir: str, qtype: Q = Q.F32, arch: str | None = None,
               encode_tensor: Callable[[np.ndarray, Q], tuple[np.ndarray, Q | None]] = encode) -> str:
    """Write the HF checkpoint in ``hf_dir`` as a GGUF file (metadata as llama.cpp writes it); return its path."""
    config = AutoConfig.from_pretrained(hf_dir)
    arch = arch or config.model_type
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    add_tokenizer(writer, hf_dir)
    for name, w in load_file(os.path.join(hf_dir, "model.safetensors")).items():
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, config.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, config.num_key_value_heads)
        data, raw_dtype = encode_tensor(w, qtype)
        writer.add_tensor(gguf_name(name), data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def add_tokenizer(writer: GGUFWriter, hf_dir: str) -> None:
    """The demo's byte-level BPE tokenizer as GGUF "gpt2" tokenizer metadata, with its chat template."""
    model = json.loads(Path(hf_dir, "tokenizer.json").read_text())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])  # 3: control
    writer.add_token_merges([" ".join(m) for m in model["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch) -> None:
    """Each test resolves its files into its own cache, not the user's."""
    monkeypatch.setenv("NANOVLLM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def gguf_ready_models(tiny_models, tmp_path_factory) -> dict[str, str]:
    """Tiny checkpoints whose config GGUF metadata carries in full: a Llama without rope scaling, and a Qwen3
    with head_dim 128 (transformers reads no head_dim from a qwen3 GGUF and assumes Qwen3's 128)."""
    root = tmp_path_factory.mktemp("gguf-ready")
    return {"llama": build_tiny_model(str(root / "llama"), "llama", seed=3,
                                      rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
            "qwen3": build_tiny_model(str(root / "qwen3"), "qwen3", seed=4, head_dim=128),
            "qwen2": tiny_models["qwen2"]}


def engine_greedy(model: str) -> list[list[int]]:
    llm = LLM(model, device="cpu", kvcache_block_size=16, max_model_len=128)
    params = SamplingParams(temperature=0, max_tokens=MAX_NEW, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("arch,qtype", [("llama", Q.F32), ("llama", Q.F16), ("llama", Q.Q8_0), ("llama", Q.Q4_0),
                                        ("qwen2", Q.Q8_0), ("qwen3", Q.Q4_1)],
                         ids=lambda v: getattr(v, "name", v))
def test_engine_matches_hf_on_the_same_gguf(gguf_ready_models, hf_gguf_model, tmp_path, arch, qtype):
    gguf_file = write_gguf(tmp_path / f"tiny-{arch}-{qtype.name}.gguf", gguf_ready_models[arch], qtype)
    expected = [hf_greedy(gguf_file, p, MAX_NEW, model=hf_gguf_model(gguf_file)) for p in PROMPTS]
    assert engine_greedy(gguf_file) == expected


def test_f32_gguf_is_the_original_model(gguf_ready_models, tmp_path):
    """Independent of transformers' GGUF loader: an F32 GGUF of a Llama (q/k permuted in the file) generates
    exactly what the safetensors checkpoint it was written from generates."""
    hf_dir = gguf_ready_models["llama"]
    gguf_file = write_gguf(tmp_path / "llama.gguf", hf_dir)
    assert engine_greedy(gguf_file) == [hf_greedy(hf_dir, p, MAX_NEW) for p in PROMPTS]


def test_directory_with_one_gguf_and_the_metadata(tiny_models, tmp_path):
    write_gguf(tmp_path / "model" / "tiny.gguf", tiny_models["qwen2"], Q.Q8_0)
    llm = LLM(str(tmp_path / "model"), device="cpu", kvcache_block_size=16, max_model_len=128)
    assert llm.config.model.startswith(str(tmp_path / "cache"))
    assert llm.config.hf_config.architectures == ["Qwen2ForCausalLM"]
    assert llm.tokenizer.chat_template == CHAT_TEMPLATE
    rendered = llm.tokenizer.decode(llm.encode_prompt([{"role": "user", "content": "the red river"}]))
    assert rendered == "<|im_start|>user\nthe red river<|im_end|>\n<|im_start|>assistant\n"
    write_gguf(tmp_path / "model" / "other.gguf", tiny_models["qwen2"])
    with pytest.raises(ValueError, match=r"holds 2 \.gguf files \(other\.gguf, tiny\.gguf\)"):
        LLM(str(tmp_path / "model"), device="cpu")


def test_resolved_once_per_file_version(tiny_models, tmp_path):
    from engine.gguf import resolve_gguf
    gguf_file = write_gguf(tmp_path / "tiny.gguf", tiny_models["qwen3"])
    first = resolve_gguf(gguf_file)
    assert resolve_gguf(gguf_file) == first
    os.utime(gguf_file, ns=(0, 0))  # an edited or replaced file gets a fresh directory
    assert resolve_gguf(gguf_file) != first


def test_loads_without_building_the_name_map_again(gguf_ready_models, tmp_path, monkeypatch):
    """The GGUF-to-HF name map is made when the file is resolved (it builds a meta model, which imports transformers'
    modeling code: seconds); loading the resolved file reads it from the cache directory."""
    import engine.gguf
    gguf_file = write_gguf(tmp_path / "tiny.gguf", gguf_ready_models["qwen3"], Q.Q4_1)
    engine.gguf.resolve_gguf(gguf_file)
    expected = engine_greedy(gguf_file)

    def built_again(*args):
        raise AssertionError("the name map was built again")
    monkeypatch.setattr(engine.gguf, "_gguf_to_hf_names", built_again)
    assert engine_greedy(gguf_file) == expected


def test_unsupported_architecture(tiny_models, tmp_path):
    gguf_file = write_gguf(tmp_path / "gemma2.gguf", tiny_models["qwen2"], arch="gemma2")
    with pytest.raises(ValueError, match=rf"{re.escape(gguf_file)}: GGUF architecture 'gemma2' is not supported "
                                         r"\(supported: llama, qwen2, qwen3\)"):
        LLM(gguf_file, device="cpu")


def test_unsupported_quantization_type(tiny_models, tmp_path):
    """Q8_1 is a type gguf-py cannot dequantize; the error names the file, the tensor and the type."""
    def q8_1_for_ffn_down(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, Q | None]:
        if w.shape == (64, 128):  # ffn_down: 64 rows of 128 values
            block_values, block_bytes = GGML_QUANT_SIZES[Q.Q8_1]
            return np.zeros((64, 128 // block_values * block_bytes), np.uint8), Q.Q8_1
        return encode(w, qtype)

    gguf_file = write_gguf(tmp_path / "q8_1.gguf", tiny_models["qwen2"], Q.Q8_0, encode_tensor=q8_1_for_ffn_down)
    with pytest.raises(ValueError, match=rf"{re.escape(gguf_file)}: tensor 'blk\.0\.ffn_down\.weight' has "
                                         r"quantization type Q8_1, which is not supported \(supported: F32, "):
        LLM(gguf_file, device="cpu")
