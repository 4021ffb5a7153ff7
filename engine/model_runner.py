"""Owns the model on one device (one TP rank): weights, the paged KV cache, CUDA graphs, input preparation,
the forward pass and sampling."""
import logging
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config
from engine.context import get_context, reset_context, set_context
from engine.layers.attention import Attention, select_backend
from engine.layers.sampler import Sampler, SamplingBatch
from engine.loader import load_weights
from engine.logger import get_logger, memory_summary, timed
from engine.models import build_model
from engine.sequence import Sequence

logger = get_logger(__name__)
CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU, where no memory profile is taken
CASCADE_MIN_BATCH = 16  # smaller decode batches gain little from it and would pay its extra kernels


def shared_prefix_blocks(tables: np.ndarray, lengths: np.ndarray) -> int:
    """How many leading block-table entries all rows have in common (a prefix shared through the prefix
    cache), stopping before any row's last block, which is still being written."""
    cap = int(lengths.min()) - 1 if len(lengths) > 1 else 0
    if cap <= 0:
        return 0
    same = (tables[:, :cap] == tables[0, :cap]).all(axis=0)
    return cap if same.all() else int(same.argmin())


@dataclass
class SampledTokens:
    """A launched step's sampled token ids: on the device (the next step may read them there) and on their way
    to the host. ``tolist()`` waits for this step only, not for steps launched after it."""
    device: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None

    def tolist(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then steps of 16 up to max_num_seqs (rounded up)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    return sizes + list(range(16, max_num_seqs + 16, 16)) if max_num_seqs > 8 else sizes + [max_num_seqs]


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0):
        self.config, self.rank = config, rank
        self.block_size = config.kvcache_block_size
        self.device = torch.device("cuda", rank) if config.device == "cuda" else torch.device("cpu")
        self.dtype = config.torch_dtype
        logger.info("Initializing ModelRunner (rank %d)", rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        Attention.backend = select_backend(self.device, self.block_size)
        logger.info("Loading model: %s", config.model)
        previous_dtype = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        with torch.device(self.device):
            self.model = build_model(config.hf_config)
        torch.set_default_dtype(previous_dtype)
        load_weights(self.model, config.model)
        self.model.eval()
        logger.info("After model loading - %s", memory_summary(self.device))
        self.sampler = Sampler(config.seed)
        self._sampling_cache: tuple[list[int], SamplingBatch] | None = None
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._allocate_kv_cache()
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}  # (batch size, cascade) -> graph
        if not config.enforce_eager and self.device.type == "cuda":
            self._capture_cudagraphs()

    def shutdown(self) -> None:
        """Drop the CUDA graphs, KV cache and weights so their memory can be reused."""
        self.graphs.clear()
        self.graph_buffers = None
        for attn in self.attention_layers:
            attn.k_cache = attn.v_cache = torch.tensor([])
        self.kv_cache = self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ----- KV cache -------------------------------------------------------------------------------
    def _block_bytes(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * len(self.attention_layers) * layer.num_kv_heads * layer.head_dim
        return per_token * self.block_size * self.dtype.itemsize

    def _num_blocks_that_fit(self) -> int:
        config = self.config
        if config.num_kvcache_blocks:
            return config.num_kvcache_blocks
        if self.device.type == "cpu":
            wanted = config.max_num_seqs * config.max_blocks_per_seq
            return max(config.max_blocks_per_seq, min(wanted, CPU_KV_CACHE_BYTES // self._block_bytes()))
        self._profile_peak_memory()
        free, total = torch.cuda.mem_get_info(self.device)
        stats = torch.cuda.memory_stats(self.device)
        peak, current = stats["allocated_bytes.all.peak"], stats["allocated_bytes.all.current"]
        budget = total * config.gpu_memory_utilization - (total - free) - (peak - current)
        logger.info("KV cache budget: total=%.2fGB, used=%.2fGB, activation_peak=%.2fGB, utilization=%.2f",
                    total / 2**30, (total - free) / 2**30, (peak - current) / 2**30, config.gpu_memory_utilization)
        return int(budget // self._block_bytes())

    @torch.inference_mode()
    def _profile_peak_memory(self) -> None:
        """Forward a full ``max_num_batched_tokens`` prefill and sample a full batch, to measure peak memory."""
        config = self.config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        seq_len = config.max_model_len
        num_seqs = max(1, min(config.max_num_batched_tokens // seq_len, config.max_num_seqs))
        cu = torch.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=torch.int32, device=self.device)
        set_context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=seq_len, max_seqlen_k=seq_len)
        input_ids = torch.zeros(num_seqs * seq_len, dtype=torch.int64, device=self.device)
        positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        self.model.compute_logits(self.model(input_ids, positions))
        reset_context()
        n = config.max_num_seqs
        logits = torch.randn(n, config.hf_config.vocab_size, device=self.device)
        ones = torch.ones(n, device=self.device)
        self.sampler(logits, SamplingBatch(ones, ones.int(), ones * 0.9, ones * 0.1, -ones.long(), ones.long(),
                                           False, False, True, True, False))
        del logits
        torch.cuda.synchronize(self.device)

    def _allocate_kv_cache(self) -> int:
        logger.info("Allocating KV cache")
        layer = self.attention_layers[0]
        num_blocks = self._num_blocks_that_fit()
        if dist.is_initialized():  # every rank must hold the same number of blocks
            count = torch.tensor([num_blocks], device=self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(count, op=dist.ReduceOp.MIN)
            num_blocks = int(count.item())
        if num_blocks < 1:
            raise RuntimeError("no GPU memory left for the KV cache: lower max_num_batched_tokens or "
                               "max_model_len, or raise gpu_memory_utilization")
        logger.info("KV cache configuration: num_kv_heads=%d, head_dim=%d, block_size=%d, dtype=%s",
                    layer.num_kv_heads, layer.head_dim, self.block_size, str(self.dtype).removeprefix("torch."))
        logger.info("Allocating %d KV cache blocks, total_size=%.2fGB", num_blocks,
                    num_blocks * self._block_bytes() / 2**30)
        self.kv_cache = torch.empty(2, len(self.attention_layers), num_blocks, self.block_size,
                                    layer.num_kv_heads, layer.head_dim, dtype=self.dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = self.kv_cache[0, i], self.kv_cache[1, i]
        logger.info("After KV cache allocation - %s", memory_summary(self.device))
        return num_blocks

    # ----- inputs ---------------------------------------------------------------------------------
    def _to_device(self, data, dtype: torch.dtype) -> torch.Tensor:
        pin = self.device.type == "cuda"
        return torch.as_tensor(np.asarray(data), dtype=dtype).pin_memory().to(self.device, non_blocking=True) \
            if pin else torch.as_tensor(np.asarray(data), dtype=dtype)

    def _block_table_array(self, seqs: list[Sequence]) -> tuple[np.ndarray, np.ndarray]:
        """Block tables padded with 0 into one ``[n, max_blocks]`` array, built without a per-row loop, and
        each row's length."""
        lengths = np.fromiter((len(s.block_table) for s in seqs), dtype=np.int64, count=len(seqs))
        flat = np.fromiter(chain.from_iterable(s.block_table for s in seqs), dtype=np.int32, count=int(lengths.sum()))
        table = np.zeros((len(seqs), int(lengths.max())), dtype=np.int32)
        rows = np.repeat(np.arange(len(seqs)), lengths)
        table[rows, np.arange(len(flat)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = flat
        return table, lengths

    def _prepare_prefill(self, seqs: list[Sequence]) -> tuple[torch.Tensor, torch.Tensor]:
        new_lens = np.array([len(s) - s.num_cached_tokens for s in seqs])
        input_ids = np.concatenate([s.token_ids[s.num_cached_tokens:] for s in seqs])
        starts = np.repeat([s.num_cached_tokens for s in seqs], new_lens)
        offsets = np.arange(len(input_ids)) - np.repeat(np.cumsum(new_lens) - new_lens, new_lens)
        positions = starts + offsets
        tables, _ = self._block_table_array(seqs)
        rows = np.repeat(np.arange(len(seqs)), new_lens)
        slot_mapping = tables[rows, positions // self.block_size] * self.block_size + positions % self.block_size
        cu_seqlens_q = np.concatenate([[0], np.cumsum(new_lens)])
        context_lens = [len(s) for s in seqs]
        set_context(is_prefill=True, cu_seqlens_q=self._to_device(cu_seqlens_q, torch.int32),
                    max_seqlen_q=int(new_lens.max()), max_seqlen_k=max(context_lens),
                    has_cached_prefix=any(s.num_cached_tokens for s in seqs),
                    slot_mapping=self._to_device(slot_mapping, torch.int64),
                    context_lens=self._to_device(context_lens, torch.int32),
                    block_tables=self._to_device(tables, torch.int32))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] PREFILL tensors: input_ids=[%d], positions=[%d], slot_mapping=[%d]",
                         self.rank, len(input_ids), len(positions), len(slot_mapping))
            logger.debug("[Rank %d] PREFILL: max_seqlen_q=%d, max_seqlen_k=%d, total_tokens=%d",
                         self.rank, new_lens.max(), max(context_lens), len(input_ids))
        return self._to_device(input_ids, torch.int64), self._to_device(positions, torch.int64)

    def _prepare_decode(self, seqs: list[Sequence], previous: tuple[torch.Tensor, list[int]] | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode inputs. With ``previous = (sampled, rows)`` the input tokens are not known on the host yet: row
        ``rows[i]`` of the previous step's device-side ``sampled`` tokens feeds sequence i."""
        n, (tables, lengths) = len(seqs), self._block_table_array(seqs)
        packed = np.empty(4 * n + tables.size + 1, dtype=np.int64)  # one host-to-device copy per step
        rows = packed[:4 * n].reshape(4, n)
        rows[0] = [s.last_token for s in seqs] if previous is None else previous[1]
        rows[3] = [len(s) for s in seqs]
        rows[1] = rows[3] - 1
        rows[2] = [s.block_table[-1] * self.block_size + s.last_block_num_tokens - 1 for s in seqs]
        packed[4 * n:-1] = tables.ravel()
        packed[-1] = shared = shared_prefix_blocks(tables, lengths) if self._cascade(n) else 0
        device = self._to_device(packed, torch.int64)
        input_ids, positions, slot_mapping, context_lens = device[:4 * n].view(4, n)
        if previous is not None:
            input_ids = previous[0].index_select(0, input_ids)
        set_context(is_prefill=False, slot_mapping=slot_mapping, context_lens=context_lens,
                    block_tables=device[4 * n:-1].view(tables.shape), shared_blocks=device[-1:] if shared else None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] DECODE tensors: input_ids=[%d], positions=[%d], context_lens=[%d], "
                         "block_tables=%s, shared_prefix_blocks=%d", self.rank, n, n, n, list(tables.shape), shared)
        return input_ids, positions

    def _cascade(self, batch: int) -> bool:
        """Whether a decode batch of this size may attend to its shared prefix blocks once (cascade attention):
        with the Triton kernels, from CASCADE_MIN_BATCH sequences. Graphs of those sizes are captured twice,
        with and without it, so batches with no shared prefix pay nothing for it."""
        return Attention.backend == "triton" and batch >= CASCADE_MIN_BATCH

    def _prepare_sampling(self, seqs: list[Sequence]) -> SamplingBatch:
        """Per-row sampling tensors; reused while the batch is unchanged (seeded rows need fresh positions)."""
        key = [s.seq_id for s in seqs]
        if self._sampling_cache is not None and self._sampling_cache[0] == key \
                and not self._sampling_cache[1].any_seeded:
            return self._sampling_cache[1]
        params = [s.params for s in seqs]
        floats = np.array([[p.temperature for p in params], [p.top_p for p in params],
                           [p.min_p for p in params]], dtype=np.float32)
        ints = np.array([[p.top_k for p in params], [-1 if p.seed is None else p.seed for p in params],
                         [len(s) - s.num_prompt_tokens for s in seqs]], dtype=np.int64)  # pending ones count
        temps, top_ps, min_ps = self._to_device(floats, torch.float32)
        top_ks, seeds, positions = self._to_device(ints, torch.int64)
        batch = SamplingBatch(temps, top_ks, top_ps, min_ps, seeds, positions,
                              all_greedy=not floats[0].any(), any_greedy=not floats[0].all(),
                              use_top_k_top_p=bool((ints[0] > 0).any() or (floats[1] < 1).any()),
                              use_min_p=bool(floats[2].any()), any_seeded=bool((ints[1] >= 0).any()))
        self._sampling_cache = (key, batch)
        return batch

    # ----- forward --------------------------------------------------------------------------------
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int] | None:
        """One engine step on this rank: returns the sampled token per sequence (rank 0), else None."""
        sampled = self.launch(seqs, is_prefill)
        return sampled.tolist() if sampled is not None else None

    @torch.inference_mode()
    def launch(self, seqs: list[Sequence], is_prefill: bool,
               previous: tuple[torch.Tensor, list[int]] | None = None) -> SampledTokens | None:
        """Queue one step's forward and sampling on the device without waiting for them; rank 0 gets the
        sampled tokens back (see :meth:`_prepare_decode` for ``previous``)."""
        phase = "PREFILL" if is_prefill else "DECODE"
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] Preparing %s batch: %d sequences", self.rank, phase, len(seqs))
        input_ids, positions = self._prepare_prefill(seqs) if is_prefill else self._prepare_decode(seqs, previous)
        sampling = self._prepare_sampling(seqs) if self.rank == 0 else None
        with timed(logger, self.device, "[Rank %d] Model forward %s", self.rank, phase):
            logits = self._forward(input_ids, positions, is_prefill)
        if logger.isEnabledFor(logging.DEBUG) and logits is not None:
            logger.debug("[Rank %d] Output: logits=%s", self.rank, list(logits.shape))
        reset_context()
        if self.rank != 0:
            return None
        sampled = self.sampler(logits, sampling)
        if self.device.type != "cuda":
            return SampledTokens(sampled, sampled, None)
        host = torch.empty(sampled.shape, dtype=sampled.dtype, pin_memory=True)
        host.copy_(sampled, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return SampledTokens(sampled, host, ready)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, is_prefill: bool) -> torch.Tensor | None:
        bs = input_ids.shape[0]
        if is_prefill or not self.graphs or bs > self.graph_sizes[-1]:
            return self.model.compute_logits(self.model(input_ids, positions))
        return self.model.compute_logits(self._replay(input_ids, positions))

    # ----- CUDA graphs ----------------------------------------------------------------------------
    @torch.inference_mode()
    def _capture_cudagraphs(self) -> None:
        config = self.config
        self.graph_sizes = graph_batch_sizes(config.max_num_seqs)
        max_bs, hidden = self.graph_sizes[-1], config.hf_config.hidden_size
        self.graph_buffers = dict(
            input_ids=torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            positions=torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            slot_mapping=torch.full((max_bs,), -1, dtype=torch.int64, device=self.device),
            context_lens=torch.ones(max_bs, dtype=torch.int32, device=self.device),
            block_tables=torch.zeros(max_bs, config.max_blocks_per_seq, dtype=torch.int32, device=self.device),
            shared_blocks=torch.zeros(1, dtype=torch.int64, device=self.device),
            outputs=torch.zeros(max_bs, hidden, dtype=self.dtype, device=self.device))
        buf, pool = self.graph_buffers, None
        logger.info("Capturing CUDA graphs for decode batch sizes %s%s", self.graph_sizes,
                    f" (from {CASCADE_MIN_BATCH} also with cascade attention)" if self._cascade(max_bs) else "")
        for bs, cascade in [(bs, c) for bs in reversed(self.graph_sizes) for c in (False, True)
                            if not c or self._cascade(bs)]:
            graph = torch.cuda.CUDAGraph()
            set_context(is_prefill=False, slot_mapping=buf["slot_mapping"][:bs],
                        context_lens=buf["context_lens"][:bs], block_tables=buf["block_tables"][:bs],
                        shared_blocks=buf["shared_blocks"] if cascade else None)
            buf["outputs"][:bs] = self.model(buf["input_ids"][:bs], buf["positions"][:bs])  # warm-up
            with torch.cuda.graph(graph, pool):
                buf["outputs"][:bs] = self.model(buf["input_ids"][:bs], buf["positions"][:bs])
            pool = pool or graph.pool()
            self.graphs[bs, cascade] = graph
            torch.cuda.synchronize(self.device)
            reset_context()
        logger.info("Captured %d CUDA graphs - %s", len(self.graphs), memory_summary(self.device))

    def _replay(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        bs = input_ids.shape[0]
        graph_bs = next(b for b in self.graph_sizes if b >= bs)
        ctx, buf = get_context(), self.graph_buffers
        buf["input_ids"][:bs].copy_(input_ids)
        buf["positions"][:bs].copy_(positions)
        buf["slot_mapping"][bs:graph_bs].fill_(-1)  # padding rows: no cache writes and no attention work
        buf["context_lens"][bs:graph_bs].zero_()
        buf["slot_mapping"][:bs].copy_(ctx.slot_mapping)
        buf["context_lens"][:bs].copy_(ctx.context_lens)
        buf["block_tables"][:bs, :ctx.block_tables.shape[1]].copy_(ctx.block_tables)
        cascade = ctx.shared_blocks is not None
        if cascade:
            buf["shared_blocks"].copy_(ctx.shared_blocks)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] DECODE CUDA graph replay: batch=%d, graph_batch=%d, k_cache=%s, v_cache=%s "
                         "(per-layer attention lines are not emitted during replay)", self.rank, bs, graph_bs,
                         list(self.kv_cache[0].shape), list(self.kv_cache[1].shape))
        self.graphs[graph_bs, cascade].replay()
        return buf["outputs"][:bs]
