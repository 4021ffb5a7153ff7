"""The logging guide's promises, checked on real runs in fresh interpreters (levels are read at import)."""
import os
import re
import subprocess
import sys

import pytest

SCRIPT = """
import sys
{pre}
from nanovllm import LLM, SamplingParams
llm = LLM(sys.argv[1], device="cpu", kvcache_block_size=16, max_model_len=128, num_kvcache_blocks=5, max_num_seqs=3,
          max_num_batched_tokens=32)
llm.generate([[5] * 20, [5] * 20 + [6] * 9, [7] * 30], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
             use_tqdm=False)
print("RESULT-ON-STDOUT")
"""
LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[nanovllm\.(engine|layers|models)\.\w+\] "
                  r"\[(DEBUG|INFO|WARNING|ERROR)\] ")


def run(model: str, level: str | None, pre: str = "") -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "NANOVLLM_LOG_LEVEL"}
    if level is not None:
        env["NANOVLLM_LOG_LEVEL"] = level
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(pre=pre), model], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["qwen3"]


@pytest.fixture(scope="module")
def debug_log(model):
    return run(model, "DEBUG")


EXPECTED_DEBUG = [  # (guide stage, a line that must appear)
    ("init", r"\[INFO\] Initializing LLMEngine$"),
    ("init", r"\[INFO\] Model: .+"),
    ("init", r"\[INFO\] Configuration: .*tensor_parallel_size=1.*max_model_len=128"),
    ("init", r"\[INFO\] Initializing ModelRunner \(rank 0\)"),
    ("init", r"\[INFO\] Loading model: "),
    ("init", r"\[INFO\] Model config: num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=16, "
             r"vocab_size=512"),
    ("init", r"\[INFO\] After model loading - CPU Memory: MaxRSS=\d+\.\d\dGB"),
    ("init", r"\[INFO\] Allocating KV cache$"),
    ("init", r"\[INFO\] KV cache configuration: num_kv_heads=2, head_dim=16, block_size=16"),
    ("init", r"\[INFO\] Allocating 5 KV cache blocks, total_size=\d+\.\d\dGB"),
    ("init", r"\[INFO\] After KV cache allocation - CPU Memory"),
    ("generate", r"\[INFO\] Starting generation for 3 prompts"),
    ("generate", r"\[INFO\] Total prompt tokens: 79"),
    ("prefill", r"\[INFO\] Scheduled PREFILL batch: size=\d, batched_tokens=\d+, seqs=\[seq_\d+\(len=20,cached=0\)"),
    ("prefill", r"\[INFO\] Scheduled PREFILL batch: size=\d, batched_tokens=\d+, seqs=\[.*"
                r"seq_\d+\(len=29,cached=16,chunk=16:28\)"),
    ("prefill", r"\[DEBUG\] \[Rank 0\] Preparing PREFILL batch: \d sequences"),
    ("prefill", r"\[DEBUG\] \[Rank 0\] PREFILL tensors: input_ids=\[\d+\], positions=\[\d+\], slot_mapping=\[\d+\]"),
    ("prefill", r"\[DEBUG\] \[Rank 0\] PREFILL: max_seqlen_q=\d+, max_seqlen_k=\d+, total_tokens=\d+"),
    ("prefill", r"\[DEBUG\] \[START\] \[Rank 0\] Model forward PREFILL$"),
    ("prefill", r"\[DEBUG\] \[END\] \[Rank 0\] Model forward PREFILL - Elapsed: \d+\.\d\dms"),
    ("prefill", r"\[DEBUG\] \[Rank 0\] Output: logits=\[\d, 512\]"),
    ("decode", r"\[INFO\] Scheduled DECODE batch: size=\d, preempted=0, seqs=\[seq_\d+\(len=\d+\)"),
    ("decode", r"\[DEBUG\] \[Rank 0\] Preparing DECODE batch: \d sequences"),
    ("decode", r"\[DEBUG\] \[Rank 0\] DECODE tensors: input_ids=\[\d\], positions=\[\d\], context_lens=\[\d\], "
               r"block_tables=\[\d, \d\]"),
    ("decode", r"\[DEBUG\] \[START\] \[Rank 0\] Model forward DECODE$"),
    ("decode", r"\[DEBUG\] Decode attention: k_cache=\[5, 16, 2, 16\], v_cache=\[5, 16, 2, 16\]"),
    ("decode", r"\[DEBUG\] \[END\] \[Rank 0\] Model forward DECODE - Elapsed: \d+\.\d\dms"),
    ("blocks", r"\[DEBUG\] Allocating blocks for seq_id=\d+, num_blocks=2"),
    ("blocks", r"\[DEBUG\] Allocated blocks for seq_id=\d+: new=\d, cache_hits=\d, free_blocks=\d, used_blocks=\d"),
    ("blocks", r"\[DEBUG\] Allocated blocks for seq_id=\d+: new=1, cache_hits=1, "),
    ("blocks", r"\[DEBUG\] Deallocated blocks for seq_id=\d+: freed=\d/\d, free_blocks=\d"),
    ("attention", r"\[DEBUG\] Attention forward: is_prefill=True, q=\[\d+, 4, 16\], k=\[\d+, 2, 16\], v=\[\d+, 2, 16\]"),
    ("attention", r"\[DEBUG\] Attention forward: is_prefill=False, q=\[\d, 4, 16\]"),
    ("attention", r"\[DEBUG\] Storing KV cache: N=\d+, num_heads=2, head_dim=16, num_slots=\d+"),
    ("attention", r"\[DEBUG\] Attention output: \[\d+, 4, 16\]"),
    ("finish", r"\[DEBUG\] Sequence finished: seq_id=\d+, output_len=12, reason=max_tokens"),
    ("finish", r"\[DEBUG\] Postprocess: [12]/3 sequences finished"),
    ("stats", r"\[INFO\] Generation complete: \d+ steps, total_output_tokens=36, prefill_time=\d+\.\d\ds, "
              r"decode_time=\d+\.\d\ds"),
    ("stats", r"\[INFO\] After generation - CPU Memory"),
    ("warning", r"\[WARNING\] KV cache full: preempted \d sequence\(s\) for recomputation"),
    ("decode", r"\[INFO\] Scheduled DECODE batch: size=\d, preempted=[1-9]"),
]


@pytest.mark.parametrize("stage,pattern", EXPECTED_DEBUG)
def test_debug_shows_every_stage(debug_log, stage, pattern):
    stdout, stderr = debug_log
    assert re.search(r"^\S+ \S+ \[nanovllm\.\S+\] " + pattern, stderr, re.M), f"{stage}: no line /{pattern}/"


def test_format_and_streams(debug_log):
    stdout, stderr = debug_log
    assert stdout.strip() == "RESULT-ON-STDOUT"            # logs never pollute stdout
    lines = [line for line in stderr.splitlines() if line.startswith("[20")]
    assert lines and all(LINE.match(line) for line in lines)
    assert any("[nanovllm.layers.attention]" in line for line in lines)


def test_info_hides_debug_and_warning_hides_info(model):
    _, info = run(model, "INFO")
    assert "[INFO] Scheduled PREFILL" in info and "[DEBUG]" not in info
    _, warning = run(model, "WARNING")
    assert "[INFO]" not in warning and "[DEBUG]" not in warning and "[WARNING] KV cache full" in warning


def test_unknown_level_warns_once_and_uses_info(model):
    _, err = run(model, "LOUD")
    assert err.count("Unknown NANOVLLM_LOG_LEVEL='LOUD'") == 1 and "[INFO] Initializing LLMEngine" in err
    assert "[DEBUG]" not in err


def test_application_logging_config_is_respected(model):
    pre = ("import logging\nlogging.basicConfig(level=logging.INFO, "
           "format='%(asctime)s | %(levelname)s | %(name)s | %(message)s', datefmt='%H:%M:%S')")
    _, err = run(model, None, pre)
    assert re.search(r"^\d\d:\d\d:\d\d \| INFO \| nanovllm\.engine\.llm_engine \| Initializing LLMEngine$", err, re.M)
    assert "[nanovllm." not in err  # the engine added no handler of its own


def test_env_set_in_code_before_import(model):
    _, err = run(model, None, "import os\nos.environ['NANOVLLM_LOG_LEVEL'] = 'WARNING'")
    assert "[INFO]" not in err and "[WARNING] KV cache full" in err


def test_log_tag_prefixes_every_engine_line(model):
    _, err = run(model, "INFO", "import os\nos.environ['NANOVLLM_LOG_TAG'] = 'actor-7'")
    lines = [line for line in err.splitlines() if line.startswith("[20")]
    assert lines and all("] [actor-7] " in line for line in lines)
