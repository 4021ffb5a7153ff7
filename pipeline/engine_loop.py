"""The engine loop: the one thread that touches an engine, fed with batches of requests from any thread.

Callers :meth:`EngineLoop.submit` a batch and get a ``concurrent.futures.Future`` (``asyncio.wrap_future``
awaits it in an event loop, ``.result()`` blocks for it). Between steps the loop admits every batch submitted
since the last step, so new rows join the running batch while older ones finish: however many batches are in
flight, the engine sees one stream of requests and its running batch stays full as long as requests keep
coming. Each finished row goes back to its batch; a batch's future resolves when its last row is done.

:attr:`EngineLoop.finished_rows` counts the rows that are done (callers add the rows they reject before
submitting); the driver waits on it to keep every actor supplied (:mod:`pipeline.dispatch`).
"""
import queue
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


@dataclass
class BatchOutput:
    outputs: list[list[dict]]                                  # per request, in order: its n completions' results
    steps: list[dict[str, Any]] = field(default_factory=list)  # the step records attributed to this batch
    times: dict[str, float | int] = field(default_factory=lambda: dict(prefill_time_s=0.0, decode_time_s=0.0,
                                                                      steps=0))


@dataclass(eq=False)
class _Batch:
    prompts: list[list[int]]
    params: list[Any]
    future: Future
    outputs: list[list[dict | None]] = field(init=False)
    remaining: list[int] = field(init=False)   # per request: completions not finished yet
    rows_left: int = field(init=False)
    result: BatchOutput = field(init=False)

    def __post_init__(self) -> None:
        self.outputs = [[None] * p.n for p in self.params]
        self.remaining = [p.n for p in self.params]
        self.rows_left = len(self.prompts)
        self.result = BatchOutput(outputs=[])

    def finish(self, index: int, completion: int, output: dict) -> bool:
        """Record one completion's result; whether that finished its request."""
        self.outputs[index][completion] = output
        self.remaining[index] -= 1
        if self.remaining[index]:
            return False
        self.rows_left -= 1
        if not self.rows_left:
            self.result.outputs = self.outputs
            self.future.set_result(self.result)
        return True


class FinishedRows:
    """A thread-safe count of finished rows that callers can wait on."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._waiters: list[tuple[int, Future]] = []

    def add(self, rows: int) -> None:
        if not rows:
            return
        with self._lock:
            self.count += rows
            ready = [f for n, f in self._waiters if n <= self.count]
            self._waiters = [(n, f) for n, f in self._waiters if n > self.count]
            count = self.count
        for future in ready:
            future.set_result(count)

    def when_at_least(self, rows: int) -> Future:
        """A future resolving to the count once it reaches ``rows`` (at once if it has)."""
        future: Future = Future()
        with self._lock:
            if self.count < rows:
                self._waiters.append((rows, future))
                return future
            count = self.count
        future.set_result(count)
        return future


class EngineLoop:
    """Runs ``llm`` (an ``engine.LLM``) in a daemon thread until :meth:`stop`.

    ``on_step(record)`` sees every step record (a dict: the engine's ``StepRecord`` plus ``num_new_tokens``, the
    tokens appended to sequences in that step). Each step is attributed to the batch with the most sequences
    that got a token in it (the oldest batch on a tie, or when none did), and its time and count go to that
    batch's ``times``. If the engine raises, every batch in flight fails with that exception, and so does
    every later one.
    """

    def __init__(self, llm: Any, name: str, on_step: Callable[[dict[str, Any]], None]):
        self.llm = llm
        self.on_step = on_step
        self.finished_rows = FinishedRows()
        self._inbox: queue.Queue[_Batch | None] = queue.Queue()   # None stops the loop
        self._inbox_lock = threading.Lock()                        # orders submissions against the loop ending
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, prompts: list[list[int]], params: list[Any]) -> Future:
        """Queue one batch (prompt token ids and SamplingParams, pairwise; ``n`` completions each); its future
        yields a BatchOutput."""
        batch = _Batch(prompts, params, Future())
        if not prompts:
            batch.future.set_result(batch.result)
            return batch.future
        with self._inbox_lock:
            if self._error is not None:
                batch.future.set_exception(self._error)
            else:
                self._inbox.put(batch)
        return batch.future

    def stop(self) -> None:
        """Stop after the current step; batches still in flight fail."""
        self._inbox.put(None)
        self._thread.join()

    # ----- the loop thread -----------------------------------------------------------------------------------
    def _run(self) -> None:
        owners: dict[int, tuple[_Batch, int]] = {}   # seq_id -> (its batch, which completion), by arrival
        error: BaseException = RuntimeError("the engine loop was stopped")
        try:
            while True:
                for batch in self._take_new(wait=not owners):
                    if batch is None:
                        return
                    self._admit(batch, owners)
                if owners:
                    self._step(owners)
        except BaseException as e:  # the engine broke: fail everything in flight (the actor gets replaced)
            error = e
        finally:
            with self._inbox_lock:
                self._error = error
                pending = [b for b in self._take_new(wait=False) if b is not None]
            for batch in {batch for batch, _ in owners.values()} | set(pending):
                if not batch.future.done():
                    batch.future.set_exception(error)

    def _admit(self, batch: _Batch, owners: dict[int, tuple[_Batch, int]]) -> None:
        """Add every request's completions, one after another (the later ones find the prompt in the prefix cache)."""
        for i, (prompt_ids, params) in enumerate(zip(batch.prompts, batch.params)):
            for j in range(params.n):
                seq = self.llm.add_request(prompt_ids, params.for_completion(j), i)
                owners[seq.seq_id] = (batch, j)

    def _step(self, owners: dict[int, tuple[_Batch, int]]) -> None:
        out = self.llm.step()
        in_batch = Counter(batch for seq_id, (batch, _) in owners.items() if seq_id in out.new_tokens)
        oldest = next(iter(owners.values()))[0]
        record = dict(out.record.to_dict(), num_new_tokens=len(out.new_tokens))
        self._attribute(record, max(in_batch, key=in_batch.__getitem__, default=oldest))
        rows_done = 0
        for seq in out.finished:
            batch, completion = owners.pop(seq.seq_id)
            rows_done += batch.finish(seq.index, completion, self.llm.result(seq))
        self.finished_rows.add(rows_done)

    def _attribute(self, record: dict[str, Any], batch: _Batch) -> None:
        self.on_step(record)
        times = batch.result.times
        batch.result.steps.append(record)
        times["steps"] += 1
        times[f"{record['phase']}_time_s"] += record["step_time_s"]

    def _take_new(self, wait: bool) -> list[_Batch | None]:
        """Everything in the inbox; with ``wait``, block until there is something."""
        items = [self._inbox.get()] if wait else []
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items
