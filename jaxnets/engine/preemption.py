"""Preemption: SIGTERM/SIGINT/SIGHUP become a flag the training loop polls between device calls."""

from __future__ import annotations

import signal
import threading
from collections.abc import Sequence
from typing import Any

# The signals that ask a run to stop: each gets the same save (SIGHUP is absent on Windows).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name)
)


class PreemptionGuard:
    """Turns SIGTERM/SIGINT/SIGHUP into a flag the training loop checks at step boundaries.

    Inside the `with` block the first signal only sets `should_stop`, so the loop can
    save, flush and exit cleanly (Colab and TPU VMs send SIGTERM before taking the
    machine; a closed terminal or SSH session sends SIGHUP, which would otherwise kill the
    run without a save). A second SIGINT raises KeyboardInterrupt as usual. The previous handlers
    are restored on exit. Must be entered on the main thread.

    Example:
        >>> with PreemptionGuard() as guard:
        ...     for step in steps:
        ...         state = train_step(state, batch(step))
        ...         if guard.should_stop:
        ...             ckpt.save(step + 1, state, metadata=meta, force=True)
        ...             ckpt.wait_until_finished()
        ...             break
    """

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def should_stop(self) -> bool:
        """True once one of the signals has arrived."""
        return self.received is not None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("PreemptionGuard must be entered on the main thread (signals)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
