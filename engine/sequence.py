"""A request's tokens and state as it moves through the scheduler."""
import time
from enum import Enum, auto
from itertools import count

from engine.sampling_params import SamplingParams


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
        # (logprob, {token id: logprob} of the top-k and the token) per generated / prompt token, when asked
        self.logprobs: list[tuple[float, dict[int, float]]] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[tuple[float, dict[int, float]] | None] | None = \
            [None] if params.prompt_logprobs is not None else None  # the first prompt token has none
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
        self.num_pending = max(0, self.num_pending - 1)
        if self.first_token_time is None:
            self.first_token_time = time.perf_counter()
