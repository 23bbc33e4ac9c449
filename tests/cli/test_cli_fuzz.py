"""Fuzz: a finished CartPole run damaged at random; eval and resume exit 0 or 2 at once and touch nothing else.

Each case copies the run, mutates it (bytes, JSON keys and values, trainer state, links, missing files), then
runs `mettle eval RUN` and `mettle train --run r` (resume). The commands run in children forked from a warm
fork server (this file run as a script), so 400 commands do not each pay for importing torch.

Knobs: METTLE_FUZZ_CASES (default 200), METTLE_FUZZ_SEED (0), METTLE_FUZZ_ONLY ("3,17": just those cases),
METTLE_FUZZ_LANES (2 servers at once), METTLE_FUZZ_BUDGET_S (start no case after this; default 180).
A case's mutation depends only on the seed and its number, so METTLE_FUZZ_ONLY replays a failure.

Resume pins total_timesteps to the finished run's: a mutated target would be a legitimate request for more
training, not a fault. Exit 99 is an uncaught exception (`python -m mettle` would exit 1 after the traceback).
Under tmp_path: fuzz-failures.txt (every failure), lane-N-logs/cases.txt (every case and how its commands
ended, with their output beside it) and lane-N-failed/ (the directories of failed cases, as the commands left them).
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import psutil
import pytest
import torch
from cli_helpers import mettle_in_process
from safetensors.torch import load_file, save_file

from mettle.rl.policy_files import (
    MANIFEST,
    POLICY_SPEC,
    POLICY_WEIGHTS,
    CheckpointError,
    list_checkpoints,
    verify_manifest,
    write_manifest,
)
from mettle.rl.training.checkpointer import TRAINER_STATE

CASES = int(os.environ.get("METTLE_FUZZ_CASES", "200"))
SEED = int(os.environ.get("METTLE_FUZZ_SEED", "0"))
ONLY = [int(n) for n in os.environ.get("METTLE_FUZZ_ONLY", "").replace(",", " ").split()]
LANES = int(os.environ.get("METTLE_FUZZ_LANES", "2"))
BUDGET_S = float(os.environ.get("METTLE_FUZZ_BUDGET_S", "180"))
"""Seconds from the test's start after which no case starts (the skipped are named), so a run of hangs or a loaded
machine still reports within pytest's 300 s timeout."""
DEADLINE_S = 30.0
MAX_STDERR_LINES = 3
CRASHED = 99
"""Exit code of a child whose command raised; its traceback is on its stderr."""
KEEP_LAST = 3
"""Checkpoints the trainer keeps; an older one may be pruned once this many newer ones are complete."""
TOTAL_TIMESTEPS = 1536
TRAIN = ["train", "--env", "gym:CartPole-v1", "--run", "r", f"total_timesteps={TOTAL_TIMESTEPS}",
         "checkpoint_interval=1", "progress_interval_s=0.01"]
CHECKPOINT_FILES = (POLICY_WEIGHTS, POLICY_SPEC, TRAINER_STATE)

OTHER_VALUES: list[Any] = ["", "x", "../../../outside", "gym:CartPole-v1", "pettingzoo:os:abort", "os:abort", 0, 1, -1,
                           3, 0.5, -0.0, math.nan, math.inf, -math.inf, [], [1, 2], {}, {"a": 1}, None, True, False]
"""Another type for any value; the hostile names abort the command (a failure) if anything imports and calls them."""
HUGE_VALUES: list[Any] = [10**18, 1e308, -1e308, -1, 2**63, -(2**63), 2**64, 10**400]


def odd_tensors() -> list[torch.Tensor]:
    """Tensors that fit nothing a trainer state holds: empty, NaN, another shape or dtype, a huge value."""
    return [torch.zeros(0), torch.tensor(math.nan), torch.zeros(3, 3), torch.zeros(2, dtype=torch.int8),
            torch.full((4,), 2**62)]


# ------------------------------------------------------------------ the fork server (this file as a script)
def serve(scratch: Path) -> None:
    """One JSON request per stdin line, one JSON result per stdout line; a forked child runs each command."""
    warm_up(scratch)
    reply({"threads": threading.active_count(), "tasks": len(os.listdir("/proc/self/task"))})
    for line in sys.stdin:
        reply(run_forked(json.loads(line)))


def reply(message: dict[str, Any]) -> None:
    """Answer the test; flushed, so no buffered text is copied into the next forked child."""
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def warm_up(scratch: Path) -> None:
    """Import what eval and resume import (learned from one forked try), so each later command starts warm."""
    listing = scratch / "modules.txt"
    run = scratch / "runs" / "r"
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgrp()
            redirect(str(scratch / "warm.out"), str(scratch / "warm.err"))
            os.chdir(scratch)
            for argv in commands(run):
                invoke(argv)
            listing.write_text("\n".join(sys.modules))
        finally:
            os._exit(0)
    reap(pid, time.monotonic(), DEADLINE_S * 2)
    for name in listing.read_text().split() if listing.exists() else []:
        with contextlib.suppress(Exception):
            importlib.import_module(name)


def run_forked(request: dict[str, Any]) -> dict[str, Any]:
    """Run one command in a forked child and report how it ended."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        exit_child(request)
    return reap(pid, start, request["timeout"])


def exit_child(request: dict[str, Any]) -> NoReturn:
    """In the child: its own process group and files, then the CLI, then exit as `python -m mettle` would."""
    try:
        os.setpgrp()
        redirect(request["stdout"], request["stderr"])
        os.chdir(request["cwd"])
        code = invoke(request["argv"])
    except BaseException:
        os._exit(CRASHED)
    exit_like_python(code)


def exit_like_python(code: int) -> NoReturn:
    """Interpreter exit as far as a command can tell (join threads, atexit handlers, flush), minus the ~2 s
    teardown of torch's modules: a command that hangs or fails at exit still does so here."""
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what Py_Finalize runs; private, but the only way to run them without the teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def redirect(stdout: str, stderr: str) -> None:
    """Point fds 0-2 at /dev/null and the case's files (sys.stdout and sys.stderr write through them)."""
    write = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, stdout, write), (2, stderr, write)):
        target = os.open(path, flags, 0o644)
        os.dup2(target, fd)
        os.close(target)


def invoke(argv: list[str]) -> int:
    """`python -m mettle ARGV` in this process: main's code, argparse's exit, or CRASHED after the traceback."""
    import mettle
    from mettle.cli import main

    sys.argv = [str(Path(mettle.__file__).parent / "__main__.py"), *argv]
    try:
        return exit_status(main(argv))
    except SystemExit as stop:
        return exit_status(stop.code)
    except BaseException:
        traceback.print_exc()
        return CRASHED
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def exit_status(code: Any) -> int:
    """The status `sys.exit(code)` exits with: None is 0, an int itself, anything else printed and 1."""
    if code is None or isinstance(code, int):
        return code or 0
    print(code, file=sys.stderr)
    return 1


def reap(pid: int, start: float, timeout: float) -> dict[str, Any]:
    """Wait until the deadline (then kill the child's whole group); its exit code and what it left running."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - start > timeout:
            kill_group(pid)
            os.waitpid(pid, 0)
            return {"code": None, "seconds": time.monotonic() - start, "left_running": []}
        time.sleep(0.005)
    seconds = time.monotonic() - start
    left = lingering(pid)
    kill_group(pid)
    return {"code": os.waitstatus_to_exitcode(status), "seconds": seconds, "left_running": left}


def kill_group(pgid: int) -> None:
    """SIGKILL the child's process group: its env workers and actor go with it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def lingering(pgid: int, grace_s: float = 2.0) -> list[str]:
    """Live processes of the group still there after a short grace (an exited command should leave none)."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = []
        for process in psutil.process_iter(["name", "status"]):
            with contextlib.suppress(psutil.Error, OSError):
                if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                    alive.append(f"pid {process.pid} ({process.info['name']})")
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def commands(run: Path) -> list[list[str]]:
    """eval, then resume; resume pins the finished run's target, so a mutated one cannot ask for hours of training."""
    return [["eval", str(run), "--episodes", "2"],
            ["train", "--run", run.name, "--run-dir", str(run.parent), f"total_timesteps={TOTAL_TIMESTEPS}"]]


# ------------------------------------------------------------------ the test's side of the server
@dataclass
class Outcome:
    """How one command ended."""

    code: int | None
    seconds: float
    stderr: str
    left_running: list[str]


class ForkServer:
    """This file run as a script: a warm Python with mettle imported, forking one child per command."""

    def __init__(self, scratch: Path, pristine: Path) -> None:
        shutil.copytree(pristine, scratch / "runs" / "r", symlinks=True)
        self.log = (scratch / "server.err").open("w")
        self.process = subprocess.Popen([sys.executable, __file__, "serve", str(scratch)], cwd=scratch, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log)

    def receive(self) -> dict[str, Any]:
        """The server's next answer; its death is a harness error."""
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.process.wait()}); see {self.log.name}")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def run(self, argv: list[str], cwd: Path, logs: Path) -> Outcome:
        """Run `mettle ARGV` in a forked child with the deadline; its stdout and stderr land in `logs`."""
        assert self.process.stdin is not None
        out, err = logs.with_suffix(".out"), logs.with_suffix(".err")
        request = {"argv": argv, "cwd": str(cwd), "stdout": str(out), "stderr": str(err), "timeout": DEADLINE_S}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.receive()
        stderr = err.read_text(errors="replace") if err.exists() else ""
        return Outcome(answer["code"], answer["seconds"], stderr, answer["left_running"])

    def close(self) -> None:
        """End the server (EOF on its stdin ends its loop)."""
        with contextlib.suppress(OSError):
            assert self.process.stdin is not None
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


# ------------------------------------------------------------------ mutations
@dataclass
class Mutation:
    """What one case did to its run: readable steps, and the entries it touched (paths relative to the run)."""

    steps: list[str] = field(default_factory=list)
    touched: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return "; ".join(self.steps)


def mutate_run(run: Path, outside: Path, source: Path, rng: random.Random) -> Mutation:
    """One to three random mutations; then, for about half the cases, re-sign the touched checkpoints' manifests."""
    mutation = Mutation()
    outside.mkdir(parents=True, exist_ok=True)
    for _ in range(rng.choice([1, 1, 1, 1, 1, 2, 2, 3])):
        target = pick_target(run, rng)
        if target is None:
            break
        relative = target.relative_to(run).as_posix()
        mutation.touched.add(relative)
        step = mutate_dir(target, outside, source / relative, rng) if target.is_dir() \
            else mutate_file(target, outside, source / relative, rng)
        mutation.steps.append(f"{relative}: {step}")
    if rng.random() < 0.5:
        resign(run, mutation)
    return mutation


def pick_target(run: Path, rng: random.Random) -> Path | None:
    """A regular file or real directory of the run; the newest checkpoint and config.json are hit more often."""
    checkpoints = list_checkpoints(run / "checkpoints")
    newest = checkpoints[-1] if checkpoints and not checkpoints[-1].is_symlink() else None
    entries, weights = [], []
    for path in sorted(walk_entries(run)):
        entries.append(path)
        hot = path.name == "config.json" and path.parent == run
        weights.append(3 if hot or (newest is not None and (path == newest or path.parent == newest)) else 1)
    return rng.choices(entries, weights)[0] if entries else None


def walk_entries(root: Path) -> Iterator[Path]:
    """Regular files and real directories under root (links are not followed, nor offered)."""
    for path in root.iterdir():
        if path.is_symlink() or path.name == ".lock":
            continue
        if path.is_dir():
            yield path
            yield from walk_entries(path)
        elif path.is_file():
            yield path


def mutate_file(path: Path, outside: Path, source_twin: Path, rng: random.Random) -> str:
    """A JSON edit, a trainer-state edit or damage to the file itself."""
    if path.suffix == ".json" and rng.random() < 0.6:
        with contextlib.suppress(ValueError, UnicodeDecodeError):
            tree = json.loads(path.read_bytes().decode())
            tree, step = edit_tree(tree, rng, [])
            path.write_text(json.dumps(tree, indent=2))
            return step
    if path.name == TRAINER_STATE and rng.random() < 0.5:
        with contextlib.suppress(Exception):  # already damaged by an earlier step: damage the bytes instead
            tree = torch.load(path, map_location="cpu", weights_only=True)
            tree, step = edit_tree(tree, rng, odd_tensors())
            torch.save(tree, path)
            return step
    if path.suffix == ".safetensors" and rng.random() < 0.4:
        with contextlib.suppress(Exception):  # already damaged by an earlier step: damage the bytes instead
            return edit_weights(path, rng)
    return damage_file(path, outside, source_twin, rng)


def edit_weights(path: Path, rng: random.Random) -> str:
    """Well-formed weights that are still wrong: a NaN, infinite or huge value, a tensor of another shape or dtype."""
    tensors = load_file(path)
    name = rng.choice(sorted(tensors))
    kind = rng.choice(["value", "value", "shape", "dtype"])
    if kind == "value":
        value = rng.choice([math.nan, math.inf, -math.inf, 3e38])
        tensor = tensors[name].clone()
        tensor.view(-1)[rng.randrange(tensor.numel())] = value
        step = f"set one element of {name} to {value}"
    else:
        tensor = torch.zeros(3, 5) if kind == "shape" else tensors[name].to(torch.float64)
        step = f"replaced {name} by a {tuple(tensor.shape)} {tensor.dtype} tensor"
    save_file({**tensors, name: tensor}, path)
    return step


def damage_file(path: Path, outside: Path, source_twin: Path, rng: random.Random) -> str:
    """Flip, truncate, extend, delete, or replace the file with a link (outside, to the twin, dangling) or a dir."""
    kind = rng.choices(["flip", "truncate", "append", "delete", "link-copy", "link-twin", "dangling", "dir"],
                       [30, 15, 5, 15, 10, 10, 7, 8])[0]
    data = path.read_bytes()
    if kind == "flip" and data:
        buffer = bytearray(data)
        offsets = sorted(rng.randrange(len(data)) for _ in range(rng.choice([1, 1, 2, 8])))
        for offset in offsets:
            buffer[offset] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(buffer))
        return f"flipped bytes at {offsets} of {len(data)}"
    if kind in ("flip", "truncate"):
        size = rng.choice([0, 1, len(data) // 2, max(len(data) - 1, 0)])
        path.write_bytes(data[:size])
        return f"truncated to {size} of {len(data)} bytes"
    if kind == "append":
        path.write_bytes(data + bytes(rng.randrange(256) for _ in range(rng.choice([1, 100]))))
        return "appended garbage"
    path.unlink()
    if kind == "delete":
        return "deleted"
    if kind == "dir":
        path.mkdir()
        return "replaced by an empty directory"
    return link_instead(path, data, outside, source_twin, kind)


def link_instead(path: Path, data: bytes, outside: Path, source_twin: Path, kind: str) -> str:
    """Put a symlink where the (removed) file was: to a copy outside the run, to its twin run's file, or nowhere."""
    if kind == "link-copy":
        copy = outside / f"{len(list(outside.iterdir()))}-{path.name}"
        copy.write_bytes(data)
        path.symlink_to(copy)
        return f"replaced by a link to an identical file outside the run ({copy.name})"
    if kind == "link-twin":
        path.symlink_to(source_twin)
        return "replaced by a link to the same file of another run"
    path.symlink_to(outside / "nowhere" / path.name)
    return "replaced by a dangling link"


def mutate_dir(path: Path, outside: Path, source_twin: Path, rng: random.Random) -> str:
    """Delete, empty, or replace a directory with a file, a link to a copy outside, to its twin, or nowhere."""
    kind = rng.choice(["delete", "empty", "file", "link-copy", "link-twin", "dangling"])
    if kind == "link-copy":
        copy = outside / f"{len(list(outside.iterdir()))}-{path.name}"
        shutil.copytree(path, copy, symlinks=True)
    shutil.rmtree(path)
    if kind == "empty":
        path.mkdir()
        return "emptied"
    if kind == "file":
        path.write_text("not a directory\n")
        return "replaced by a file"
    if kind == "link-copy":
        path.symlink_to(copy, target_is_directory=True)
        return f"replaced by a link to an identical copy outside the run ({copy.name})"
    if kind == "link-twin":
        path.symlink_to(source_twin, target_is_directory=True)
        return "replaced by a link to the same directory of another run"
    if kind == "dangling":
        path.symlink_to(outside / "nowhere" / path.name, target_is_directory=True)
        return "replaced by a dangling link"
    return "deleted"


def edit_tree(tree: Any, rng: random.Random, extra_values: list[Any]) -> tuple[Any, str]:
    """Delete or rename a key, or swap a value for another type or a huge number, somewhere in a JSON-like tree."""
    path = random_path(tree, rng)
    if not path or rng.random() < 0.03:
        value = rng.choice(OTHER_VALUES + extra_values)
        return value, f"whole document replaced by {show(value)}"
    *above, key = path
    parent = node_at(tree, above)
    kinds = ["retype", "huge", "delete", "rename"] if isinstance(parent, dict) else ["retype", "huge", "delete"]
    kind = rng.choice(kinds)
    where = "".join(f"[{show(part)}]" for part in path)
    if kind == "delete":
        return edit_at(tree, above, lambda node: without(node, key)), f"deleted {where}"
    if kind == "rename":
        new = rng.choice([f"{key}_", str(key).upper(), f"../{key}", "", "__class__", 7]) if isinstance(key, str) \
            else 1000
        return edit_at(tree, above, lambda node: renamed(node, key, new)), f"renamed {where} to {show(new)}"
    current = type(parent[key])
    pool = HUGE_VALUES if kind == "huge" else [v for v in OTHER_VALUES + extra_values if type(v) is not current]
    value = rng.choice(pool)
    return edit_at(tree, above, lambda node: replaced(node, key, value)), f"set {where} = {show(value)}"


def children(node: Any) -> list[Any]:
    """The keys or indices of a dict, list or tuple; a leaf has none."""
    if isinstance(node, dict):
        return list(node)
    return list(range(len(node))) if isinstance(node, list | tuple) else []


def random_path(tree: Any, rng: random.Random) -> list[Any]:
    """A random descent that stops early now and then, so shallow keys are hit as often as deep list items."""
    path: list[Any] = []
    node = tree
    while keys := children(node):
        key = rng.choice(keys)
        path.append(key)
        node = node[key]
        if rng.random() < 0.3:
            break
    return path


def node_at(tree: Any, path: list[Any]) -> Any:
    """The node at `path`."""
    for key in path:
        tree = tree[key]
    return tree


def edit_at(tree: Any, path: list[Any], edit: Callable[[Any], Any]) -> Any:
    """A copy of `tree` whose node at `path` is `edit(node)` (tuples rebuilt, since they cannot be changed)."""
    if not path:
        return edit(tree)
    key, rest = path[0], path[1:]
    return replaced(tree, key, edit_at(tree[key], rest, edit))


def replaced(node: Any, key: Any, value: Any) -> Any:
    """A copy of a dict, list or tuple with one item replaced."""
    if isinstance(node, dict):
        return {**node, key: value}
    items = list(node)
    items[key] = value
    return tuple(items) if isinstance(node, tuple) else items


def without(node: Any, key: Any) -> Any:
    """A copy of a dict, list or tuple without one item."""
    if isinstance(node, dict):
        return {k: v for k, v in node.items() if k != key}
    items = [v for i, v in enumerate(node) if i != key]
    return tuple(items) if isinstance(node, tuple) else items


def renamed(node: dict[Any, Any], key: Any, new: Any) -> dict[Any, Any]:
    """A copy of a dict with one key renamed in place (order kept)."""
    return {(new if k == key else k): v for k, v in node.items()}


def show(value: Any) -> str:
    """A short repr for a case's description."""
    if isinstance(value, torch.Tensor):
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**20:
        return f"10**{len(str(abs(value))) - 1}" if str(abs(value)).strip("0") == "1" else f"{value:.3e}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def resign(run: Path, mutation: Mutation) -> None:
    """Write fresh manifests for touched checkpoints (not where the manifest itself was the target)."""
    directories = {run / Path(relative).parent for relative in mutation.touched}
    directories |= {run / relative for relative in mutation.touched if (run / relative).is_dir()}
    signed = []
    for directory in sorted(directories):
        if directory.is_symlink() or not directory.is_dir() or (directory / MANIFEST).relative_to(run).as_posix() \
                in mutation.touched:
            continue
        if directory == run:
            write_manifest(directory, (POLICY_WEIGHTS, POLICY_SPEC))
        elif directory.parent.name == "checkpoints" and directory.name.isdigit():
            write_manifest(directory)
        else:
            continue
        signed.append(directory.relative_to(run).as_posix())
    if signed:
        mutation.steps.append(f"manifest re-signed in {', '.join(signed)}")


# ------------------------------------------------------------------ what must hold
@dataclass
class Failure:
    """One broken promise of one case."""

    case: int
    mutation: str
    command: str
    problem: str
    stderr: str = ""


def file_facts(path: Path) -> tuple[Any, ...]:
    """A link's target, a directory, or a file's size, mtime and sha256: any write shows."""
    info = path.lstat()
    if path.is_symlink():
        return ("link", os.readlink(path))
    if path.is_dir():
        return ("dir",)
    return ("file", info.st_size, info.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())


def snapshot(root: Path, skip: Path) -> dict[str, tuple[Any, ...]]:
    """Every entry under root except the `skip` tree (links not followed)."""
    facts = {}
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        dirs[:] = [name for name in dirs if here / name != skip]
        for name in dirs + files:
            facts[str((here / name).relative_to(root))] = file_facts(here / name)
    return facts


def changed(before: dict[str, tuple[Any, ...]], after: dict[str, tuple[Any, ...]]) -> list[str]:
    """Entries made, removed or altered between two snapshots."""
    return sorted(key for key in before.keys() | after.keys() if before.get(key) != after.get(key))


def checkpoint_digests(directory: Path) -> dict[str, str]:
    """A checkpoint directory's entries: a regular file by sha256, anything else by its kind."""
    return {entry.name: hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() and not entry.is_symlink()
            else "link" if entry.is_symlink() else "other" for entry in directory.iterdir()}


def verifies(directory: Path) -> bool:
    """Whether a checkpoint's manifest lists and matches all its files."""
    try:
        verify_manifest(directory, CHECKPOINT_FILES)
    except CheckpointError:
        return False
    return True


def intact_checkpoints(run: Path, pristine: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    """Checkpoints the mutation left alone: real directories, every file as made, verified. Name -> digests."""
    checkpoints = run / "checkpoints"
    if checkpoints.is_symlink():
        return {}
    return {path.name: digests for path in list_checkpoints(checkpoints)
            if not path.is_symlink() and (digests := checkpoint_digests(path)) == pristine.get(path.name)
            and verifies(path)}


def lost_checkpoints(run: Path, intact: dict[str, dict[str, str]]) -> list[str]:
    """Intact checkpoints changed, moved or deleted; pruning counts as deletion unless KEEP_LAST newer ones verify.

    "No intact checkpoint is deleted": one the mutation did not touch stays where it was, byte for byte, unless
    the trainer wrote KEEP_LAST newer complete checkpoints (then pruning it is the design). Moving it to damaged/
    is a loss too: only damaged checkpoints go there.
    """
    checkpoints = run / "checkpoints"
    now = {path.name: path for path in list_checkpoints(checkpoints)}
    problems = []
    for name, digests in sorted(intact.items()):
        if name in now:
            if checkpoint_digests(now[name]) != digests:
                problems.append(f"intact checkpoint {name} was changed")
            continue
        if sum(1 for newer, path in now.items() if newer > name and verifies(path)) >= KEEP_LAST:
            continue
        moved = sorted(path.name for path in (checkpoints / "damaged").glob(f"{name}-*"))
        problems.append(f"intact checkpoint {name} was " + (f"moved to damaged/{moved[0]}" if moved else "deleted"))
    return problems


def command_problems(outcome: Outcome) -> list[str]:
    """Exit 0 or 2, within the deadline, at most MAX_STDERR_LINES of stderr, no traceback, nothing left running."""
    problems = []
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    if outcome.code is None:
        problems.append(f"timed out after {DEADLINE_S:.0f} s")
    elif outcome.code not in (0, 2):
        problems.append(f"exit {outcome.code}" + (" (uncaught exception)" if outcome.code == CRASHED else ""))
    if "Traceback" in outcome.stderr:
        problems.append("traceback on stderr")
    if len(lines) > MAX_STDERR_LINES:
        problems.append(f"{len(lines)} lines of stderr")
    if outcome.left_running:
        problems.append(f"left running: {', '.join(outcome.left_running)}")
    return problems


# ------------------------------------------------------------------ one case, one lane, the test
@dataclass
class Lane:
    """One fork server and the directory its cases run in, beside the run it links to ("another run")."""

    server: ForkServer
    root: Path
    logs: Path
    failed: Path
    pristine: Path

    @property
    def source(self) -> Path:
        """The other run that link mutations point into; it must never change."""
        return self.root / "source" / "r"


def run_case(lane: Lane, number: int, pristine_digests: dict[str, dict[str, str]]) -> list[Failure]:
    """Copy, mutate, run eval and resume, check; a failed case's directory is kept for a look."""
    case_dir = lane.root / f"case-{number:03d}"
    run = case_dir / "runs" / "r"
    shutil.copytree(lane.pristine, run, symlinks=True)
    mutation = mutate_run(run, case_dir / "outside", lane.source, random.Random(f"{SEED}:{number}"))
    intact = intact_checkpoints(run, pristine_digests)
    before = snapshot(lane.root, run)
    failures, ends = [], []
    for argv in commands(run):
        outcome = lane.server.run(argv, case_dir, lane.logs / f"case-{number:03d}-{argv[0]}")
        ends.append(f"{argv[0]} {outcome.code} in {outcome.seconds:.1f} s")
        problems = command_problems(outcome)
        if problems:
            failures.append(Failure(number, str(mutation), f"mettle {argv[0]}", "; ".join(problems), outcome.stderr))
    outside = changed(before, snapshot(lane.root, run))
    if outside:
        problem = f"changed outside the run: {', '.join(outside[:5])}"
        failures.append(Failure(number, str(mutation), "eval+train", problem))
        shutil.rmtree(lane.source.parent)
        shutil.copytree(lane.pristine, lane.source, symlinks=True)
    failures += [Failure(number, str(mutation), "eval+train", problem) for problem in lost_checkpoints(run, intact)]
    with (lane.logs / "cases.txt").open("a") as log:
        log.write(f"case {number}: {', '.join(ends)}{' FAILED' if failures else ''}: {mutation}\n")
    if failures:
        os.replace(case_dir, lane.failed / case_dir.name)
    else:
        shutil.rmtree(case_dir)
    return failures


def run_lane(lane: Lane, numbers: list[int], pristine_digests: dict[str, dict[str, str]], deadline: float,
             ) -> tuple[list[Failure], list[int]]:
    """This lane's cases in turn until the time budget is spent: the failures, and the cases skipped."""
    failures: list[Failure] = []
    skipped = []
    for number in numbers:
        if time.monotonic() > deadline:
            skipped.append(number)
            continue
        failures += run_case(lane, number, pristine_digests)
    return failures, skipped


def signature(failure: Failure) -> str:
    """What makes two failures the same kind: command, problem and the last stderr line, numbers and paths masked."""
    lines = [line for line in failure.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    masked = re.sub(r"\d+", "N", re.sub(r"/\S+", "PATH", f"{failure.problem.split(';')[0]} | {last}"))
    return f"{failure.command}: {masked[:200]}"


def summary(failures: list[Failure], skipped: list[int], ran: int, details: Path) -> str:
    """Failures grouped by kind, each with its cases and one full example."""
    groups: dict[str, list[Failure]] = {}
    for failure in failures:
        groups.setdefault(signature(failure), []).append(failure)
    cases = sorted({failure.case for failure in failures})
    text = [f"{len(cases)} of {ran} cases failed ({len(failures)} failures of {len(groups)} kinds); "
            f"seed {SEED}; details in {details}; replay with METTLE_FUZZ_ONLY={','.join(map(str, cases[:10]))}"]
    if skipped:
        text.append(f"{len(skipped)} cases skipped: the {BUDGET_S:.0f} s budget was spent")
    for key, group in sorted(groups.items(), key=lambda item: -len(item[1])):
        first = group[0]
        tail = "\n        ".join(first.stderr.strip().splitlines()[-4:])
        text.append(f"[{len(group)}x] {key}\n    cases {sorted({f.case for f in group})[:12]}\n"
                    f"    e.g. case {first.case}: {first.mutation}\n        {tail}")
    return "\n".join(text)


def describe(failure: Failure) -> str:
    """One failure in full, for the details file."""
    return (f"case {failure.case}: {failure.mutation}\n  {failure.command}: {failure.problem}\n  "
            + "\n  ".join(failure.stderr.strip().splitlines()[-12:]))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished CartPole run with three checkpoints, made once (in this process: the fuzzed commands are the test)."""
    root = tmp_path_factory.mktemp("pristine")
    result = mettle_in_process(*TRAIN, "--run-dir", str(root), cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(list_checkpoints(root / "r" / "checkpoints")) == KEEP_LAST
    return root / "r"


def test_damaged_runs_eval_and_resume_in_one_line_and_touch_nothing_else(finished_run: Path, tmp_path: Path) -> None:
    """Every mutation ends eval and resume with exit 0 or 2 in 30 s, tersely, outside and intact checkpoints kept."""
    deadline = time.monotonic() + BUDGET_S
    pristine_digests = {path.name: checkpoint_digests(path) for path in list_checkpoints(finished_run / "checkpoints")}
    before = snapshot(finished_run, finished_run / "none")
    numbers = ONLY or list(range(CASES))
    lanes = [make_lane(tmp_path / f"lane-{index}", finished_run) for index in range(max(1, min(LANES, len(numbers))))]
    try:
        for lane in lanes:
            ready = lane.server.receive()
            assert ready == {"threads": 1, "tasks": 1}, f"the fork server must be single-threaded to fork: {ready}"
        with ThreadPoolExecutor(len(lanes)) as pool:
            results = list(pool.map(lambda index: run_lane(lanes[index], numbers[index::len(lanes)],
                                                           pristine_digests, deadline), range(len(lanes))))
    finally:
        for lane in lanes:
            lane.server.close()
    failures = sorted((f for found, _ in results for f in found), key=lambda f: f.case)
    skipped = sorted(n for _, lost in results for n in lost)
    details = tmp_path / "fuzz-failures.txt"
    details.write_text("\n\n".join(describe(failure) for failure in failures))
    assert changed(before, snapshot(finished_run, finished_run / "none")) == [], "the pristine run changed"
    assert not failures, summary(failures, skipped, len(numbers) - len(skipped), details)
    if skipped:  # a loaded machine runs fewer cases rather than failing for time
        warnings.warn(f"{len(skipped)} of {len(numbers)} fuzz cases skipped: the {BUDGET_S:.0f} s budget was spent",
                      stacklevel=1)


def make_lane(root: Path, pristine: Path) -> Lane:
    """A lane's directories, its twin run and its (starting) fork server."""
    for name in ("logs", "failed", "scratch"):
        (root.parent / f"{root.name}-{name}").mkdir(parents=True)
    shutil.copytree(pristine, root / "source" / "r", symlinks=True)
    server = ForkServer(root.parent / f"{root.name}-scratch", pristine)
    return Lane(server, root, root.parent / f"{root.name}-logs", root.parent / f"{root.name}-failed", pristine)


if __name__ == "__main__" and sys.argv[1:2] == ["serve"]:
    serve(Path(sys.argv[2]))
