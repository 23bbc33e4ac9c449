"""`mettle eval` verifies checkpoints, falls back to the newest intact one and names it; flaws are one line."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import mettle_in_process, run_mettle

from mettle.rl.policy_files import list_checkpoints, write_manifest

EVAL = ["--episodes", "3", "--json"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short CartPole run with three checkpoints (trained in this process: eval is what is tested)."""
    root = tmp_path_factory.mktemp("runs")
    result = mettle_in_process("train", "--env", "gym:CartPole-v1", "--run", "r", "--run-dir", str(root),
                               "total_timesteps=1536", "checkpoint_interval=1", "progress_interval_s=100", cwd=root)
    assert result.returncode == 0, result.stderr
    assert len(list_checkpoints(root / "r" / "checkpoints")) >= 2
    return root / "r"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run that a test may damage."""
    shutil.copytree(trained, tmp_path / "r")
    return tmp_path / "r"


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_spec(checkpoint: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change policy.json and write a matching manifest, so only the loader's checks stand in the way."""
    spec = json.loads((checkpoint / "policy.json").read_text())
    change(spec)
    (checkpoint / "policy.json").write_text(json.dumps(spec))
    write_manifest(checkpoint)


def evaluate(path: Path) -> tuple[int, dict[str, Any] | None, str]:
    """Exit code, the JSON summary (None on error) and stderr of an in-process `mettle eval`."""
    result = mettle_in_process("eval", str(path), *EVAL, cwd=path.parent)
    code = result.returncode
    return code, json.loads(result.stdout.splitlines()[-1]) if code == 0 else None, result.stderr


DAMAGE: dict[str, Callable[[Path], None]] = {
    "weight-data": lambda c: flip(c / "policy.safetensors", -3),
    "weight-header": lambda c: flip(c / "policy.safetensors", 12),
    "no-manifest": lambda c: (c / "manifest.json").unlink(),
    "unknown-class": lambda c: edit_spec(c, lambda s: s["policy"].update({"class": "evilmod:X"})),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_eval_skips_a_damaged_newest_checkpoint_and_names_the_one_used(run: Path, case: str, caplog: Any) -> None:
    *_, previous, newest = list_checkpoints(run / "checkpoints")
    _, intact, _ = evaluate(previous)
    DAMAGE[case](newest)
    with caplog.at_level(logging.WARNING):
        code, summary, err = evaluate(run)
    assert code == 0, err
    assert f"using checkpoint {previous}" in err
    assert str(newest) in caplog.text and "skipping damaged checkpoint" in caplog.text
    assert summary == intact


@pytest.mark.parametrize(
    "damage,expected",
    [
        (lambda c: flip(c / "policy.safetensors", 12), "truncated or altered"),
        (lambda c: (c / "policy.json").write_text("{not json") or write_manifest(c), "policy.json"),
        (lambda c: edit_spec(c, lambda s: s.update(action_space={"type": "Tuple"})), "unknown space type 'Tuple'"),
        (lambda c: edit_spec(c, lambda s: s["policy"]["kwargs"].update(hidden_size=7)), "does not fit the policy"),
        (lambda c: edit_spec(c, lambda s: s["policy"].update(kwargs={"depth": 3})), "rejects kwargs"),
        (lambda c: flip(c / "policy.safetensors", 12) or write_manifest(c), "policy.safetensors"),
    ],
)
def test_eval_of_one_damaged_checkpoint_is_one_line_exit_2(run: Path, damage: Callable[[Path], None],
                                                            expected: str) -> None:
    newest = list_checkpoints(run / "checkpoints")[-1]
    damage(newest)
    code, _, err = evaluate(newest)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mettle: error:") and expected in err, err


def test_eval_with_every_checkpoint_damaged_is_one_line_exit_2(run: Path) -> None:
    for checkpoint in list_checkpoints(run / "checkpoints"):
        flip(checkpoint / "policy.safetensors", -3)
    result = mettle_in_process("eval", str(run), *EVAL, cwd=run)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mettle: error: no usable checkpoint"), result.stderr
    assert "Traceback" not in result.stderr


def test_a_hostile_policy_json_runs_no_code(run: Path) -> None:
    marker = run / "pwned"
    (run / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\nX = 1\n")
    newest = list_checkpoints(run / "checkpoints")[-1]
    edit_spec(newest, lambda s: s["policy"].update({"class": "evilmod:X"}))
    result = run_mettle("eval", str(newest), *EVAL, cwd=run)  # python -m puts the cwd, and evilmod.py, on sys.path
    assert not marker.exists()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'evilmod:X'" in lines[0] and "register_policy" in lines[0], result.stderr


def test_eval_acts_on_the_runs_torch_threads(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Eval runs torch on the run's `torch_threads` (1 by default), as training did: on 2 cores, torch's own default
    of 2 threads made evaluating CartPole about 100x slower."""
    calls: list[int] = []
    monkeypatch.setattr("torch.set_num_threads", calls.append)
    code, summary, err = evaluate(trained)
    assert code == 0 and summary is not None, err
    assert calls[:-1] == [1]  # the last call is the test helper putting the thread count back
