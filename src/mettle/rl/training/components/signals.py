"""GracefulShutdown: SIGINT/SIGTERM end training after the current epoch, with a checkpoint."""

from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Any, TextIO

from mettle.rl.training.component import TrainerComponent

HANDLED = (signal.SIGINT, signal.SIGTERM)

_pending: int | None = None  # a signal that arrived during start-up, before a GracefulShutdown was registered
_received: int | None = None  # the first stop signal this process received, at start-up or in training
_announce = True  # whether this process says so when a stop signal arrives (ranks of `--nproc`: their launcher does)


def install_early_handlers(stream: TextIO | None = None, announce: bool = True) -> None:
    """From the first line of `mettle train`: a SIGINT/SIGTERM during start-up is remembered, not fatal.

    `announce=False` (a rank whose launcher announces the user's signals) keeps quiet when one arrives: torchrun
    also sends SIGTERM when another rank died, and then no checkpoint is coming.
    """
    global _announce
    out = stream or sys.stderr
    _announce = announce

    def record(signum: int, frame: FrameType | None) -> None:
        global _pending
        _pending = signum
        note_received(signum)
        if _announce:
            print(f"{signal.Signals(signum).name} received during start-up: stopping before training starts",
                  file=out, flush=True)
        install_repeat_handlers(out)

    if threading.current_thread() is threading.main_thread():
        for sig in HANDLED:
            signal.signal(sig, record)


def pending_signal() -> int | None:
    """The signal recorded during start-up, if any."""
    return _pending


def received_signal() -> int | None:
    """The first SIGINT/SIGTERM this process received (start-up or training), if any."""
    return _received


def note_received(signum: int) -> None:
    """Remember the first stop signal (what a failing rank checks: was it told that the group is ending?)."""
    global _received
    if _received is None:
        _received = signum


def install_repeat_handlers(stream: TextIO) -> None:
    """After the first signal: SIGINT again stops now; SIGTERM again is noted (a scheduler escalates to SIGKILL)."""

    for sig in HANDLED:
        signal.signal(sig, lambda signum, frame: repeat_signal(signum, stream))


def repeat_signal(signum: int, stream: TextIO) -> None:
    """A second SIGINT stops now (KeyboardInterrupt); a second SIGTERM is only noted."""
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    if _announce:
        print("SIGTERM received again: already stopping (SIGINT or SIGKILL to stop now)", file=stream, flush=True)


class GracefulShutdown(TrainerComponent):
    """First signal: finish the epoch and stop cleanly (the checkpointer saves); second SIGINT: stop now."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def register(self, context: Any) -> None:
        """Install the handlers (only possible from the main thread); take over a signal from start-up."""
        super().register(context)
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in HANDLED}
            if _pending is None:
                for sig in HANDLED:
                    signal.signal(sig, self._handle)
            else:
                install_repeat_handlers(self.stream)
        if _pending is not None:
            self.received = _pending
            context.stop_requested = True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:  # a repeat, should this handler still be (or again be) installed
            repeat_signal(signum, self.stream)
            return
        self.received = signum
        self.context.stop_requested = True
        note_received(signum)
        if _announce:
            name = signal.Signals(signum).name
            print(f"{name} received: finishing this epoch and writing a checkpoint (SIGINT again to stop now)",
                  file=self.stream, flush=True)
        install_repeat_handlers(self.stream)

    def on_epoch_end(self, epoch: int) -> None:
        """Ask again: a handler that ran while the trainer was agreeing on a stop across ranks was overwritten."""
        if self.received is not None:
            self.context.stop_requested = True

    def on_training_complete(self) -> None:
        """Give the process its previous handlers back."""
        self.uninstall()

    def on_failure(self, error: BaseException) -> None:
        """Likewise after a failure."""
        self.uninstall()

    def uninstall(self) -> None:
        """Restore the handlers that were there before registration (after a signal: keep the repeat handlers)."""
        if self.received is not None and self._previous:
            install_repeat_handlers(self.stream)
            self._previous = {}
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
