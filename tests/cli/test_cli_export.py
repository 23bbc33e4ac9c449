"""`mettle export`: the ONNX and TorchScript files act as the eager policy does, on the env's own observations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cli_helpers import mettle_in_process

from mettle.agent.normalizer import batch_moments
from mettle.agent.policy import Policy
from mettle.config import EnvConfig, PolicyConfig, RunConfig, build_run_config
from mettle.contracts import TrainingEnvironment
from mettle.recipes import recipe_for

ARENA = {"num_agents": 2, "width": 7, "height": 6, "mines": 2, "altars": 1, "max_steps": 8}
SPEAKER_LISTENER = "pettingzoo:mpe2.simple_speaker_listener_v4:parallel_env"
RUNS: dict[str, tuple[EnvConfig, PolicyConfig]] = {
    "mlp": (EnvConfig(name="gym:CartPole-v1", num_envs=2), PolicyConfig(kind="mlp", hidden_size=16)),
    "lstm": (EnvConfig(name="gym:CartPole-v1", num_envs=2), PolicyConfig(kind="lstm", hidden_size=16)),
    "token": (EnvConfig(name="mettagrid:arena", num_envs=2, kwargs=ARENA), PolicyConfig(kind="token", hidden_size=16)),
    "per_type": (EnvConfig(name=SPEAKER_LISTENER, num_envs=2),
                 PolicyConfig(kind="lstm", hidden_size=16, share=False)),
}
"""Runs as `mettle train` leaves them (config.json, a policy); Pendulum is built from its recipe below."""
FORMATS = ("onnx", "torchscript")
ROWS = 100
TOLERANCE = 1e-5

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")]


def collect(env: TrainingEnvironment, policy: Policy, rows: int, seed: int = 3) -> np.ndarray:
    """`rows` observations the environment gives while the (untrained) policy acts in it."""
    env.reset(seed=seed)
    seen: list[np.ndarray] = []
    while sum(len(batch) for batch in seen) < rows:
        batch = env.get_observations()
        seen.append(batch.observations.copy())
        env.send_actions(policy.act(batch, "cpu"), batch.rows)
    policy.reset_memory()
    return np.concatenate(seen)[:rows]


def make_run(root: Path, name: str, cfg: RunConfig) -> tuple[Path, np.ndarray]:
    """A run directory with an untrained policy (a normaliser fitted to real observations when the config asks for
    one), and ROWS observations from its environment."""
    from mettle.envs.factory import make_environment
    from mettle.rl.policy_files import save_policy
    from mettle.run import attach_observation_normalizer, policy_for_config

    run = root / name
    run.mkdir()
    (run / "config.json").write_text(cfg.model_dump_json())
    env = make_environment(cfg.env)
    try:
        policy = policy_for_config(cfg, env.policy_env_info)
        policy.initialize_to_environment(env.policy_env_info, "cpu")
        observations = collect(env, policy, ROWS)
        if cfg.env.normalize_observations:
            attach_observation_normalizer(cfg, policy, env.policy_env_info)
            assert policy.observation_normalizer is not None
            policy.observation_normalizer.merge(batch_moments(torch.as_tensor(observations).reshape(ROWS, -1)))
        save_policy(policy, env.policy_env_info, run, agent_step=0, epoch=0)
    finally:
        env.close()
    return run, observations


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, np.ndarray]]:
    """One run per policy kind, plus Pendulum (Box actions) with its recipe's observation normalisation."""
    root = tmp_path_factory.mktemp("runs")
    made = {kind: make_run(root, kind, RunConfig(env=env, policy=policy)) for kind, (env, policy) in RUNS.items()}
    pendulum = build_run_config(["env.name=gym:Pendulum-v1", "env.num_envs=2", "policy.hidden_size=16"],
                                defaults=recipe_for("gym:Pendulum-v1", None))
    assert pendulum.env.normalize_observations, "the Pendulum recipe normalises observations"
    made["box"] = make_run(root, "box", pendulum)
    return made


@pytest.fixture(scope="module")
def exported(runs: dict[str, tuple[Path, np.ndarray]]) -> dict[tuple[str, str], Path]:
    """Every run exported in every format with `mettle export`."""
    files = {}
    for kind, (run, _) in runs.items():
        for fmt in FORMATS:
            out = run / f"exported-{fmt}"
            result = mettle_in_process("export", str(run), "--format", fmt, "--out", str(out), cwd=run)
            assert result.returncode == 0, result.stderr
            assert result.stdout.startswith("exported "), result.stdout
            files[kind, fmt] = out
    return files


def load(run: Path) -> Policy:
    """The run's policy as eval loads it."""
    from mettle.rl.policy_files import load_policy

    policy, _ = load_policy(run)
    return policy.eval()


def eager_step(policy: Policy, observations: np.ndarray, first: bool) -> list[np.ndarray]:
    """What the graph should give: the policy's own rollout forward (memory kept per row), greedy."""
    obs = torch.as_tensor(observations).unsqueeze(1)
    starts = torch.full((len(observations), 1), first)
    with torch.no_grad():
        output = policy(obs, starts, rows=slice(0, len(observations)), deterministic=True)
    assert output.logits is not None
    heads = [output.logits[:, 0]]
    log_std = getattr(policy, "log_std", None)
    if log_std is not None:
        heads.append(log_std.detach().expand_as(heads[0]))
    state = policy.memory_state()
    return [tensor.numpy() for tensor in (*heads, output.values[:, 0], *state.values())]


def run_exported(path: Path, fmt: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The file's outputs, run as a user would: onnxruntime, or torch.jit.load."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return list(session.run(None, feeds))
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return [tensor.numpy() for tensor in module(*(torch.from_numpy(array) for array in feeds.values()))]


def sidecar(path: Path) -> dict[str, Any]:
    """FILE.json."""
    data: dict[str, Any] = json.loads(path.with_name(path.name + ".json").read_text())
    return data


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", [*RUNS, "box"])
@pytest.mark.parametrize("rows", [ROWS, 7])
def test_exported_file_acts_as_the_eager_policy(runs: dict[str, tuple[Path, np.ndarray]],
                                                exported: dict[tuple[str, str], Path],
                                                kind: str, fmt: str, rows: int) -> None:
    run, observations = runs[kind]
    path, policy = exported[kind, fmt], load(run)
    observations = observations[:rows]
    described = sidecar(path)
    names = [port["name"] for port in described["inputs"]]
    state = {name: np.zeros((rows, *port["shape"][1:]), np.float32)
             for name, port in zip(names, described["inputs"], strict=True) if name != "observations"}
    dtype = described["inputs"][0]["dtype"]
    policy.reset_memory()
    worst = 0.0
    for first in (True, False):  # the second step feeds the graph's state back, as the policy keeps its own
        expected = eager_step(policy, observations, first)
        got = run_exported(path, fmt, {"observations": observations.astype(dtype), **state})
        assert len(got) == len(expected) == len(described["outputs"])
        for port, a, b in zip(described["outputs"], got, expected, strict=True):
            assert list(a.shape) == [rows, *port["shape"][1:]], port
            worst = max(worst, float(np.abs(a - b).max()))
        state = dict(zip(state, got[len(got) - len(state):], strict=True))
        if not state:
            break
    print(f"{kind} {fmt} rows={rows}: max abs difference {worst:.2e}")
    assert worst <= TOLERANCE


def test_the_normaliser_is_in_the_graph(runs: dict[str, tuple[Path, np.ndarray]],
                                        exported: dict[tuple[str, str], Path]) -> None:
    run, observations = runs["box"]
    policy = load(run)
    assert policy.observation_normalizer is not None and float(policy.observation_normalizer.count) == ROWS
    mean, _, values = run_exported(exported["box", "onnx"], "onnx", {"observations": observations.astype(np.float32)})
    policy.observation_normalizer = None
    raw_mean, _, raw_values = eager_step(policy, observations, True)
    # far above the 1e-5 the file matches the policy by (the untrained actor's means are small: its gain is 0.01)
    assert float(np.abs(values - raw_values).max()) > 1e-2 and float(np.abs(mean - raw_mean).max()) > 1e-4
    assert sidecar(exported["box", "onnx"])["observation_normalization_in_graph"] is True


def test_sidecar_names_the_interface(runs: dict[str, tuple[Path, np.ndarray]],
                                     exported: dict[tuple[str, str], Path]) -> None:
    lstm = sidecar(exported["lstm", "onnx"])
    assert [(p["name"], p["shape"], p["dtype"]) for p in lstm["inputs"]] == [
        ("observations", ["batch", 4], "float32"), ("lstm_h", ["batch", 16], "float32"),
        ("lstm_c", ["batch", 16], "float32")]
    assert [(p["name"], p["shape"]) for p in lstm["outputs"]] == [
        ("logits", ["batch", 2]), ("values", ["batch"]), ("lstm_h_out", ["batch", 16]), ("lstm_c_out", ["batch", 16])]
    assert lstm["recurrent_state"] == [{"input": "lstm_h", "output": "lstm_h_out"},
                                       {"input": "lstm_c", "output": "lstm_c_out"}]
    assert lstm["action_space"]["nvec"] == [2] and lstm["observation_space"]["type"] == "Box"
    assert lstm["source"]["run_dir"] == str(runs["lstm"][0].resolve()) and lstm["policy"]["class"] == "lstm"
    token = sidecar(exported["token", "torchscript"])
    assert token["format"] == "torchscript" and token["inputs"][0]["dtype"] == "uint8"
    box = sidecar(exported["box", "onnx"])
    assert [p["name"] for p in box["outputs"]] == ["mean", "log_std", "values"]
    assert box["action_space"]["shape"] == [1] and box["action_space"]["type"] == "Box"
    per_type = sidecar(exported["per_type", "onnx"])
    assert per_type["invalid_action_mask_in_graph"] is True
    assert [p["name"] for p in per_type["inputs"]][1:] == ["type0_lstm_h", "type0_lstm_c", "type1_lstm_h",
                                                           "type1_lstm_c"]


def test_the_default_file_is_in_the_run_directory(runs: dict[str, tuple[Path, np.ndarray]]) -> None:
    run = runs["mlp"][0]
    result = mettle_in_process("export", str(run), "--format", "torchscript", cwd=run)
    assert result.returncode == 0, result.stderr
    assert (run / "policy.pt").is_file() and sidecar(run / "policy.pt")["file"] == "policy.pt"


def test_a_run_without_a_policy_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(RunConfig().model_dump_json())
    result = mettle_in_process("export", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("mettle: error:"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    missing = mettle_in_process("export", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("mettle: error:"), missing.stderr


def test_a_damaged_policy_is_one_line(runs: dict[str, tuple[Path, np.ndarray]], tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["mlp"][0], run)
    (run / "policy.json").write_text("{not json")
    result = mettle_in_process("export", str(run), "--out", str(tmp_path / "p.onnx"), cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("mettle: error:"), result.stderr
    assert not (tmp_path / "p.onnx").exists()


def test_unknown_format_is_a_usage_error(runs: dict[str, tuple[Path, np.ndarray]]) -> None:
    result = mettle_in_process("export", str(runs["mlp"][0]), "--format", "tflite", cwd=runs["mlp"][0])
    assert result.returncode == 2 and "invalid choice: 'tflite'" in result.stderr


def test_missing_onnx_says_how_to_install(runs: dict[str, tuple[Path, np.ndarray]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name, *a))
    result = mettle_in_process("export", str(runs["mlp"][0]), "--format", "onnx", cwd=runs["mlp"][0])
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("mettle: error: --format onnx needs onnxscript, not installed; install with: "
                                     'pip install -e ".[export]" (or: pip install onnx onnxscript onnxruntime)')


def test_a_per_type_gaussian_policy_is_refused_in_one_line() -> None:
    import gymnasium as gym

    from mettle.agent.registry import build_policy
    from mettle.config import ConfigError
    from mettle.contracts import PolicyEnvInfo
    from mettle.export import exportable

    info = PolicyEnvInfo(gym.spaces.Box(-1, 1, (5,), np.float32), gym.spaces.Box(-1, 1, (2,), np.float32), 2,
                         extras={"agent_types": ["a", "b"]})
    policy = build_policy("per_type", kind="mlp", types=2, hidden_size=8)
    policy.initialize_to_environment(info, "cpu")
    with pytest.raises(ConfigError, match="per-type Gaussian heads are not exported"):
        exportable(policy, info)


def test_an_out_that_cannot_be_written_is_one_line(runs: dict[str, tuple[Path, np.ndarray]], tmp_path: Path) -> None:
    run = runs["mlp"][0]
    for out, expected in ((tmp_path, "is a directory"), (tmp_path / "no" / "p.onnx", "does not exist"),
                          (Path("/proc/p.onnx"), "cannot write in /proc")):
        result = mettle_in_process("export", str(run), "--out", str(out), cwd=tmp_path)
        assert result.returncode == 2 and result.stderr.startswith("mettle: error:"), result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
