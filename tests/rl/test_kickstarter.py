"""Kickstarter: its terms against hand-worked numbers, its annealing, the teacher's place in the rollout, teacher
loading and its errors, exact resume with a recurrent teacher, and distillation on MettaGrid.

The oracle minibatch is 2 rows x 2 steps over 2 actions. Each live step's teacher and student distributions are
chosen so that KL(teacher || student) can be written down exactly; the dead step holds extreme numbers, so any
leak of it into a mean shows.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from resume_helpers import checkpointed, train_and_close

from mettle.agent.distributions import kl_divergence
from mettle.agent.lstm import LSTMPolicy
from mettle.agent.policy import Policy, PolicyOutput
from mettle.agent.registry import build_policy
from mettle.agent.token import TokenPolicy
from mettle.config import ConfigError, EnvConfig, build_run_config
from mettle.contracts import PolicyEnvInfo
from mettle.envs.factory import make_environment
from mettle.rl.loss import Kickstarter, RolloutBatch
from mettle.rl.loss.kickstarter import TEACHER_LOGITS, TEACHER_VALUES
from mettle.rl.minibatch import Minibatch
from mettle.rl.policy_files import save_policy
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import AdvantageConfig, KickstarterConfig, LossesConfig, TrainerConfig
from mettle.rl.training import TrainerComponent
from mettle.rl.training.context import TrainerState
from mettle.run import build_run

pytestmark = pytest.mark.usefixtures("one_thread")

ACTION_COEF, VALUE_COEF, ANNEAL_STEPS = 0.7, 0.3, 1000

# ------------------------------------------------------------------ the oracle minibatch (nvec (2,))
MASK = [[True, True], [True, False]]
TEACHER_LOGITS_TABLE = [[[0.0, math.log(3.0)], [math.log(2.0), 0.0]], [[1.0, -1.0], [40.0, -40.0]]]
STUDENT_LOGITS_TABLE = [[[0.0, 0.0], [0.0, math.log(2.0)]], [[3.0, 1.0], [-40.0, 40.0]]]
TEACHER_PROBS = {(0, 0): (0.25, 0.75), (0, 1): (2 / 3, 1 / 3), (1, 0): (1 / (1 + math.exp(-2)), 1 / (1 + math.exp(2)))}
STUDENT_PROBS = {(0, 0): (0.5, 0.5), (0, 1): (1 / 3, 2 / 3), (1, 0): TEACHER_PROBS[1, 0]}
"""Softmax of the logits above, live steps only: (1, 0) differs from its teacher by a shift, so the same."""
HAND_KL = {
    (0, 0): 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5),
    (0, 1): (2 / 3) * math.log(2.0) + (1 / 3) * math.log(0.5),
    (1, 0): 0.0,
}
STUDENT_VALUES = [[1.0, -1.0], [0.3, -1000.0]]
TEACHER_VALUES_TABLE = [[0.5, 1.0], [0.0, 1000.0]]
HAND_SQUARED_ERROR = {(0, 0): 0.25, (0, 1): 4.0, (1, 0): 0.09}
LIVE = [(0, 0), (0, 1), (1, 0)]


def weighted_mean(per_step: dict[tuple[int, int], float], weights: list[float]) -> float:
    """sum(w_i x_it) / sum(w_i) over live steps only."""
    return sum(weights[i] * x for (i, _), x in per_step.items()) / sum(weights[i] for i, _ in per_step)


def tiny_policy(kind: str, nvec: tuple[int, ...] = (2,), obs_size: int = 4) -> Policy:
    """A small initialised policy over a Box observation and the given action heads."""
    action_space = gym.spaces.Discrete(nvec[0]) if len(nvec) == 1 else gym.spaces.MultiDiscrete(list(nvec))
    return tiny_policy_for(PolicyEnvInfo(gym.spaces.Box(-1.0, 1.0, (obs_size,), np.float32), action_space), kind)


def tiny_policy_for(info: PolicyEnvInfo, kind: str) -> Policy:
    """A small initialised policy for `info` (hidden size 8: these tests never need it to learn)."""
    policy = build_policy(kind, hidden_size=8)
    policy.initialize_to_environment(info, "cpu")
    return policy


def make_kickstarter(nvec: tuple[int, ...] = (2,), agent_step: int = 0, teacher: Policy | None = None,
                     rollout_steps: int = 64) -> Kickstarter:
    """A Kickstarter built by hand (the teacher is only run by on_rollout_step)."""
    cfg = KickstarterConfig(enabled=True, teacher="unused", action_coef=ACTION_COEF, value_coef=VALUE_COEF,
                            anneal_steps=ANNEAL_STEPS)
    state = TrainerState(agent_step=agent_step)
    return Kickstarter(cfg, teacher or tiny_policy("mlp", nvec), nvec, state, rollout_steps)


def make_minibatch(weights: list[float], teacher_logits: torch.Tensor, teacher_values: torch.Tensor,
                   mask: list[list[bool]] = MASK) -> Minibatch:
    """A minibatch holding the teacher's fields, with per-row importance `weights`."""
    rows = len(mask)
    data = {"mask": torch.tensor(mask), TEACHER_LOGITS: teacher_logits, TEACHER_VALUES: teacher_values}
    zeros = torch.zeros(rows, len(mask[0]))
    return Minibatch(torch.arange(rows), data, zeros, zeros, torch.tensor(weights).unsqueeze(1))


def oracle_inputs(weights: list[float]) -> tuple[Minibatch, PolicyOutput]:
    """The tables above as a minibatch and the student's output (logits and values require grad)."""
    minibatch = make_minibatch(weights, torch.tensor(TEACHER_LOGITS_TABLE), torch.tensor(TEACHER_VALUES_TABLE))
    return minibatch, student_output(torch.tensor(STUDENT_LOGITS_TABLE), torch.tensor(STUDENT_VALUES))


def student_output(logits: torch.Tensor, values: torch.Tensor) -> PolicyOutput:
    """A learner output whose logits and values are leaves requiring grad."""
    rows, steps = values.shape
    zeros = torch.zeros(rows, steps)
    return PolicyOutput(actions=torch.zeros(rows, steps, 1, dtype=torch.int64), log_prob=zeros, entropy=zeros,
                        values=values.clone().requires_grad_(True), logits=logits.clone().requires_grad_(True))


def test_the_hand_probabilities_are_the_softmax_of_the_tables() -> None:
    """Guard on the test data: the probabilities the hand KLs use are those the logits give."""
    for i, t in LIVE:
        for table, probs in ((TEACHER_LOGITS_TABLE, TEACHER_PROBS), (STUDENT_LOGITS_TABLE, STUDENT_PROBS)):
            assert torch.softmax(torch.tensor(table[i][t]), -1).tolist() == pytest.approx(probs[i, t], rel=1e-6)
    for (i, t), kl in HAND_KL.items():
        p, q = TEACHER_PROBS[i, t], STUDENT_PROBS[i, t]
        assert kl == pytest.approx(sum(pa * math.log(pa / qa) for pa, qa in zip(p, q, strict=True)), abs=1e-12)


@pytest.mark.parametrize("agent_step,share", [(0, 1.0), (ANNEAL_STEPS // 4, 0.75)])
@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 0.5]], ids=["uniform", "importance"])
def test_terms_and_diagnostics_match_hand_numbers(agent_step: int, share: float, weights: list[float]) -> None:
    """kl and value_mse are live-step weighted means; the term is share x (action_coef KL + value_coef MSE)."""
    minibatch, output = oracle_inputs(weights)
    term, metrics = make_kickstarter(agent_step=agent_step)(minibatch, output)
    kl, mse = weighted_mean(HAND_KL, weights), weighted_mean(HAND_SQUARED_ERROR, weights)
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert metrics["value_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert metrics["action_coef"].item() == pytest.approx(share * ACTION_COEF)
    assert metrics["value_coef"].item() == pytest.approx(share * VALUE_COEF)
    assert term.shape == ()
    assert term.item() == pytest.approx(ACTION_COEF * share * kl + VALUE_COEF * share * mse, rel=1e-5)
    assert not any(value.requires_grad for value in metrics.values())


@pytest.mark.parametrize("weights", [[1.0, 1.0], [1.0, 0.5]], ids=["uniform", "importance"])
def test_gradients_match_hand_derivatives_and_skip_the_dead_step(weights: list[float]) -> None:
    """d/d student logits = action_coef (q - p) w_i / W; d/dV = value_coef 2 (V - V_teacher) w_i / W; dead: 0."""
    minibatch, output = oracle_inputs(weights)
    term, _ = make_kickstarter()(minibatch, output)
    term.backward()
    assert output.logits is not None and output.logits.grad is not None and output.values.grad is not None
    total = sum(weights[i] for i, _ in LIVE)
    for i in range(2):
        for t in range(2):
            live, share = MASK[i][t], weights[i] / total
            expected_logits = ([ACTION_COEF * share * (q - p) for p, q in
                                zip(TEACHER_PROBS[i, t], STUDENT_PROBS[i, t], strict=True)] if live else [0.0, 0.0])
            error = STUDENT_VALUES[i][t] - TEACHER_VALUES_TABLE[i][t]
            expected_value = VALUE_COEF * share * 2 * error if live else 0.0
            assert output.logits.grad[i, t].tolist() == pytest.approx(expected_logits, abs=1e-6), (i, t)
            assert output.values.grad[i, t].item() == pytest.approx(expected_value, abs=1e-6), (i, t)


def torch_reference_kl(teacher: torch.Tensor, student: torch.Tensor, nvec: tuple[int, ...]) -> torch.Tensor:
    """Sum over heads of torch.distributions' KL between Categoricals."""
    heads = zip(teacher.split(list(nvec), -1), student.split(list(nvec), -1), strict=True)
    return sum(torch.distributions.kl_divergence(torch.distributions.Categorical(logits=p),
                                                 torch.distributions.Categorical(logits=q)) for p, q in heads)


@pytest.mark.parametrize("nvec", [(3, 2), (2, 3, 4), (5,), (2, 2)])
def test_kl_divergence_is_the_sum_of_per_head_categorical_kls(nvec: tuple[int, ...]) -> None:
    """Heads of equal and unequal sizes, one head alone; a distribution's KL to itself is zero."""
    generator = torch.Generator().manual_seed(0)
    teacher = 3 * torch.randn(4, 5, sum(nvec), generator=generator)
    student = 3 * torch.randn(4, 5, sum(nvec), generator=generator)
    expected = torch_reference_kl(teacher, student, nvec)
    assert torch.allclose(kl_divergence(teacher, student, nvec), expected, atol=1e-5, rtol=1e-5)
    assert torch.allclose(kl_divergence(student, student, nvec), torch.zeros(4, 5), atol=1e-6)


def test_multi_head_term_with_unequal_heads_matches_torch_distributions() -> None:
    """nvec (3, 2): the loss's kl is the weighted live-step mean of the per-head Categorical KLs summed."""
    nvec, mask, weights = (3, 2), [[True, True, False], [False, True, True]], [0.4, 1.0]
    generator = torch.Generator().manual_seed(1)
    teacher = 2 * torch.randn(2, 3, 5, generator=generator)
    values = torch.randn(2, 3, generator=generator)
    teacher_values = torch.randn(2, 3, generator=generator)
    output = student_output(2 * torch.randn(2, 3, 5, generator=generator), values)
    term, metrics = make_kickstarter(nvec)(make_minibatch(weights, teacher, teacher_values, mask), output)
    assert output.logits is not None
    per_step = torch_reference_kl(teacher, output.logits.detach(), nvec)
    squared = (values - teacher_values) ** 2
    live = [(i, t) for i in range(2) for t in range(3) if mask[i][t]]
    kl = weighted_mean({(i, t): per_step[i, t].item() for i, t in live}, weights)
    mse = weighted_mean({(i, t): squared[i, t].item() for i, t in live}, weights)
    assert metrics["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert metrics["value_mse"].item() == pytest.approx(mse, rel=1e-5)
    assert term.item() == pytest.approx(ACTION_COEF * kl + VALUE_COEF * mse, rel=1e-5)


# ------------------------------------------------------------------ annealing
def test_the_coefficient_falls_linearly_to_zero_and_stays_there() -> None:
    """1 at step 0, 0.75 a quarter of the way, 0 at anneal_steps and after (never negative)."""
    kick = make_kickstarter()
    assert kick.coefficient(0) == 1.0
    assert kick.coefficient(ANNEAL_STEPS // 4) == 0.75
    assert kick.coefficient(ANNEAL_STEPS) == 0.0
    assert kick.coefficient(3 * ANNEAL_STEPS) == 0.0


@pytest.mark.parametrize("agent_step", [ANNEAL_STEPS, 2 * ANNEAL_STEPS])
def test_an_annealed_kickstarter_gives_a_zero_term_that_still_backpropagates(agent_step: int) -> None:
    """At zero weight: a zero term, only the coefficient diagnostics (the rollout stored zeros), valid backward."""
    zeros = torch.zeros(2, 2)
    minibatch = make_minibatch([1.0, 1.0], torch.zeros(2, 2, 2), zeros)
    output = student_output(torch.tensor(STUDENT_LOGITS_TABLE), torch.tensor(STUDENT_VALUES))
    term, metrics = make_kickstarter(agent_step=agent_step)(minibatch, output)
    assert term.item() == 0.0 and term.requires_grad
    assert metrics == {"action_coef": torch.tensor(0.0), "value_coef": torch.tensor(0.0)}
    term.backward()
    assert output.values.grad is not None and torch.equal(output.values.grad, zeros)


def test_a_student_without_logits_is_named() -> None:
    """A policy that does not return logits cannot be distilled into: the error says what is missing."""
    minibatch, output = oracle_inputs([1.0, 1.0])
    output.logits = None
    with pytest.raises(ValueError, match=r"needs the student's logits.*PolicyOutput\.logits is None"):
        make_kickstarter()(minibatch, output)


# ------------------------------------------------------------------ the teacher in the rollout
class ForwardCounter:
    """Counts a module's forward calls through a hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        module.register_forward_hook(self._count)

    def _count(self, *_: Any) -> None:
        self.calls += 1


ROW_GROUPS = (slice(0, 3), slice(3, 5))
STARTS = [[True] * 5, [False] * 5, [False, True, False, False, True]]
"""Per step, per row: which rows start an episode (a recurrent teacher resets its memory there)."""


def rollout_batches(steps: int = 3, agent_step: int = 0) -> Iterator[RolloutBatch]:
    """Two row groups stepping in turn, as an async env gives them, with episode starts mixed in."""
    generator = torch.Generator().manual_seed(2)
    for step in range(steps):
        observations = torch.randn(5, 4, generator=generator)
        starts = torch.tensor(STARTS[step])
        for rows in ROW_GROUPS:
            yield RolloutBatch(rows, observations[rows], starts[rows], torch.ones(rows.stop - rows.start, dtype=bool),
                               agent_step)


def dummy_output(n: int) -> PolicyOutput:
    """The student's rollout output (the kickstarter does not read it)."""
    zeros = torch.zeros(n, 1)
    return PolicyOutput(torch.zeros(n, 1, 2, dtype=torch.int64), zeros, zeros, zeros)


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_rollout_step_stores_the_teachers_deterministic_outputs_and_draws_no_random_numbers(kind: str) -> None:
    """Per row group, the stored logits and values are those of the teacher run directly (mode actions), its
    per-row memory carried between calls; torch's global RNG is left as it was."""
    nvec = (3, 2)
    teacher = tiny_policy(kind, nvec)
    reference = copy.deepcopy(teacher)
    kick = make_kickstarter(nvec, teacher=teacher)
    rng_before = torch.get_rng_state()
    for batch in rollout_batches():
        with torch.inference_mode():
            fields = kick.on_rollout_step(batch, dummy_output(batch.observations.shape[0]))
            expected = reference(batch.observations.unsqueeze(1), batch.starts.unsqueeze(1), rows=batch.rows,
                                 deterministic=True)
        assert expected.logits is not None
        assert sorted(fields) == sorted(kick.experience_spec())
        assert fields[TEACHER_LOGITS].shape == (batch.observations.shape[0], 5)
        assert torch.equal(fields[TEACHER_LOGITS], expected.logits[:, 0])
        assert torch.equal(fields[TEACHER_VALUES], expected.values[:, 0])
    assert torch.equal(torch.get_rng_state(), rng_before)
    if kind == "lstm":
        assert kick.rollout_state_dict()["memory"].keys() == {"lstm_h", "lstm_c"}


@pytest.mark.parametrize("margin,runs", [(1, True), (0, False), (-5, False)])
def test_the_teacher_is_not_run_once_the_rollouts_update_would_weigh_it_at_zero(margin: int, runs: bool) -> None:
    """The update of a rollout starting at agent_step s weighs the teacher with coefficient(s + rollout_steps):
    at zero the teacher is not called, its memory does not move, and zeros are stored."""
    rollout_steps = 64
    teacher = tiny_policy("lstm")
    counter = ForwardCounter(teacher)
    kick = make_kickstarter(teacher=teacher, rollout_steps=rollout_steps)
    batch = next(rollout_batches(agent_step=ANNEAL_STEPS - rollout_steps - margin))
    with torch.inference_mode():
        fields = kick.on_rollout_step(batch, dummy_output(3))
    assert counter.calls == (1 if runs else 0)
    assert fields[TEACHER_LOGITS].shape == (3, 2) and fields[TEACHER_VALUES].shape == (3,)
    assert fields[TEACHER_LOGITS].dtype == fields[TEACHER_VALUES].dtype == torch.float32
    stored_nothing = not fields[TEACHER_LOGITS].any() and not fields[TEACHER_VALUES].any()
    assert stored_nothing != runs
    assert (teacher.memory_state() != {}) == runs


class RolloutTeacherRecorder(TrainerComponent):
    """Per epoch: the teacher's forward calls during the rollout, the stored teacher fields and the losses."""

    def __init__(self, counter: ForwardCounter | None = None) -> None:
        super().__init__(epoch_interval=1)
        self.counter = counter
        self.calls: list[int] = []
        self.fields: list[dict[str, torch.Tensor]] = []
        self.losses: list[dict[str, float]] = []

    def on_rollout_end(self) -> None:
        """Keep the rollout's teacher fields and how often the teacher ran since the last rollout."""
        buffers = self.context.experience.buffers
        self.fields.append({name: buffers[name].clone() for name in (TEACHER_LOGITS, TEACHER_VALUES)})
        if self.counter is not None:
            self.calls.append(self.counter.calls - sum(self.calls))

    def on_epoch_end(self, epoch: int) -> None:
        """Keep the update's mean losses and diagnostics."""
        self.losses.append(dict(self.context.stats.losses))


def cartpole_trainer(teacher: Path, total_epochs: int, vectorization: str = "serial", anneal_steps: int = 1_000_000,
                     **trainer: Any) -> Trainer:
    """An mlp student on 4 CartPoles kickstarted from `teacher`, 64 agent steps per rollout."""
    env = make_environment(EnvConfig(name="gym:CartPole-v1", num_envs=4, vectorization=vectorization), seed=7)
    kick = KickstarterConfig(enabled=True, teacher=str(teacher), value_coef=1.0, anneal_steps=anneal_steps)
    losses = LossesConfig(kickstarter=kick)
    cfg = TrainerConfig(total_timesteps=total_epochs * 64, batch_size=64, minibatch_size=32, bptt_horizon=8,
                        update_epochs=2, seed=11, losses=losses, **trainer)
    return Trainer(cfg, env, build_policy("mlp", hidden_size=32), "cpu")


train = train_and_close


def test_a_training_run_stops_running_the_teacher_with_the_rollout_whose_update_weighs_it_at_zero(
        teacher_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """anneal_steps = 2 rollouts: the first update weighs the teacher at 1/2, the second at 0, so the second rollout
    runs no teacher and stores zeros (except each row's first step: the decision held from rollout one)."""
    trainer = cartpole_trainer(teacher_run[0], total_epochs=2, anneal_steps=128)
    kick = trainer.losses[-1]
    assert isinstance(kick, Kickstarter)
    recorder = RolloutTeacherRecorder(ForwardCounter(kick.teacher))
    trainer.register(recorder)
    train(trainer)
    assert recorder.calls[0] > 0 and recorder.calls[1] == 0
    first, second = recorder.losses
    assert first["kickstarter/action_coef"] == first["kickstarter/value_coef"] == 0.5
    assert math.isfinite(first["kickstarter/kl"]) and first["kickstarter/value_mse"] > 0
    assert {k: v for k, v in second.items() if k.startswith("kickstarter/")} == {
        "kickstarter/action_coef": 0.0, "kickstarter/value_coef": 0.0}
    exp = trainer.context.experience
    held = torch.zeros(exp.segments, exp.horizon, dtype=torch.bool)
    held[: exp.num_rows, 0] = True  # segment r of window 0, position 0: row r's decision held from the first rollout
    values = recorder.fields[1][TEACHER_VALUES]
    assert not values[~held].any() and not recorder.fields[1][TEACHER_LOGITS][~held].any()
    assert values[held].all()


# ------------------------------------------------------------------ teacher loading
@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, torch.Tensor]]]:
    """A real 2-epoch run of an lstm policy on CartPole (its run directory), and its final weights."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    cfg = build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=4", "policy.kind=lstm", "policy.hidden_size=16",
                            "batch_size=64", "minibatch_size=32", "bptt_horizon=8", "total_timesteps=128",
                            "stats.tensorboard=false", "seed=3"])
    with build_run(cfg, run_dir) as run:
        run.trainer.train()
        weights = {name: tensor.clone() for name, tensor in run.policy.state_dict().items()}
    torch.set_num_threads(threads)
    yield run_dir, weights


def save_untrained_teacher(env_name: str, directory: Path, kind: str = "mlp") -> Path:
    """A freshly initialised policy for `env_name`, saved as a checkpoint directory."""
    env = make_environment(EnvConfig(name=env_name, num_envs=1), seed=0)
    try:
        save_policy(tiny_policy_for(env.policy_env_info, kind), env.policy_env_info, directory)
    finally:
        env.close()
    return directory


def test_an_lstm_teacher_from_a_run_directory_kickstarts_an_mlp_student(
        teacher_run: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """The run's newest checkpoint is loaded (its trained weights), frozen, outside the optimizer, and unchanged by
    training; the losses come in config order and the kickstarter's diagnostics are reported."""
    run_dir, weights = teacher_run
    cfg = build_run_config(["env.name=gym:CartPole-v1", "env.num_envs=4", "policy.kind=mlp", "batch_size=64",
                            "minibatch_size=32", "bptt_horizon=8", "total_timesteps=128",
                            "losses.kickstarter.enabled=true", f"losses.kickstarter.teacher={run_dir}"])
    with build_run(cfg) as run:
        assert [loss.name for loss in run.trainer.losses] == ["ppo_actor", "ppo_critic", "kickstarter"]
        kick = run.trainer.losses[-1]
        assert isinstance(kick, Kickstarter) and isinstance(kick.teacher, LSTMPolicy)
        assert not kick.teacher.training
        teacher_params = {id(p) for p in kick.teacher.parameters()}
        trained = {id(p) for group in run.trainer.context.optimizer.param_groups for p in group["params"]}
        assert not teacher_params & trained
        assert not any(p.requires_grad for p in kick.teacher.parameters())
        run.trainer.train()
        for name, tensor in kick.teacher.state_dict().items():
            assert torch.equal(tensor, weights[name]), name
        losses = run.trainer.context.stats.losses
    assert losses["kickstarter/kl"] > 0 and math.isfinite(losses["kickstarter/kl"])
    assert losses["kickstarter/value_mse"] > 0
    assert 0 < losses["kickstarter/action_coef"] < 1


@pytest.mark.parametrize("teacher_env,pattern", [
    ("gym:Acrobot-v1", r"acts in Discrete\(3\), this environment in Discrete\(2\)"),
    ("gym:mettle/CartPoleNoVel-v1", r"reads observations Box\(2,\), this environment gives Box\(4,\)"),
], ids=["action-space", "observations"])
def test_a_teacher_for_other_spaces_is_refused_in_one_line(teacher_env: str, pattern: str, tmp_path: Path) -> None:
    """A teacher trained on another env (Acrobot's 3 actions, CartPole without velocities) is refused before
    training, in one line that names the config field, the teacher's path and both spaces."""
    teacher = save_untrained_teacher(teacher_env, tmp_path / "teacher")
    with pytest.raises(ValueError, match=r"^losses\.kickstarter\.teacher: ") as caught:
        cartpole_trainer(teacher, total_epochs=1)
    message = str(caught.value)
    assert "\n" not in message
    assert str(teacher) in message
    assert re.search(pattern, message), message


@pytest.mark.parametrize("make", ["missing", "empty"])
def test_a_teacher_path_without_a_checkpoint_is_one_line(make: str, tmp_path: Path) -> None:
    """A missing path, or a directory holding no checkpoint: one line naming the field and the path."""
    path = tmp_path / "nowhere"
    if make == "empty":
        path.mkdir()
    with pytest.raises(ValueError) as caught:
        cartpole_trainer(path, total_epochs=1)
    message = str(caught.value)
    assert message.startswith("losses.kickstarter.teacher: ") and "\n" not in message
    assert str(path) in message
    assert ("does not exist" if make == "missing" else "holds no checkpoint") in message


def test_an_enabled_kickstarter_without_a_teacher_fails_validation_naming_the_field() -> None:
    """The CLI's overrides and the config class both refuse it, before any env is made."""
    with pytest.raises(ConfigError) as caught:
        build_run_config(["env.name=gym:CartPole-v1", "losses.kickstarter.enabled=true"])
    message = str(caught.value)
    assert "losses.kickstarter.teacher is not set" in message and "\n" not in message
    with pytest.raises(ValueError, match=r"losses\.kickstarter\.teacher is not set"):
        KickstarterConfig(enabled=True)
    assert KickstarterConfig(enabled=False).teacher is None  # off needs no teacher


# ------------------------------------------------------------------ exact resume with a recurrent teacher
EPOCHS, STOP = 4, 2


def build_resumable(teacher: Path, run: Path, recorder: RolloutTeacherRecorder, stop: int | None = None,
                    **trainer: Any) -> Trainer:
    """The CartPole student with an lstm teacher, checkpointing every epoch into `run` and restored from it."""
    built = cartpole_trainer(teacher, EPOCHS, vectorization="gymnasium_sync", **trainer)
    built.register(recorder)
    return checkpointed(built, run, stop)


def train_split(teacher: Path, run: Path, **trainer: Any) -> tuple[Trainer, RolloutTeacherRecorder]:
    """Stop at epoch STOP, then continue in a new trainer, env, policy and teacher rebuilt from the checkpoint."""
    recorder = RolloutTeacherRecorder()
    train(build_resumable(teacher, run, recorder, stop=STOP, **trainer))
    second = build_resumable(teacher, run, recorder, **trainer)
    assert second.context.state.epoch == STOP
    train(second)
    return second, recorder


def assert_same_records(a: RolloutTeacherRecorder, b: RolloutTeacherRecorder) -> None:
    assert a.losses == b.losses
    assert len(a.fields) == len(b.fields) == EPOCHS
    for epoch, (x, y) in enumerate(zip(a.fields, b.fields, strict=True)):
        for name in x:
            assert torch.equal(x[name], y[name]), (epoch, name)


OVERLAP = {"overlap": True, "advantage": AdvantageConfig(method="vtrace")}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_a_split_run_with_an_lstm_teacher_equals_the_unbroken_run(
        overlap: bool, teacher_run: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, caplog: Any) -> None:
    """The teacher's per-row memory is rollout state: after a resume the recorded teacher fields, the losses
    and the final weights are bitwise those of the run that never stopped."""
    teacher, extra = teacher_run[0], (OVERLAP if overlap else {})
    straight = RolloutTeacherRecorder()
    unbroken = build_resumable(teacher, tmp_path / "straight", straight, **extra)
    assert unbroken.overlapped == overlap
    train(unbroken)
    with caplog.at_level(logging.WARNING):
        split, split_record = train_split(teacher, tmp_path / "split", **extra)
    assert "not exact" not in caplog.text and "synchronously" not in caplog.text
    assert_same_records(straight, split_record)
    assert any(fields[TEACHER_VALUES].any() for fields in split_record.fields[STOP:])
    for (name, x), (_, y) in zip(unbroken.context.policy.state_dict().items(),
                                 split.context.policy.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_without_the_teachers_memory_the_split_run_differs(teacher_run: tuple[Path, dict[str, torch.Tensor]],
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The control: a resume that drops the teacher's saved memory records other teacher outputs after the split,
    so the test above would catch a teacher memory left out of the rollout state."""
    teacher = teacher_run[0]
    straight = RolloutTeacherRecorder()
    train(build_resumable(teacher, tmp_path / "straight", straight))
    monkeypatch.setattr(Kickstarter, "load_rollout_state_dict", lambda self, state: None)
    _, split_record = train_split(teacher, tmp_path / "split")
    for epoch in range(STOP):
        assert torch.equal(straight.fields[epoch][TEACHER_LOGITS], split_record.fields[epoch][TEACHER_LOGITS])
    assert not torch.equal(straight.fields[STOP][TEACHER_LOGITS], split_record.fields[STOP][TEACHER_LOGITS])


# ------------------------------------------------------------------ distillation on MettaGrid
ARENA = {"num_agents": 2, "width": 8, "height": 8, "mines": 2, "altars": 1, "max_steps": 20}
TEACHER_BIAS = [2.0, -1.0, 0.0, 1.0, -2.0]
"""The token teacher's actor bias: a clear preference the student, starting near uniform, has to learn."""


def test_a_token_student_distils_a_token_teacher_on_mettagrid(tmp_path: Path) -> None:
    """Pure distillation (PPO's actor term off): loss/kickstarter/kl in metrics.jsonl is finite and falls, and the
    buffer holds the teacher's outputs, which prefer action 0 as its bias does."""
    env = make_environment(EnvConfig(name="mettagrid:arena", num_envs=1, kwargs=ARENA), seed=0)
    try:
        teacher = build_policy("token", hidden_size=16)
        teacher.initialize_to_environment(env.policy_env_info, "cpu")
        assert isinstance(teacher, TokenPolicy) and env.policy_env_info.action_nvec == (5,)
        with torch.no_grad():
            teacher.actor_head.bias.copy_(torch.tensor(TEACHER_BIAS))
        save_policy(teacher, env.policy_env_info, tmp_path / "teacher")
    finally:
        env.close()
    cfg = build_run_config([
        "env.name=mettagrid:arena", "env.num_envs=2", f"env.kwargs={json.dumps(ARENA)}", "policy.kind=token",
        "policy.hidden_size=16", "batch_size=64", "minibatch_size=32", "bptt_horizon=8", "total_timesteps=384",
        "optimizer.learning_rate=0.01", "stats.tensorboard=false", "losses.ppo_actor.enabled=false",
        "losses.kickstarter.enabled=true", f"losses.kickstarter.teacher={tmp_path / 'teacher'}",
        "losses.kickstarter.anneal_steps=100000",
    ])
    with build_run(cfg, tmp_path / "student") as run:
        run.trainer.train()
        buffers = run.trainer.context.experience.buffers
        live = buffers["mask"]
        logits, values = buffers[TEACHER_LOGITS][live], buffers[TEACHER_VALUES][live]
    assert logits.abs().sum(-1).min() > 0 and values.any()
    assert (logits.argmax(-1) == 0).all()
    lines = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    kl = [line["loss/kickstarter/kl"] for line in lines]
    assert len(kl) == 6 and all(math.isfinite(value) for value in kl)
    assert kl[-1] < 0.5 * kl[0], kl
    assert all(line["loss/kickstarter/action_coef"] > 0.99 for line in lines)
