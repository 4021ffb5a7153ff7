"""Chooses each step's batch: a prefill of waiting sequences if any fit, else one decode token for every
running sequence, preempting (and later recomputing) the newest ones when the KV cache runs out.

With async scheduling the engine asks for the next decode batch while the current step still runs on the
GPU (:meth:`Scheduler.schedule_next_decode`): its sequences then hold a *pending* token, counted in their
length but not yet known. Sequences sure to finish with the pending token (length limits) are left out; one
that stops on a sampled token (EOS, stop token) is found one step late and its extra token is dropped."""
import logging
from collections import deque

from engine.block_manager import BlockManager
from engine.config import Config
from engine.logger import get_logger
from engine.sequence import Sequence, SequenceStatus

logger = get_logger(__name__)
MAX_LISTED_SEQS = 8


def describe_batch(seqs: list[Sequence], prefill: bool) -> str:
    shown = ", ".join(s.describe(prefill) for s in seqs[:MAX_LISTED_SEQS])
    more = f", ... (+{len(seqs) - MAX_LISTED_SEQS} more)" if len(seqs) > MAX_LISTED_SEQS else ""
    return f"[{shown}{more}]"


class Scheduler:
    def __init__(self, config: Config, num_blocks: int, eos_token_ids: set[int]):
        self.max_num_seqs = config.max_num_seqs
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.max_model_len = config.max_model_len
        self.eos_token_ids = eos_token_ids
        self.block_manager = BlockManager(num_blocks, config.kvcache_block_size, config.enable_prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preempted_last_step = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def schedule(self) -> tuple[list[Sequence], bool]:
        self.num_preempted_last_step = 0
        seqs = self._schedule_prefill()
        if seqs:
            return seqs, True
        seqs = self._schedule_decode()
        if not seqs:
            raise RuntimeError("scheduler made no progress: no waiting sequence fits in the free KV cache "
                               f"({self.block_manager.num_free_blocks} free blocks) and none is running")
        return seqs, False

    def _schedule_prefill(self) -> list[Sequence]:
        scheduled, num_tokens = [], 0
        while self.waiting and len(scheduled) < self.max_num_seqs:
            seq = self.waiting[0]
            fits, cached = self.block_manager.can_allocate(seq)
            if not fits or num_tokens + len(seq) - cached > self.max_num_batched_tokens:
                break
            self.block_manager.allocate(seq)
            if seq.first_cached_tokens is None:
                seq.first_cached_tokens = seq.num_cached_tokens
            num_tokens += len(seq) - seq.num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(self.waiting.popleft())
            scheduled.append(seq)
        if scheduled and logger.isEnabledFor(logging.INFO):
            logger.info("Scheduled PREFILL batch: size=%d, batched_tokens=%d, seqs=%s",
                        len(scheduled), num_tokens, describe_batch(scheduled, True))
        return scheduled

    def schedule_next_decode(self, current: list[Sequence]) -> list[Sequence] | None:
        """The decode batch to launch after ``current`` before its tokens are known, or None when the next step
        must wait for them: sequences are waiting (a prefill may be due), some running sequence was not in
        ``current`` (its input token would come from elsewhere), or nothing would be left to run."""
        if self.waiting or len(self.running) > self.max_num_seqs:
            return None
        in_current = {s.seq_id for s in current}
        finishing = {s.seq_id for s in self.running if self._finishes_with_pending(s)}
        if len(finishing) == len(self.running) or any(
                s.seq_id not in in_current for s in self.running if s.seq_id not in finishing):
            return None
        self.num_preempted_last_step = 0
        return self._schedule_decode(finishing) or None

    def _finishes_with_pending(self, seq: Sequence) -> bool:
        return len(seq) - seq.num_prompt_tokens >= seq.params.max_tokens or len(seq) >= self.max_model_len

    def _schedule_decode(self, skip: set[int] = frozenset()) -> list[Sequence]:
        """One token for every running sequence (but those in ``skip``), preempting the newest when needed."""
        scheduled, skipped = [], []
        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            if seq.seq_id in skip:
                skipped.append(seq)
                continue
            while not self.block_manager.can_append(seq):
                if self.running:
                    self._preempt(self.running.pop())
                else:
                    self._preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                scheduled.append(seq)
        self.running.extendleft(reversed(scheduled + skipped))
        if self.num_preempted_last_step:
            logger.warning("KV cache full: preempted %d sequence(s) for recomputation (free_blocks=%d)",
                           self.num_preempted_last_step, self.block_manager.num_free_blocks)
        if scheduled and logger.isEnabledFor(logging.INFO):
            logger.info("Scheduled DECODE batch: size=%d, preempted=%d, seqs=%s",
                        len(scheduled), self.num_preempted_last_step, describe_batch(scheduled, False))
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)
        self.num_preempted_last_step += 1

    def postprocess(self, seqs: list[Sequence], token_ids: list[int]) -> list[Sequence]:
        """Append each sampled token; finish sequences that hit EOS, a stop token or a length limit. Sequences
        that finished while this step was in flight are skipped (their token is one past the end)."""
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            if seq.is_finished:
                continue
            seq.append_token(token_id)
            reason = self._finish_reason(seq, token_id)
            if reason:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if not params.ignore_eos and token_id in self.eos_token_ids:
            return "eos"
        if token_id in params.stop_token_ids:
            return "stop"
        if seq.num_completion_tokens >= params.max_tokens:
            return "max_tokens"
        if len(seq.token_ids) >= self.max_model_len:
            return "max_model_len"
        return None

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0
        self.block_manager.deallocate(seq)
        (self.running if seq in self.running else self.waiting).remove(seq)  # preempted while in flight
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Sequence finished: seq_id=%d, output_len=%d, reason=%s",
                         seq.seq_id, seq.num_completion_tokens, reason)
