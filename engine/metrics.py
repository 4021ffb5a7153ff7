"""Per-step metric records, handed to callbacks (no log parsing needed)."""
from dataclasses import asdict, dataclass


@dataclass
class StepRecord:
    step: int                      # 0-based index within the engine's lifetime
    phase: str                     # "prefill" (prompt tokens, maybe with decode rows) | "decode" (decode rows only)
    batch_size: int                # sequences scheduled this step
    num_tokens: int                # tokens forwarded this step: uncached prompt tokens + one per decode row
    num_prefill_tokens: int        # of which prompt tokens (or recomputed ones, after preemption)
    num_decode_seqs: int           # sequences fed back their sampled token this step
    num_running: int               # after the step
    num_waiting: int               # after the step
    num_preempted: int             # preempted while scheduling this step
    num_finished: int              # sequences that finished this step
    kv_blocks_used: int
    kv_blocks_free: int
    prefix_cache_hit_tokens: int   # prompt tokens served from the prefix cache this step
    step_time_s: float
    wait_time_s: float             # of step_time_s, waiting for the device to finish this step (the rest is host
                                   # work: scheduling and launching the next step, postprocessing this one)
    timestamp: float               # wall clock (time.time()) at the end of the step

    def to_dict(self) -> dict:
        return asdict(self)
