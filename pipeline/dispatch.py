"""The dispatch loop: start engine actors, keep each one supplied, write shards, survive faults, stop cleanly.

Dispatch is driven by each actor's load: the driver keeps about ``target_rows`` rows outstanding at every
actor (sent and not yet finished there: a full running batch plus as many waiting, see
:data:`pipeline.actor.FEED_FACTOR`), handing the next piece of work to the least-loaded actor that is below
its target. When every actor is at its target, the driver waits on ``wait_for_capacity``, which an actor
answers as soon as enough of its rows have finished; so an actor's engine always has rows to admit as others
finish, whatever the shard boundaries, and a slow actor simply receives less. A piece is a whole shard or,
after repeated failures, part of one:

* an actor that dies (killed, OOM, GPU error, lost node) or raises while running a piece is replaced (the
  engine's state after a failed step is unknown), and its pieces are retried on other actors. One failure
  costs one piece one attempt: the piece that raised or, when the process died with several pieces in it,
  the newest (it joined an engine that ran the older ones fine); the others go back uncharged. Every piece
  that was on a failed actor then runs alone, so its next failure is its own;
* after ``1 + --max-shard-retries`` failed attempts a shard is split in halves, and halves are split
  again on failure, until the row that breaks it is alone; that row then gets an error after the same
  number of attempts, and every other row completes;
* a shard is written (atomically, by a writer thread, so the loop keeps feeding the actors meanwhile) as
  soon as all its rows are back, and only then counted as done;
* Ctrl-C / SIGTERM (:mod:`pipeline.signals`) end the loop at its next turn; ``stats.json`` is written with
  ``"status": "interrupted"``, the command that resumes is printed, and the actors are stopped.
"""
import logging
import math
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from pipeline.actor import ShardResult
from pipeline.config import JobConfig
from pipeline.errors import JobFailed, root_cause
from pipeline.inputs import InputSource
from pipeline.output import OutputDir
from pipeline.progress import Progress
from pipeline.rows import OutputSpec, error_result_table
from pipeline.signals import StopRequest
from pipeline.stats import JobStats, result_totals

log = logging.getLogger("pipeline")
WAIT_TICK_S = 0.2           # ray.wait timeout: how often progress and stop requests are looked at
SHUTDOWN_GRACE_S = 5.0      # for the actors' own shutdown before they are killed


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
    """A started actor and the driver's view of its load."""
    actor_id: str
    handle: Any
    target_rows: int = 0                                    # rows to keep outstanding here (from ready())
    pieces: dict[Any, Piece] = field(default_factory=dict)  # run_shard ref -> piece, in dispatch order
    rows_sent: int = 0
    rows_finished: int = 0                                  # as the actor last reported
    capacity_ref: Any = None                                # a wait_for_capacity call in flight

    @property
    def outstanding(self) -> int:
        return self.rows_sent - self.rows_finished

    def can_take(self, piece: Piece) -> bool:
        if piece.alone:
            return not self.pieces
        return self.outstanding < self.target_rows and not any(p.alone for p in self.pieces.values())

    def send(self, piece: Piece):
        ref = self.handle.run_shard.remote(piece.shard_id, piece.ref())
        self.pieces[ref] = piece
        self.rows_sent += piece.num_rows
        return ref

    def wait_for_capacity(self):
        """Ask to hear back once this actor is below its target again (it has finished enough rows)."""
        self.capacity_ref = self.handle.wait_for_capacity.remote(self.rows_sent - self.target_rows + 1)
        return self.capacity_ref

    def note_finished(self, rows_finished: int) -> None:
        self.rows_finished = max(self.rows_finished, rows_finished)


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
    """The dispatch loop and its bookkeeping for one run of a job: :meth:`start_actors` (they load their engines
    while the driver finishes planning), :meth:`run`, and :meth:`stop_actors` (always)."""

    def __init__(self, config: JobConfig, source: InputSource, out: OutputDir, num_shards: int, actors: ActorPlan,
                 outputs: OutputSpec, actor_columns: list[str], stats: JobStats, resume_hint: str, stop: StopRequest):
        self.config, self.source, self.out, self.num_shards = config, source, out, num_shards
        self.actor_args, self.num_actors, self.actor_columns = actors.args, actors.count, actor_columns
        self.remote_cls = ray.remote(actors.cls).options(num_cpus=1, num_gpus=actors.gpus, max_restarts=0,
                                                          runtime_env={"env_vars": actors.env_vars})
        self.outputs = outputs
        self.output_schema = pa.schema(list(source.schema) + list(outputs.schema()))
        self.stats, self.resume_hint, self.stop = stats, resume_hint, stop
        self.status, self.error = "starting", None
        self.summary: dict[str, Any] = {}           # what stats.json says, once written
        self.done: set[int] = set()
        self.shard_iter: Iterator[tuple[int, pa.Table]] = iter(())
        self.input_exhausted = False
        self.progress: Progress | None = None
        self.queue: deque[Piece] = deque()          # waiting for an actor: retries and split halves, then new shards
        self.pending: dict[int, PendingShard] = {}
        self.writer = ThreadPoolExecutor(1, thread_name_prefix="shard-writer")
        self.writes: list[Future] = []              # shards being written (each future yields its PendingShard)
        self.starting: dict[Any, LiveActor] = {}    # ready() ref -> actor
        self.actors: list[LiveActor] = []            # started and not failed
        self.running: dict[Any, LiveActor] = {}     # run_shard ref -> the actor running it
        self.capacity: dict[Any, LiveActor] = {}    # wait_for_capacity ref -> its actor
        self.next_actor = 0
        self.ever_ready = False
        self.start_failures = 0
        self.consecutive_failures = 0
        # A poisoned row costs at most (attempts per shard) + (halvings) + (attempts for the row) failures in
        # a row; many more than that, on every actor, means the actors themselves are broken.
        attempts = config.max_shard_retries + 1
        self.max_consecutive_failures = self.num_actors * (2 * attempts + math.ceil(math.log2(config.shard_size)) + 2)

    # ----- main loop ---------------------------------------------------------------------------------------------
    def start_actors(self) -> None:
        if not self.stop.requested:
            for _ in range(self.num_actors):
                self._start_actor()

    def run(self, done: set[int]) -> None:
        """Run until every shard is written, a stop is requested or the job fails; then write ``stats.json`` and,
        unless completed, say how to resume (raising :class:`JobFailed` for a failure)."""
        self.done = set(done)
        self.stats.shards_skipped = len(done)
        self.shard_iter = self.source.shards(self.config.shard_size)
        done_rows = sum(min(self.config.shard_size, self.source.num_rows - s * self.config.shard_size) for s in done)
        self.progress = Progress(self.source.num_rows, done_rows, self.config.progress_interval_s)
        try:
            while not self._finished() and not self.stop.requested:
                self._dispatch()
                self._wait_and_handle()
                self._count_written(wait=False)
                self.progress.tick()
            self.status = "interrupted" if self.stop.requested else "completed"
        except JobFailed as e:
            self.status, self.error = "failed", e
        finally:
            self._finish_writes()
            self.progress.close()
        if self.status == "interrupted":
            log.warning("%s: stopping; finished shards stay in %s", self.stop.name, self.out.results)
        self.finish()

    def finish(self) -> None:
        """Write ``stats.json`` for the current status; unless completed, print how to resume (or raise it)."""
        self.summary = self._write_stats()
        if self.status == "completed":
            return
        written = len(self.out.finished_shards())
        hint = f"{written} of {self.num_shards} shards are written in {self.out.results}; resume with: {self.resume_hint}"
        if self.error is not None:
            raise JobFailed(f"{self.error} ({hint})") from self.error
        # One write, newline included: Ray's log forwarding thread writes to the same stream.
        sys.stderr.write(f"Interrupted: {hint}\n")
        sys.stderr.flush()

    def finish_late_stop(self) -> None:
        """A stop requested after a completed run wrote its stats (while the actors or Ray shut down) still
        ends the job as interrupted: exit status 130/143, ``stats.json`` and the resume hint say so."""
        if self.status == "completed" and self.stop.requested:
            self.status = "interrupted"
            self.finish()

    def _finished(self) -> bool:
        return self.input_exhausted and not self.queue and not self.running and not self.pending and not self.writes

    def _dispatch(self) -> None:
        """Hand out pieces in queue order, each to the least-loaded actor that can take it; when work is left and
        actors are at their target, ask them to say when they have room."""
        while (piece := self._next_piece()) is not None:
            actor = min((a for a in self.actors if a.can_take(piece)), key=lambda a: a.outstanding, default=None)
            if actor is None:
                break
            self.queue.popleft()
            self.running[actor.send(piece)] = actor
        if self.queue:
            for actor in self.actors:
                if actor.capacity_ref is None and actor.outstanding >= actor.target_rows:
                    self.capacity[actor.wait_for_capacity()] = actor
        if self.queue and not self.running and not self.starting:  # an idle live actor would have taken it
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
        waiting = [*self.starting, *self.running, *self.capacity]
        if not waiting:  # the last piece just came back
            return
        ready, _ = ray.wait(waiting, num_returns=1, timeout=WAIT_TICK_S)
        for ref in ready:
            if ref in self.starting:
                self._on_actor_started(ref, self.starting.pop(ref))
            elif ref in self.capacity:
                self._on_capacity(ref, self.capacity.pop(ref))
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
            stats.status, stats.error = "failed to start", root_cause(e)
            self.start_failures += 1
            if not self.ever_ready and not self.starting:
                raise JobFailed(f"engine actor {actor.actor_id} failed to start: {stats.error}") from e
            log.warning("%s failed to start: %s", actor.actor_id, stats.error)
            self._top_up()
            return
        self.ever_ready = True
        actor.target_rows = info["target_rows"]
        stats.status, stats.pid, stats.node_id, stats.load_time_s = "running", info["pid"], info["node_id"], \
            info["load_time_s"]
        stats.started_s, stats.ready_s = info["started_at"] - self.stats.started_at, self.stats.elapsed()
        log.info("%s ready (pid %d, engine loaded in %.1fs)", actor.actor_id, info["pid"], info["load_time_s"])
        self.actors.append(actor)
        self._top_up()

    def _on_capacity(self, ref, actor: LiveActor) -> None:
        actor.capacity_ref = None
        try:
            actor.note_finished(ray.get(ref))
        except RayError:
            pass  # the actor failed: its run_shard calls report it

    def _replace_actor(self, actor: LiveActor, why: str, reason: str) -> None:
        """Kill ``actor`` (if it still runs) and start a replacement."""
        self.actors.remove(actor)
        self.capacity.pop(actor.capacity_ref, None)
        stats = self.stats.actor(actor.actor_id)
        stats.status, stats.error = "died", reason
        ray.kill(actor.handle, no_restart=True)
        log.warning("%s %s: %s", actor.actor_id, why, reason)
        self._top_up()

    def _top_up(self) -> None:
        """Start actors until ``num_actors`` are live, while work remains.

        Only once some actor has loaded the engine (so a start can succeed), and only while start failures
        stay below ``num_actors`` (a model that cannot load fails the job instead of retrying forever).
        Replacements wait in Ray's queue until resources (GPUs, a node) are free.
        """
        live = len(self.actors) + len(self.starting)
        while (self.ever_ready and live < self.num_actors and self.start_failures < self.num_actors
               and not self._finished()):
            self.stats.actors_replaced += 1
            self._start_actor()
            log.warning("started actor-%d as a replacement", self.next_actor - 1)
            live += 1

    def stop_actors(self) -> None:
        """Shut every actor down (briefly waiting for the engines to release their devices), then kill them."""
        actors = list(self.actors)
        try:
            ray.get([a.handle.shutdown.remote() for a in actors], timeout=SHUTDOWN_GRACE_S)
        except (RayError, GetTimeoutError):
            pass  # best effort: the actor is killed below either way
        for actor in [*actors, *self.starting.values()]:
            try:
                ray.kill(actor.handle, no_restart=True)
            except RayError as e:
                log.warning("could not kill %s: %s", actor.actor_id, root_cause(e))
            if self.stats.actor(actor.actor_id).status in ("running", "starting"):
                self.stats.actor(actor.actor_id).status = "stopped"
        self.actors.clear()
        self.running.clear()
        self.starting.clear()
        self.capacity.clear()

    # ----- pieces ------------------------------------------------------------------------------------------------
    def _on_piece_returned(self, ref, actor: LiveActor) -> None:
        try:
            result: ShardResult = ray.get(ref)
        except RayError as e:
            self._on_actor_failed(actor, ref, e)
            return
        piece = actor.pieces.pop(ref)
        actor.note_finished(result.rows_finished)
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
        self._replace_actor(actor, why, root_cause(error))
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
            self._piece_done(piece, error_result_table(1, error, actor.actor_id, piece.shard_id, self.outputs), None, 0)

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
        self.writes.append(self.writer.submit(self._write_files, shard, table, steps))

    def _write_files(self, shard: PendingShard, table: pa.Table, steps: pa.Table | None) -> PendingShard:
        """In the writer thread: the shard's files, the part last (it marks the shard done)."""
        self.out.write_shard(shard.shard_id, table, steps)
        return shard

    def _count_written(self, wait: bool) -> None:
        """Count the shards whose files are written (raising the first write's failure); with ``wait``, all."""
        finished = [w for w in self.writes if wait or w.done()]
        for write in finished:
            self.writes.remove(write)
            shard = write.result()
            self.done.add(shard.shard_id)
            self.stats.shard_written(shard.table.num_rows, shard.generated_tokens)
            self.progress.advance(shard.table.num_rows, shard.generated_tokens)

    def _finish_writes(self) -> None:
        """Let the writes under way end (each is atomic, so every shard is either written or not), count them."""
        try:
            self._count_written(wait=True)
        except JobFailed as e:
            if self.error is None:
                self.status, self.error = "failed", e
        self.writer.shutdown()

    # ----- end of run ----------------------------------------------------------------------------------------------
    def _write_stats(self) -> dict[str, Any]:
        try:
            self.out.merge_steps()
            summary = self.stats.summary(self.status, result_totals(self.out.part_paths()), self.source.num_rows,
                                         self.num_shards, self.config.to_dict())
            self.out.write_json(self.out.stats_path, summary)
            self.out.close()
        except JobFailed as e:
            log.error("%s", e)
            return {}
        return summary
