"""ProgressLogger: plain lines off a terminal, a rich dashboard on one."""

from __future__ import annotations

import io
import re
from typing import Any

import pytest
from rich.console import Console

from mettle.agent.mlp import MLPPolicy
from mettle.envs.testing import BanditEnvironment
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import TrainerComponent
from mettle.rl.training.components.progress import ProgressLogger, format_duration
from mettle.rl.training.components.signals import StopAtEpoch

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class TtyStream(io.StringIO):
    """A captured stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


class FailAt(TrainerComponent):
    """Raises at the end of a given epoch, to exercise on_failure."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch: int) -> None:
        if epoch == self.epoch:
            raise RuntimeError("boom")


def make_trainer(epochs: int, episode_length: int = 8, **settings: Any) -> Trainer:
    cfg = TrainerConfig(total_timesteps=epochs * 64, batch_size=64, minibatch_size=32, bptt_horizon=4,
                        update_epochs=1, **settings)
    env = BanditEnvironment(num_envs=8, episode_length=episode_length)
    return Trainer(cfg, env, MLPPolicy(), "cpu", run_name="tiny-run")


def render(renderable: Any) -> str:
    console = Console(file=io.StringIO(), width=120, force_terminal=True)
    console.print(renderable)
    return ANSI.sub("", console.file.getvalue())  # type: ignore[attr-defined]


def test_plain_lines_report_steps_speed_return_and_time_split() -> None:
    stream = io.StringIO()
    trainer = make_trainer(epochs=3)
    progress = trainer.register(ProgressLogger(stream=stream, interval_s=0))
    trainer.train()
    assert not progress.live_mode
    lines = stream.getvalue().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["epoch 1", "epoch 2", "epoch 3", "done epoch 3"]
    assert "steps 64/192" in lines[0] and "steps 192/192" in lines[-1]
    split = re.compile(r"\| rollout \d+% train \d+% other \d+% \|")
    for line in lines:
        assert "sps" in line and "return" in line and "eta" in line and "policy_loss" in line
        assert re.search(r"\| value_loss \d+\.\d{4} \|", line), line
        assert split.search(line), line


def test_plain_lines_leave_out_a_disabled_loss_rather_than_print_nan() -> None:
    stream = io.StringIO()
    trainer = make_trainer(epochs=2, losses={"ppo_critic": {"enabled": False}})
    trainer.register(ProgressLogger(stream=stream, interval_s=0))
    trainer.train()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3 and all("policy_loss" in line and "entropy" in line for line in lines)
    assert not [line for line in lines if "value_loss" in line or "nan" in line]


def test_plain_lines_show_a_dash_before_the_first_episode_ends() -> None:
    stream = io.StringIO()
    trainer = make_trainer(epochs=1, episode_length=1000)
    trainer.register(ProgressLogger(stream=stream, interval_s=0))
    trainer.train()
    line = stream.getvalue().splitlines()[0]
    assert "| return - | length - |" in line and "nan" not in line, line


def test_interval_limits_plain_lines() -> None:
    stream = io.StringIO()
    trainer = make_trainer(epochs=3)
    trainer.register(ProgressLogger(stream=stream, interval_s=3600))
    trainer.train()
    assert [line.split(" |")[0] for line in stream.getvalue().splitlines()] == ["epoch 1", "done epoch 3"]


def test_dashboard_shows_every_field() -> None:
    trainer = make_trainer(epochs=4)
    trainer.register(StopAtEpoch(2))  # stop after two epochs of the four the dashboard expects
    progress = trainer.register(ProgressLogger(stream=io.StringIO(), interval_s=3600, live=False))
    trainer.train()
    progress.on_step([{"episode_return": 5.0, "episode_length": 8, "game/ore_mined": 3.0, "agent/moves": 7.0}])
    text = render(progress.build_dashboard())
    for field in ("tiny-run", "agent steps", "128 / 256 (50.0%)", "ETA", "SPS", "SPS avg", "epoch", "rollout",
                  "train", "other", "session", "return", "length", "game/ore_mined", "agent/moves"):
        assert field in text, field
    for name in ("ppo_actor/policy_loss", "ppo_critic/value_loss", "ppo_actor/entropy", "ppo_actor/approx_kl",
                 "ppo_actor/clipfrac", "explained_variance"):
        assert re.search(rf"{name}\s+-?[0-9]", text), name
    assert re.search(r"epoch\s+2\b", text)
    assert re.search(r"rollout\s+\d+%\s+\d+%", text) and re.search(r"train\s+\d+%\s+\d+%", text)
    assert re.search(r"return\s+\d+\.\d+", text)
    assert re.search(r"ETA \d+:\d\d:\d\d", text)


def test_auto_mode_follows_the_stream() -> None:
    assert not ProgressLogger(stream=io.StringIO()).live_mode
    assert ProgressLogger(stream=TtyStream()).live_mode
    assert not ProgressLogger(stream=TtyStream(), live=False).live_mode
    assert ProgressLogger(console=Console(file=io.StringIO()), live=True).live_mode


def test_live_display_runs_and_stops_at_the_end() -> None:
    stream = TtyStream()
    trainer = make_trainer(epochs=2)
    progress = trainer.register(ProgressLogger(console=Console(file=stream, width=120, force_terminal=True),
                                               interval_s=0))
    trainer.train()
    assert progress._live is None
    text = ANSI.sub("", stream.getvalue())
    assert "mettle · done · tiny-run" in text and "128 / 128 (100.0%)" in text


def test_live_display_stops_on_failure() -> None:
    trainer = make_trainer(epochs=3)
    progress = trainer.register(ProgressLogger(stream=TtyStream(), interval_s=0))
    trainer.register(FailAt(2))
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train()
    assert progress.live_mode and progress._live is None


@pytest.mark.parametrize("seconds,text", [(None, "?"), (float("inf"), "?"), (0.4, "0:00:00"), (3725, "1:02:05")])
def test_format_duration(seconds: float | None, text: str) -> None:
    assert format_duration(seconds) == text
