"""`mettle play` draws a policy's MettaGrid episode, saves it as a MettaScope replay (mettagrid's own writer), and
plays replays back; the replay files hold what the episode did."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mettle.config import EnvConfig, PolicyConfig, RunConfig
from mettle.envs.mettagrid import make_mettagrid_environment
from mettle.envs.mettagrid_replays import read_replay, replay_frames
from mettle.play import CLEAR, HOME, default_replay_dir, object_symbols, play_run, replay_file
from mettle.rl.evaluate import ActionChoice

ARENA = {"num_agents": 3, "width": 8, "height": 7, "mines": 3, "altars": 2, "max_steps": 6}
STATUS = re.compile(r"^(?:mettagrid:arena|[0-9a-f-]+\.json\.z)  step (\d+)/6  return ", re.MULTILINE)
DENSE = {"num_agents": 2, "width": 6, "height": 6, "mines": 3, "altars": 3, "max_steps": 30}
"""Mines and altars close together: random moves earn rewards within the episode (seed 5, actions from rng 0)."""

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `mettle train` leaves it, holding an untrained token policy for a tiny arena."""
    from mettle.agent.registry import build_policy
    from mettle.rl.policy_files import save_policy

    run = tmp_path_factory.mktemp("run")
    cfg = RunConfig(env=EnvConfig(name="mettagrid:arena", num_envs=1, kwargs=ARENA),
                    policy=PolicyConfig(kind="token", hidden_size=16))
    (run / "config.json").write_text(cfg.model_dump_json())
    env = make_mettagrid_environment("arena", num_envs=1, **ARENA)
    try:
        policy = build_policy("token", hidden_size=16)
        policy.initialize_to_environment(env.policy_env_info, "cpu")
        save_policy(policy, env.policy_env_info, run, agent_step=0, epoch=0)
    finally:
        env.close()
    return run


def frames_of(text: str) -> list[str]:
    """Frames written to a non-terminal stream: separated by blank lines (the closing actions line left out)."""
    return [frame for frame in text.split("\n\n") if frame.strip() and not frame.startswith("actions: ")]


def decode(path: Path) -> dict[str, Any]:
    """A replay file as MettaScope reads it: zlib, then JSON (independent of mettle's reader)."""
    data = json.loads(zlib.decompress(path.read_bytes()))
    assert isinstance(data, dict)
    return data


def at(field: Any, step: int) -> Any:
    """A replay field at a replay step: the last `[step, value]` change at or before it, or the constant."""
    if isinstance(field, list) and field and all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], int)
                                                 for c in field):
        return [value for when, value in field if when <= step][-1]
    return field


# ---------------------------------------------------------------------------------- the replay files
def test_a_written_replay_holds_what_the_episode_did(tmp_path: Path) -> None:
    env = make_mettagrid_environment("arena", num_envs=1, seed=5, **DENSE)
    env.record_replays(tmp_path, episodes=1)
    env.reset(5)
    rng, returns = np.random.default_rng(0), np.zeros(2)
    positions: list[dict[int, list[int]]] = []
    totals: list[list[float]] = []
    try:
        for _ in range(DENSE["max_steps"]):
            env.send_actions(rng.integers(0, 5, size=(2, 1)))
            returns += env.get_observations().rewards
            sim = env.simulations[0]
            assert sim is not None
            positions.append({o["agent_id"]: [o["c"], o["r"]] for o in sim.grid_objects().values() if "agent_id" in o})
            totals.append(returns.tolist())
        written = env.finish_replays()
    finally:
        env.close()
    assert written == list(tmp_path.glob("*.json.z")) and len(written) == 1, "one episode recorded, at its end"
    data = decode(written[0])
    assert data["version"] == 4 and data["num_agents"] == 2 and data["map_size"] == [6, 6]
    assert data["max_steps"] == DENSE["max_steps"] == data["infos"]["attributes"]["steps"], "one entry per step"
    assert data["infos"]["episode_rewards"] == totals[-1] and sum(totals[-1]) > 0, "the episode earned rewards"
    agents = {obj["agent_id"]: obj for obj in data["objects"] if "agent_id" in obj}
    assert sorted(agents) == [0, 1]
    for step in (0, 7, 15, 29):  # replay step i is the state after the game's step i + 1
        for agent, obj in agents.items():
            assert at(obj["location"], step) == positions[step][agent], (step, agent)
            assert at(obj["total_reward"], step) == pytest.approx(totals[step][agent]), (step, agent)
    assert len({tuple(p[0]) for p in positions}) > 1, "the agents moved"
    frames = replay_frames(read_replay(written[0]))
    assert [f.step for f in frames] == list(range(1, 31))
    assert [list(f.returns) for f in frames] == totals
    seen = [{o["agent_id"]: [o["c"], o["r"]] for o in f.objects.values() if "agent_id" in o} for f in frames]
    assert seen == positions, "mettle's reader agrees"


def test_only_the_first_episodes_to_start_are_recorded(tmp_path: Path) -> None:
    env = make_mettagrid_environment("arena", num_envs=3, seed=1, **ARENA)
    env.record_replays(tmp_path, episodes=2)
    env.reset(1)
    try:
        for _ in range(3 * ARENA["max_steps"] + 2):  # three episodes per game
            env.send_actions(np.zeros((9, 1), dtype=np.int64))
        written = env.finish_replays()
    finally:
        env.close()
    assert len(written) == 2 and sorted(written) == sorted(tmp_path.glob("*.json.z"))
    assert all(decode(path)["max_steps"] == ARENA["max_steps"] for path in written)


def test_recording_leaves_the_games_as_they_were(tmp_path: Path) -> None:
    batches = []
    for directory in (None, tmp_path):
        env = make_mettagrid_environment("arena", num_envs=2, seed=5, **DENSE)
        env.record_replays(directory)
        env.reset(5)
        rng, seen = np.random.default_rng(0), []
        try:
            for _ in range(DENSE["max_steps"] + 3):
                env.send_actions(rng.integers(0, 5, size=(4, 1)))
                batch = env.get_observations()
                seen.append((batch.observations.copy(), batch.rewards.copy(), batch.terminals.copy()))
        finally:
            env.close()
        batches.append(seen)
    for plain, recorded in zip(*batches, strict=True):
        assert all(np.array_equal(a, b) for a, b in zip(plain, recorded, strict=True))
    assert len(list(tmp_path.glob("*.json.z"))) == 2, "episodes=None records every game's episodes"


# ---------------------------------------------------------------------------------- watching
def test_play_to_a_plain_stream_prints_one_ascii_frame_per_step(run_dir: Path) -> None:
    out = io.StringIO()
    assert play_run(run_dir, steps=4, fps=0, save=None, stream=out, seed=1, actions="greedy") == 0
    frames = frames_of(out.getvalue())
    assert len(frames) == 4
    assert [int(m) for m in STATUS.findall(out.getvalue())] == [1, 2, 3, 4]
    assert "\x1b" not in out.getvalue()
    for frame in frames:
        grid = frame.split("\n")[1:8]
        assert grid[0] == grid[-1] == "#" * 8 and sorted(c for c in "".join(grid) if c.isdigit()) == ["0", "1", "2"]
    assert not (run_dir / "replays").exists(), "nothing is saved without --save"


def test_play_without_steps_runs_one_whole_episode(run_dir: Path) -> None:
    out = io.StringIO()
    assert play_run(run_dir, steps=None, fps=0, save=None, stream=out, seed=2, actions="sampled") == 0
    assert [int(m) for m in STATUS.findall(out.getvalue())] == [1, 2, 3, 4, 5, 6]
    longer = io.StringIO()
    play_run(run_dir, steps=50, fps=0, save=None, stream=longer, seed=2, actions="sampled")
    assert len(frames_of(longer.getvalue())) == 6, "play stops at the end of the episode"


def test_play_on_a_terminal_redraws_mettagrids_map_in_place(run_dir: Path) -> None:
    from mettagrid.renderer.miniscope.symbol import AGENT_SQUARES, DEFAULT_SYMBOL_MAP

    master, slave = os.openpty()
    chunks: list[bytes] = []
    reader = threading.Thread(target=_drain, args=(master, chunks), daemon=True)
    reader.start()
    with open(slave, "w", encoding="utf-8", closefd=True) as terminal:
        assert terminal.isatty()
        assert play_run(run_dir, steps=3, fps=0, save=None, stream=terminal, seed=1, actions="greedy") == 0
    reader.join(timeout=5)
    os.close(master)
    shown = b"".join(chunks).decode().replace("\r\n", "\n")
    assert shown.count(CLEAR) == 1 and shown.count(HOME) == 3
    drawn = [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", frame) for frame in shown.split(HOME)[1:]]
    assert [int(m) for frame in drawn for m in STATUS.findall(frame)] == [1, 2, 3]
    wall, mine = DEFAULT_SYMBOL_MAP["wall"], chr(0xFF4D)  # a type mettagrid has no symbol for: full-width "ｍ"
    for frame in drawn:
        grid = frame.split("\n")[1:8]
        assert grid[0] == grid[-1] == wall * 8, grid
        assert all(square in "".join(grid) for square in AGENT_SQUARES[:3]) and "".join(grid).count(mine) == 3


def _drain(fd: int, chunks: list[bytes]) -> None:
    """Read a pty's master side until the slave closes (so the writer never blocks on a full buffer)."""
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:
            return
        if not data:
            return
        chunks.append(data)


def test_object_symbols_are_distinct_lowercase_letters() -> None:
    symbols = object_symbols(["agent", "wall", "mine", "mine_red", "altar", "", "generator"])
    assert symbols["wall"] == "#" and "agent" not in symbols and "" not in symbols
    letters = [symbols[name] for name in ("mine", "mine_red", "altar", "generator")]
    assert len(set(letters)) == 4 and all(c.islower() for c in letters)


# ---------------------------------------------------------------------------------- saving and playing back
def test_save_writes_a_replay_that_plays_back_as_it_was_shown(run_dir: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    live = io.StringIO()
    assert play_run(run_dir, steps=None, fps=0, save=tmp_path / "out", stream=live, seed=3, actions="sampled") == 0
    (replay,) = (tmp_path / "out").glob("*.json.z")
    assert f"replay {replay}" in capsys.readouterr().err
    data = decode(replay)
    assert data["version"] == 4 and data["max_steps"] == 6 and data["num_agents"] == 3
    replayed = io.StringIO()
    assert replay_file(replay, fps=0, stream=replayed) == 0
    body = [frame.split("\n", 1)[1] for frame in frames_of(replayed.getvalue())]
    assert body == [frame.split("\n", 1)[1] for frame in frames_of(live.getvalue())], "same maps and returns"
    assert [int(m) for m in STATUS.findall(replayed.getvalue())] == [1, 2, 3, 4, 5, 6]


def test_save_does_not_change_the_episode(run_dir: Path, tmp_path: Path) -> None:
    plain, saved = io.StringIO(), io.StringIO()
    play_run(run_dir, steps=None, fps=0, save=None, stream=plain, seed=4, actions="sampled")
    play_run(run_dir, steps=None, fps=0, save=tmp_path, stream=saved, seed=4, actions="sampled")
    assert frames_of(plain.getvalue()) == frames_of(saved.getvalue())


def test_default_replay_dir_is_the_runs(run_dir: Path) -> None:
    assert default_replay_dir(run_dir) == run_dir / "replays"
    assert default_replay_dir(run_dir / "checkpoints" / "3") == run_dir / "replays"


class InterruptedStream(io.StringIO):
    """A stream whose second frame is cut short by Ctrl-C."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        if self.flushes == 2:
            raise KeyboardInterrupt


def test_ctrl_c_stops_play_and_still_saves_what_was_played(run_dir: Path, tmp_path: Path) -> None:
    code = play_run(run_dir, steps=5, fps=0, save=tmp_path, stream=InterruptedStream(), seed=3, actions="greedy")
    assert code == 130
    (replay,) = tmp_path.glob("*.json.z")
    assert decode(replay)["max_steps"] == 2


def test_steps_cut_the_saved_episode_short(run_dir: Path, tmp_path: Path) -> None:
    play_run(run_dir, steps=4, fps=0, save=tmp_path, stream=io.StringIO(), seed=3, actions="greedy")
    (replay,) = tmp_path.glob("*.json.z")
    assert decode(replay)["max_steps"] == 4


def test_replay_is_paced_by_fps(run_dir: Path, tmp_path: Path) -> None:
    play_run(run_dir, steps=4, fps=0, save=tmp_path, stream=io.StringIO(), seed=3, actions="greedy")
    (replay,) = tmp_path.glob("*.json.z")
    start = time.monotonic()
    replay_file(replay, fps=40, stream=io.StringIO())
    assert time.monotonic() - start >= 3 / 40 * 0.9


def z(document: Any) -> bytes:
    """A JSON document compressed as a replay is."""
    return zlib.compress(json.dumps(document).encode())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b'{"version": 4}', "not zlib-compressed"),
        (zlib.compress(b"import os; os.system('x')"), "its content is not JSON"),
        (zlib.compress(b"\xff\xfe"), "its content is not JSON"),
        (zlib.compress(b"x" * 100)[:-4], "cut short"),
        (z([1, 2]), "its JSON is not an object"),
        (z({"version": 3}), "replay format version 3; this mettle reads version 4"),
        (z({"format": "mettle-play", "version": 1}), "replay format version 1"),
        (z({"version": 4, "num_agents": 1, "max_steps": 1, "type_names": [], "map_size": [2, 2]}),
         "field 'objects' must be a list"),
        (z({"version": 4, "num_agents": 1, "max_steps": 1, "objects": [], "type_names": [], "map_size": [2]}),
         "'map_size' must be [width, height]"),
        (z({"version": 4, "num_agents": 1, "max_steps": 10**9, "objects": [], "type_names": [], "map_size": [2, 2]}),
         "'max_steps' 1000000000 is not in"),
        (z({"version": 4, "num_agents": 1, "max_steps": 1, "objects": [{"id": 1}], "type_names": [],
            "map_size": [2, 2]}), "an object is malformed"),
        (z({"version": 4, "num_agents": 1, "max_steps": 0, "objects": [], "type_names": [], "map_size": [2, 2]}),
         "holds no steps"),
    ],
)
def test_replay_of_a_bad_file_is_one_line_naming_it(tmp_path: Path, content: bytes | None, problem: str) -> None:
    path = tmp_path / "episode.json.z"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(problem)) as caught:
        replay_file(path, fps=0, stream=io.StringIO())
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_play_refuses_other_environments_and_bad_options(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "config.json").write_text(RunConfig(env=EnvConfig(name="gym:CartPole-v1")).model_dump_json())
    with pytest.raises(ValueError, match="mettle play shows and saves MettaGrid environments; gym:CartPole-v1 is not"):
        play_run(tmp_path, steps=1, fps=0, save=tmp_path / "replays", stream=io.StringIO(), seed=0, actions="greedy")
    assert not (tmp_path / "replays").exists()
    with pytest.raises(ValueError, match="does not exist"):
        play_run(tmp_path / "nope", steps=1, fps=0, save=None, stream=io.StringIO(), seed=0, actions="greedy")
    with pytest.raises(ValueError, match="--steps 0"):
        play_run(run_dir, steps=0, fps=0, save=None, stream=io.StringIO(), seed=0, actions="greedy")
    with pytest.raises(ValueError, match="--fps -1"):
        play_run(run_dir, steps=1, fps=-1, save=None, stream=io.StringIO(), seed=0, actions="greedy")
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="cannot create the replay directory"):
        play_run(run_dir, steps=1, fps=0, save=tmp_path / "file", stream=io.StringIO(), seed=0, actions="greedy")


@pytest.mark.parametrize(("actions", "line"), [
    ("auto", "actions: sampled (MettaGrid default; --greedy for argmax)"),
    ("greedy", "actions: greedy (--greedy; MettaGrid default: sampled)"),
    ("sampled", "actions: sampled (--sample; MettaGrid default: sampled)"),
])
def test_play_samples_by_default_and_says_so(run_dir: Path, actions: str, line: str) -> None:
    out = io.StringIO()
    assert play_run(run_dir, steps=3, fps=0, save=None, stream=out, seed=4, actions=actions) == 0  # type: ignore[arg-type]
    assert out.getvalue().splitlines()[-1] == line


def test_play_by_default_moves_as_sampled_play_does_and_repeats_for_a_seed(run_dir: Path) -> None:
    played: dict[str, list[list[str]]] = {}
    choices: tuple[ActionChoice, ...] = ("auto", "auto", "sampled", "greedy")
    for actions in choices:
        out = io.StringIO()
        play_run(run_dir, steps=None, fps=0, save=None, stream=out, seed=5, actions=actions)
        played.setdefault(actions, []).append(frames_of(out.getvalue()))
    assert played["auto"][0] == played["auto"][1] == played["sampled"][0]
    assert played["greedy"][0] != played["sampled"][0], "the agents move differently when they act greedily"
