"""The objects that cross module boundaries each step: the scheduler's batch (to the model runner and the
tensor-parallel workers) and what one engine step hands back to its caller."""
from dataclasses import dataclass, field, replace

from engine.metrics import StepRecord
from engine.sequence import Sequence

PENDING_TOKEN = -1  # stands for a token the previous step is still sampling: the runner reads it on the device
# a decode row's tokens while that token is pending (every row, with async scheduling): one shared tuple, so that a
# step does not allocate an object per row, each of which counts toward Python's next garbage collection
PENDING_ROW = (PENDING_TOKEN,)


@dataclass
class SchedulerOutput:
    """One step's batch. Row i forwards ``num_scheduled_tokens[i]`` tokens of a sequence at positions
    ``num_computed_tokens[i]`` onward, attending to every token before them in the KV cache. A row whose tokens
    reach the end of its sequence samples the next token (``sample[i]``); a prompt chunk that stops short does
    not, and is the last row (it used up the step's token budget). Decode rows (a running sequence fed back
    its sampled token) come first: rows ``[0, num_decode_rows)``."""
    seqs: list[Sequence] = field(default_factory=list, repr=False)  # rank 0 only: not sent to TP workers
    num_computed_tokens: list[int] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    token_ids: list[list[int] | tuple[int]] = field(default_factory=list)  # each row's new tokens (or PENDING_ROW)
    block_tables: list[list[int]] = field(default_factory=list)
    sample: list[bool] = field(default_factory=list)
    num_decode_rows: int = 0
    num_preempted: int = 0
    num_cached_tokens: int = 0  # prefix-cache hits of the sequences admitted this step
    prompt_logprob_rows: list[int] = field(default_factory=list)  # rows whose positions need prompt logprobs

    def add_row(self, seq: Sequence, token_ids: list[int], sample: bool) -> None:
        """Add ``token_ids`` of ``seq``, starting at its computed tokens, to the batch."""
        self.seqs.append(seq)
        self.num_computed_tokens.append(seq.num_computed_tokens)
        self.num_scheduled_tokens.append(len(token_ids))
        self.token_ids.append(token_ids)
        self.block_tables.append(seq.block_table)
        self.sample.append(sample)
        if seq.params.prompt_logprobs is not None and seq.num_computed_tokens + 1 < seq.num_prompt_tokens:
            self.prompt_logprob_rows.append(self.num_rows - 1)

    def add_decode_rows(self) -> None:
        """Fill the columns of the rows of ``seqs``, which holds only decoding sequences: one row each that feeds
        back its last sampled token (PENDING_TOKEN while the step in flight samples it) and samples the next."""
        n = len(self.seqs)
        self.num_computed_tokens = [seq.num_computed_tokens for seq in self.seqs]
        self.num_scheduled_tokens = [1] * n
        self.token_ids = [seq.token_ids[start:start + 1] or PENDING_ROW
                          for seq, start in zip(self.seqs, self.num_computed_tokens)]
        self.block_tables = [seq.block_table for seq in self.seqs]
        self.sample = [True] * n
        self.num_decode_rows = n

    @property
    def num_rows(self) -> int:
        return len(self.num_scheduled_tokens)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def is_decode_only(self) -> bool:
        return self.num_decode_rows == self.num_rows

    @property
    def phase(self) -> str:
        """"prefill" for a step with prompt tokens (alone or with decodes), "decode" for a decode-only step."""
        return "decode" if self.is_decode_only else "prefill"

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences of the rows that sample, in row order (the order of the sampled tokens): in a decode-only
        batch every row (``seqs`` itself, not a copy)."""
        if self.is_decode_only:
            return self.seqs
        return [seq for seq, sample in zip(self.seqs, self.sample) if sample]

    def for_workers(self) -> "SchedulerOutput":
        """This batch without the Sequence objects, which the other tensor-parallel ranks do not need."""
        return replace(self, seqs=[])


@dataclass
class StepOutput:
    finished: list[Sequence]           # finished this step; results via ``llm.result(seq)``
    new_tokens: dict[int, int]         # seq_id -> the token appended this step (one per sequence that sampled)
    record: StepRecord
