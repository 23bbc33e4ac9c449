"""The sweep's search space parser: every distribution kind, and each bad one refused in one line naming it."""

from __future__ import annotations

from pathlib import Path

import pytest

from mettle.config import parse_value
from mettle.errors import ConfigError
from mettle.sweep_space import (
    Distribution,
    is_distribution,
    override_text,
    parse_distribution,
    space_from_file,
    split_overrides,
)


@pytest.mark.parametrize("text,expected", [
    ("log(1e-4,3e-3)", Distribution("log", "log(1e-4,3e-3)", 1e-4, 3e-3)),
    ("float(0.1, 0.9)", Distribution("float", "float(0.1, 0.9)", 0.1, 0.9)),
    ("uniform(-1,1)", Distribution("float", "uniform(-1,1)", -1.0, 1.0)),
    ("int(2,10)", Distribution("int", "int(2,10)", 2.0, 10.0)),
    ("int(-3,-3)", Distribution("int", "int(-3,-3)", -3.0, -3.0)),
    ("choice(gae,vtrace)", Distribution("choice", "choice(gae,vtrace)", choices=("gae", "vtrace"))),
    ("choice(64, 128,true,null,1.5)", Distribution("choice", "choice(64, 128,true,null,1.5)",
                                                    choices=(64, 128, True, None, 1.5))),
], ids=["log", "float", "uniform", "int", "int-point", "choice-strings", "choice-json"])
def test_each_distribution_kind_parses(text: str, expected: Distribution) -> None:
    assert parse_distribution("k", text) == expected


def test_extremes_are_both_ends_or_every_choice() -> None:
    assert parse_distribution("k", "int(2,10)").extremes() == [2, 10]
    assert parse_distribution("k", "log(1e-4,3e-3)").extremes() == [1e-4, 3e-3]
    assert parse_distribution("k", "choice(gae,vtrace)").extremes() == ["gae", "vtrace"]


@pytest.mark.parametrize("text,expected", [
    ("log(1e-4)", "takes 2 bounds (low, high), got 1"),
    ("float(1,2,3)", "takes 2 bounds (low, high), got 3"),
    ("int()", "takes 2 bounds (low, high), got 0"),
    ("int(a,b)", "'a' is not an integer"),
    ("int(1.5,3)", "'1.5' is not an integer"),
    ("float(x,1)", "'x' is not a number"),
    ("float(nan,1)", "'nan' is not a finite number"),
    ("log(0,1)", "log() needs 0 < low"),
    ("int(10,2)", "low 10 is above high 2"),
    ("log(3e-3,1e-4)", "low 3e-3 is above high 1e-4"),
    ("foo(1,2)", "unknown distribution 'foo'"),
    ("eval(1,2)", "unknown distribution 'eval'"),
    ("choice()", "choice() needs values"),
    ("choice(a,,b)", "choice() needs values"),
    ("choice(a,a)", "a choice is listed twice"),
    ("choice([1],2)", "choice value '[1]' must be"),
], ids=lambda value: value if "(" in value else None)
def test_a_bad_distribution_is_one_line_naming_it(text: str, expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_distribution("update_epochs", text)
    message = str(caught.value)
    assert message.startswith(f"search space update_epochs={text}: ") and expected in message, message
    assert "\n" not in message


def test_overrides_split_into_fixed_values_and_the_space() -> None:
    fixed, space = split_overrides(["total_timesteps=50000", "update_epochs=int(2,10)", "env.name=gym:CartPole-v1",
                                    "optimizer.learning_rate=log(1e-4,3e-3)"])
    assert fixed == ["total_timesteps=50000", "env.name=gym:CartPole-v1"]
    assert sorted(space) == ["optimizer.learning_rate", "update_epochs"]
    assert is_distribution("bar(1)") and not is_distribution("gym:CartPole-v1")
    with pytest.raises(ConfigError, match="given twice"):
        split_overrides(["update_epochs=int(2,3)", "update_epochs=int(4,5)"])


@pytest.mark.parametrize("value", [3, 0.00123456789, True, None, "vtrace"])
def test_a_sampled_value_reads_back_as_itself(value: object) -> None:
    key, _, text = override_text("k", value).partition("=")  # type: ignore[arg-type]
    assert key == "k" and parse_value(text) == value


def test_a_space_file_is_yaml_or_json_data(tmp_path: Path) -> None:
    yaml_file = tmp_path / "space.yaml"
    yaml_file.write_text("optimizer.learning_rate: log(1e-4,3e-3)\nadvantage.method: [gae, vtrace]\n"
                         "batch_size: [256, 512]\n")
    space = space_from_file(yaml_file)
    assert space["optimizer.learning_rate"].kind == "log"
    assert space["advantage.method"].choices == ("gae", "vtrace")
    assert space["batch_size"].choices == (256, 512)
    json_file = tmp_path / "space.json"
    json_file.write_text('{"update_epochs": "int(2,10)"}')
    assert space_from_file(json_file)["update_epochs"].kind == "int"


@pytest.mark.parametrize("content,expected", [
    ("- 1\n- 2\n", "expected a mapping"),
    ("update_epochs: 3\n", "give a distribution as text"),
    ("update_epochs: int(3)\n", "takes 2 bounds"),
    ("a: [unclosed\n", "cannot read it"),
    ("x: !!python/object/apply:os.system [echo hi]\n", "cannot read it"),
], ids=["list", "number", "bad-dist", "bad-yaml", "python-tag"])
def test_a_bad_space_file_is_one_line(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "space.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        space_from_file(path)
