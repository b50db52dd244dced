"""Wait for SIGTERM / SIGINT without a race and without taking a lock in a signal handler.

Why not the obvious ways:

* ``signal.signal(SIGTERM, lambda *_: event.set())``: the Python handler runs in the main thread
  between two bytecodes; if the main thread is inside ``event.wait()`` and holds the event's
  (non-reentrant) lock at that moment, ``event.set()`` waits for it forever.
* ``pthread_sigmask`` + ``sigwait``: every thread must inherit the mask, but importing numpy
  already starts OpenBLAS threads with the signals unblocked, so a SIGTERM can land on one of
  them and kill the process with the default action.

Here the C-level handler writes the signal number into a pipe (``signal.set_wakeup_fd``), from
whichever thread the kernel picked; the main thread waits on the pipe. No lock is involved.
"""

from __future__ import annotations

import os
import select
import signal
import time
from types import TracebackType

DEFAULT_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def _ignore(signum: int, frame: object) -> None:
    """A Python-level handler must exist (else the default action ends the process); the pipe does the work."""


class StopSignals:
    """Install in the main thread; ``wait()``/``is_set()`` behave like a ``threading.Event`` set by a signal.

    Signals listed in ``ignored`` are ignored altogether (a worker process leaves SIGINT to its parent).
    """

    def __init__(self, signals: tuple[int, ...] = DEFAULT_STOP_SIGNALS, ignored: tuple[int, ...] = ()) -> None:
        self.signals = tuple(signals)
        self.ignored = tuple(ignored)
        self.received: signal.Signals | None = None
        self._read_fd = self._write_fd = -1
        self._previous_handlers: dict[int, object] = {}
        self._previous_wakeup_fd = -1

    def install(self) -> "StopSignals":
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for sig in self.signals:
            self._previous_handlers[sig] = signal.signal(sig, _ignore)
        for sig in self.ignored:
            self._previous_handlers[sig] = signal.signal(sig, signal.SIG_IGN)
        return self

    def close(self) -> None:
        if self._read_fd < 0:
            return
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous_handlers.clear()
        signal.set_wakeup_fd(self._previous_wakeup_fd)
        os.close(self._read_fd)
        os.close(self._write_fd)
        self._read_fd = self._write_fd = -1

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _drain(self) -> None:
        try:
            data = os.read(self._read_fd, 512)
        except BlockingIOError:
            return
        for byte in data:
            if byte in self.signals and self.received is None:
                self.received = signal.Signals(byte)

    def is_set(self) -> bool:
        if self.received is None:
            self._drain()
        return self.received is not None

    def wait(self, timeout: float | None = None) -> bool:
        """True once a stop signal has arrived; False if ``timeout`` seconds passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            select.select([self._read_fd], [], [], left)  # other signals' bytes wake it too: loop
        return True
