"""Evaluator: same numbers as evaluate_policy, runs on its interval, never disturbs training, says how it acts."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from mettle.agent.policy import Policy, PolicyOutput, TensorSpec
from mettle.agent.registry import build_policy
from mettle.config import EnvConfig, RunConfig
from mettle.envs.testing import BanditEnvironment
from mettle.profiling.stopwatch import Stopwatch
from mettle.rl.evaluate import evaluate_policy
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import EpochStats, PolicyEnvInfo, TrainerState
from mettle.rl.training.components.evaluator import Evaluator, EvaluatorConfig, env_stat_means
from mettle.run import load_run_config

BATCH = 64
EVAL_SEED = 777


pytestmark = pytest.mark.usefixtures("one_thread")


def config(epochs: int = 4, **changes: Any) -> TrainerConfig:
    base: dict[str, Any] = dict(total_timesteps=epochs * BATCH, batch_size=BATCH, minibatch_size=32, bptt_horizon=4,
                                update_epochs=2, seed=1)
    return TrainerConfig(**{**base, **changes})


class CountingFactory:
    """Builds bandit envs and remembers them, to check laziness, reuse and closing."""

    def __init__(self, num_envs: int = 3, seed: int = 0) -> None:
        self.num_envs, self.seed = num_envs, seed
        self.built: list[BanditEnvironment] = []

    def __call__(self) -> BanditEnvironment:
        env = BanditEnvironment(num_envs=self.num_envs, seed=self.seed)
        self.built.append(env)
        return env


class CopyPolicy(Policy):
    """Hand-made bandit player: greedy copies the one-hot target; sampling is 'soft' copying."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def initialize_to_environment(self, env_info: PolicyEnvInfo, device: torch.device | str) -> None:
        pass

    def get_agent_experience_spec(self) -> dict[str, TensorSpec]:
        return {}

    def forward(self, observations: torch.Tensor, starts: torch.Tensor, actions: torch.Tensor | None = None,
                memory: dict[str, torch.Tensor] | None = None, rows: slice | None = None,
                deterministic: bool = False) -> PolicyOutput:
        logits = observations * self.scale
        if deterministic:
            chosen = logits.argmax(-1, keepdim=True)
        else:
            chosen = torch.multinomial(logits.softmax(-1).flatten(0, 1), 1).view(*logits.shape[:2], 1)
        zeros = torch.zeros(logits.shape[:2])
        return PolicyOutput(chosen, zeros, zeros, zeros)


def bare_context(policy: Policy, stats: Any = None) -> Any:
    """Just the context fields the Evaluator touches, for unit tests without a Trainer."""
    return SimpleNamespace(policy=policy, device=torch.device("cpu"), state=TrainerState(), stopwatch=Stopwatch(),
                           stats=stats if stats is not None else EpochStats())


def expected_results(policy: Policy, episodes: int, deterministic: bool, num_envs: int = 3) -> dict[str, float]:
    """evaluate_policy run separately on a fresh env, torch seeded as the Evaluator seeds it."""
    with torch.random.fork_rng():
        torch.manual_seed(EVAL_SEED)
        infos = evaluate_policy(policy, BanditEnvironment(num_envs=num_envs), episodes, "cpu", deterministic,
                                EVAL_SEED)
    returns = np.array([i["episode_return"] for i in infos])
    return {"mean_return": float(returns.mean()), "std_return": float(returns.std()), "episodes": float(len(infos))}


def test_greedy_copy_policy_scores_perfectly_and_stats_are_reported() -> None:
    evaluator = Evaluator({"bandit": CountingFactory()}, episodes=7, seed=EVAL_SEED)
    stats = EpochStats()
    evaluator.register(bare_context(CopyPolicy(), stats))
    results = evaluator.evaluate()
    assert results["eval/bandit/mean_return"] == 8.0
    assert results["eval/bandit/std_return"] == 0.0
    assert results["eval/bandit/mean_length"] == 8.0
    assert results["eval/bandit/episodes"] == 7.0
    assert results["eval/bandit/greedy"] == 1.0, "a family-less env name takes the non-MettaGrid default: argmax"
    assert evaluator.latest == results == stats.metrics, "results are published for the reporters"
    assert evaluator.history == [{"epoch": 0.0, "agent_step": 0.0, **results}]


def test_env_stat_means_average_numeric_stats_only() -> None:
    infos = [{"episode_return": 1.0, "env_id": 0, "agent_id": 1, "game/hearts": 2.0, "agent/moves": np.float32(4),
              "label": "x", "nested": {"a": 1}},
             {"episode_return": 3.0, "env_id": 1, "game/hearts": 4}]
    assert env_stat_means(infos) == {"game/hearts": 3.0, "agent/moves": 4.0}


@pytest.mark.parametrize("actions", ["greedy", "sampled"])
def test_results_match_evaluate_policy_before_and_after_training(actions: str) -> None:
    deterministic = actions == "greedy"
    trainer = Trainer(config(optimizer={"learning_rate": 0.01}), BanditEnvironment(num_envs=4), build_policy("mlp"),
                      "cpu")
    evaluator = Evaluator({"bandit": CountingFactory()}, episodes=12, epoch_interval=2, actions=actions,  # type: ignore[arg-type]
                          seed=EVAL_SEED, on_complete=False)
    trainer.register(evaluator)
    untrained = evaluator.evaluate()
    assert {k: untrained[f"eval/bandit/{k}"] for k in ("mean_return", "std_return", "episodes")} == \
        expected_results(trainer.context.policy, 12, deterministic)
    trainer.train()
    trained = evaluator.latest
    assert {k: trained[f"eval/bandit/{k}"] for k in ("mean_return", "std_return", "episodes")} == \
        expected_results(trainer.context.policy, 12, deterministic)
    assert [entry["epoch"] for entry in evaluator.history] == [0, 2, 4]
    assert trained["eval/bandit/mean_return"] > untrained["eval/bandit/mean_return"]
    assert trained["eval/bandit/greedy"] == float(deterministic)


@pytest.mark.parametrize("epochs,on_complete,expected", [(5, True, [2, 4, 5]), (5, False, [2, 4]), (4, True, [2, 4])])
def test_runs_exactly_on_its_interval_and_at_completion(epochs: int, on_complete: bool, expected: list[int]) -> None:
    factory = CountingFactory()
    trainer = Trainer(config(epochs, update_epochs=1), BanditEnvironment(num_envs=4), build_policy("mlp"), "cpu")
    evaluator = Evaluator({"a": factory}, episodes=3, epoch_interval=2, on_complete=on_complete)
    trainer.register(evaluator)
    trainer.train()
    assert [int(entry["epoch"]) for entry in evaluator.history] == expected
    assert [int(entry["agent_step"]) for entry in evaluator.history] == [e * BATCH for e in expected]
    assert len(factory.built) == 1 and factory.built[0].closed  # built once, reused, closed at the end
    assert trainer.context.stopwatch.count("evaluate") == len(expected)


def test_several_envs_are_reported_under_their_names_and_closed_on_failure() -> None:
    first, second = CountingFactory(num_envs=2), CountingFactory(num_envs=5)
    evaluator = Evaluator({"small": first, "large": second}, episodes=5)
    evaluator.register(bare_context(CopyPolicy()))
    results = evaluator.evaluate()
    assert results["eval/small/mean_return"] == results["eval/large/mean_return"] == 8.0
    evaluator.on_failure(RuntimeError("boom"))
    assert first.built[0].closed and second.built[0].closed
    evaluator.evaluate()  # a later use builds fresh envs
    assert len(first.built) == 2


def test_evaluation_leaves_rng_memory_and_modes_as_they_were() -> None:
    policy = build_policy("lstm", hidden_size=8)
    policy.initialize_to_environment(BanditEnvironment(num_envs=4).policy_env_info, "cpu")
    with torch.inference_mode():
        policy(torch.rand(4, 1, 4), torch.ones(4, 1, dtype=torch.bool), rows=slice(0, 4))
    policy.train()
    policy.critic_head.eval()
    memory = policy.memory_state()
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state())
    evaluator = Evaluator({"bandit": CountingFactory(num_envs=3)}, episodes=6, actions="sampled")
    evaluator.register(bare_context(policy))
    evaluator.evaluate()
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])
    assert torch.equal(torch.get_rng_state(), before[2])
    after = policy.memory_state()
    assert after.keys() == memory.keys() and all(torch.equal(after[k], memory[k]) for k in memory)
    assert policy.training and policy.lstm.training and not policy.critic_head.training


def train_lstm(with_evaluator: bool) -> Trainer:
    trainer = Trainer(config(4), BanditEnvironment(num_envs=4, seed=2), build_policy("lstm", hidden_size=16), "cpu")
    if with_evaluator:
        trainer.register(Evaluator({"train_env": CountingFactory(num_envs=3)}, episodes=5, epoch_interval=1,
                                   actions="sampled"))
    trainer.train()
    return trainer


def test_training_is_bitwise_identical_with_and_without_the_evaluator() -> None:
    plain, evaluated = train_lstm(False), train_lstm(True)
    assert len(evaluated.components[0].history) == 4  # type: ignore[attr-defined]
    for (name, x), (_, y) in zip(plain.context.policy.state_dict().items(),
                                 evaluated.context.policy.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    mem_a, mem_b = plain.context.policy.memory_state(), evaluated.context.policy.memory_state()
    assert all(torch.equal(mem_a[k], mem_b[k]) for k in mem_a)
    assert plain.context.stats.losses == evaluated.context.stats.losses


def test_state_dict_round_trips_through_a_weights_only_load() -> None:
    evaluator = Evaluator({"bandit": CountingFactory()}, episodes=3)
    evaluator.register(bare_context(CopyPolicy()))
    evaluator.evaluate()
    evaluator.context.state.epoch = 3
    evaluator.evaluate()
    buffer = io.BytesIO()
    torch.save(evaluator.state_dict(), buffer)
    buffer.seek(0)
    restored = Evaluator({"bandit": CountingFactory()})
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert restored.history == evaluator.history
    assert restored.latest == evaluator.latest


def test_config_builds_only_when_enabled_and_forbids_unknown_fields() -> None:
    assert EvaluatorConfig().build({"a": CountingFactory()}) is None
    built = EvaluatorConfig(enabled=True, interval=3, episodes=4, actions="sampled").build({"a": CountingFactory()})
    assert built is not None and (built.epoch_interval, built.episodes, built.modes) == (3, 4, {"a": "sampled"})
    with pytest.raises(ValueError):
        EvaluatorConfig(episodes=0)
    with pytest.raises(ValueError):
        EvaluatorConfig(nonsense=1)  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        Evaluator({})


FAMILIES = {"mettagrid:arena": "sampled", "gym:CartPole-v1": "greedy", "pettingzoo:mpe2.simple_spread_v3:parallel_env":
            "greedy"}
"""What "auto" resolves to per env family: MettaGrid samples (greedy agents there block each other)."""


@pytest.mark.parametrize(("actions", "expected"), [("auto", FAMILIES), ("greedy", dict.fromkeys(FAMILIES, "greedy")),
                                                   ("sampled", dict.fromkeys(FAMILIES, "sampled"))])
def test_actions_resolve_by_env_family_and_are_recorded_and_logged(
    actions: str, expected: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    evaluator = EvaluatorConfig(enabled=True, episodes=3, actions=actions).build(
        {name: CountingFactory() for name in FAMILIES})
    assert evaluator is not None and evaluator.modes == expected
    evaluator.register(bare_context(CopyPolicy()))
    with caplog.at_level(logging.INFO, logger="mettle.rl.training.components.evaluator"):
        results = evaluator.evaluate()
        evaluator.evaluate()
    for name, mode in expected.items():
        assert results[f"eval/{name}/greedy"] == (1.0 if mode == "greedy" else 0.0)
        assert evaluator.history[-1][f"eval/{name}/greedy"] == results[f"eval/{name}/greedy"]
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == len(FAMILIES), "said once per environment, when it is built"
    if actions == "auto":
        assert "evaluator on mettagrid:arena: actions: sampled (MettaGrid default; evaluator.actions=greedy for " \
               "argmax)" in lines
        assert "evaluator on gym:CartPole-v1: actions: greedy (Gymnasium default; evaluator.actions=sampled to " \
               "sample)" in lines
    else:
        assert all(f"actions: {actions} (evaluator.actions={actions}; " in line for line in lines), lines


def test_the_default_config_is_auto() -> None:
    assert EvaluatorConfig().actions == "auto"
    assert RunConfig().evaluator.actions == "auto"


@pytest.mark.parametrize(("deterministic", "actions"), [(True, "auto"), (False, "sampled")])
def test_a_config_json_saved_with_deterministic_still_loads(tmp_path: Path, deterministic: bool, actions: str) -> None:
    data = RunConfig(env=EnvConfig(name="mettagrid:arena")).model_dump(mode="json")
    data["evaluator"].pop("actions")
    data["evaluator"]["deterministic"] = deterministic  # as config.json was written before `actions`
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = load_run_config(tmp_path)
    assert loaded.evaluator.actions == actions
    assert "deterministic" not in loaded.model_dump(mode="json")["evaluator"], "it is saved again as `actions`"


def test_replays_on_an_env_that_cannot_record_them_are_a_warning(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    evaluator = Evaluator({"bandit": CountingFactory()}, episodes=3, seed=EVAL_SEED, replays=1, replay_dir=tmp_path)
    evaluator.register(bare_context(CopyPolicy(), EpochStats()))
    with caplog.at_level(logging.WARNING):
        assert evaluator.evaluate()["eval/bandit/mean_return"] == 8.0
    assert "evaluator.replays=1, but this environment writes no replays" in caplog.text
    assert not list(tmp_path.iterdir())
    with pytest.raises(ValueError, match="replay_dir"):
        Evaluator({"bandit": CountingFactory()}, replays=1)


def test_the_config_passes_replays_only_with_a_run_dir(tmp_path: Path) -> None:
    cfg = EvaluatorConfig(enabled=True, replays=2)
    with_dir, without = cfg.build({"a": CountingFactory()}, replay_dir=tmp_path), cfg.build({"a": CountingFactory()})
    assert with_dir is not None and (with_dir.replays, with_dir.replay_dir) == (2, tmp_path)
    assert without is not None and without.replays == 0
