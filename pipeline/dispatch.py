"""The dispatch loop: start engine actors, hand out work dynamically, write shards, survive faults.

Dispatch is dynamic: the least-loaded actor gets the next piece of work, so a slow actor never holds the
others back, and each actor holds up to ``MAX_SHARDS_IN_FLIGHT`` pieces, so its engine starts the next one
while the current one drains. A piece is a whole shard or, after repeated failures, part of one:

* an actor that dies (killed, OOM, GPU error) or raises while running a piece is replaced (the engine's
  state after a failed ``generate`` is unknown), and the piece is retried on another actor. One failure
  costs one piece one attempt: the piece that raised or, when the process died with several pieces in it,
  the newest (it joined an engine that ran the older one fine); the others go back uncharged. Every piece
  that was on a failed actor then runs alone, so its next failure is its own;
* after ``1 + --max-shard-retries`` failed attempts a shard is split in halves, and halves are split
  again on failure, until the row that breaks it is alone; that row then gets an error after the same
  number of attempts, and every other row completes;
* a shard is written (atomically) as soon as all its rows are back, and only then counted as done;
* Ctrl-C / SIGTERM stop the loop; actors are shut down and what is written stays.
"""
import logging
import math
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from pipeline.actor import MAX_SHARDS_IN_FLIGHT, ShardResult
from pipeline.config import JobConfig
from pipeline.errors import JobFailed, root_cause
from pipeline.inputs import InputSource
from pipeline.output import OutputDir
from pipeline.progress import Progress
from pipeline.rows import OUTPUT_SCHEMA, error_result_table
from pipeline.stats import JobStats, result_totals

log = logging.getLogger("pipeline")
WAIT_TICK_S = 1.0           # ray.wait timeout: how often progress and signals are looked at
SHUTDOWN_GRACE_S = 10.0


class Interrupted(Exception):
    """SIGTERM (Ctrl-C raises KeyboardInterrupt): stop dispatching, keep what is written, say how to resume."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.exit_code = 128 + signum


# ----- work units ---------------------------------------------------------------------------------------------------
@dataclass
class Piece:
    """A run of rows of one shard, sent to one actor at a time until it succeeds or is given up."""
    shard_id: int
    offset: int                  # first row within the shard
    table: pa.Table              # the columns the actor needs
    max_attempts: int
    whole: bool = True           # the whole shard, not a half from a split
    attempts: int = 0
    alone: bool = False          # run with no other piece on its actor (it was on an actor that failed)
    _ref: Any = None             # the table in Ray's object store, put once, reused on retry

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def ref(self):
        if self._ref is None:
            self._ref = ray.put(self.table)
        return self._ref

    def describe(self) -> str:
        if self.whole:
            return f"shard {self.shard_id}"
        return f"shard {self.shard_id} rows {self.offset}-{self.offset + self.num_rows - 1}"


@dataclass
class PendingShard:
    """A shard whose pieces are not all back yet; written once they are."""
    shard_id: int
    table: pa.Table                                          # every input column, as read
    rows_pending: int
    results: dict[int, pa.Table] = field(default_factory=dict)  # offset → result columns
    steps: list[pa.Table] = field(default_factory=list)
    generated_tokens: int = 0


@dataclass(eq=False)
class LiveActor:
    actor_id: str
    handle: Any
    pieces: dict[Any, Piece] = field(default_factory=dict)  # run_shard ref -> piece, in dispatch order

    def can_take(self, piece: Piece) -> bool:
        if piece.alone:
            return not self.pieces
        return len(self.pieces) < MAX_SHARDS_IN_FLIGHT and not any(p.alone for p in self.pieces.values())


@dataclass(frozen=True)
class ActorPlan:
    """How to start engine actors: ``count`` of ``cls(actor_id, *args)``, each with ``gpus`` GPUs (one CPU) and
    ``env_vars`` set in its process before it runs any code."""
    cls: type
    args: tuple
    count: int
    gpus: float
    env_vars: dict[str, str]


class JobRunner:
    """The dispatch loop and its bookkeeping for one run of a job.

    ``done`` are the shards already written (by an earlier run): they are read past, not run.
    ``actor_columns`` are the input columns the actors need (prompt and per-row overrides).
    """

    def __init__(self, config: JobConfig, source: InputSource, out: OutputDir, done: set[int], num_shards: int,
                 actors: ActorPlan, actor_columns: list[str], stats: JobStats, resume_hint: str):
        self.config, self.source, self.out = config, source, out
        self.done, self.num_shards = set(done), num_shards
        self.actor_args, self.num_actors, self.actor_columns = actors.args, actors.count, actor_columns
        self.remote_cls = ray.remote(actors.cls).options(num_cpus=1, num_gpus=actors.gpus, max_restarts=0,
                                                          max_concurrency=MAX_SHARDS_IN_FLIGHT,
                                                          runtime_env={"env_vars": actors.env_vars})
        self.output_schema = pa.schema(list(source.schema) + list(OUTPUT_SCHEMA))
        self.stats = stats
        self.stats.shards_skipped = len(done)
        self.resume_hint = resume_hint
        self.shard_iter: Iterator[tuple[int, pa.Table]] = source.shards(config.shard_size)
        self.input_exhausted = False
        self.queue: deque[Piece] = deque()          # waiting for an actor: retries and split halves, then new shards
        self.pending: dict[int, PendingShard] = {}
        self.starting: dict[Any, LiveActor] = {}    # ready() ref -> actor
        self.actors: list[LiveActor] = []            # started and not failed
        self.running: dict[Any, LiveActor] = {}     # run_shard ref -> the actor running it
        self.next_actor = 0
        self.ever_ready = False
        self.start_failures = 0
        self.consecutive_failures = 0
        # A poisoned row costs at most (attempts per shard) + (halvings) + (attempts for the row) failures in
        # a row; many more than that, on every actor, means the actors themselves are broken.
        attempts = config.max_shard_retries + 1
        self.max_consecutive_failures = self.num_actors * (2 * attempts + math.ceil(math.log2(config.shard_size)) + 2)
        done_rows = sum(min(config.shard_size, source.num_rows - s * config.shard_size) for s in done)
        self.progress = Progress(source.num_rows, done_rows, config.progress_interval_s)

    # ----- main loop ---------------------------------------------------------------------------------------------
    def run(self) -> tuple[str, int, dict[str, Any]]:
        """Run to the end; return (status, exit code, stats). Raises JobFailed (with how to resume)."""
        status, exit_code, error = "completed", 0, None
        restore = self._install_signal_handlers()
        try:
            for _ in range(self.num_actors):
                self._start_actor()
            while not self._finished():
                self._dispatch()
                self._wait_and_handle()
                self.progress.tick()
        except (Interrupted, KeyboardInterrupt) as e:
            signum = e.exit_code - 128 if isinstance(e, Interrupted) else signal.SIGINT
            status, exit_code = "interrupted", 128 + signum
            log.warning("%s: stopping; finished shards stay in %s", signal.Signals(signum).name, self.out.results)
        except JobFailed as e:
            status, exit_code, error = "failed", e.exit_code, e
        finally:
            restore()
            self.progress.close()
            self._stop_actors()
        stats = self._write_stats(status)
        if status != "completed":
            written = len(self.out.finished_shards())
            hint = (f"{written} of {self.num_shards} shards are written in {self.out.results}; "
                    f"resume with: {self.resume_hint}")
            if error is not None:
                raise JobFailed(f"{error} ({hint})") from error
            # One write, newline included: Ray's log forwarding thread writes to the same stream.
            sys.stderr.write(f"Interrupted: {hint}\n")
            sys.stderr.flush()
        return status, exit_code, stats

    def _finished(self) -> bool:
        return self.input_exhausted and not self.queue and not self.running and not self.pending

    def _dispatch(self) -> None:
        """Hand out pieces in queue order, each to the least-loaded actor that can take it."""
        while (piece := self._next_piece()) is not None:
            actor = min((a for a in self.actors if a.can_take(piece)), key=lambda a: len(a.pieces), default=None)
            if actor is None:
                break
            self.queue.popleft()
            ref = actor.handle.run_shard.remote(piece.shard_id, piece.ref())
            actor.pieces[ref] = piece
            self.running[ref] = actor
        if not self.running and not self.starting and not self._finished():
            raise JobFailed("no engine actor is left to run the remaining shards")

    def _next_piece(self) -> Piece | None:
        """The piece at the head of the queue (retries and split halves first, then the next shard), left there."""
        if self.queue:
            return self.queue[0]
        for shard_id, table in self.shard_iter:
            if shard_id in self.done:
                continue
            self.pending[shard_id] = PendingShard(shard_id, table, table.num_rows)
            self.queue.append(Piece(shard_id, 0, table.select(self.actor_columns), self.config.max_shard_retries + 1))
            return self.queue[0]
        self.input_exhausted = True
        return None

    def _wait_and_handle(self) -> None:
        waiting = [*self.starting, *self.running]
        if not waiting:  # the last piece just came back
            return
        ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_TICK_S)
        for ref in ready:
            if ref in self.starting:
                self._on_actor_started(ref, self.starting.pop(ref))
            else:
                self._on_piece_returned(ref, self.running.pop(ref))

    # ----- actors ------------------------------------------------------------------------------------------------
    def _start_actor(self) -> None:
        actor_id = f"actor-{self.next_actor}"
        self.next_actor += 1
        handle = self.remote_cls.remote(actor_id, *self.actor_args)
        self.starting[handle.ready.remote()] = LiveActor(actor_id, handle)
        self.stats.actor(actor_id)

    def _on_actor_started(self, ref, actor: LiveActor) -> None:
        stats = self.stats.actor(actor.actor_id)
        try:
            info = ray.get(ref)
        except RayError as e:
            stats.status = "failed to start"
            self.start_failures += 1
            reason = root_cause(e)
            if not self.ever_ready and not self.starting:
                raise JobFailed(f"engine actor {actor.actor_id} failed to start: {reason}") from e
            log.warning("%s failed to start: %s", actor.actor_id, reason)
            self._top_up()
            return
        self.ever_ready = True
        stats.status, stats.pid, stats.node_id, stats.load_time_s = "running", info["pid"], info["node_id"], \
            info["load_time_s"]
        log.info("%s ready (pid %d, engine loaded in %.1fs)", actor.actor_id, info["pid"], info["load_time_s"])
        self.actors.append(actor)
        self._top_up()

    def _replace_actor(self, actor: LiveActor, why: str) -> None:
        """Kill ``actor`` (if it still runs) and start a replacement."""
        self.actors.remove(actor)
        self.stats.actor(actor.actor_id).status = "died"
        ray.kill(actor.handle, no_restart=True)
        log.warning("%s %s", actor.actor_id, why)
        self._top_up()

    def _top_up(self) -> None:
        """Start actors until ``num_actors`` are live, while work remains.

        Only once some actor has loaded the engine (so a start can succeed), and only while start failures
        stay below ``num_actors`` (a model that cannot load fails the job instead of retrying forever).
        Replacements wait in Ray's queue until resources (GPUs) are free.
        """
        live = len(self.actors) + len(self.starting)
        while (self.ever_ready and live < self.num_actors and self.start_failures < self.num_actors
               and not self._finished()):
            self.stats.actors_replaced += 1
            self._start_actor()
            log.warning("started actor-%d as a replacement", self.next_actor - 1)
            live += 1

    def _stop_actors(self) -> None:
        actors = list(self.actors)
        refs = [a.handle.shutdown.remote() for a in actors]
        try:
            ray.get(refs, timeout=SHUTDOWN_GRACE_S)
        except (RayError, GetTimeoutError):
            pass  # best effort: the actor is killed below either way
        for actor in [*actors, *self.starting.values()]:
            try:
                ray.kill(actor.handle, no_restart=True)
            except RayError as e:
                log.warning("could not kill %s: %s", actor.actor_id, root_cause(e))
            if self.stats.actor(actor.actor_id).status == "running":
                self.stats.actor(actor.actor_id).status = "stopped"
        self.actors.clear()
        self.running.clear()
        self.starting.clear()

    # ----- pieces ------------------------------------------------------------------------------------------------
    def _on_piece_returned(self, ref, actor: LiveActor) -> None:
        try:
            result: ShardResult = ray.get(ref)
        except RayError as e:
            self._on_actor_failed(actor, ref, e)
            return
        piece = actor.pieces.pop(ref)
        self.consecutive_failures = 0
        self.stats.actor(actor.actor_id).add(result.stats)
        self._piece_done(piece, result.results, result.steps, result.stats["generated_tokens"])

    def _on_actor_failed(self, actor: LiveActor, ref, error: RayError) -> None:
        """Replace ``actor`` and requeue its pieces: the one to blame is charged an attempt (see the module's
        docstring), the others go back uncharged; all of them run alone next time."""
        pieces = list(actor.pieces.values())  # in dispatch order
        if isinstance(error, RayActorError):  # the process died: killed, OOM, segfault, lost node
            culprit, reason = pieces[-1], f"actor {actor.actor_id} died: {root_cause(error)}"
            why = f"died while running {culprit.describe()}"
        else:  # run_shard raised: the engine may be left mid-batch, so the actor is replaced
            culprit, reason = actor.pieces[ref], root_cause(error)
            why = f"failed on {culprit.describe()}"
        for other in actor.pieces:
            self.running.pop(other, None)
        actor.pieces.clear()
        self._replace_actor(actor, why)
        for piece in reversed(pieces):
            piece.alone = True
            if piece is not culprit:
                self.queue.appendleft(piece)
        self._piece_failed(culprit, actor, reason)

    def _piece_failed(self, piece: Piece, actor: LiveActor, reason: str) -> None:
        piece.attempts += 1
        self.consecutive_failures += 1
        if self.consecutive_failures > self.max_consecutive_failures:
            raise JobFailed(f"{self.consecutive_failures} attempts failed in a row, the last: {reason}")
        if piece.attempts < piece.max_attempts:
            self.stats.shard_retries += 1
            log.warning("%s failed (attempt %d/%d: %s); retrying", piece.describe(), piece.attempts,
                        piece.max_attempts, reason)
            self.queue.appendleft(piece)
        elif piece.num_rows > 1:
            self.stats.shard_splits += 1
            half = piece.num_rows // 2
            halves = [Piece(piece.shard_id, piece.offset + start, piece.table.slice(start, length),
                            # Halves of several rows get one try (a failure splits further); a single row gets
                            # the full budget before it is declared bad.
                            1 if length > 1 else self.config.max_shard_retries + 1, whole=False, alone=True)
                      for start, length in ((0, half), (half, piece.num_rows - half))]
            log.warning("%s failed %d times (%s); splitting it to isolate the bad row(s)", piece.describe(),
                        piece.attempts, reason)
            self.queue.extendleft(reversed(halves))
        else:
            log.error("%s failed %d times; marking it failed: %s", piece.describe(), piece.attempts, reason)
            error = f"row failed on {piece.attempts} attempt(s), the last: {reason}"
            self._piece_done(piece, error_result_table(1, error, actor.actor_id, piece.shard_id), None, 0)

    def _piece_done(self, piece: Piece, results: pa.Table, steps: pa.Table | None, generated_tokens: int) -> None:
        shard = self.pending[piece.shard_id]
        shard.results[piece.offset] = results
        shard.rows_pending -= piece.num_rows
        shard.generated_tokens += generated_tokens
        if steps is not None and steps.num_rows:
            shard.steps.append(steps)
        if shard.rows_pending == 0:
            self._write_shard(self.pending.pop(piece.shard_id))

    def _write_shard(self, shard: PendingShard) -> None:
        results = pa.concat_tables([shard.results[offset] for offset in sorted(shard.results)])
        table = pa.Table.from_arrays([*shard.table.columns, *results.columns], schema=self.output_schema)
        steps = pa.concat_tables(shard.steps, promote_options="default") if shard.steps else None
        self.out.write_shard(shard.shard_id, table, steps)
        self.done.add(shard.shard_id)
        self.stats.shard_written(table.num_rows, shard.generated_tokens)
        self.progress.advance(table.num_rows, shard.generated_tokens)

    # ----- end of run ----------------------------------------------------------------------------------------------
    def _write_stats(self, status: str) -> dict[str, Any]:
        try:
            self.out.merge_steps()
            summary = self.stats.summary(status, result_totals(self.out.part_paths()), self.source.num_rows,
                                         self.num_shards, self.config.to_dict())
            self.out.write_json(self.out.stats_path, summary)
            self.out.close()
        except JobFailed as e:
            log.error("%s", e)
            return {}
        return summary

    @staticmethod
    def _install_signal_handlers():
        """SIGTERM raises :class:`Interrupted` (SIGINT already raises KeyboardInterrupt); returns an undo."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None

        def on_signal(signum, _frame):
            raise Interrupted(signum)

        previous = signal.signal(signal.SIGTERM, on_signal)
        return lambda: signal.signal(signal.SIGTERM, previous)
