"""The shared space conversions and the row bookkeeping's shortcuts give exactly what the plain rules give."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

from mettle.envs.rows import RowBuffers
from mettle.envs.spaces import ActionConverter, ObservationWriter, scalar_infos


class SpaceError(ValueError):
    """Stands in for an adapter's own error class."""


def test_range_check_catches_negative_and_too_large_choices_of_any_integer_dtype() -> None:
    converter = ActionConverter(gym.spaces.MultiDiscrete([3, 2]), rows=2, error=SpaceError)
    assert converter.in_range(np.array([[0, 0], [2, 1]]))
    for bad in ([[3, 0], [0, 0]], [[0, 2], [0, 0]], [[-1, 0], [0, 0]], [[0, 0], [0, -(2**31)]]):
        assert not converter.in_range(np.array(bad, dtype=np.int64))
        assert not converter.in_range(np.array(bad, dtype=np.int32))
    assert not converter.in_range(np.array([[0, 0], [0, -(2**63)]]))
    assert converter.in_range(np.array([[2, 1], [0, 0]], dtype=np.uint8))
    assert not converter.in_range(np.asfortranarray(np.array([[0, 0], [0, 2]])))


def test_batched_actions_add_the_space_start_and_are_views_without_one() -> None:
    plain = ActionConverter(gym.spaces.Discrete(4), rows=3, error=SpaceError)
    actions = np.array([[0], [3], [1]])
    assert np.shares_memory(plain.batched(actions), actions) and plain.batched(actions).shape == (3,)
    shifted = ActionConverter(gym.spaces.MultiDiscrete([2, 2], start=[5, -1]), rows=2, error=SpaceError)
    assert shifted.batched(np.array([[0, 1], [1, 0]])).tolist() == [[5, 0], [6, -1]]
    with pytest.raises(ValueError, match=r"expected actions shaped \(2, 2\), got \(2, 1\)"):
        shifted.batched(np.zeros((2, 1), dtype=np.int64))


def test_single_actions_match_the_agent_space() -> None:
    discrete = ActionConverter(gym.spaces.Discrete(3, start=2), rows=1, error=SpaceError)
    assert discrete.single(np.array([1])) == 3 and isinstance(discrete.single(np.array([1])), int)
    multi = ActionConverter(gym.spaces.MultiDiscrete([[2, 3]]), rows=1, error=SpaceError)
    action = multi.single(np.array([1, 2]))
    assert action.shape == (1, 2) and action.dtype == multi.space.dtype and multi.space.contains(action)


def test_unsupported_spaces_fail_with_the_adapter_error_and_prefix() -> None:
    box = gym.spaces.Box(0, 1, (2,))
    with pytest.raises(SpaceError, match=r"^game: action space Box.* not supported; mettle policies need Discrete"):
        ActionConverter(box, rows=1, error=SpaceError, prefix="game: ")
    refused = r"^game: observation space Text\(1, 4, .*\) is not supported; mettle takes Box, Discrete, MultiDiscrete, "
    with pytest.raises(SpaceError, match=refused + r"MultiBinary, or Dict/Tuple nests of them; wrap it$"):
        ObservationWriter(gym.spaces.Text(4), SpaceError, "game: ", "wrap it")


@pytest.mark.parametrize("space,part", [
    (gym.spaces.Dict({"a": gym.spaces.Tuple([gym.spaces.Discrete(2), gym.spaces.Graph(gym.spaces.Discrete(2), None)])}),
     r"\['a'\]\[1\] is Graph"),
    (gym.spaces.Tuple([gym.spaces.MultiBinary(2), gym.spaces.Sequence(gym.spaces.Discrete(2))]), r"\[1\] is Sequence"),
    (gym.spaces.Dict({"x": gym.spaces.OneOf([gym.spaces.Discrete(2)])}), r"\['x'\] is OneOf"),
])
def test_nested_parts_without_a_feature_form_are_named_by_their_keys(space: gym.Space, part: str) -> None:
    with pytest.raises(SpaceError, match=f"is not supported: its part {part}") as error:
        ObservationWriter(space, SpaceError, "", "wrap it")
    assert "\n" not in str(error.value)


def test_empty_dicts_and_multirow_arrays_still_give_one_line() -> None:
    with pytest.raises(SpaceError, match=r"^observation space Dict\(\) is not supported"):
        ObservationWriter(gym.spaces.Dict({}), SpaceError, "", "")
    space = gym.spaces.Tuple([gym.spaces.MultiDiscrete([[2, 3], [4, 5]]), gym.spaces.Text(3)])
    with pytest.raises(SpaceError, match=r"MultiDiscrete\(\[\[2 3\] \[4 5\]\]\), Text") as error:
        ObservationWriter(space, SpaceError, "", "")
    assert "\n" not in str(error.value)


def test_observations_are_written_as_they_are_or_one_hot() -> None:
    one_hot = ObservationWriter(gym.spaces.Discrete(3, start=1), SpaceError, "", "")
    out = np.full((3, 3), 7.0, dtype=np.float32)
    one_hot.write(out, np.array([1, 3, 2]))
    assert out.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 0]]
    one_hot.write(out, np.array([2, 2, 2]), rows=np.array([False, True, False]))
    assert out.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    one_hot.write_row(out[0], 3)
    assert out[0].tolist() == [0, 0, 1]
    box = ObservationWriter(gym.spaces.Box(-1, 1, (2,), dtype=np.float64), SpaceError, "", "")
    rows = np.zeros((2, 2), dtype=np.float32)
    box.write_row(rows[1], [[0.5], [0.25]])
    assert box.space.dtype == np.float32 and rows.tolist() == [[0, 0], [0.5, 0.25]]


NESTED = gym.spaces.Dict({
    "state": gym.spaces.Tuple([
        gym.spaces.MultiDiscrete([[2, 3], [2, 4]], start=[[1, 0], [0, -2]]),
        gym.spaces.MultiBinary([2, 2]),
    ]),
    "cell": gym.spaces.Discrete(5, start=-1),
    "image": gym.spaces.Box(0, 255, (2, 3), dtype=np.uint8),
    "speed": gym.spaces.Box(-np.inf, np.inf, (1,), dtype=np.float64),
})
"""Every kind of part, nested, with starts, multi-dimensional shapes and unbounded values."""


def batch_of(space: gym.Space, samples: list) -> object:
    """Samples stacked the way a Gymnasium vector env hands them over (a Dict of batched parts, and so on)."""
    return gym.vector.utils.concatenate(space, samples, gym.vector.utils.create_empty_array(space, len(samples)))


@pytest.mark.parametrize("space", [
    NESTED,
    gym.spaces.Tuple([gym.spaces.Discrete(32), gym.spaces.Discrete(11), gym.spaces.Discrete(2)]),  # Blackjack's
    gym.spaces.MultiDiscrete([3, 2], start=[1, 1]),
    gym.spaces.MultiBinary(3),
])
def test_other_spaces_land_in_the_columns_gymnasium_flattens_them_to(space: gym.Space) -> None:
    writer = ObservationWriter(space, SpaceError, "", "")
    reference = gym.spaces.flatten_space(space)
    assert writer.space == gym.spaces.Box(reference.low.astype(np.float32), reference.high.astype(np.float32),
                                          dtype=np.float32)
    assert writer.extras == {"observation_source": space}
    space.seed(7)
    samples = [space.sample() for _ in range(6)]
    expected = np.stack([gym.spaces.flatten(space, sample) for sample in samples]).astype(np.float32)
    out = np.full((6, *writer.space.shape), 7.0, dtype=np.float32)
    writer.write(out, batch_of(space, samples))
    np.testing.assert_array_equal(out, expected)

    some = np.array([True, False, False, True, False, True])
    out.fill(7.0)
    writer.write(out, batch_of(space, samples), rows=some)
    np.testing.assert_array_equal(out[some], expected[some])
    assert (out[~some] == 7.0).all(), "rows left out stay as they were"
    writer.write(out, batch_of(space, samples), rows=np.zeros(6, dtype=bool))

    for sample, want in zip(samples, expected, strict=True):
        row = np.full(writer.space.shape, 7.0, dtype=np.float32)
        writer.write_row(row, sample)
        np.testing.assert_array_equal(row, want)
        assert space.contains(gym.spaces.unflatten(space, row.astype(reference.dtype))), "extras read it back"


def test_box_observations_keep_their_shape_and_only_integer_ones_name_their_source() -> None:
    floats = ObservationWriter(gym.spaces.Box(-1.0, 1.0, (2, 3), dtype=np.float64), SpaceError, "", "")
    assert floats.space.shape == (2, 3) and floats.extras == {}
    image = gym.spaces.Box(0, 255, (2, 3), dtype=np.uint8)
    writer = ObservationWriter(image, SpaceError, "", "")
    assert writer.space.shape == (2, 3) and writer.space.dtype == np.float32
    assert writer.extras == {"observation_source": image}, "normalisation needs to know these were integers"


def test_scalar_infos_keep_numbers_and_flatten_nested_dicts() -> None:
    info = {"a": 1, "b": np.float32(0.5), "c": np.array(2), "skip": "text", "v": np.ones(2), "n": {"x": True}}
    assert scalar_infos(info, "p/") == {"p/a": 1.0, "p/b": 0.5, "p/c": 2.0, "p/n/x": 1.0}
    assert scalar_infos(None) == {}


def _record_by_the_rules(buffers: RowBuffers, step: tuple[np.ndarray, ...]) -> None:
    """One step through the per-row rules only, with the shortcuts turned off."""
    buffers.settled = False
    buffers.begin_step()
    buffers.settled = False
    buffers.record(*step)


@pytest.mark.parametrize("reward_dtype", [np.float32, np.float64, np.int64])
def test_row_shortcuts_give_what_the_per_row_rules_give(reward_dtype: type) -> None:
    rng = np.random.default_rng(0)
    rows, fast, ruled = 6, RowBuffers.allocate(6, (1,)), RowBuffers.allocate(6, (1,))
    for buffers in (fast, ruled):
        buffers.restart_all()
    for t in range(600):
        ending = rng.random() < 0.3  # about a third of the steps end an episode somewhere, some both ways
        terminals = (rng.random(rows) < 0.3) & ending
        truncations = ((rng.random(rows) < 0.3) & ending).astype(np.int8)  # flags need not be bool
        step = ((rng.random(rows) * 4 - 2).astype(reward_dtype), terminals, truncations)
        fast.begin_step()
        fast.record(*step)
        _record_by_the_rules(ruled, step)
        for name in ("rewards", "terminals", "truncations", "mask", "starts", "done", "live", "returns", "lengths"):
            assert np.array_equal(getattr(fast, name), getattr(ruled, name)), (t, name)
        assert fast.any_done == ruled.any_done == bool(fast.done.any())
        fast.clear_totals(fast.done)
        ruled.clear_totals(ruled.done)
