"""Preemption: the signals cluster schedulers send before they stop a job (SIGTERM) turned into
a flag the training loop reads, so that it saves at the next step boundary and exits."""

from __future__ import annotations

import os
import signal
import threading
import types
from typing import Any


class Preemption:
    """The preemption signals a manager handles, and the one received."""

    def __init__(self) -> None:
        self.stop_signal: int | None = None
        self._closed = False
        self._handlers: dict[int, Any] = {}
        self._previous: dict[int, Any] = {}

    def install(self, signals: tuple[int, ...]) -> None:
        """Handle ``signals``. Raises ValueError where one cannot be handled; ``restore`` then
        puts back the handlers installed so far."""
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("preemption handlers can only be installed from the main thread")
        for signum in signals:
            try:
                self._handlers[signum] = signal.signal(signum, self.on_signal)
            except (OSError, ValueError, TypeError) as e:
                raise ValueError(f"cannot handle signal {signum!r} for preemption: {e}") from e
        self._previous = dict(self._handlers)

    def on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        if not self._closed:
            self.stop_signal = signum
            return
        # Still installed after close() (a manager opened later put its own handler on top and
        # then restored this one): behave as the handler that was there before.
        previous = self._previous.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def close(self) -> None:
        """From now on, a signal goes to the handler that was there before (the manager is
        closing: nothing saves at a step boundary any more)."""
        self._closed = True

    def restore(self) -> None:
        """Put back the handlers that were there before."""
        for signum, handler in self._handlers.items():
            # Only a handler that is still ours is replaced: one installed later stays.
            if signal.getsignal(signum) == self.on_signal:
                signal.signal(signum, handler)
        self._handlers.clear()
