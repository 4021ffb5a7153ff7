"""CUDA graphs of the forward pass, captured at start-up and replayed each step.

A decode-only step replays one graph of the whole model for its batch size (:class:`DecodeGraphs`): the decode
attention's launches depend on shapes only. A step with prompt tokens cannot be captured whole, since the prefill
attention's launches depend on the rows' lengths, so it replays the model in pieces (:class:`PiecewiseGraphs`,
vLLM's piecewise graphs): everything between two attention calls is one graph per token count, and attention runs
eagerly in between. Run eagerly, a step launches about ten kernels per layer from Python, and from ~500 rows up that
host time, not the GPU, set the step time (docs/benchmarks.md, 2026-12-03).

Batches are padded up to the next captured size. Padding rows have slot -1 (no KV-cache write) and, in decode,
context length 0 (no attention work); their outputs are never read.
"""
import functools
from typing import Callable

import torch
from torch import nn

from engine.context import get_context, reset_context, set_context
from engine.layers.attention import Attention
MAX_DECODE_GRAPH_BATCH = 1024  # decode graphs cover batches up to min(max_num_seqs, this): the default running limit
# Token counts of the piecewise graphs (steps up to the token budget, padded to the next one; larger steps run
# eagerly, where the GPU work of 16k+ tokens hides the launches). Padding stays under a quarter of a step
# from 1024 tokens on (a padded token costs what a real one does in the GEMMs).
PIECEWISE_TOKEN_SIZES = (*range(256, 4097, 256), 5120, 6144, 7168, 8192, 10240, 12288, 14336, 16384)


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, multiples of 16 to 256, of 32 to 512, of 64 to
    MAX_DECODE_GRAPH_BATCH; up to the first one >= ``max_batch``."""
    sizes = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32), *range(576, MAX_DECODE_GRAPH_BATCH + 1, 64)]
    return [s for s in sizes if s < max_batch] + [next(s for s in sizes if s >= min(max_batch, sizes[-1]))]


def piecewise_token_sizes(max_tokens: int) -> list[int]:
    """Token counts to capture piecewise: PIECEWISE_TOKEN_SIZES below ``max_tokens``, then ``max_tokens`` itself
    (the step budget) if no larger than the largest of them."""
    sizes = [s for s in PIECEWISE_TOKEN_SIZES if s < max_tokens]
    return sizes + [max_tokens] if max_tokens <= PIECEWISE_TOKEN_SIZES[-1] else sizes


@functools.cache
def capture_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def capture(run: Callable[[], None], pool) -> torch.cuda.CUDAGraph:
    """Run once eagerly (Triton compiles there, not under capture), then capture ``run`` into ``pool`` on a side
    stream. (Not ``torch.cuda.graph``: it empties the allocator's cache before every capture, so each of the
    hundreds of captures would give back and re-allocate the warm-up's memory.)"""
    run()
    graph, stream = torch.cuda.CUDAGraph(), capture_stream(torch.cuda.current_device())
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        graph.capture_begin(*(() if pool is None else (pool,)))
        try:
            run()
        finally:
            graph.capture_end()
    torch.cuda.current_stream().wait_stream(stream)
    return graph


class DecodeGraphs:
    """One graph of the whole model per decode batch size, reading its inputs from static buffers; sizes that may
    use cascade attention (``cascade(size)``) are captured twice, with and without it. ``pool``: their memory pool,
    which the piecewise graphs share."""

    def __init__(self, model: nn.Module, sizes: list[int], max_blocks: int, hidden_size: int, dtype: torch.dtype,
                 device: torch.device, cascade: Callable[[int], bool], pool=None):
        max_bs = sizes[-1]
        self.sizes, self.graphs = sizes, {}
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks, dtype=torch.int32, device=device)
        self.shared_blocks = torch.zeros(1, dtype=torch.int64, device=device)
        # the decode attention's row order (int32, as the mixed steps' uploads: one kernel variant); padding rows last
        self.rows = torch.arange(max_bs, dtype=torch.int32, device=device)
        self.order = self.rows.clone()
        self.outputs = torch.zeros(max_bs, hidden_size, dtype=dtype, device=device)
        for bs, with_cascade in [(bs, c) for bs in reversed(sizes) for c in (False, True) if not c or cascade(bs)]:
            set_context(is_prefill=False, slot_mapping=self.slot_mapping[:bs], context_lens=self.context_lens[:bs],
                        block_tables=self.block_tables[:bs], decode_order=self.order[:bs],
                        shared_blocks=self.shared_blocks if with_cascade else None)

            def run(bs=bs):
                self.outputs[:bs] = model(self.input_ids[:bs], self.positions[:bs])
            self.graphs[bs, with_cascade] = graph = capture(run, pool)
            pool = pool or graph.pool()
            torch.cuda.synchronize(device)
            reset_context()
        self.pool = pool

    def __len__(self) -> int:
        return len(self.graphs)

    def padded_size(self, num_rows: int) -> int | None:
        """The captured batch size a decode batch of ``num_rows`` replays (None: larger than any)."""
        return next((b for b in self.sizes if b >= num_rows), None)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, graph_bs: int) -> torch.Tensor:
        bs = input_ids.shape[0]
        ctx = get_context()
        self.input_ids[:bs].copy_(input_ids)
        self.positions[:bs].copy_(positions)
        self.slot_mapping[bs:graph_bs].fill_(-1)
        self.context_lens[bs:graph_bs].zero_()
        self.order[bs:graph_bs].copy_(self.rows[bs:graph_bs])
        self.slot_mapping[:bs].copy_(ctx.slot_mapping)
        self.context_lens[:bs].copy_(ctx.context_lens)
        self.order[:bs].copy_(ctx.decode_order)
        self.block_tables[:bs, :ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        cascade = ctx.shared_blocks is not None
        if cascade:
            self.shared_blocks.copy_(ctx.shared_blocks)
        self.graphs[graph_bs, cascade].replay()
        return self.outputs[:bs]


class PiecewiseGraphs:
    """The model cut at its attention calls (``model.piece``), one graph per piece and token count. Pieces hand
    their outputs to the eager attention, and it to the next piece, through static buffers of the largest size."""

    def __init__(self, model: nn.Module, attention_layers: list[Attention], sizes: list[int], device: torch.device,
                 pool=None):
        self.model, self.attention_layers, self.sizes, self.graphs = model, attention_layers, sizes, {}
        max_tokens = sizes[-1]
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        set_context(is_prefill=True, slot_mapping=self.slot_mapping)
        q, k, v, self.kv_stored, residual = model.piece(0, self.positions, self.input_ids, None)
        self.q, self.k, self.v, self.residual = (torch.zeros_like(t) for t in (q, k, v, residual))
        self.attn_out = torch.zeros_like(q)
        self.hidden = None  # the last piece's output, allocated at its first run
        del q, k, v, residual
        for size in reversed(sizes):
            set_context(is_prefill=True, slot_mapping=self.slot_mapping[:size])
            self.graphs[size] = []
            for i in range(len(attention_layers) + 1):
                graph = capture(lambda i=i, size=size: self._run_piece(i, size), pool)
                pool = pool or graph.pool()
                self.graphs[size].append(graph)
            torch.cuda.synchronize(device)
            reset_context()

    def __len__(self) -> int:
        return sum(map(len, self.graphs.values()))

    def padded_size(self, num_tokens: int) -> int | None:
        """The captured token count a step of ``num_tokens`` replays (None: larger than any)."""
        return next((s for s in self.sizes if s >= num_tokens), None)

    def _run_piece(self, i: int, size: int) -> None:
        x = self.input_ids[:size] if i == 0 else self.attn_out[:size]
        out = self.model.piece(i, self.positions[:size], x, self.residual[:size] if i else None)
        if i == len(self.attention_layers):
            if self.hidden is None:
                self.hidden = torch.zeros((self.sizes[-1], *out.shape[1:]), dtype=out.dtype, device=out.device)
            self.hidden[:size].copy_(out)
            return
        for buffer, value in zip((self.q, self.k, self.v, self.residual), (*out[:3], out[4])):
            buffer[:size].copy_(value)

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
        """The forward pass of a step whose attention metadata is in the context: the pieces of token count ``size``
        replayed, attention eager on the real tokens."""
        n = input_ids.shape[0]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(get_context().slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        graphs = self.graphs[size]
        q, k, v, attn_out = self.q[:n], self.k[:n], self.v[:n], self.attn_out[:n]
        for graph, attention in zip(graphs, self.attention_layers):
            graph.replay()
            attn_out.copy_(attention(q, k, v, kv_stored=self.kv_stored))
        graphs[-1].replay()
        return self.hidden[:n]
