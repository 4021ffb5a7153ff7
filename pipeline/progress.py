"""Driver progress: a tqdm bar on a terminal, a plain line every few seconds otherwise (logs, ray job submit)."""
import logging
import sys
import time
from typing import TextIO

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm


class Progress:
    def __init__(self, total_rows: int, done_rows: int, interval_s: float, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.tokens = total_rows, done_rows, 0
        self.start_done = done_rows
        self.started = self.last_line = time.monotonic()
        self.interval_s = interval_s
        self.bar = self._redirect = None
        if self.stream.isatty():
            self.bar = tqdm(total=total_rows, initial=done_rows, unit="row", desc="rows", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)
            # The driver's own log lines go above the bar instead of through it.
            self._redirect = logging_redirect_tqdm([logging.getLogger()])
            self._redirect.__enter__()

    def advance(self, rows: int, tokens: int) -> None:
        self.done += rows
        self.tokens += tokens
        if self.bar is not None:
            self.bar.update(rows)
            self.bar.set_postfix_str(f"{self._tokens_per_s():.0f} tok/s", refresh=False)
        self.tick()

    def tick(self) -> None:
        """Print the plain line when it is due (no-op on a terminal, where tqdm refreshes itself)."""
        now = time.monotonic()
        if self.bar is None and now - self.last_line >= self.interval_s:
            self.last_line = now
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.monotonic() - self.started
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0
        eta = f"{(self.total - self.done) / rate:.0f}s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"[progress] {self.done}/{self.total} rows ({pct:.1f}%), {self._tokens_per_s():.1f} tok/s, "
                f"elapsed {elapsed:.0f}s, ETA {eta}")

    def _tokens_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.tokens / elapsed if elapsed > 0 else 0.0

    def close(self) -> None:
        if self.bar is not None:
            self._redirect.__exit__(None, None, None)
            self.bar.close()
        else:
            print(self.line(), file=self.stream, flush=True)
