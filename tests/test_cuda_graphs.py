"""The CUDA-graph paths' bookkeeping, run on CPU: ``capture`` is swapped for a stand-in whose ``replay()`` reruns the
captured call, so the static buffers, padding to captured sizes, the slot -1 of padding rows and the pieces cut at
attention run exactly as on the GPU, and greedy output must still equal HF's in fp32. (The real capture runs in the
``gpu``-marked tests: tests/test_chunked_prefill.py, tests/test_gpu.py.)"""
import pytest
import torch

from engine import LLM, SamplingParams
from engine import context, cuda_graphs
from engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs, graph_batch_sizes, piecewise_token_sizes
from tests.test_chunked_prefill import BS, BUDGET, expected, generate, llama_9_heads, random_prompts  # noqa: F401 (fixture)


class Rerun:
    """Stands in for a captured graph: replay() reruns the call under the context it was captured with (a graph's
    kernels read the static buffers the capture-time context named, whatever the step's context says)."""

    def __init__(self, run, pool):
        self.run, self.context = run, context.get_context()

    def replay(self):
        step_context, context._CONTEXT = context._CONTEXT, self.context
        try:
            self.run()
        finally:
            context._CONTEXT = step_context

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


def install_graphs(llm: LLM, token_sizes: list[int]):
    """Give a CPU engine both kinds of graphs (captured with ``Rerun``; the test patches ``capture``)."""
    runner, config = llm.model_runner, llm.config
    runner.decode_graphs = DecodeGraphs(runner.model, graph_batch_sizes(config.max_num_seqs), config.max_blocks_per_seq,
                                        config.hf_config.hidden_size, runner.dtype, runner.device, lambda bs: False)
    runner.piecewise_graphs = PiecewiseGraphs(runner.model.model, runner.attention_layers, token_sizes, runner.device)
    return runner


def recording(graphs, replays: list, decode: DecodeGraphs):
    """``graphs.replay`` that records ``(rows, padded size)`` and checks that padding rows write no KV cache slot
    and, in decode graphs, that the attention's row order lists the real rows longest first, then the padding rows
    (a permutation of the padded batch whichever sizes ran before). Every step's attention lengths, tables and row
    order come in the decode graphs' buffer types, so that an eager step (the pieces' attention, a split plan)
    launches the Triton variants the captures compiled instead of compiling others mid-run (~1 s each on a cold
    Triton cache)."""
    replay = graphs.replay

    def run(input_ids, positions, size):
        ctx = context.get_context()
        assert (ctx.context_lens.dtype, ctx.block_tables.dtype, ctx.decode_order.dtype) == (
            decode.context_lens.dtype, decode.block_tables.dtype, decode.order.dtype)
        out = replay(input_ids, positions, size)
        n = len(input_ids)
        replays.append((n, size))
        assert (graphs.slot_mapping[n:size] == -1).all()
        if isinstance(graphs, DecodeGraphs):
            order = graphs.order[:size].tolist()
            assert sorted(order[:n]) == list(range(n)) and order[n:] == list(range(n, size))
            lengths = graphs.context_lens[order[:n]].tolist()
            assert lengths == sorted(lengths, reverse=True)
        return out
    return run


ODD_SHAPES = {  # GQA group 5 with head_dim 80, group 7 with head_dim 96; hidden sizes not powers of two
    "llama_10_2_80": ("llama", dict(num_attention_heads=10, num_key_value_heads=2, head_dim=80, hidden_size=240,
                                    intermediate_size=400)),
    "qwen3_7_1_96": ("qwen3", dict(num_attention_heads=7, num_key_value_heads=1, head_dim=96, hidden_size=224,
                                   intermediate_size=352)),
}


@pytest.fixture(scope="module")
def odd_shapes(tmp_path_factory) -> dict[str, str]:
    from engine.demo import build_tiny_model
    return {name: build_tiny_model(str(tmp_path_factory.mktemp(name)), arch, **shape)
            for name, (arch, shape) in ODD_SHAPES.items()}


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("model", ["qwen3", "llama_9_heads", *ODD_SHAPES])
def test_graph_replays_match_hf(tiny_models, llama_9_heads, odd_shapes, model, async_scheduling, monkeypatch):
    """Chunked prompts mixed with decodes through the piecewise path (steps padded up to 24 or 32 tokens),
    decode-only steps through the decode path (padded to 1, 2, 4, 8 rows), prefix hits, greedy == HF."""
    monkeypatch.setattr(cuda_graphs, "capture", Rerun)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    path = {"llama_9_heads": llama_9_heads, **odd_shapes}.get(model) or tiny_models[model]
    llm = LLM(path, device="cpu", kvcache_block_size=BS, max_model_len=512, max_num_batched_tokens=BUDGET,
              max_num_seqs=7, async_scheduling=async_scheduling)
    runner = install_graphs(llm, [24, BUDGET])
    replays = {"decode": [], "pieces": []}
    for kind, graphs in (("decode", runner.decode_graphs), ("pieces", runner.piecewise_graphs)):
        monkeypatch.setattr(graphs, "replay", recording(graphs, replays[kind], runner.decode_graphs))
    shared = random_prompts(512, (40,), seed=3)[0]
    prompts = random_prompts(512, (5, 90, 17, 3, 61, 2)) + random_prompts(512, (9, 30), seed=4, prefix=shared)
    outs, records = generate(path, prompts, max_new=10, llm=llm)
    assert [o["token_ids"] for o in outs] == [expected(path, p, 10) for p in prompts]
    assert {size for _, size in replays["pieces"]} == {24, BUDGET}
    assert any(n < size for n, size in replays["pieces"]) and any(n < size for n, size in replays["decode"])
    assert len(replays["decode"]) == sum(r.phase == "decode" for r in records)
    assert len(replays["pieces"]) == sum(r.phase == "prefill" for r in records)
    assert any(r.num_decode_seqs and r.num_prefill_tokens for r in records)
    assert outs[-1]["num_cached_tokens"] == 32


def test_real_model_through_graph_replays(monkeypatch):
    """SmolLM2-135M-Instruct (9 heads, 3 KV heads, head_dim 64, tied embeddings), its chat prompts chunked by a
    40-token budget and padded to 32 or 40 tokens: the same greedy answers as without graphs (which equal HF's,
    tests/test_real_model.py)."""
    monkeypatch.setattr(cuda_graphs, "capture", Rerun)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    questions = ["What is the capital of France?", "Name one primary color.", "What is 2 + 2?"]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    greedy = SamplingParams(temperature=0, max_tokens=16)
    answers = []
    for graphs in (False, True):
        llm = LLM("demo", device="cpu", max_model_len=256, max_num_seqs=3, max_num_batched_tokens=40)
        if graphs:
            install_graphs(llm, [32, 40])
        answers.append([o["token_ids"] for o in llm.generate(prompts, greedy, use_tqdm=False)])
        llm.shutdown()
    assert answers[0] == answers[1] and all(answers[0])
