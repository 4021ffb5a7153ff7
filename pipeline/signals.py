"""Ctrl-C and SIGTERM as a *request to stop*, which nothing ever raises.

A Python signal handler runs in the main thread, wherever it happens to be, and the driver spends most of
its time inside Ray's C code (``ray.wait``, ``ray.get``, ``ray.shutdown``): an exception raised from a
handler there surfaces as ``SystemError: <cyfunction CoreWorker.wait> returned a result with an exception
set``, or worse. Ray also installs handlers of its own in the driver (``ray.init``: one that calls
``sys.exit``; a local cluster's node: one that kills its processes and exits; the core worker: a C++ one,
reset to the default action, which kills the process, while Ray shuts down).

So no handler runs at all: :class:`StopRequest` blocks SIGINT and SIGTERM in the main thread before any
other thread exists (every thread started later, Ray's included, inherits the block), and one thread of
its own takes them with ``sigtimedwait`` and records the first in :attr:`StopRequest.signum`. The dispatch
loop polls it between its short waits. Processes started through Python with a ``preexec_fn`` (Ray's own
processes of a local cluster) get the signals unblocked again in the child.

A second signal of the same kind quits at once (``os._exit``), for a user who does not want to wait; the job
then resumes from its written shards, as after a kill.
"""
import os
import signal
import threading

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
POLL_S = 0.2
_blocked_by_stop_request = 0   # StopRequest scopes open in this process


def _unblock_in_child() -> None:
    if _blocked_by_stop_request:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


os.register_at_fork(after_in_child=_unblock_in_child)


class StopRequest:
    """``with StopRequest() as stop:`` turns SIGINT and SIGTERM into :attr:`signum` until the block ends.

    Enter it in the main thread before starting threads (the command line does, first thing); elsewhere it is
    inert and never reports a request.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous_mask: set[int] | None = None
        self._closing = threading.Event()
        self._waiter: threading.Thread | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        """The shell's status for a process stopped by the signal: 130 (SIGINT), 143 (SIGTERM)."""
        return 128 + (self.signum or 0)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def __enter__(self) -> "StopRequest":
        global _blocked_by_stop_request
        if threading.current_thread() is threading.main_thread():
            self._previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
            _blocked_by_stop_request += 1
            self._waiter = threading.Thread(target=self._take_signals, name="stop-signals", daemon=True)
            self._waiter.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        global _blocked_by_stop_request
        if self._waiter is not None:
            self._closing.set()
            self._waiter.join()
            _blocked_by_stop_request -= 1
            signal.pthread_sigmask(signal.SIG_SETMASK, self._previous_mask)
            self._waiter = None

    def _take_signals(self) -> None:
        while not self._closing.is_set():
            info = signal.sigtimedwait(STOP_SIGNALS, POLL_S)
            if info is not None:
                self._on_signal(info.si_signo)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.signum == signum:
            os.write(2, f"\n{name} again: quitting now; re-run the same command to resume\n".encode())
            os._exit(128 + signum)
        self.signum = self.signum or signum
        # os.write, not print: this thread may interrupt another thread's write to sys.stderr.
        os.write(2, f"\n{name}: stopping after the current step (send it again to quit at once)\n".encode())
