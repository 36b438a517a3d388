"""Ctrl-C during training: finish the step, save a checkpoint, then stop.

While a `StopRequest` is active, the first SIGINT only sets `requested`; the training loop
checks it between steps (so the model, optimizer and EMA are never caught half-updated),
saves a checkpoint at the step reached and raises `mupad.errors.Interrupted`. A second
SIGINT stops at once (the previous checkpoint stays the newest). Outside the main thread
signal handlers cannot be installed; there Ctrl-C behaves as usual.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType, TracebackType
from typing import Any

logger = logging.getLogger(__name__)


class StopRequest:
    """A context in which the first Ctrl-C asks for a clean stop instead of raising."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:  # a second Ctrl-C: stop now
            self._restore()
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops "
            "at once, without one)"
        )
