"""The actor process of overlapped training: a forked child that runs rollouts on the learner's command.

The learner forks the actor (so it inherits the environment, its worker pipes and the rollout state) and
talks to it over one duplex pipe: each request is a pickled tuple, each answer `("ok", payload)` or
`("error", one line, traceback, the pickled exception)`; the learner's ActorError is chained to that exception
(so an env worker's death seen by the actor reads as one, not as an actor bug). Weights travel through
`SharedWeights`, never through the pipe. The learner notices the actor's death through its process sentinel;
the actor leaves when the learner dies (it polls `getppid` while idle, as env workers do).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import traceback
from collections.abc import Callable
from multiprocessing import connection
from typing import Any

import torch

from mettle import errors

_PARENT_CHECK_S = 0.5
"""How often an idle actor checks that the learner is still alive."""
_GRACE_S = 5.0
"""How long close() lets the actor exit politely before SIGKILL."""

Handler = Callable[[tuple[Any, ...]], Any]
"""Runs in the actor: answers one request (a tuple whose first item names it)."""


class ActorError(RuntimeError):
    """The actor process raised, died or stopped answering; names its pid so the failure can be traced."""

    def __init__(self, message: str, raised: bool = False) -> None:
        super().__init__(message)
        self.raised = raised
        """Whether the actor raised (its traceback is in a note) rather than died."""


class SharedWeights:
    """A shared-memory copy of the policy's state dict and its version, written by the learner, read by the actor."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.tensors = {name: shared(t.detach().to("cpu", copy=True)) for name, t in state.items()}
        self.version = shared(torch.zeros(1, dtype=torch.int64))

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Copy the learner's weights in (from any device), then mark them with `version`."""
        for name, tensor in state.items():
            self.tensors[name].copy_(tensor.detach())
        self.version[0] = version

    def load_into(self, module: torch.nn.Module, version: int) -> None:
        """Copy the weights into the actor's module (to its device); they must be the commanded version."""
        if int(self.version[0]) != version:
            raise RuntimeError(f"shared weights are version {int(self.version[0])}, the rollout needs {version}")
        module.load_state_dict(self.tensors)


def shared(tensor: torch.Tensor) -> torch.Tensor:
    """The CPU tensor, its storage moved into shared memory (in place), so a forked process sees its writes."""
    tensor.share_memory_()  # type: ignore[no-untyped-call]
    return tensor


class ActorProcess:
    """Learner-side handle of the forked actor: requests, answers, and death reported by name."""

    def __init__(self, handler: Handler, setup: Callable[[], None]) -> None:
        context = mp.get_context("fork")
        ours, theirs = context.Pipe(duplex=True)
        self.conn = ours
        self.process = context.Process(target=_actor_main, args=(theirs, handler, setup, os.getpid()),
                                       name="mettle-actor", daemon=True)
        self.process.start()
        theirs.close()  # only the actor holds its end: the learner sees EOF when it dies
        self.pid = int(self.process.pid or 0)
        self.failed = False

    def send(self, request: tuple[Any, ...]) -> None:
        """Send a request; a dead actor is reported by the next `receive`."""
        with contextlib.suppress(OSError):
            self.conn.send_bytes(pickle.dumps(request, pickle.HIGHEST_PROTOCOL))

    def receive(self) -> Any:
        """Wait for the answer to the oldest request; raise ActorError if the actor failed or died meanwhile."""
        ready = connection.wait([self.conn, self.process.sentinel])
        if self.conn not in ready and not self.conn.poll():
            raise self._fail(self._death())
        try:
            kind, *payload = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            raise self._fail(self._death()) from None
        if kind == "error":
            error = ActorError(f"actor process (pid {self.pid}) raised {payload[0]}", raised=True)
            error.add_note(f"actor traceback:\n{payload[1]}")
            raise self._fail(error) from _unpickled(payload[2])
        return payload[0]

    def request(self, request: tuple[Any, ...]) -> Any:
        """Send a request and wait for its answer."""
        self.send(request)
        return self.receive()

    def _death(self) -> ActorError:
        """How the actor ended (reaped, to learn its exit code)."""
        self.process.join(timeout=1.0)
        code = self.process.exitcode
        if code is None:
            detail = "closed its pipe but is still running"
        elif code < 0:
            detail = f"was killed by {signal.Signals(-code).name}"
        else:
            detail = f"exited unexpectedly with exit code {code}"
        return ActorError(f"actor process (pid {self.pid}) {detail}")

    def _fail(self, error: ActorError) -> ActorError:
        """Remember the actor cannot be trusted, so close() kills it rather than asking."""
        self.failed = True
        return error

    def close(self) -> None:
        """Ask the actor to exit (SIGKILL after a grace period, or at once after a failure); reap it. Idempotent."""
        if self.process.exitcode is None:
            if not self.failed:
                self.send(("close",))
                self.process.join(_GRACE_S)
            if self.process.exitcode is None:
                self.process.kill()
                self.process.join()
        self.conn.close()


def _actor_main(conn: connection.Connection, handler: Handler, setup: Callable[[], None], parent: int) -> None:
    """Actor entry: one torch thread, the learner's signals undone, then serve requests until told to close."""
    # Ctrl-C, and torchrun's SIGTERM, reach the whole process group: the learner decides, and its graceful
    # checkpoint needs the actor's rollout; it ends the actor afterwards (or the actor leaves when it dies).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError), open("/proc/self/comm", "w") as comm:
        comm.write("mettle-actor")
    torch.set_num_threads(1)
    try:
        setup()
        while (request := _receive(conn, parent)) is not None and request[0] != "close":
            conn.send_bytes(pickle.dumps(("ok", handler(request)), pickle.HIGHEST_PROTOCOL))
    except BaseException as error:
        with contextlib.suppress(OSError):
            text = errors.one_line(error, with_type=True, first_line=True)
            conn.send_bytes(pickle.dumps(("error", text, traceback.format_exc(), _pickled(error))))
        sys.exit(1)


def _pickled(error: BaseException) -> bytes | None:
    """The actor's exception as bytes, so the learner can chain it (an env worker's death is named, not a bug);
    None when it does not survive a round trip."""
    try:
        data = pickle.dumps(error, pickle.HIGHEST_PROTOCOL)
        pickle.loads(data)
    except Exception:
        return None
    return data


def _unpickled(data: bytes | None) -> BaseException | None:
    """The actor's exception again (see `_pickled`), or None."""
    if data is None:
        return None
    try:
        error = pickle.loads(data)
    except Exception:
        return None
    return error if isinstance(error, BaseException) else None


def _receive(conn: connection.Connection, parent: int) -> tuple[Any, ...] | None:
    """The next request, or None once the learner is gone (pipe closed or reparented)."""
    while not conn.poll(_PARENT_CHECK_S):
        if os.getppid() != parent:
            return None
    try:
        request: tuple[Any, ...] = pickle.loads(conn.recv_bytes())
    except (EOFError, OSError):
        return None
    return request
