"""The Loss contract end to end, with a loss written the way a user would, on real CartPole with the mlp policy.

`ProbeLoss` stores two fields per step (the observation's largest |component|, and the rollout step
counter it keeps as rollout state), checks in every minibatch that the fields it reads are the ones its
rollout stored for those steps, keeps update-side state (a running mean its term pulls the value toward,
counts of calls and of `on_update_end`) and reports diagnostics. The tests check where those diagnostics
land, that a checkpoint split leaves the run bitwise unchanged with overlap off and on (on: the rollout
hook runs in the forked actor, whose state the checkpoint must carry), and the contract's errors.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from resume_helpers import checkpointed, train_and_close

from mettle.agent.policy import PolicyOutput, TensorSpec
from mettle.agent.registry import build_policy
from mettle.config import EnvConfig
from mettle.envs.factory import make_environment
from mettle.rl.loss import Loss, RolloutBatch, masked_mean
from mettle.rl.minibatch import Minibatch
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import AdvantageConfig, LossesConfig, PPOConfig, PPOLossConfig, TrainerConfig
from mettle.rl.training import ContextCheckpointer, TrainerComponent
from mettle.rl.training.actor import ActorError
from mettle.rl.training.checkpointer import load_trainer_state
from mettle.rl.training.components.loggers import JsonlLogger
from mettle.rl.training.components.signals import StopAtEpoch
from mettle.rl.training.components.stats import StatsReporter
from mettle.rl.training.overlap import OverlappedRollouts

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS, HORIZON, EPOCHS, STOP = 4, 8, 4, 2
BATCH = ROWS * HORIZON * 2
PEAK, STEP = "probe_obs_peak", "probe_step"
DIAGNOSTICS = ("term", "peak", "running_mean", "step", "updates_ended")
OVERLAP: dict[str, Any] = {"overlap": True, "advantage": AdvantageConfig(method="vtrace")}


def rollout_decisions(rollouts: int) -> int:
    """Hand count of `on_rollout_step` calls: the first rollout decides once more than it stores (the step held
    for the next rollout once every row is full); later rollouts commit that held step first, so decide 16."""
    per_rollout = BATCH // ROWS
    return per_rollout + 1 + (rollouts - 1) * per_rollout


class ProbeLoss(Loss):
    """A user's auxiliary loss: pulls the value toward a running mean of the observations' peaks (tiny weight)."""

    name = "probe"

    def __init__(self, rows: int = ROWS, coef: float = 1e-3, fail_at_step: int | None = None) -> None:
        self.rows, self.coef, self.fail_at_step = rows, coef, fail_at_step
        self.steps_seen = 0
        """Rollout side: `on_rollout_step` calls so far (stored per step in STEP)."""
        self.running_mean = torch.zeros(())
        """Update side: exponential mean of the minibatches' peaks."""
        self.calls = 0
        self.updates_ended = 0
        self.record: dict[int, torch.Tensor] = {}
        """Test-only, not state: each step's stored peaks as this process's rollout made them."""
        self.matched = 0
        """Test-only: minibatch steps found equal to `record` (0 when the rollout ran in another process)."""

    def experience_spec(self) -> dict[str, TensorSpec]:
        """A float derived from the observation and the rollout step's index."""
        return {PEAK: TensorSpec((), torch.float32), STEP: TensorSpec((), torch.int64)}

    def on_rollout_step(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        """Each row's largest |observation component|, and this step's index."""
        if self.steps_seen == self.fail_at_step:
            raise RuntimeError(f"probe broke at rollout step {self.steps_seen}")
        assert batch.rows == slice(0, self.rows), "serial CartPole steps every row together"
        peak = batch.observations.abs().amax(dim=-1)
        self.record[self.steps_seen] = peak.clone()
        step = torch.full((peak.shape[0],), self.steps_seen, dtype=torch.int64)
        self.steps_seen += 1
        return {PEAK: peak, STEP: step}

    def __call__(self, minibatch: Minibatch, output: PolicyOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        peaks, steps = minibatch.data[PEAK], minibatch.data[STEP]
        assert torch.equal(peaks, minibatch.data["observations"].abs().amax(dim=-1)), "PEAK is not its step's"
        assert torch.equal(steps[:, 1:], steps[:, :-1] + 1), "a segment holds one row's consecutive steps"
        self._match_record(minibatch)
        batch_peak = (peaks * minibatch.loss_weights).sum()
        self.running_mean = 0.9 * self.running_mean + 0.1 * batch_peak
        self.calls += 1
        term = self.coef * masked_mean((output.values - self.running_mean).pow(2), minibatch)
        return term, {"term": term.detach(), "peak": batch_peak, "running_mean": self.running_mean.clone(),
                      "step": steps.double().mean(), "updates_ended": torch.tensor(float(self.updates_ended))}

    def _match_record(self, minibatch: Minibatch) -> None:
        """Stored fields equal what this process's rollout returned for those (row, step)s."""
        peaks, steps = minibatch.data[PEAK], minibatch.data[STEP]
        for i, segment in enumerate(minibatch.indices.tolist()):
            row = segment % self.rows  # segment = window * rows + row
            for t, step in enumerate(steps[i].tolist()):
                if step in self.record:  # absent: decided before a resume, or in the actor
                    assert torch.equal(peaks[i, t], self.record[step][row]), (segment, t, step)
                    self.matched += 1

    def on_update_end(self) -> None:
        self.updates_ended += 1

    def state_dict(self) -> dict[str, Any]:
        return {"running_mean": self.running_mean.clone(), "calls": self.calls, "updates_ended": self.updates_ended}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.running_mean = state["running_mean"].clone()
        self.calls, self.updates_ended = state["calls"], state["updates_ended"]

    def rollout_state_dict(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_rollout_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_seen = state["steps_seen"]


class EpochRecorder(TrainerComponent):
    """Keeps each epoch's loss diagnostics, as the trainer left them in ctx.stats.losses."""

    def __init__(self, log: list[dict[str, float]]) -> None:
        super().__init__(epoch_interval=1)
        self.log = log

    def on_epoch_end(self, epoch: int) -> None:
        """Record this epoch's diagnostics."""
        self.log.append(dict(self.context.stats.losses))


def config(epochs: int = EPOCHS, **overrides: Any) -> TrainerConfig:
    return TrainerConfig(total_timesteps=epochs * BATCH, batch_size=BATCH, minibatch_size=ROWS * HORIZON,
                         bptt_horizon=HORIZON, update_epochs=2, seed=11, **overrides)


def cartpole_trainer(cfg: TrainerConfig) -> Trainer:
    env = make_environment(EnvConfig(name="gym:CartPole-v1", num_envs=ROWS, vectorization="serial"), seed=7)
    return Trainer(cfg, env, build_policy("mlp", hidden_size=32), "cpu")


def build(run: Path, log: list[dict[str, float]], stop: int | None = None, **overrides: Any) -> Trainer:
    """A trainer with the probe added first, then a recorder, a metrics.jsonl reporter and a checkpointer."""
    trainer = cartpole_trainer(config(**overrides))
    trainer.add_loss(ProbeLoss())
    trainer.register(EpochRecorder(log))
    trainer.register(StatsReporter([JsonlLogger(run / "metrics.jsonl")]))
    return checkpointed(trainer, run / "checkpoints", stop)


train = train_and_close


def probe(trainer: Trainer) -> ProbeLoss:
    (found,) = [loss for loss in trainer.losses if isinstance(loss, ProbeLoss)]
    return found


def saved_core_loop(run: Path, epoch: int) -> dict[str, Any]:
    state = load_trainer_state(run / "checkpoints" / f"{epoch:08d}" / "trainer_state.pt")
    core_loop: dict[str, Any] = state["ranks"][0]["core_loop"]
    return core_loop


def jsonl_losses(run: Path) -> list[dict[str, float]]:
    """Each metrics.jsonl record's loss/ entries, with the prefix taken off."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k.removeprefix("loss/"): v for k, v in record.items() if k.startswith("loss/")} for record in records]


@pytest.mark.parametrize("overlap", [False, True], ids=["synchronous", "overlapped"])
def test_a_custom_loss_resumes_bitwise_and_reports_under_its_name(overlap: bool, tmp_path: Path) -> None:
    overrides: dict[str, Any] = OVERLAP if overlap else {}
    straight_log: list[dict[str, float]] = []
    straight = train(build(tmp_path / "straight", straight_log, **overrides))
    assert straight.overlapped == overlap
    split_log: list[dict[str, float]] = []
    first = train(build(tmp_path / "split", split_log, stop=STOP, **overrides))
    saved = saved_core_loop(tmp_path / "split", STOP)
    split = build(tmp_path / "split", split_log, **overrides)
    assert split.context.state.epoch == STOP
    train(split)

    # The probe's fields, hooks and diagnostics were used: names under probe/, values as the loss computed them.
    rollouts = EPOCHS + 1 if overlap else EPOCHS  # overlapped, the actor has collected one rollout ahead
    assert straight_log[0].keys() >= {f"probe/{name}" for name in DIAGNOSTICS} | {"ppo_actor/policy_loss"}
    assert [epoch["probe/updates_ended"] for epoch in straight_log] == [0.0, 1.0, 2.0, 3.0]
    assert 0 < straight_log[-1]["probe/term"] < 1e-2 and straight_log[-1]["probe/peak"] > 0
    assert straight_log[0]["probe/step"] == pytest.approx((BATCH // ROWS - 1) / 2)  # steps 0..15, held one not yet
    ours = probe(straight)
    assert ours.state_dict()["updates_ended"] == EPOCHS and ours.calls == EPOCHS * 2 * 2  # 2 passes x 2 minibatches
    assert straight.rollouts.state_dict()["loss_rollout"]["probe"] == {"steps_seen": rollout_decisions(rollouts)}
    if overlap:  # every rollout hook ran in the actor: the learner's copy never stepped, yet the state is the actor's
        assert ours.steps_seen == 0 and ours.record == {} and ours.matched == 0
    else:
        assert ours.steps_seen == rollout_decisions(EPOCHS) and ours.matched == EPOCHS * 2 * BATCH
    assert_same_state(saved["losses"]["probe"], first.core_loop.state_dict()["losses"]["probe"])
    assert saved["loss_rollout"]["probe"] == {"steps_seen": rollout_decisions(STOP + overlap)}
    assert saved["losses"]["probe"]["updates_ended"] == STOP

    # metrics.jsonl carries them under loss/probe/, with the values ctx.stats.losses held.
    for run, log in (("straight", straight_log), ("split", split_log)):
        logged = jsonl_losses(tmp_path / run)
        assert all(f"probe/{name}" in epoch for epoch in logged for name in DIAGNOSTICS)
        assert logged == log

    # Resumed in fresh objects, the run is the unbroken one, bit for bit, the probe's state included.
    assert split_log == straight_log
    for (name, a), b in zip(straight.context.policy.state_dict().items(), split.context.policy.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    assert_same_state(probe(straight).state_dict(), probe(split).state_dict())
    assert split.rollouts.state_dict()["loss_rollout"] == straight.rollouts.state_dict()["loss_rollout"]
    if overlap:  # the resumed learner loaded the saved rollout state, and its actor was forked from it
        assert probe(split).steps_seen == rollout_decisions(STOP + 1)
    else:
        assert probe(split).rollout_state_dict() == ours.rollout_state_dict()


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], key


# ------------------------------------------------------------------------------------------------- errors
def test_add_loss_after_restore_or_train_is_refused(tmp_path: Path) -> None:
    restored = cartpole_trainer(config(epochs=1))
    restored.register(ContextCheckpointer(tmp_path / "checkpoints"))
    assert restored.restore() is None
    with pytest.raises(RuntimeError, match=r"add_loss\(ProbeLoss\) after restore\(\)"):
        restored.add_loss(ProbeLoss())
    restored.context.env.close()
    trained = train(cartpole_trainer(config(epochs=1)))
    with pytest.raises(RuntimeError, match=r"add_loss\(ProbeLoss\) after train\(\)"):
        trained.add_loss(ProbeLoss())
    assert [loss.name for loss in trained.losses] == ["ppo_actor", "ppo_critic"]


class Renamed(ProbeLoss):
    """The probe under another name, declaring the same fields."""

    name = "renamed"


class ClashesWithRewards(ProbeLoss):
    """Declares a field the experience already stores."""

    name = "clash"

    def experience_spec(self) -> dict[str, TensorSpec]:
        return {"rewards": TensorSpec((), torch.float32)}


class NamedPPOActor(ProbeLoss):
    name = "ppo_actor"


def test_names_and_fields_must_be_new() -> None:
    trainer = cartpole_trainer(config(epochs=1))
    try:
        trainer.add_loss(ProbeLoss())
        with pytest.raises(ValueError, match=r"a loss named 'probe' is already added .*give ProbeLoss another"):
            trainer.add_loss(ProbeLoss())
        with pytest.raises(ValueError, match=r"a loss named 'ppo_actor' is already added"):
            trainer.add_loss(NamedPPOActor())
        with pytest.raises(ValueError, match=r"experience fields \['rewards'\] are already stored"):
            trainer.add_loss(ClashesWithRewards())
        with pytest.raises(ValueError, match=rf"experience fields \['{PEAK}', '{STEP}'\] are already stored"):
            trainer.add_loss(Renamed())
        assert [loss.name for loss in trainer.losses] == ["ppo_actor", "ppo_critic", "probe"]
        assert trainer.context.experience.buffers["rewards"].dtype == torch.float32
    finally:
        trainer.context.env.close()


class MissingField(ProbeLoss):
    name = "missing"

    def on_rollout_step(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        return {PEAK: super().on_rollout_step(batch, output)[PEAK]}


class ExtraField(ProbeLoss):
    name = "extra"

    def on_rollout_step(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        fields = super().on_rollout_step(batch, output)
        return {**fields, "undeclared": fields[PEAK]}


@pytest.mark.parametrize(("loss", "returned"), [(MissingField, [PEAK]), (ExtraField, [PEAK, STEP, "undeclared"])])
def test_a_rollout_hook_must_return_exactly_its_fields(loss: type[ProbeLoss], returned: list[str]) -> None:
    trainer = cartpole_trainer(config(epochs=1))
    trainer.add_loss(loss())
    message = (rf"{loss.__name__}\.on_rollout_step returned fields {re.escape(str(sorted(returned)))}, but "
               rf"experience_spec declares \['{PEAK}', '{STEP}'\]")
    with pytest.raises(ValueError, match=message):
        train(trainer)


def test_without_any_loss_train_names_the_fix_and_a_custom_loss_alone_trains() -> None:
    off = LossesConfig(ppo_actor=PPOLossConfig(enabled=False), ppo_critic=PPOLossConfig(enabled=False))
    empty = cartpole_trainer(config(epochs=1, losses=off))
    assert empty.losses == []
    with pytest.raises(ValueError, match=r"no loss to train on: enable losses\.ppo_actor.*Trainer\.add_loss"):
        train(empty)

    alone = cartpole_trainer(config(epochs=1, losses=off))
    before = {k: v.clone() for k, v in alone.context.policy.state_dict().items()}
    alone.add_loss(ProbeLoss(coef=1.0))
    train(alone)
    assert {key.split("/")[0] for key in alone.context.stats.losses if "/" in key} == {"probe"}
    changed = {k for k, v in alone.context.policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if k.startswith("critic_")}  # the probe's term reads only the values


def test_target_kl_needs_the_ppo_actor() -> None:
    with pytest.raises(ValueError, match=r"ppo\.target_kl needs losses\.ppo_actor\.enabled=true"):
        TrainerConfig(ppo=PPOConfig(target_kl=0.02), losses=LossesConfig(ppo_actor=PPOLossConfig(enabled=False)))
    TrainerConfig(ppo=PPOConfig(target_kl=0.02), losses=LossesConfig(ppo_critic=PPOLossConfig(enabled=False)))


def test_a_rollout_hook_failing_in_the_actor_ends_training_and_the_actor() -> None:
    """Step 20 is in the second rollout, which the actor collects while the learner updates on the first."""
    trainer = cartpole_trainer(config(epochs=3, **OVERLAP))
    failing = trainer.add_loss(ProbeLoss(fail_at_step=20))
    assert trainer.overlapped
    with pytest.raises(ActorError, match=r"actor process \(pid \d+\) raised RuntimeError: probe broke at rollout "
                                         r"step 20") as raised:
        train(trainer)
    assert raised.value.raised and "on_rollout_step" in "".join(raised.value.__notes__)
    pid = int(re.search(r"pid (\d+)", str(raised.value)).group(1))  # type: ignore[union-attr]
    assert not psutil.pid_exists(pid), "the actor is reaped"
    assert not [child for child in psutil.Process().children(recursive=True) if child.name() == "mettle-actor"]
    assert isinstance(trainer.rollouts, OverlappedRollouts) and trainer.rollouts.actor is None
    assert isinstance(failing, ProbeLoss) and failing.steps_seen == 0  # it raised over there, not here
    assert trainer.context.state.epoch == 1  # the first update ran on the rollout the actor finished


def resumed_with(run: Path, losses: list[Loss]) -> Trainer:
    """A trainer over the run's checkpoints with `losses` added (instead of those it was trained with)."""
    trainer = cartpole_trainer(config(epochs=4))
    for loss in losses:
        trainer.add_loss(loss)
    trainer.register(ContextCheckpointer(run / "checkpoints", epoch_interval=1))
    trainer.restore()
    return trainer


def test_a_loss_dropped_or_added_on_resume_is_named_and_training_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Held decisions carry the dropped loss's fields (they are left out); an added loss starts fresh, said once."""
    train(build(tmp_path / "run", [], stop=2))
    with caplog.at_level(logging.WARNING):
        dropped = train(resumed_with(tmp_path / "run", []))
    assert dropped.context.state.epoch == 4
    assert "loss 'probe', which this run does not have: it is ignored" in caplog.text
    without = resumed_with(tmp_path / "plain", [])
    without.register(StopAtEpoch(2))
    train(without)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        added = train(resumed_with(tmp_path / "plain", [ProbeLoss()]))
    assert added.context.state.epoch == 4 and probe(added).updates_ended == 2
    assert "holds no rollout_state_dict for loss 'probe' (added since it was written): it starts fresh" in caplog.text
