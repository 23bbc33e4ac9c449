"""Every MPE task of mpe2, agents alike or not, trains with one shared policy and evaluates; none draws a choice it
lacks."""

from __future__ import annotations

import json
import pkgutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

mpe2 = pytest.importorskip("mpe2")

from cli.cli_helpers import mettle_in_process  # noqa: E402
from mettle.envs.agent_types import AgentLayout  # noqa: E402

MPE_TASKS = sorted(module.name for module in pkgutil.iter_modules(mpe2.__path__) if module.name.startswith("simple"))
SLOW = {"simple_world_comm_v3"}
"""Tasks whose 20k steps take longest, left to `-m slow` so the default run stays near a minute."""


def mpe_env(task: str) -> str:
    return f"pettingzoo:mpe2.{task}:parallel_env"


@pytest.mark.parametrize("task", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW else t for t in MPE_TASKS])
def test_every_mpe_task_trains_20k_steps_with_no_override_and_evaluates(tmp_path: Path, task: str) -> None:
    trained = mettle_in_process("train", "--env", mpe_env(task), "--run", "r", "--run-dir", str(tmp_path),
                                "total_timesteps=20000", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    evaluated = mettle_in_process("eval", str(tmp_path / "r"), "--episodes", "2", "--json", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert np.isfinite(json.loads(evaluated.stdout)["mean_return"])


def test_a_speaker_never_gets_a_choice_it_lacks_over_10k_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[tuple[str, Any]] = []
    single = AgentLayout.single

    def recording(layout: AgentLayout, agent: str, row: np.ndarray, error: type[ValueError]) -> Any:
        sent.append((agent, row.tolist()))
        return single(layout, agent, row, error)

    monkeypatch.setattr(AgentLayout, "single", recording)
    trained = mettle_in_process("train", "--env", mpe_env("simple_speaker_listener_v4"), "--run", "r", "--run-dir",
                                str(tmp_path), "total_timesteps=10000", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    speaker = [row[0] for agent, row in sent if agent == "speaker_0"]
    listener = [row[0] for agent, row in sent if agent == "listener_0"]
    assert len(speaker) >= 10_000 // 2 and set(speaker) == {0, 1, 2}, "the speaker's Discrete(3): no 3 or 4"
    assert set(listener) == {0, 1, 2, 3, 4}
