"""The CUDA-graph paths' bookkeeping, run on CPU: ``capture`` is swapped for a stand-in whose ``replay()`` reruns the
captured call, so the static buffers, padding to captured sizes, the slot -1 of padding rows and the pieces cut at
attention run exactly as on the GPU, and greedy output must still equal HF's in fp32. (The real capture runs in the
``gpu``-marked tests: tests/test_chunked_prefill.py, tests/test_gpu.py.)"""
import pytest
import torch

from engine import LLM
from engine import cuda_graphs
from engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs, graph_batch_sizes, piecewise_token_sizes
from tests.test_chunked_prefill import BS, BUDGET, expected, generate, llama_9_heads, random_prompts  # noqa: F401 (fixture)


class Rerun:
    """Stands in for a captured graph: replay() reruns the call."""

    def __init__(self, run, pool):
        self.replay = run

    def pool(self):
        return None


def test_graph_sizes():
    assert graph_batch_sizes(1) == [1] and graph_batch_sizes(5) == [1, 2, 4, 8]
    assert graph_batch_sizes(1024)[-3:] == [896, 960, 1024] and graph_batch_sizes(300)[-2:] == [288, 320]
    sizes = graph_batch_sizes(1024)
    assert all(b - a <= 64 and (b - a) / b <= 0.5 for a, b in zip(sizes, sizes[1:]))
    assert piecewise_token_sizes(32) == [32] and piecewise_token_sizes(600) == [256, 512, 600] and len(piecewise_token_sizes(16384)) == 24
    assert piecewise_token_sizes(16384)[-1] == 16384 and piecewise_token_sizes(65536)[-1] == 16384
    tokens = piecewise_token_sizes(16384)
    assert all((b - a) / b <= 0.25 for a, b in zip(tokens[3:], tokens[4:]))


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("model", ["qwen3", "llama_9_heads"])
def test_graph_replays_match_hf(tiny_models, llama_9_heads, model, async_scheduling, monkeypatch):
    """Chunked prompts mixed with decodes through the piecewise path (steps padded up to 24 or 32 tokens),
    decode-only steps through the decode path (padded to 1, 2, 4, 8 rows), prefix hits, greedy == HF."""
    monkeypatch.setattr(cuda_graphs, "capture", Rerun)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    path = llama_9_heads if model == "llama_9_heads" else tiny_models[model]
    llm = LLM(path, device="cpu", kvcache_block_size=BS, max_model_len=512, max_num_batched_tokens=BUDGET,
              max_num_seqs=7, async_scheduling=async_scheduling)
    runner = llm.model_runner
    runner.decode_graphs = DecodeGraphs(runner.model, graph_batch_sizes(7), llm.config.max_blocks_per_seq,
                                        llm.config.hf_config.hidden_size, runner.dtype, runner.device,
                                        lambda bs: False)
    runner.piecewise_graphs = PiecewiseGraphs(runner.model.model, runner.attention_layers, [24, BUDGET],
                                              runner.device)
    replays = {"decode": [], "pieces": []}
    decode_replay, piece_replay = runner.decode_graphs.replay, runner.piecewise_graphs.replay
    monkeypatch.setattr(runner.decode_graphs, "replay",
                        lambda ids, pos, size: replays["decode"].append(size) or decode_replay(ids, pos, size))
    monkeypatch.setattr(runner.piecewise_graphs, "replay",
                        lambda ids, pos, size: replays["pieces"].append(size) or piece_replay(ids, pos, size))
    shared = random_prompts(512, (40,), seed=3)[0]
    prompts = random_prompts(512, (5, 90, 17, 3, 61, 2)) + random_prompts(512, (9, 30), seed=4, prefix=shared)
    outs, records = generate(path, prompts, llm=llm)
    assert [o["token_ids"] for o in outs] == [expected(path, p) for p in prompts]
    assert set(replays["pieces"]) == {24, BUDGET} and {1, 2, 4, 8} & set(replays["decode"])
    assert len(replays["decode"]) == sum(r.phase == "decode" for r in records)
    assert len(replays["pieces"]) == sum(r.phase == "prefill" for r in records)
    assert any(r.num_decode_seqs and r.num_prefill_tokens for r in records)
    assert outs[-1]["num_cached_tokens"] == 32
