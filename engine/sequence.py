"""A request's tokens and state as it moves through the scheduler, and its logprob entries.

Logprob entries stay numpy rows until a result asks for them: per token, its id, its logprob and ``k`` (id,
logprob) alternatives, packed as ``2 + 2k`` float32 columns (ids as int32 bit patterns), so a row with more
alternatives holds a sequence's entry in its leading columns. Building ``(logprob, {id: logprob})`` per token
at every step took ~0.6 ms of host time per 256-row decode step; :meth:`LogprobEntries.lists` builds them once,
for the result. Generated tokens' entries arrive one per sequence per step: a step's rows go into the engine's
:class:`LogprobStaging` buffer in one copy, each sequence notes its row there, and every time the buffer fills
each sequence copies its rows out into a block of its own (so a finished sequence does not keep step buffers
alive). Prompt entries arrive in chunks and become blocks at once.
"""
import time
from enum import Enum, auto
from itertools import count

import numpy as np

from engine.sampling_params import MAX_LOGPROBS, SamplingParams

STAGING_ROWS = 16384  # rows of the staging buffer: ~64 decode steps of 256 sequences, 2.8 MB


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _ids = count()

    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int, index: int = 0):
        self.seq_id = next(Sequence._ids)
        self.index = index  # position in the caller's prompt list
        self.status = SequenceStatus.WAITING
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)
        self.num_computed_tokens = 0  # leading tokens whose K/V are in the cache or computed by a launched step
        self.num_cached_tokens = 0  # prefix-cache hits at the latest admission
        self.first_cached_tokens: int | None = None  # hits at first admission (reported to the user)
        self.block_size = block_size
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # chained hashes of the leading full blocks (the block manager's cache)
        self.num_registered_blocks = 0  # leading blocks of block_table in the prefix-cache index
        self.num_pending = 0  # tokens sampled by launched steps whose values are not back yet
        self.params = params
        # where it stops: the length it may reach and the sampled ids that end it (the scheduler adds max_model_len
        # and EOS when the sequence is added)
        self.max_len = self.num_prompt_tokens + params.max_tokens
        self.stop_ids: frozenset[int] = frozenset(params.stop_token_ids)
        # per generated token / per prompt token after the first, when asked
        self.logprobs = LogprobEntries(params.logprobs) if params.logprobs is not None else None
        self.prompt_logprobs = LogprobEntries(params.prompt_logprobs) if params.prompt_logprobs is not None else None
        self.grammar = None  # the request's xgrammar matcher once its grammar compiled (structured outputs)
        self.finish_reason: str | None = None  # "eos" | "stop" | "max_tokens" | "max_model_len"
        self.stop_text_end: int | None = None  # cut the text here when a stop string matched
        self.arrival_time = time.perf_counter()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __len__(self) -> int:
        """Tokens the KV cache will hold once the launched steps finish (known tokens plus pending ones)."""
        return len(self.token_ids) + self.num_pending

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def num_completion_tokens(self) -> int:
        """Generated tokens known so far (pending ones not included)."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens to forward before the next one can be sampled."""
        return len(self) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Every token is computed but the last, a sampled one: the next step feeds it back."""
        return self.num_computed_tokens == len(self) - 1 >= self.num_prompt_tokens

    def block(self, i: int) -> list[int]:
        return self.token_ids[i * self.block_size:(i + 1) * self.block_size]

    def append_token(self, token_id: int) -> None:
        """Add a sampled token (the value of the oldest pending one, if any)."""
        self.token_ids.append(token_id)
        if self.num_pending:
            self.num_pending -= 1
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()


def pack_logprobs(out: np.ndarray, token_ids: np.ndarray, token: np.ndarray, top_ids: np.ndarray,
                  top: np.ndarray) -> None:
    """Write entries into ``out`` ``[n, >= 2 + 2k]`` float32: per row the token's id and logprob, then its top ``k``
    alternatives as (id, logprob) pairs, ids as int32 bits."""
    k = top.shape[1]
    ids = out.view(np.int32)
    ids[:, 0] = token_ids
    out[:, 1] = token
    ids[:, 2:2 + 2 * k:2] = top_ids
    out[:, 3:3 + 2 * k:2] = top


class LogprobStaging:
    """The engine's buffer for the latest steps' generated-token entries; see the module docstring."""

    def __init__(self, rows: int = STAGING_ROWS):
        self.buffer = np.empty((rows, 2 + 2 * MAX_LOGPROBS), dtype=np.float32)
        self.used = 0
        self.holders: list[LogprobEntries] = []  # the entries with rows here

    def add(self, token_ids: np.ndarray, token: np.ndarray, top_ids: np.ndarray, top: np.ndarray) -> int:
        """Store one step's entries (see :func:`pack_logprobs`); returns the buffer row of the first."""
        n = len(token)
        if self.used + n > len(self.buffer):
            self.flush()
            if n > len(self.buffer):
                self.buffer = np.empty((n, self.buffer.shape[1]), dtype=np.float32)
        first, self.used = self.used, self.used + n
        pack_logprobs(self.buffer[first:self.used], token_ids, token, top_ids, top)
        return first

    def flush(self) -> None:
        """Move every holder's rows into its own blocks; the buffer is free again."""
        for entries in self.holders:
            entries.unstage(self)
        self.holders.clear()
        self.used = 0


class LogprobEntries:
    """One sequence's logprob entries (top ``k`` alternatives each): packed blocks of its own, then rows it still
    has in the engine's :class:`LogprobStaging` buffer."""

    def __init__(self, k: int):
        self.k = k
        self.blocks: list[np.ndarray] = []  # [n, 2 + 2k] packed rows, oldest first
        self.staged: list[int] = []         # its rows in the staging buffer, after the blocks

    def add(self, token_ids: np.ndarray, token: np.ndarray, top_ids: np.ndarray, top: np.ndarray) -> None:
        """Append entries (top_ids / top may have more than ``k`` columns) as a block of their own."""
        block = np.empty((len(token), 2 + 2 * self.k), dtype=np.float32)
        pack_logprobs(block, token_ids, token, top_ids[:, :self.k], top[:, :self.k])
        self.blocks.append(block)

    def stage(self, row: int, staging: LogprobStaging) -> None:
        """Append the entry in row ``row`` of the staging buffer."""
        if not self.staged:
            staging.holders.append(self)
        self.staged.append(row)

    def unstage(self, staging: LogprobStaging) -> None:
        """Copy the staged rows into a block of its own."""
        if self.staged:
            self.blocks.append(staging.buffer[self.staged, :2 + 2 * self.k])
            self.staged = []

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` entries (a preempted prompt recomputes the rest); they must all be in blocks."""
        assert not self.staged
        if n < sum(len(block) for block in self.blocks):
            self.blocks = [self._packed(None)[:n]]

    def lists(self, staging: LogprobStaging) -> tuple[list[float], list[dict[int, float]]]:
        """The result form: each token's logprob, and ``{token id: logprob}`` of its top ``k`` and itself."""
        packed = self._packed(staging)
        token_ids, token = packed[:, 0].view(np.int32).tolist(), packed[:, 1].tolist()
        top_ids, top = packed[:, 2::2].view(np.int32).tolist(), packed[:, 3::2].tolist()
        alternatives = [dict(zip(ids, values)) for ids, values in zip(top_ids, top)]
        for alts, token_id, logprob in zip(alternatives, token_ids, token):
            alts[token_id] = logprob
        return token, alternatives

    def _packed(self, staging: LogprobStaging | None) -> np.ndarray:
        parts = self.blocks + ([staging.buffer[self.staged, :2 + 2 * self.k]] if self.staged else [])
        return np.concatenate(parts) if parts else np.empty((0, 2 + 2 * self.k), dtype=np.float32)
