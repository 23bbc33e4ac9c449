"""GracefulShutdown: SIGINT/SIGTERM end training after the current epoch, with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, TextIO

from mettle.rl.training.component import TrainerComponent

HANDLED = (signal.SIGINT, signal.SIGTERM)


class GracefulShutdown(TrainerComponent):
    """First signal: finish the epoch and stop cleanly (the checkpointer saves); second SIGINT: stop now."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def register(self, context: Any) -> None:
        """Install the handlers (only possible from the main thread)."""
        super().register(context)
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in HANDLED}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum
        self.context.stop_requested = True
        name = signal.Signals(signum).name
        print(f"{name} received: finishing this epoch and writing a checkpoint (SIGINT again to stop now)",
              file=self.stream, flush=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def on_training_complete(self) -> None:
        """Give the process its previous handlers back."""
        self.uninstall()

    def on_failure(self, error: BaseException) -> None:
        """Likewise after a failure."""
        self.uninstall()

    def uninstall(self) -> None:
        """Restore the handlers that were there before registration."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


class StopAtEpoch(TrainerComponent):
    """Ends training cleanly once `epoch` epochs are done, as a signal would (a time-boxed job, a staged run)."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        if epoch < 1:
            raise ValueError(f"epoch {epoch} must be >= 1")
        self.stop_epoch = epoch

    def on_epoch_end(self, epoch: int) -> None:
        """Ask the trainer to stop after this epoch (the checkpointer, registered later, still saves it)."""
        if epoch >= self.stop_epoch:
            self.context.stop_requested = True
