"""Job statistics: per-actor counters from shard results, totals read back from the written parts."""
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

# Counters an actor reports for each shard it ran (see EngineActor.run_shard), summed per actor.
SHARD_COUNTERS = ("rows", "rows_ok", "rows_failed", "prompt_tokens", "generated_tokens", "busy_s",
                  "prefill_time_s", "decode_time_s", "steps")


@dataclass
class ActorStats:
    actor_id: str
    pid: int | None = None
    node_id: str | None = None
    started_s: float | None = None   # when its engine began to load, in seconds from the job's launch
    load_time_s: float | None = None
    ready_s: float | None = None     # when the driver saw it ready, from launch
    status: str = "starting"    # starting | running | stopped | died | failed to start
    error: str | None = None    # why it died or failed to start
    shards: int = 0
    rows: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0
    prefill_time_s: float = 0.0
    decode_time_s: float = 0.0
    steps: int = 0

    def add(self, shard_stats: dict[str, Any]) -> None:
        self.shards += 1
        for key in SHARD_COUNTERS:
            setattr(self, key, getattr(self, key) + shard_stats[key])


class JobStats:
    """What the driver observed in this run; :meth:`summary` adds totals over all written parts."""

    def __init__(self, job_id: str, started: float, resources: dict[str, Any]):
        self.job_id = job_id
        self.started = started          # time.monotonic() when the job began (before planning and Ray)
        self.started_at = time.time() - self.elapsed()  # the same instant on the wall clock (steps' timestamps)
        self.resources = resources
        self.actors: dict[str, ActorStats] = {}
        self.ray_ready_s: float | None = None  # from launch: Ray started or joined
        self.first_result_s: float | None = None
        self.rows_done = 0              # rows written by this run
        self.generated_tokens = 0       # tokens generated for rows written by this run
        self.shards_written = 0
        self.shards_skipped = 0         # already done by an earlier run
        self.shard_retries = 0
        self.shard_splits = 0
        self.actors_replaced = 0

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def actor(self, actor_id: str) -> ActorStats:
        return self.actors.setdefault(actor_id, ActorStats(actor_id))

    def shard_written(self, rows: int, generated_tokens: int) -> None:
        if self.first_result_s is None:
            self.first_result_s = self.elapsed()
        self.shards_written += 1
        self.rows_done += rows
        self.generated_tokens += generated_tokens

    def summary(self, status: str, totals: dict[str, int], num_rows: int, num_shards: int,
                config: dict[str, Any]) -> dict[str, Any]:
        wall = self.elapsed()
        return dict(
            job_id=self.job_id, status=status, wall_time_s=wall,
            rows_total=num_rows, **totals,
            output_tokens_per_s=self.generated_tokens / wall if wall > 0 else 0.0,
            time_to_ray_s=self.ray_ready_s,
            time_to_first_result_s=self.first_result_s,
            this_run=dict(started_at=self.started_at, rows=self.rows_done, generated_tokens=self.generated_tokens,
                          shards_written=self.shards_written, shards_skipped=self.shards_skipped,
                          shard_retries=self.shard_retries, shard_splits=self.shard_splits,
                          actors_replaced=self.actors_replaced),
            shards_total=num_shards,
            resources=self.resources,
            actors={a.actor_id: asdict(a) for a in self.actors.values()},
            config=config,
        )


def result_totals(parts: list[Path]) -> dict[str, int]:
    """Row and token totals over written part files (all runs of the job), reading only the needed columns."""
    totals = dict(rows_done=0, rows_ok=0, rows_failed=0, prompt_tokens=0, generated_tokens=0)
    if not parts:
        return totals
    table = pads.dataset([str(p) for p in parts], format="parquet").to_table(
        columns=["error", "num_prompt_tokens", "num_generated_tokens"])
    failed = table.num_rows - table["error"].null_count
    totals.update(rows_done=table.num_rows, rows_ok=table.num_rows - failed, rows_failed=failed,
                  prompt_tokens=int(pc.sum(table["num_prompt_tokens"]).as_py() or 0),
                  generated_tokens=_total(table["num_generated_tokens"]))
    return totals


def _total(counts: pa.ChunkedArray) -> int:
    """The sum of a count column: one count per row, or (rows with n completions) a list of counts per row."""
    if pa.types.is_list(counts.type):
        counts = pc.list_flatten(counts)
    return int(pc.sum(counts).as_py() or 0)
