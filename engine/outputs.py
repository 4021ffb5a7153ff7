"""What one engine step hands back to its caller."""
from dataclasses import dataclass

from engine.metrics import StepRecord
from engine.sequence import Sequence


@dataclass
class StepOutput:
    finished: list[Sequence]           # finished this step; results via ``llm.result(seq)``
    new_tokens: dict[int, list[int]]   # seq_id -> token ids appended this step
    record: StepRecord
