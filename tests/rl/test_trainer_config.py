"""TrainerConfig rejects bad values with messages that name the field and the fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mettle.config import ConfigError, build_run_config
from mettle.rl.trainer_config import TrainerConfig


def test_defaults_are_consistent() -> None:
    cfg = TrainerConfig()
    assert cfg.segments * cfg.bptt_horizon == cfg.batch_size
    assert cfg.minibatches_per_epoch * cfg.minibatch_size == cfg.batch_size


def test_batch_not_multiple_of_minibatch_suggests_fix() -> None:
    expected = "batch_size 1000 is not a multiple of minibatch_size 256; try batch_size=1024"
    with pytest.raises(ValidationError, match=expected):
        TrainerConfig(batch_size=1000, minibatch_size=256, bptt_horizon=8)


def test_minibatch_larger_than_batch() -> None:
    with pytest.raises(ValidationError, match="minibatch_size 4096 is larger than batch_size 1024"):
        TrainerConfig(batch_size=1024, minibatch_size=4096)


def test_minibatch_must_hold_whole_windows() -> None:
    with pytest.raises(ValidationError, match="not a multiple of bptt_horizon 24; try minibatch_size=264"):
        TrainerConfig(batch_size=768, minibatch_size=256, bptt_horizon=24)


def test_rows_must_fill_windows() -> None:
    cfg = TrainerConfig(batch_size=1024, minibatch_size=256, bptt_horizon=16)
    cfg.check_rows(8)
    with pytest.raises(ValueError, match=r"agent rows x bptt_horizon \(24 x 16 = 384\); try batch_size=1152"):
        cfg.check_rows(24)


@pytest.mark.parametrize("field,value", [("update_epochs", 0), ("total_timesteps", -1), ("batch_size", 0)])
def test_bounds(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        TrainerConfig(**{field: value})


def test_unknown_key_is_forbidden() -> None:
    with pytest.raises(ValidationError, match="extra"):
        TrainerConfig(bogus=1)  # type: ignore[call-arg]


def test_every_field_has_a_docstring() -> None:
    from mettle.rl import trainer_config

    models = [TrainerConfig, trainer_config.OptimizerConfig, trainer_config.AdvantageConfig,
              trainer_config.PPOConfig, trainer_config.SamplingConfig]
    for model in models:
        for name, info in model.model_fields.items():
            assert info.description, f"{model.__name__}.{name} has no docstring"


def test_overrides_resolve_trainer_keys_and_validate() -> None:
    cfg = build_run_config(["optimizer.learning_rate=0.01", "batch_size=2048", "env.num_envs=4"])
    assert cfg.trainer.optimizer.learning_rate == 0.01
    assert cfg.trainer.batch_size == 2048
    assert cfg.env.num_envs == 4


def test_override_errors_are_one_line() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'optimizer.learnin_rate'; did you mean 'learning_rate'"):
        build_run_config(["optimizer.learnin_rate=0.1"])
    with pytest.raises(ConfigError) as info:
        build_run_config(["optimizer.learning_rate=-1"])
    message = str(info.value)
    assert "trainer.optimizer.learning_rate" in message and "-1" in message and "\n" not in message
    with pytest.raises(ConfigError, match="is not key=value"):
        build_run_config(["batch_size"])
