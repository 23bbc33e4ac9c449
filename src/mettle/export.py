"""`mettle export RUN_DIR --format onnx|torchscript`: a run's acting policy as one graph file and a JSON sidecar.

The graph is the policy's `export_step`: observations (and, for a recurrent policy, its state) in; logits (for a
Box action space the Gaussian's mean and log-std), values (and the new state) out. Observation normalisation and
invalid-action masks are inside it, as in the policy's forward; sampling is left to the caller, whom the sidecar
tells how (the action spaces, which state feeds back into which input).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from mettle.agent.policy import NON_MEMORY_FIELDS, Policy
from mettle.agent.registry import policy_spec
from mettle.config import ConfigError
from mettle.contracts import PolicyEnvInfo
from mettle.errors import one_line
from mettle.files import atomic_write
from mettle.rl.policy_files import POLICY_WEIGHTS, file_digest, space_to_json

FORMATS = {"onnx": ".onnx", "torchscript": ".pt"}
"""Export formats and the suffix of their default file name."""
ONNX_MODULES = ("onnx", "onnxscript", "onnxruntime")
INSTALL_HINT = 'pip install -e ".[export]" (or: pip install onnx onnxscript onnxruntime)'
BATCH = "batch"
"""The name of the dynamic first dimension of every input and output."""
EXAMPLE_ROWS = 2
"""Rows of the example batch the graph is built from (the batch dimension stays dynamic)."""
CHECK_ROWS = 5
"""Rows of the batch the written file is checked on: another size than the example's."""
TOLERANCE = 1e-5
"""Largest difference from the eager policy that the written file may show."""


@dataclass(frozen=True)
class Port:
    """One input or output of the graph: its name, shape ("batch" first) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str


class ActingGraph(nn.Module):
    """The policy's `export_step` with flat outputs: (logits | mean, log_std), values, new state."""

    def __init__(self, policy: Policy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, observations: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """One step of [B, ...] observations from the state given; the Gaussian's log-std is repeated per row."""
        logits, values, *new_state = self.policy.export_step(observations, *state)
        log_std = getattr(self.policy, "log_std", None)
        heads = (logits,) if log_std is None else (logits, log_std.expand_as(logits))
        return (*heads, values, *new_state)


def export_command(run_dir: Path, fmt: str, out: Path | None) -> int:
    """Load the run's newest usable policy, write the graph and its sidecar, check the file against the policy."""
    from mettle.run import load_newest_policy

    if fmt == "onnx":
        require_onnx()
    if not run_dir.exists():
        raise ConfigError(f"run directory {run_dir} does not exist")
    target = out if out is not None else run_dir / f"policy{FORMATS[fmt]}"
    check_target(target)
    policy, env_info, used = load_newest_policy(run_dir, "cpu")
    policy.eval()
    graph = exportable(policy, env_info)
    inputs, outputs = ports(policy, env_info)
    try:
        with quiet():
            write_graph(graph, fmt, example_inputs(inputs, env_info, EXAMPLE_ROWS, seed=0), (inputs, outputs), target)
            difference = check_file(graph, fmt, inputs, target, env_info)
        sidecar = describe(policy, env_info, fmt, inputs, outputs, target, run_dir, used)
        sidecar["checked_max_abs_difference"] = difference
        atomic_write(sidecar_path(target), lambda f: f.write(json.dumps(sidecar, indent=2).encode()))
    except OSError as error:  # a read-only or full disk: one line, not a traceback
        raise ConfigError(f"cannot write {target}: {one_line(error)}; choose another --out") from None
    print(f"exported {sidecar['policy']['class']} policy from {used} to {target} and {sidecar_path(target)} "
          f"(inputs {', '.join(p.name for p in inputs)}; outputs {', '.join(p.name for p in outputs)}; "
          f"max abs difference from the eager policy {difference:.1e})")
    return 0


def require_onnx() -> None:
    """The ONNX exporter needs onnx and onnxscript, and the written file is checked in onnxruntime."""
    missing = [name for name in ONNX_MODULES if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"--format onnx needs {', '.join(missing)}, not installed; install with: {INSTALL_HINT}")


def check_target(target: Path) -> None:
    """The file to write is a file name in a directory that exists (the graph and FILE.json land there)."""
    if target.is_dir():
        raise ConfigError(f"--out {target} is a directory; name a file, e.g. {target / 'policy.onnx'}")
    if not target.parent.is_dir():
        raise ConfigError(f"--out {target}: directory {target.parent} does not exist; create it or choose another")
    try:  # the exporters report a file they cannot open as a RuntimeError deep inside: find out before
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as error:
        raise ConfigError(f"--out {target}: cannot write in {target.parent} ({one_line(error)}); choose another") \
            from None


def sidecar_path(target: Path) -> Path:
    """FILE.json beside FILE."""
    return target.with_name(target.name + ".json")


def exportable(policy: Policy, env_info: PolicyEnvInfo) -> ActingGraph:
    """The graph module, or one line on what cannot be exported."""
    if type(policy).export_step is Policy.export_step:
        raise ConfigError(f"{type(policy).__name__} defines no export_step, so it cannot be exported; export an "
                          "mlp, lstm, token or per-type policy")
    if env_info.continuous_actions and getattr(policy, "log_std", None) is None:
        raise ConfigError(f"{type(policy).__name__} on a Box action space has no single log-std to export "
                          "(per-type Gaussian heads are not exported); export a shared mlp or lstm policy")
    return ActingGraph(policy).eval()


def ports(policy: Policy, env_info: PolicyEnvInfo) -> tuple[list[Port], list[Port]]:
    """The graph's inputs and outputs, named as the policy's experience spec names them."""
    spec = policy.get_agent_experience_spec()
    observations = spec["observations"]
    state = [(graph_name(name), tensor) for name, tensor in spec.items() if name not in NON_MEMORY_FIELDS]
    inputs = [Port("observations", (BATCH, *observations.shape), dtype_name(observations.dtype))]
    inputs += [Port(name, (BATCH, *tensor.shape), dtype_name(tensor.dtype)) for name, tensor in state]
    if env_info.continuous_actions:
        dims = int(np.prod(env_info.action_space.shape or (1,)))
        heads = [Port("mean", (BATCH, dims), "float32"), Port("log_std", (BATCH, dims), "float32")]
    else:
        heads = [Port("logits", (BATCH, sum(env_info.action_nvec)), "float32")]
    outputs = [*heads, Port("values", (BATCH,), "float32")]
    outputs += [Port(f"{name}_out", (BATCH, *tensor.shape), dtype_name(tensor.dtype)) for name, tensor in state]
    return inputs, outputs


def graph_name(field: str) -> str:
    """A memory field as a graph input name: `type0.lstm_h` becomes `type0_lstm_h`."""
    return field.replace(".", "_")


def dtype_name(dtype: torch.dtype) -> str:
    """`float32`, `uint8`: numpy's name for a torch dtype."""
    return str(dtype).removeprefix("torch.")


def example_inputs(inputs: list[Port], env_info: PolicyEnvInfo, rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Observations sampled from the space and random state, `rows` rows of each input."""
    space = env_info.observation_space
    space.seed(seed)
    generator = torch.Generator().manual_seed(seed)
    observations = np.stack([space.sample() for _ in range(rows)])
    first = inputs[0]
    tensors = [torch.as_tensor(observations).to(getattr(torch, first.dtype)).reshape(rows, *row_shape(first))]
    tensors += [torch.randn((rows, *row_shape(port)), generator=generator) * 0.5 for port in inputs[1:]]
    return tuple(tensors)


def row_shape(port: Port) -> tuple[int, ...]:
    """One row's shape: the port's without the batch dimension."""
    return tuple(int(size) for size in port.shape[1:])


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Keep the exporters' warnings and progress lines off the terminal: the command prints one summary."""
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def write_graph(graph: ActingGraph, fmt: str, example: tuple[torch.Tensor, ...],
                interface: tuple[list[Port], list[Port]], target: Path) -> None:
    """Build the graph from an example batch and write it atomically (a temp file in the target's directory)."""
    staged = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        with torch.no_grad():
            if fmt == "onnx":
                write_onnx(graph, example, *interface, staged)
            else:
                torch.jit.save(torch.jit.trace(graph, example, check_trace=False),  # type: ignore[no-untyped-call]
                               str(staged))
        os.replace(staged, target)
    finally:
        staged.unlink(missing_ok=True)


def write_onnx(graph: ActingGraph, example: tuple[torch.Tensor, ...], inputs: list[Port], outputs: list[Port],
               staged: Path) -> None:
    """torch.onnx's dynamo exporter, every input's first dimension dynamic."""
    batch = torch.export.Dim(BATCH, min=1)
    state = tuple({0: batch} for _ in example[1:])  # *state: one nested entry, absent when there is none
    dynamic = ({0: batch}, state) if state else ({0: batch},)
    program = torch.onnx.export(graph, example, dynamo=True, dynamic_shapes=dynamic, verbose=False,
                                input_names=[port.name for port in inputs],
                                output_names=[port.name for port in outputs], optimize=True)
    assert program is not None
    program.save(str(staged))


def run_file(target: Path, fmt: str, inputs: list[Port], arrays: tuple[np.ndarray, ...]) -> list[np.ndarray]:
    """The written file's outputs for these inputs, run as a user runs it (onnxruntime, or torch.jit.load)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        results: list[np.ndarray] = session.run(None, {port.name: array for port, array in zip(inputs, arrays,
                                                                                            strict=True)})
        return results
    module = torch.jit.load(str(target))  # type: ignore[no-untyped-call]
    with torch.no_grad():
        return [tensor.numpy() for tensor in module(*(torch.from_numpy(array) for array in arrays))]


def check_file(graph: ActingGraph, fmt: str, inputs: list[Port], target: Path, env_info: PolicyEnvInfo) -> float:
    """The largest difference between the file and the eager policy on a batch of another size; over TOLERANCE
    the file is removed and the export refused (an exporter bug must not ship a policy that acts otherwise)."""
    example = example_inputs(inputs, env_info, CHECK_ROWS, seed=1)
    with torch.no_grad():
        expected = [tensor.numpy() for tensor in graph(*example)]
    got = run_file(target, fmt, inputs, tuple(tensor.numpy() for tensor in example))
    difference = max(float(np.abs(a - b).max()) for a, b in zip(got, expected, strict=True))
    if not difference <= TOLERANCE:
        target.unlink(missing_ok=True)
        raise ConfigError(f"the exported {fmt} graph differs from the policy by {difference:.2e} (more than "
                          f"{TOLERANCE}); nothing was written; export to the other --format")
    return difference


def describe(policy: Policy, env_info: PolicyEnvInfo, fmt: str, inputs: list[Port], outputs: list[Port],
             target: Path, run_dir: Path, checkpoint: Path) -> dict[str, Any]:
    """The sidecar: what goes in and comes out, the spaces to act in, and where the policy came from."""
    state = [{"input": port.name, "output": f"{port.name}_out"} for port in inputs[1:]]
    return {
        "format": fmt,
        "file": target.name,
        "source": {"run_dir": str(run_dir.resolve()), "checkpoint": str(checkpoint.resolve()),
                   "weights_sha256": file_digest(checkpoint / POLICY_WEIGHTS)["sha256"]},
        "policy": policy_spec(policy),
        "inputs": [asdict(port) for port in inputs],
        "outputs": [asdict(port) for port in outputs],
        "batch_dimension": {"index": 0, "name": BATCH},
        "recurrent_state": state,
        "state_reset": "feed zeros as the state at an episode's first step, and each *_out back as the next input"
                       if state else None,
        "observation_space": space_to_json(env_info.observation_space),
        "action_space": action_description(env_info),
        "observation_normalization_in_graph": policy.observation_normalizer is not None,
        "invalid_action_mask_in_graph": policy.invalid_actions is not None,
    }


def action_description(env_info: PolicyEnvInfo) -> dict[str, Any]:
    """The action space, with how to act on the outputs: per-head slices of the logits, or a Box's bounds."""
    space = env_info.action_space
    described = space_to_json(space)
    if isinstance(space, gym.spaces.Box):
        return described | {"shape": list(space.shape), "act": "mean (greedy) or mean + exp(log_std) * N(0, 1), "
                                                                  "clipped to [low, high]"}
    return described | {"nvec": list(env_info.action_nvec),
                        "act": "split logits by nvec; per head argmax (greedy) or sample softmax(logits)"}
