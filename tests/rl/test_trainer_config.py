"""TrainerConfig rejects bad values with messages that name the field and the fix."""

from __future__ import annotations

import random
import re
from collections.abc import Callable

import pytest
from pydantic import ValidationError

from mettle.config import ConfigError, build_run_config
from mettle.rl.trainer_config import DEFER_SIZE_CHECK, SIZE_FIELDS, TrainerConfig, fit_sizes_to_rows


def test_defaults_are_consistent() -> None:
    cfg = TrainerConfig()
    assert cfg.segments * cfg.bptt_horizon == cfg.batch_size
    assert cfg.minibatches_per_epoch * cfg.minibatch_size == cfg.batch_size


def size_message(**sizes: int) -> str | None:
    """The one-line message of the size rule a TrainerConfig with these sizes breaks (None: it builds)."""
    try:
        TrainerConfig(**sizes)
    except ValidationError as error:
        return error.errors()[0]["msg"].removeprefix("Value error, ")
    return None


def test_batch_not_multiple_of_minibatch_suggests_fix() -> None:
    message = size_message(batch_size=1000, minibatch_size=256, bptt_horizon=8)
    assert message == "batch_size 1000 is not a multiple of minibatch_size 256; try minibatch_size=200"


def test_minibatch_larger_than_batch() -> None:
    with pytest.raises(ValidationError, match="minibatch_size 4096 is larger than batch_size 1024"):
        TrainerConfig(batch_size=1024, minibatch_size=4096)


def test_minibatch_must_hold_whole_windows() -> None:
    message = size_message(batch_size=768, minibatch_size=256, bptt_horizon=24)
    assert message == "minibatch_size 256 is not a multiple of bptt_horizon 24; try minibatch_size=192"


def test_rows_must_fill_windows() -> None:
    cfg = TrainerConfig(batch_size=1024, minibatch_size=256, bptt_horizon=16)
    cfg.check_rows(8)
    expected = r"agent rows x bptt_horizon \(24 x 16 = 384\); try batch_size=1152 minibatch_size=288$"
    with pytest.raises(ValueError, match=expected):
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


def test_sizes_that_went_in_a_circle_now_settle_in_one_step() -> None:
    """Issue 12: 24 rows with default sizes said 8064, which then said 8192, which said 8064 again."""
    with pytest.raises(ValueError, match=r"try batch_size=8064 minibatch_size=2016$"):
        TrainerConfig().check_rows(24)
    assert size_message(batch_size=8064).endswith("try minibatch_size=2016")
    TrainerConfig(batch_size=8064, minibatch_size=2016).check_rows(24)


SIZE_GRID = [(rows, bptt) for rows in (1, 2, 3, 5, 7, 8, 12, 24, 48) for bptt in (1, 4, 8, 16, 24, 32)]


def size_samples(count: int = 1500) -> list[tuple[int, int, int, int]]:
    """(rows, bptt, batch, minibatch) drawn across the grid, from tiny to large, many deliberately invalid."""
    draw = random.Random(12)
    samples = []
    for _ in range(count):
        rows, bptt = draw.choice(SIZE_GRID)
        batch = draw.choice([draw.randint(1, 20_000), bptt * rows * draw.randint(1, 40), 2 ** draw.randint(4, 14)])
        minibatch = draw.choice([draw.randint(1, batch + 64), bptt * draw.randint(1, 64), 2 ** draw.randint(3, 12)])
        samples.append((rows, bptt, batch, minibatch))
    return samples


def suggested(message: str) -> dict[str, int]:
    """The key=value pairs after 'try' at the end of a one-line error."""
    match = re.search(r"; try ((?:\w+=\d+ ?)+)$", message)
    assert match, f"no fix in {message!r}"
    pairs = dict(item.split("=") for item in match.group(1).split())
    assert set(pairs) <= set(SIZE_FIELDS), message
    return {key: int(value) for key, value in pairs.items()}


def passes_everything(batch: int, minibatch: int, bptt: int, rows: int) -> None:
    """Both the model validators and check_rows accept these sizes."""
    TrainerConfig(batch_size=batch, minibatch_size=minibatch, bptt_horizon=bptt).check_rows(rows)


def first_error(check: Callable[[], object]) -> str | None:
    """The one-line message of the size error `check` raises, from a validator or check_rows."""
    try:
        check()
    except ValidationError as error:
        return error.errors()[0]["msg"].removeprefix("Value error, ")
    except ValueError as error:
        return str(error)
    return None


def deferred(sizes: dict[str, int]) -> TrainerConfig:
    """A config as build_run_config makes it: size rules left to the check that knows the rows."""
    return TrainerConfig.model_validate(sizes, context={DEFER_SIZE_CHECK: True})


def test_every_suggestion_passes_every_rule_at_once() -> None:
    """Whatever the sizes, a fix suggested where the rows are known passes all checks in one step."""
    errors = 0
    for rows, bptt, batch, minibatch in size_samples():
        sizes = {"batch_size": batch, "minibatch_size": minibatch, "bptt_horizon": bptt}
        for check in (lambda s=sizes, r=rows: deferred(s).check_rows(r),
                      lambda s=sizes, r=rows: TrainerConfig.model_validate(s, context={"num_rows": r})):
            message = first_error(check)
            if message is None:
                continue
            errors += 1
            fixed = sizes | suggested(message)
            assert "\n" not in message
            passes_everything(fixed["batch_size"], fixed["minibatch_size"], bptt, rows)
    assert errors > 1000, "the sample exercises the errors"


def test_without_rows_a_suggestion_passes_the_model_and_keeps_a_batch_that_fits_the_rows() -> None:
    """The model validator alone cannot see the rows; its fix never breaks a batch_size that already fits them."""
    for rows, bptt, batch, minibatch in size_samples():
        message = size_message(batch_size=batch, minibatch_size=minibatch, bptt_horizon=bptt)
        if message is None:
            continue
        fixed = {"batch_size": batch, "minibatch_size": minibatch} | suggested(message)
        TrainerConfig(**fixed, bptt_horizon=bptt)
        if batch % (rows * bptt) == 0:
            assert fixed["batch_size"] == batch, message
            passes_everything(fixed["batch_size"], fixed["minibatch_size"], bptt, rows)


@pytest.mark.parametrize("explicit", [(), ("batch_size",), ("minibatch_size",), SIZE_FIELDS])
def test_fitting_keeps_what_the_user_set_and_fits_the_rest(explicit: tuple[str, ...]) -> None:
    """Sizes the user left unset move to fit the rows; set ones are kept, or the error's fix works."""
    for rows, bptt, batch, minibatch in size_samples(600):
        if minibatch > batch or batch % minibatch or minibatch % bptt:
            continue  # fit_sizes_to_rows starts from a config that passed the model validators
        cfg = TrainerConfig(batch_size=batch, minibatch_size=minibatch, bptt_horizon=bptt)
        try:
            fitted = fit_sizes_to_rows(cfg, rows, explicit)
        except ValueError as error:
            assert explicit, "with nothing set by the user, sizes always fit"
            fixed = {"batch_size": batch, "minibatch_size": minibatch} | suggested(str(error))
            passes_everything(fixed["batch_size"], fixed["minibatch_size"], bptt, rows)
            continue
        passes_everything(fitted.batch_size, fitted.minibatch_size, bptt, rows)
        for name in explicit:
            assert getattr(fitted, name) == getattr(cfg, name)


def test_fitting_the_defaults_to_24_rows_logs_one_line(caplog: pytest.LogCaptureFixture) -> None:
    cfg = TrainerConfig()
    with caplog.at_level("INFO", logger="mettle.rl.trainer_config"):
        fitted = fit_sizes_to_rows(cfg, 24, explicit=set())
    assert (fitted.batch_size, fitted.minibatch_size) == (8064, 2016)
    assert fitted.model_dump(exclude=set(SIZE_FIELDS)) == cfg.model_dump(exclude=set(SIZE_FIELDS))
    assert [r.getMessage() for r in caplog.records] == [
        "batch_size 8192 / minibatch_size 2048 do not fit 24 agent rows x bptt_horizon 16; "
        "using batch_size=8064 minibatch_size=2016 (set them to choose)"]
    assert fit_sizes_to_rows(cfg, 8, explicit=set()) is cfg, "sizes that fit are left alone"


def test_an_explicit_batch_that_cannot_fit_names_itself() -> None:
    cfg = TrainerConfig(batch_size=8192)
    with pytest.raises(ValueError, match=r"^batch_size 8192 must be a multiple of agent rows x bptt_horizon "
                                         r"\(24 x 16 = 384\); try batch_size=8064 minibatch_size=2016$"):
        fit_sizes_to_rows(cfg, 24, explicit={"batch_size"})
    assert fit_sizes_to_rows(cfg, 24, explicit={"minibatch_size"}).batch_size == 6144, "a multiple of 384 and 2048"


@pytest.mark.parametrize(
    "path,value",
    [("update_epochs", 2), ("total_timesteps", 64), ("ppo.entropy_coef", 0.1), ("ppo.clip_coef", 0.1),
     ("optimizer.learning_rate", 1e-3), ("advantage.gamma", 0.9), ("sampling.method", "prioritized"),
     ("ppo", None)],
)
def test_a_trainer_config_cannot_be_changed(path: str, value: object) -> None:
    """What schedules and the autotuner move lives in TrainerState; writing to the config fails loudly."""
    cfg = TrainerConfig()
    *parents, name = path.split(".")
    owner = cfg
    for parent in parents:
        owner = getattr(owner, parent)
    before = cfg.model_dump_json()
    with pytest.raises(ValidationError, match="frozen"):
        setattr(owner, name, value)
    assert cfg.model_dump_json() == before
    changed = cfg.model_copy(update={"update_epochs": 2})  # variants are new objects
    assert (changed.update_epochs, cfg.update_epochs) == (2, 4)
