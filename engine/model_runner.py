"""Owns the model on one device (one TP rank): weights, the paged KV cache, CUDA graphs, input preparation,
the forward pass and sampling. Each step runs one :class:`SchedulerOutput`: a decode-only batch replays a CUDA
graph; any other (prompt chunks, alone or with decode rows) replays piecewise graphs around eager attention
(engine/cuda_graphs.py), its decode rows through the decode attention kernel and its prompt chunks through the
paged prefill attention.

A step is queued in two parts, neither waiting for the device: :meth:`ModelRunner.forward` (inputs, forward
pass, logits) and :meth:`ModelRunner.sample` (sampling settings, penalty tensors, grammar bitmask, sampling).
:meth:`ModelRunner.launch` queues both back to back. The engine queues them apart for a step whose sampling
needs the step before it postprocessed on the host (deferred sampling, engine/llm_engine.py): that step's
forward reads its pending input tokens on the device, so only its sampling has to wait."""
import logging
import time
from dataclasses import dataclass, field, replace
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from engine.config import Config
from engine.context import get_context, reset_context, set_context
from engine.cuda_graphs import DecodeGraphs, PiecewiseGraphs, graph_batch_sizes, piecewise_token_sizes
from engine.layers.attention import Attention, select_backend
from engine.layers.fusion import use_triton_kernels
from engine.layers.sampler import Sampler, SamplingBatch, TokenLogprobs, token_logprobs
from engine.loader import load_weights
from engine.logger import get_logger, memory_summary, timed
from engine.logits_processors import PenaltyBatch, ProcessorRow, build_penalty_batch, needs_processing
from engine.models import build_model
from engine.outputs import PENDING_TOKEN, SchedulerOutput
from engine.sequence import Sequence
from engine.staging import DownloadRing, UploadRing

logger = get_logger(__name__)
CPU_KV_CACHE_BYTES = 1 << 30  # default KV budget on CPU, where no memory profile is taken
CASCADE_MIN_BATCH = 16  # smaller decode batches gain little from it and would pay its extra kernels
PROMPT_LOGITS_CHUNK = 1024  # prompt logprobs: positions whose logits are computed at a time
UPLOAD_ALIGN_BYTES = 16  # Triton specializes kernels on 16-byte pointer alignment: every uploaded view has it
# Pinned staging buffers (engine/staging.py): more than two steps' uploads (a prompt step makes up to ~5), and
# more than the sampled-token copies of the steps in flight (two).
UPLOAD_SLOTS = 12
DOWNLOAD_SLOTS = 8
UPLOAD_SLOT_MAX_BYTES = 8 << 20  # start-up size of an upload buffer at most (larger uploads grow theirs)


def shared_prefix_blocks(tables: np.ndarray, lengths: np.ndarray) -> int:
    """How many leading block-table entries all rows have in common (a prefix shared through the prefix
    cache), stopping before any row's last block, which is still being written."""
    cap = int(lengths.min()) - 1 if len(lengths) > 1 else 0
    if cap <= 0:
        return 0
    same = (tables[:, :cap] == tables[0, :cap]).all(axis=0)
    return cap if same.all() else int(same.argmin())


def longest_first(context_lens: np.ndarray) -> np.ndarray:
    """Decode rows by context length, longest first: the order the decode attention starts their programs in, so
    that no SM is left with a long row while the others idle (on the H200, 10-14 % off the kernel at 96-544 rows of
    uneven lengths; docs/benchmarks.md, 2026-12-04, sixth session)."""
    return np.argsort(-context_lens, kind="stable")


@dataclass
class StepLogits:
    """A step whose forward pass is queued on the device but not its sampling: the logits of its sampling rows
    (None when no row samples; rank 0 samples them) and its prompt logprobs (rank 0)."""
    batch: SchedulerOutput
    logits: torch.Tensor | None
    prompt_logprobs: list[tuple[Sequence, int, TokenLogprobs]]


@dataclass
class SampledTokens:
    """A launched step's sampled token ids: on the device (the next step may read them there) and on their way
    to the host. ``tolist()`` waits for this step only, not for steps launched after it."""
    device: torch.Tensor
    host: torch.Tensor
    ready: torch.cuda.Event | None
    logprobs: TokenLogprobs | None = None  # rows ``logprob_rows`` of the sampled tokens (host, once ready)
    logprob_rows: list[int] = field(default_factory=list)
    prompt_logprobs: list[tuple[Sequence, int, TokenLogprobs]] = field(default_factory=list)  # (seq, from, lps)

    def tolist(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host.tolist()


@dataclass
class SamplingSettings:
    """The sampling settings made for one set of sampling sequences (``seq_ids``, in row order), kept while the
    next steps sample the same sequences; ``positions`` are the seeded rows' output positions on the host."""
    seq_ids: list[int]
    sampling: SamplingBatch
    processed: list[int]    # rows with logits processors
    constrained: list[int]  # rows with a grammar
    positions: np.ndarray


def upload_bytes_bound(config: Config) -> int:
    """Bytes of the largest single ``ModelRunner._upload`` (a decode step of every running sequence with a block
    table as wide as the longest allowed, in int64; a prompt step's token arrays), padding included, up to
    UPLOAD_SLOT_MAX_BYTES: the staging buffers' start-up size (2.7 MB at Qwen3's 32k context in 128-token blocks)."""
    rows, tokens = config.max_num_seqs_limit, config.max_num_batched_tokens
    bound = 8 * (4 * tokens + (config.max_blocks_per_seq + 8) * rows) + 16 * UPLOAD_ALIGN_BYTES
    return min(bound, UPLOAD_SLOT_MAX_BYTES)


def block_table_array(block_tables: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Block tables padded with 0 into one ``[rows, max_blocks]`` array, and each row's length."""
    lengths = np.fromiter(map(len, block_tables), dtype=np.int64, count=len(block_tables))
    table = np.zeros((len(block_tables), int(lengths.max())), dtype=np.int64)
    table[np.arange(table.shape[1]) < lengths[:, None]] = np.fromiter(
        chain.from_iterable(block_tables), dtype=np.int64, count=int(lengths.sum()))
    return table, lengths


class ModelRunner:
    def __init__(self, config: Config, rank: int = 0):
        self.config, self.rank = config, rank
        self.block_size = config.kvcache_block_size
        self.device = torch.device("cuda", rank) if config.device == "cuda" else torch.device("cpu")
        self.dtype = config.torch_dtype
        logger.info("Initializing ModelRunner (rank %d)", rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            self.uploads = UploadRing(self.device, UPLOAD_SLOTS, upload_bytes_bound(config))
            self.downloads = DownloadRing(DOWNLOAD_SLOTS, 8 * config.max_num_seqs_limit)
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
        self._sampling_cache: SamplingSettings | None = None
        self._bitmask = None  # engine.structured.TokenBitmask, from the first constrained step on
        self.eos_token_ids: list[int] = []  # held back by min_tokens; set by the engine
        # The latest step's sampled tokens on the device and the row of each sequence in them (rank 0).
        self._last_sampled: tuple[torch.Tensor, dict[int, int]] | None = None
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        self.num_blocks = self._allocate_kv_cache()
        if config.max_num_seqs is None:
            config.max_num_seqs = config.default_max_num_seqs(self.num_blocks)
            if rank == 0:
                logger.info("Running set: max_num_seqs=%d (fitted to the KV cache)", config.max_num_seqs)
        self.decode_graphs: DecodeGraphs | None = None
        self.piecewise_graphs: PiecewiseGraphs | None = None
        if self.device.type == "cuda":
            self._compile_ahead()
            self._load_lm_head_kernels()
        if not config.enforce_eager and self.device.type == "cuda":
            self._capture_cudagraphs()

    def shutdown(self) -> None:
        """Drop the CUDA graphs, KV cache and weights so their memory can be reused."""
        self.decode_graphs = self.piecewise_graphs = None
        for attn in self.attention_layers:
            attn.k_cache = attn.v_cache = torch.tensor([])
        self.kv_cache = self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _compile_ahead(self) -> None:
        """Compile now, in parallel, the kernel variants that steps would otherwise first meet mid-run (about a
        second each with a cold Triton cache, the GPU idle meanwhile): the sampler's, for every running-set size
        and for both logits dtypes (top-k/top-p/min-p sample from float32), and the prefill kernel of steps with
        context in the cache. The start-up's forward passes and graph captures compile the rest."""
        from engine.kernels.warmup import ahead_of_time
        started = time.perf_counter()
        with ahead_of_time():
            if use_triton_kernels(self.kv_cache):
                from engine.kernels.triton_fused import compile_gumbel_argmax
                compile_gumbel_argmax(self.config.hf_config.vocab_size, self.config.max_num_seqs,
                                      tuple({self.dtype, torch.float32}), self.device)
            if Attention.backend == "triton":
                from engine.kernels.triton_attention import compile_paged_prefill
                layer = self.attention_layers[0]
                compile_paged_prefill(layer.num_heads, layer.k_cache, layer.v_cache)
        logger.info("Compiled the sampling and prefill kernels for every batch size in %.2fs",
                    time.perf_counter() - started)

    @torch.inference_mode()
    def _load_lm_head_kernels(self) -> None:
        """Run this rank's LM-head product once at every row count a step samples (1 to ``max_num_seqs``): cuBLAS
        picks its kernel by the row count, and CUDA loads a kernel at its first launch, a load that may wait for the
        whole device. Otherwise a run whose batch grows through new sizes meets those loads mid-run. (~160 TFLOP in
        all at Qwen3-0.6B's vocabulary and 1,024 rows.)"""
        started = time.perf_counter()
        weight = self.model.lm_head.weight
        hidden = torch.zeros(self.config.max_num_seqs, weight.shape[1], dtype=weight.dtype, device=self.device)
        for rows in range(1, hidden.shape[0] + 1):
            torch.nn.functional.linear(hidden[:rows], weight)
        torch.cuda.synchronize(self.device)
        logger.info("Loaded the LM head's kernels for 1 to %d rows in %.2fs", hidden.shape[0],
                    time.perf_counter() - started)

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
            wanted = config.max_num_seqs_limit * config.max_blocks_per_seq
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
        seq_len = min(config.max_model_len, config.max_num_batched_tokens)
        num_seqs = max(1, min(config.max_num_batched_tokens // seq_len, config.max_num_seqs_limit))
        cu = torch.arange(0, (num_seqs + 1) * seq_len, seq_len, dtype=torch.int32, device=self.device)
        set_context(is_prefill=True, cu_seqlens_q=cu, max_seqlen_q=seq_len, max_seqlen_k=seq_len)
        input_ids = torch.zeros(num_seqs * seq_len, dtype=torch.int64, device=self.device)
        positions = torch.arange(seq_len, device=self.device).repeat(num_seqs)
        self.model.compute_logits(self.model(input_ids, positions))
        reset_context()
        n = config.max_num_seqs_limit
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
    def _upload(self, *arrays: np.ndarray, dtype: type = np.int64) -> list[torch.Tensor]:
        """Copy the arrays to the device in one transfer (through a pinned staging buffer, non-blocking, on CUDA);
        a view per array, each starting UPLOAD_ALIGN_BYTES-aligned."""
        align = UPLOAD_ALIGN_BYTES // np.dtype(dtype).itemsize
        offsets = np.cumsum([0] + [-(-a.size // align) * align for a in arrays])
        flat = np.zeros(offsets[-1], dtype=dtype)
        for a, start in zip(arrays, offsets):
            flat[start:start + a.size] = a.ravel()
        device = self.uploads.upload(flat) if self.device.type == "cuda" else torch.from_numpy(flat)
        return [device[start:start + a.size].view(a.shape) for a, start in zip(arrays, offsets)]

    def _pending_inputs(self, batch: SchedulerOutput, input_ids: np.ndarray, token_rows: np.ndarray
                        ) -> tuple[np.ndarray, np.ndarray]:
        """Where ``input_ids`` hold PENDING_TOKEN, and the row of each such token's sequence in the latest
        step's sampled tokens (async scheduling: the value is still on the device)."""
        where = np.flatnonzero(input_ids == PENDING_TOKEN)
        if not len(where):
            return where, where
        rows = self._last_sampled[1]
        return where, np.fromiter((rows[batch.seqs[r].seq_id] for r in token_rows[where]), np.int64, len(where))

    def _feed_pending(self, input_ids: torch.Tensor, where: torch.Tensor, rows: torch.Tensor) -> None:
        if where.numel():
            input_ids.index_copy_(0, where, self._last_sampled[0].index_select(0, rows))

    def _prepare_prefill(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of a batch with prompt tokens: every row's new tokens packed back to back, attending to its
        whole context in the paged cache (the context of a decode row is all but its one new token)."""
        starts = np.array(batch.num_computed_tokens, dtype=np.int64)
        new_lens = np.array(batch.num_scheduled_tokens, dtype=np.int64)
        cu_seqlens_q = np.concatenate([[0], np.cumsum(new_lens)])
        num_tokens = int(cu_seqlens_q[-1])
        token_rows = np.repeat(np.arange(batch.num_rows), new_lens)
        positions = np.arange(num_tokens) + np.repeat(starts - cu_seqlens_q[:-1], new_lens)
        tables, _ = block_table_array(batch.block_tables)
        slot_mapping = tables[token_rows, positions // self.block_size] * self.block_size + positions % self.block_size
        context_lens = starts + new_lens
        input_ids = np.fromiter(chain.from_iterable(batch.token_ids), dtype=np.int64, count=num_tokens)
        pending = self._pending_inputs(batch, input_ids, token_rows)
        ids_d, positions_d, slots_d, *pending_d = self._upload(input_ids, positions, slot_mapping, *pending)
        order = longest_first(context_lens[:batch.num_decode_rows])
        cu_d, context_d, tables_d, order_d = self._upload(cu_seqlens_q, context_lens, tables, order, dtype=np.int32)
        self._feed_pending(ids_d, *pending_d)
        set_context(is_prefill=True, cu_seqlens_q=cu_d, num_decode_tokens=batch.num_decode_rows,
                    max_seqlen_q=int(new_lens.max()), max_seqlen_k=int(context_lens.max()),
                    max_prompt_context=int(context_lens[batch.num_decode_rows:].max(initial=0)),
                    slot_mapping=slots_d, context_lens=context_d, block_tables=tables_d, decode_order=order_d,
                    decode_split_plan=self._split_plan(context_lens[order]))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] PREFILL tensors: input_ids=[%d], positions=[%d], slot_mapping=[%d]",
                         self.rank, num_tokens, num_tokens, num_tokens)
            logger.debug("[Rank %d] PREFILL: max_seqlen_q=%d, max_seqlen_k=%d, total_tokens=%d",
                         self.rank, new_lens.max(), context_lens.max(), num_tokens)
        return ids_d, positions_d

    def _prepare_decode(self, batch: SchedulerOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs of a decode-only batch (one token per row), in two host-to-device copies: the token inputs in
        int64, the attention's lengths, tables and row order in int32, the types of the decode graphs' buffers and
        of the mixed steps' uploads: eager decode attention (a split plan) launches the kernel variants the graph
        captures compiled instead of int64 ones first met mid-run."""
        n = batch.num_rows
        positions = np.array(batch.num_computed_tokens, dtype=np.int64)
        tables, lengths = block_table_array(batch.block_tables)
        slot_mapping = tables[np.arange(n), positions // self.block_size] * self.block_size \
            + positions % self.block_size
        input_ids = np.fromiter((t[0] for t in batch.token_ids), dtype=np.int64, count=n)
        shared = np.array([shared_prefix_blocks(tables, lengths) if self._cascade(n) else 0])
        pending = self._pending_inputs(batch, input_ids, np.arange(n))
        order = longest_first(positions)
        ids_d, positions_d, slots_d, shared_d, *pending_d = self._upload(input_ids, positions, slot_mapping, shared,
                                                                         *pending)
        context_d, tables_d, order_d = self._upload(positions + 1, tables, order, dtype=np.int32)
        self._feed_pending(ids_d, *pending_d)
        set_context(is_prefill=False, slot_mapping=slots_d, context_lens=context_d, block_tables=tables_d,
                    shared_blocks=shared_d if shared[0] else None, decode_order=order_d,
                    decode_split_plan=self._split_plan(positions[order] + 1))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] DECODE tensors: input_ids=[%d], positions=[%d], context_lens=[%d], "
                         "block_tables=%s, shared_prefix_blocks=%d", self.rank, n, n, n, list(tables.shape), shared[0])
        return ids_d, positions_d

    def _split_plan(self, context_lens_desc: np.ndarray) -> tuple[int, int] | None:
        """Which of a step's decode rows (context lengths, longest first) the Triton decode kernel splits: the few
        much longer than the rest (``long_row_split_plan``); a decode-only step with such rows replays the piecewise
        graphs instead of a whole-model one."""
        if Attention.backend != "triton" or not len(context_lens_desc):
            return None
        from engine.kernels.triton_attention import long_row_split_plan
        return long_row_split_plan(context_lens_desc, self.attention_layers[0].num_kv_heads, self.device)

    def _cascade(self, batch: int) -> bool:
        """Whether a decode batch of this size may attend to its shared prefix blocks once (cascade attention):
        with the Triton kernels, from CASCADE_MIN_BATCH sequences. Graphs of those sizes are captured twice,
        with and without it, so batches with no shared prefix pay nothing for it."""
        return Attention.backend == "triton" and batch >= CASCADE_MIN_BATCH

    def _prepare_sampling(self, batch: SchedulerOutput) -> SamplingBatch:
        """Per-row sampling tensors of the rows that sample, plus the logits processors' inputs and the grammar
        bitmask, made each step for the rows that have them."""
        seqs = batch.sampling_seqs
        sampling, processed, constrained = self._sampling_settings(batch, seqs)
        if not processed and not constrained:
            return sampling
        vocab_size = self.config.hf_config.vocab_size
        penalties = self._penalty_batch([(r, seqs[r]) for r in processed], vocab_size) if processed else None
        bitmask = self._grammar_bitmask(seqs, constrained, vocab_size) if constrained else None
        return replace(sampling, penalties=penalties, bitmask=bitmask)

    def _grammar_bitmask(self, seqs: list[Sequence], constrained: list[int], vocab_size: int) -> torch.Tensor | None:
        """The batch's token bitmask, from the constrained rows whose sequence still runs. A row of a sequence that
        finished on its previous token (found one step late under async scheduling: EOS, the end of its grammar, a
        token outside it, a stop string) stays unmasked: its token is dropped, and a terminated matcher cannot fill
        a mask (xgrammar raises)."""
        live = [(r, seqs[r].grammar) for r in constrained if not seqs[r].is_finished]
        if not live:
            return None
        if self._bitmask is None:
            from engine.structured import TokenBitmask
            self._bitmask = TokenBitmask(vocab_size, self.device)
        return self._bitmask.fill(live, len(seqs))

    def _penalty_batch(self, rows: list[tuple[int, Sequence]], vocab_size: int) -> PenaltyBatch:
        """(Every token of a row with a token penalty is known here: such a step is sampled only after the step
        before it was postprocessed, see LLMEngine's deferred sampling.)"""
        return build_penalty_batch([ProcessorRow(r, s.params, s.token_ids[:s.num_prompt_tokens], s.completion_token_ids,
                                                 len(s) - 1 - s.num_prompt_tokens) for r, s in rows],
                                   self.eos_token_ids, vocab_size, self.device)

    def _sampling_settings(self, batch: SchedulerOutput, seqs: list[Sequence]
                           ) -> tuple[SamplingBatch, list[int], list[int]]:
        """The settings tensors, and the rows with logits processors and with a grammar; reused while the
        sampling sequences are unchanged. Seeded rows need their output positions: when each moved on by one
        (decode steps), the cached device positions are stepped in place (queued after the sampling that read
        them) instead of rebuilding every tensor."""
        key = [s.seq_id for s in seqs]
        cache = self._sampling_cache
        if cache is not None and cache.seq_ids == key:
            if not cache.sampling.any_seeded:
                return cache.sampling, cache.processed, cache.constrained
            positions = self._output_positions(batch, seqs)
            if np.array_equal(positions, cache.positions + 1):
                cache.sampling.positions.add_(1)
                cache.positions = positions
                return cache.sampling, cache.processed, cache.constrained
        params = [s.params for s in seqs]
        positions = self._output_positions(batch, seqs)
        floats = np.array([[p.temperature for p in params], [p.top_p for p in params],
                           [p.min_p for p in params]], dtype=np.float32)
        ints = np.array([[p.top_k for p in params], [-1 if p.seed is None else p.seed for p in params],
                         positions], dtype=np.int64)
        temps, top_ps, min_ps = self._upload(floats, dtype=np.float32)[0]
        top_ks, seeds, device_positions = self._upload(ints)[0]
        sampling = SamplingBatch(temps, top_ks, top_ps, min_ps, seeds, device_positions,
                                 all_greedy=not floats[0].any(), any_greedy=not floats[0].all(),
                                 use_top_k_top_p=bool((ints[0] > 0).any() or (floats[1] < 1).any()),
                                 use_min_p=bool(floats[2].any()), any_seeded=bool((ints[1] >= 0).any()))
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        if logprob_rows:
            sampling.logprob_rows = self._upload(np.array(logprob_rows))[0]
            sampling.logprob_row_list = logprob_rows
            sampling.num_logprobs = max(params[i].logprobs for i in logprob_rows)
        processed = [i for i, p in enumerate(params) if needs_processing(p)]
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None]
        self._sampling_cache = SamplingSettings(key, sampling, processed, constrained, positions)
        return sampling, processed, constrained

    @staticmethod
    def _output_positions(batch: SchedulerOutput, seqs: list[Sequence]) -> np.ndarray:
        """Each sampling row's output position: how many tokens its sequence generated before this one."""
        ends = [c + n for c, n, sample in zip(batch.num_computed_tokens, batch.num_scheduled_tokens, batch.sample)
                if sample]
        return np.array([end - s.num_prompt_tokens for end, s in zip(ends, seqs)], dtype=np.int64)

    # ----- forward --------------------------------------------------------------------------------
    def run(self, batch: SchedulerOutput) -> SampledTokens | None:
        """One engine step on this rank (a tensor-parallel runner first sends the batch to the other ranks):
        the token sampled by each sampling row (rank 0; read with ``tolist()``), else None."""
        return self.launch(batch)

    def launch(self, batch: SchedulerOutput) -> SampledTokens | None:
        """Queue one step's forward and sampling on the device without waiting for them; rank 0 gets the
        sampled tokens back, one per sampling row."""
        return self.sample(self.forward(batch))

    @torch.inference_mode()
    def forward(self, batch: SchedulerOutput) -> StepLogits:
        """Queue one step's forward pass, its sampling rows' logits and its prompt logprobs (every rank takes part
        in the LM head). A row whose input is PENDING_TOKEN reads it from the latest sampling queued (``sample``)
        on the device."""
        phase = batch.phase.upper()
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("[Rank %d] Preparing %s batch: %d sequences", self.rank, phase, batch.num_rows)
        input_ids, positions = self._prepare_decode(batch) if batch.is_decode_only else self._prepare_prefill(batch)
        num_sampled = sum(batch.sample)  # (not len(batch.sampling_seqs): workers get no Sequence objects)
        with timed(logger, self.device, "[Rank %d] Model forward %s", self.rank, phase):
            hidden = self._forward(input_ids, positions, batch.is_decode_only)
            logits = self.model.compute_logits(hidden) if num_sampled else None  # one row per batch row
        if logger.isEnabledFor(logging.DEBUG) and logits is not None:
            logger.debug("[Rank %d] Output: logits=%s", self.rank, list(logits.shape))
        reset_context()
        prompt_logprobs = self._prompt_logprobs(batch, hidden) if batch.prompt_logprob_rows else []
        # Only the last row can be a chunk that stops short of its sequence's end (it used up the budget).
        # (Other tensor-parallel ranks get no logits: the LM head gathers them on rank 0.)
        return StepLogits(batch, logits[:num_sampled] if logits is not None else None, prompt_logprobs)

    @torch.inference_mode()
    def sample(self, step: StepLogits) -> SampledTokens | None:
        """Queue the sampling of a forwarded step (rank 0; other ranks return None): its sampling settings,
        penalty tensors and grammar bitmask are built now, from the sequences as they are now (host time that
        overlaps the forward pass on the device). Its tokens become the next forward's pending inputs."""
        if self.rank != 0:
            return None
        sampling = self._prepare_sampling(step.batch) if step.logits is not None else None
        return self._sample(step.batch, step.logits, sampling, step.prompt_logprobs)

    def _prompt_logprobs(self, batch: SchedulerOutput, hidden: torch.Tensor
                         ) -> list[tuple[Sequence, int, TokenLogprobs]]:
        """Raw logprobs of the prompt tokens that follow the positions of each row in
        ``batch.prompt_logprob_rows``, from those positions' logits only (PROMPT_LOGITS_CHUNK at a time; every
        rank takes part in the LM head). Rank 0 gets ``(seq, position of the first token, logprobs)`` chunks."""
        starts = np.cumsum([0] + batch.num_scheduled_tokens)
        out = []
        for row in batch.prompt_logprob_rows:
            for begin in range(starts[row], starts[row + 1], PROMPT_LOGITS_CHUNK):
                end = min(begin + PROMPT_LOGITS_CHUNK, starts[row + 1])
                logits = self.model.lm_head.logits(hidden[begin:end])
                if self.rank == 0:
                    seq = batch.seqs[row]
                    first = batch.num_computed_tokens[row] + int(begin - starts[row]) + 1
                    targets = seq.token_ids[first:min(first + end - begin, seq.num_prompt_tokens)]
                    logprobs = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
                    out.append((seq, first, self._to_host(token_logprobs(
                        logprobs, self._upload(np.array(targets))[0], seq.params.prompt_logprobs))))
        return out

    def _sample(self, batch: SchedulerOutput, logits: torch.Tensor | None, sampling: SamplingBatch | None,
                prompt_logprobs: list[tuple[Sequence, int, TokenLogprobs]]) -> SampledTokens:
        """Sample the sampling rows' tokens and start their copy (and their logprobs') to the host; they stay on
        the device as the next launch's pending inputs."""
        logprobs = None
        if logits is None:
            sampled = torch.empty(0, dtype=torch.int64, device=self.device)
        else:
            sampled, logprobs = self.sampler.sample(logits, sampling)
        self._last_sampled = sampled, {seq.seq_id: i for i, seq in enumerate(batch.sampling_seqs)}
        logprob_rows = sampling.logprob_row_list if logprobs is not None else []
        if self.device.type != "cuda":
            return SampledTokens(sampled, sampled, None, logprobs, logprob_rows, prompt_logprobs)
        host, logprobs = self.downloads.download(sampled), logprobs and self._to_host(logprobs)
        ready = torch.cuda.Event()
        ready.record()
        return SampledTokens(sampled, host, ready, logprobs, logprob_rows, prompt_logprobs)

    def _to_host(self, x: torch.Tensor | TokenLogprobs) -> torch.Tensor | TokenLogprobs:
        """Start copying logprobs to (pinned) host memory of their own, which the engine may keep; the copy is
        complete once the step's ``ready`` event is. (Sampled tokens go through ``self.downloads``.)"""
        if self.device.type != "cuda":
            return x
        if isinstance(x, TokenLogprobs):
            return TokenLogprobs(*map(self._to_host, (x.token, x.top_ids, x.top)))
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        return host.copy_(x, non_blocking=True)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor, decode_only: bool) -> torch.Tensor:
        # A decode step that splits a few long rows (its split plan) cannot replay a whole-model graph, whose splits
        # depend on the batch size only: it replays the pieces around its eager attention, as a mixed step does.
        whole = decode_only and get_context().decode_split_plan is None
        graphs = self.decode_graphs if whole else self.piecewise_graphs
        size = graphs.padded_size(input_ids.shape[0]) if graphs is not None else None
        if size is None:
            return self.model(input_ids, positions)
        if logger.isEnabledFor(logging.DEBUG):
            if whole:
                logger.debug("[Rank %d] DECODE CUDA graph replay: batch=%d, graph_batch=%d, k_cache=%s, v_cache=%s "
                             "(per-layer attention lines are not emitted during replay)", self.rank,
                             input_ids.shape[0], size, list(self.kv_cache[0].shape), list(self.kv_cache[1].shape))
            else:
                logger.debug("[Rank %d] %s piecewise CUDA graph replay: tokens=%d, graph_tokens=%d (attention runs "
                             "eagerly between the pieces; other per-layer lines are not emitted)", self.rank,
                             "DECODE" if decode_only else "MIXED" if get_context().num_decode_tokens else "PREFILL",
                             input_ids.shape[0], size)
        return graphs.replay(input_ids, positions, size)

    # ----- CUDA graphs ----------------------------------------------------------------------------
    @property
    def num_cuda_graphs(self) -> int:
        return sum(len(g) for g in (self.decode_graphs, self.piecewise_graphs) if g is not None)

    @torch.inference_mode()
    def _capture_cudagraphs(self) -> None:
        config = self.config
        sizes = graph_batch_sizes(config.max_num_seqs)
        logger.info("Capturing CUDA graphs for decode batch sizes %s%s", sizes,
                    f" (from {CASCADE_MIN_BATCH} also with cascade attention)" if self._cascade(sizes[-1]) else "")
        self.decode_graphs = DecodeGraphs(self.model, sizes, config.max_blocks_per_seq, config.hf_config.hidden_size,
                                          self.dtype, self.device, self._cascade)
        token_sizes = piecewise_token_sizes(config.max_num_batched_tokens)
        logger.info("Capturing piecewise CUDA graphs (%d pieces, split at attention) for token counts %s",
                    len(self.attention_layers) + 1, token_sizes)
        self.piecewise_graphs = PiecewiseGraphs(self.model.model, self.attention_layers, token_sizes, self.device,
                                                self.decode_graphs.pool)
        logger.info("Captured %d CUDA graphs - %s", self.num_cuda_graphs, memory_summary(self.device))
