"""Chooses each step's batch under one token budget (``max_num_batched_tokens``): first one decode token for
every running sequence that has sampled, then the next chunks of running sequences still prefilling, then
waiting prompts (whole, or a first chunk when the budget left is smaller). A prompt longer than the budget is
thus prefilled over several steps. In a step with decode rows, prompt work is capped as well
(``max_prefill_tokens_with_decodes``, scaled up beside fewer than PROMPT_CAP_ROWS decode rows: ``prompt_work_cap``),
counted in tokens of short-context work: a token at position p counts 1 + p / ``attention_break_even``, since its
attention over p keys costs that much more than its linear layers. So a long prompt's late chunks, whose attention
reads the whole prefix, are cut short and do not stall the decoding sequences beside them, while short prompts
keep nearly the whole budget. Prompt chunks next to other
rows leave PREFILL_WATERMARK of the KV cache free, so the decoding sequences can grow into it; when the cache
still runs out, the newest sequences not yet in the batch are preempted and later recomputed. ``max_num_seqs``
bounds the running set.

With async scheduling the engine asks for the next batch while the current step still runs on the device:
its sequences then hold a *pending* token, counted in their length but not yet known (the runner feeds it to
the next step on the device). Sequences sure to finish with the pending token (length limits) are left out;
one that stops on a sampled token (EOS, stop token) is found one step late and its extra token is dropped."""
import logging
import math
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.config import Config
from engine.logger import get_logger
from engine.outputs import PENDING_TOKEN, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus

logger = get_logger(__name__)
MAX_LISTED_SEQS = 8
PREFILL_WATERMARK = 0.01  # of the KV blocks, kept free of prompt chunks for decodes (vLLM v0's default, 1 %)
# The decode rows that max_prefill_tokens_with_decodes protects at its face value; beside fewer, the cap grows in
# proportion (prompt_work_cap).
PROMPT_CAP_ROWS = 32


def prompt_work(start: int, num_tokens: int, break_even: float) -> float:
    """Work of prompt positions ``start .. start + num_tokens - 1`` in tokens of short-context work: each token
    counts 1 for its linear layers plus (keys it attends to) / ``break_even`` for its attention."""
    keys = num_tokens * start + num_tokens * (num_tokens + 1) / 2
    return num_tokens + keys / break_even


def prompt_work_cap(cap: int | None, decode_rows: int) -> float | None:
    """The prompt work a step beside ``decode_rows`` decode rows may take (None: no cap): ``cap`` from
    PROMPT_CAP_ROWS rows on, ``cap * PROMPT_CAP_ROWS / decode_rows`` below. The cap trades throughput for the
    decoding rows' inter-token latency, and the delay a step's prompt work adds is paid by every decoding row: with
    few of them (a long prompt prefilled beside the first rows of its batch) it buys little, so their total delay,
    not each one's, is bounded."""
    if cap is None or not decode_rows:
        return None
    return cap * max(1.0, PROMPT_CAP_ROWS / decode_rows)


def prompt_tokens_within(work: float, start: int, break_even: float) -> int:
    """The most prompt tokens from position ``start`` whose ``prompt_work`` fits in ``work`` (the positive root
    of n + (n * start + n * (n + 1) / 2) / break_even = work, in the form that keeps precision for large
    break_even)."""
    if work <= 0:
        return 0
    b = 1 + (start + 0.5) / break_even
    n = int(2 * work / (b + math.sqrt(b * b + 2 * work / break_even)))
    return n - 1 if n and prompt_work(start, n, break_even) > work else n


@dataclass
class PromptBudget:
    """What the prompt rows of one step may still take: tokens, and in a step with decode rows, work
    (``prompt_work``; None: not counted). The first prompt row gets at least one token, so a prompt deep into a
    long context still advances. A row cut short ends the step's prompt rows: only the last row of a batch may
    stop short of its sequence's end (the runner takes the sampling rows' logits as the first ones)."""
    tokens: int
    work: float | None
    break_even: float
    first: bool = True

    @property
    def exhausted(self) -> bool:
        """Nothing more fits anywhere (a token costs at least 1 of work)."""
        return not self.tokens or (self.work is not None and self.work < 1 and not self.first)

    def chunk(self, start: int, wanted: int) -> int:
        """Tokens a row from position ``start`` that wants ``wanted`` more may take now."""
        num_tokens = min(wanted, self.tokens)
        if self.work is not None:
            within = prompt_tokens_within(self.work, start, self.break_even)
            num_tokens = min(num_tokens, max(within, int(self.first)))
        return num_tokens

    def spend(self, start: int, num_tokens: int, wanted: int) -> None:
        self.tokens = self.tokens - num_tokens if num_tokens == wanted else 0
        if self.work is not None:
            self.work -= prompt_work(start, num_tokens, self.break_even)
        self.first = False


class Scheduler:
    def __init__(self, config: Config, num_blocks: int, eos_token_ids: set[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_prefill_tokens_with_decodes = config.max_prefill_tokens_with_decodes
        self.attention_break_even = config.attention_break_even
        self.max_model_len = config.max_model_len
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.watermark = int(num_blocks * PREFILL_WATERMARK)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        seq.max_len = min(seq.max_len, self.max_model_len)
        if not seq.params.ignore_eos:
            seq.stop_ids = seq.stop_ids | self.eos_token_ids
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> SchedulerOutput:
        """The next step's batch (empty when nothing can run now). Scheduled tokens count as computed from
        here on, and a row that samples adds a pending token to its sequence."""
        out = SchedulerOutput()
        decoding, prefilling = [], []
        for seq in self.running:
            (decoding if seq.is_decoding else prefilling).append(seq)
        tokens = self._schedule_decodes(out, decoding, self.max_num_batched_tokens)
        work = prompt_work_cap(self.max_prefill_tokens_with_decodes, out.num_decode_rows)
        budget = PromptBudget(tokens, work, self.attention_break_even)
        self._schedule_prefilling(out, prefilling, budget)
        if not out.num_preempted:
            self._schedule_waiting(out, budget)
        self._log(out)
        return out

    def _schedule_decodes(self, out: SchedulerOutput, seqs: list[Sequence], budget: int) -> int:
        """The first rows of an empty batch: one token for each decoding sequence that fits, oldest first (the hot
        path of every step, so the rows' columns are filled in one pass at the end); returns the budget left."""
        rows = out.seqs  # (``_allocate_or_preempt`` spares the sequences already in it)
        block_size = self.block_manager.block_size
        for seq in seqs:
            if len(rows) == budget:
                break
            if seq.status is not SequenceStatus.RUNNING or self._finishes_with_pending(seq):
                continue  # preempted for an earlier row of this step, or done once its pending token is back
            # (most steps: the last block has room for the token)
            if seq.num_computed_tokens < len(seq.block_table) * block_size or self._allocate_or_preempt(out, seq, 1):
                rows.append(seq)
        out.add_decode_rows()
        for seq in rows:
            seq.num_computed_tokens += 1
            seq.num_pending += 1
            if seq.num_computed_tokens >= (seq.num_registered_blocks + 1) * block_size:  # a block may be full
                self.block_manager.register_computed_blocks(seq)
        return budget - len(rows)

    def _schedule_prefilling(self, out: SchedulerOutput, seqs: list[Sequence], budget: PromptBudget) -> None:
        """Rows for the next chunks of running sequences still prefilling, oldest first, within ``budget``.
        A chunk next to other rows waits rather than take the watermark's blocks or preempt anything."""
        for seq in seqs:
            if budget.exhausted:
                break
            if seq.status is not SequenceStatus.RUNNING or self._finishes_with_pending(seq):
                continue  # preempted for an earlier row of this step, or done once its pending token is back
            num_tokens = budget.chunk(seq.num_computed_tokens, seq.num_uncomputed_tokens)
            if not num_tokens:
                continue  # too little work is left for this one's long context
            if out.num_rows:
                fits = self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens, reserve=self.watermark)
            else:
                fits = self._allocate_or_preempt(out, seq, num_tokens)
            if fits:
                budget.spend(seq.num_computed_tokens, num_tokens, seq.num_uncomputed_tokens)
                self._add_row(out, seq, num_tokens)

    def _allocate_or_preempt(self, out: SchedulerOutput, seq: Sequence, num_tokens: int) -> bool:
        """Blocks for ``num_tokens`` more tokens of ``seq``, preempting the newest running sequences not in the
        batch yet until they fit; when none is left, ``seq`` itself is preempted (returns False)."""
        while not self.block_manager.allocate(seq, seq.num_computed_tokens + num_tokens):
            in_batch = {s.seq_id for s in out.seqs}
            victim = next((s for s in reversed(self.running) if s is not seq and s.seq_id not in in_batch), seq)
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _schedule_waiting(self, out: SchedulerOutput, budget: PromptBudget) -> None:
        """Admit waiting sequences in order while the budget, the running limit and the KV cache allow."""
        while self.waiting and not budget.exhausted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:
                break  # preempted while its last token was in flight: recomputed once that token is known
            # prompt logprobs need every prompt position's logits, so such a request skips the prefix cache
            cached = [] if seq.params.prompt_logprobs is not None else self.block_manager.cached_prefix(seq)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_tokens = budget.chunk(num_cached_tokens, len(seq) - num_cached_tokens)
            if not num_tokens:
                break
            reserve = self.watermark if out.num_rows else 0
            if not self.block_manager.allocate(seq, num_cached_tokens + num_tokens, cached, reserve):
                break
            seq.num_computed_tokens = seq.num_cached_tokens = num_cached_tokens
            if seq.first_cached_tokens is None:
                seq.first_cached_tokens = num_cached_tokens
            out.num_cached_tokens += num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            budget.spend(num_cached_tokens, num_tokens, len(seq) - num_cached_tokens)
            self._add_row(out, seq, num_tokens)

    def _add_row(self, out: SchedulerOutput, seq: Sequence, num_tokens: int) -> None:
        start = seq.num_computed_tokens
        token_ids = seq.token_ids[start:start + num_tokens]
        if len(token_ids) < num_tokens:  # a decode row fed the token the step in flight is sampling
            token_ids.append(PENDING_TOKEN)
        sample = start + num_tokens == len(seq)
        out.add_row(seq, token_ids, sample)
        seq.num_computed_tokens += num_tokens
        seq.num_pending += sample
        self.block_manager.register_computed_blocks(seq)

    @staticmethod
    def _finishes_with_pending(seq: Sequence) -> bool:
        return seq.num_pending > 0 and len(seq.token_ids) + seq.num_pending >= seq.max_len

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        out.num_preempted += 1

    def _log(self, out: SchedulerOutput) -> None:
        if out.num_preempted:
            logger.warning("KV cache full: preempted %d sequence(s) for recomputation (free_blocks=%d)",
                           out.num_preempted, self.block_manager.num_free_blocks)
        if not logger.isEnabledFor(logging.INFO):
            return
        if out.num_decode_rows:
            logger.info("Scheduled DECODE batch: size=%d, preempted=%d, seqs=%s", out.num_decode_rows,
                        out.num_preempted, describe_rows(out, range(out.num_decode_rows)))
        if not out.is_decode_only:
            prefill = range(out.num_decode_rows, out.num_rows)
            logger.info("Scheduled PREFILL batch: size=%d, batched_tokens=%d, seqs=%s", len(prefill),
                        sum(out.num_scheduled_tokens[i] for i in prefill), describe_rows(out, prefill))

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Append each sampled token; finish sequences that hit EOS, a stop token or a length limit. Sequences
        that finished while this step was in flight are skipped (their token is one past the end)."""
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            if seq.is_finished:
                continue
            seq.append_token(token_id)
            if token_id in seq.stop_ids or len(seq.token_ids) >= seq.max_len:
                self.finish(seq, self._finish_reason(seq, token_id))
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str:
        """Why a sequence that ended on ``token_id`` ended (``seq.stop_ids`` or ``seq.max_len``)."""
        if token_id in seq.stop_ids:
            return "eos" if token_id in self.eos_token_ids and not seq.params.ignore_eos else "stop"
        return "max_tokens" if seq.num_completion_tokens >= seq.params.max_tokens else "max_model_len"

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0
        self.block_manager.free(seq)
        (self.running if seq in self.running else self.waiting).remove(seq)  # preempted while in flight
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Sequence finished: seq_id=%d, output_len=%d, reason=%s",
                         seq.seq_id, seq.num_completion_tokens, reason)


def describe_rows(out: SchedulerOutput, rows: range) -> str:
    """``[seq_N(len=L), ...]`` for decode rows; prefill rows add their prefix-cache hits and, for a chunk of
    the tokens left, its positions ``chunk=start:end``. The first MAX_LISTED_SEQS rows, then a count."""
    shown = []
    for i in rows[:MAX_LISTED_SEQS]:
        seq, start = out.seqs[i], out.num_computed_tokens[i]
        end = start + out.num_scheduled_tokens[i]
        if i < out.num_decode_rows:
            shown.append(f"seq_{seq.seq_id}(len={end})")
            continue
        length = len(seq) - out.sample[i]  # its tokens before this row's sample
        chunk = "" if start == seq.num_cached_tokens and end == length else f",chunk={start}:{end}"
        shown.append(f"seq_{seq.seq_id}(len={length},cached={seq.num_cached_tokens}{chunk})")
    more = f", ... (+{len(rows) - MAX_LISTED_SEQS} more)" if len(rows) > MAX_LISTED_SEQS else ""
    return f"[{', '.join(shown)}{more}]"
