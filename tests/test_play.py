"""`mettle play` draws a policy's MettaGrid episode as text, records it, and replays exactly what was shown."""

from __future__ import annotations

import io
import json
import os
import re
import threading
import time
from pathlib import Path

import pytest

from mettle.config import EnvConfig, PolicyConfig, RunConfig
from mettle.play import (
    CLEAR,
    HOME,
    AgentState,
    FrameData,
    legend_for,
    object_symbols,
    play_run,
    read_recording,
    render_frame,
    replay_file,
    snapshot,
)
from mettle.rl.evaluate import ActionChoice

ARENA = {"num_agents": 3, "width": 8, "height": 7, "mines": 3, "altars": 2, "max_steps": 6}
STATUS = re.compile(r"^mettagrid:arena  step (\d+)/6  return ", re.MULTILINE)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run directory as `mettle train` leaves it, holding an untrained token policy for a tiny arena."""
    from mettle.agent.registry import build_policy
    from mettle.envs.mettagrid import make_mettagrid_environment
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


def test_render_frame_from_structured_data() -> None:
    frame = FrameData(step=3, max_steps=10, grid=("#####", "#0.m#", "#.1a#", "#####"),
                      agents=(AgentState(0, 1, 1, 1.5, {"ore": 2}), AgentState(1, 2, 2, 0.5, {"ore": 1, "heart": 1})))
    text = render_frame(frame, "mettagrid:arena", [("#", "wall"), ("m", "mine")])
    lines = text.split("\n")
    assert lines[0] == "mettagrid:arena  step 3/10  return 2.00  inventory: ore=3 heart=1"
    assert lines[1:5] == list(frame.grid)
    assert lines[5] == "0: 1.50 ore=2   1: 0.50 ore=1 heart=1"
    assert lines[6] == "legend: # wall  m mine"


def test_snapshot_of_a_real_game_has_a_wall_border_and_every_agent() -> None:
    from mettle.envs.mettagrid import make_mettagrid_environment

    env = make_mettagrid_environment("arena", num_envs=1, seed=7, **ARENA)
    try:
        sim = env.simulations[0]
        assert sim is not None
        symbols = object_symbols(sim.object_type_names)
        frame = snapshot(sim, symbols, [0.0, 1.0, 2.0], max_steps=6)
    finally:
        env.close()
    grid = frame.grid
    assert len(grid) == 7 and all(len(row) == 8 for row in grid)
    assert grid[0] == grid[-1] == "#" * 8 and all(row[0] == row[-1] == "#" for row in grid)
    body = "".join(grid)
    assert sorted(c for c in body if c.isdigit()) == ["0", "1", "2"]
    assert body.count(symbols["mine"]) == 3 and body.count(symbols["altar"]) == 2
    assert [a.id for a in frame.agents] == [0, 1, 2] and [a.total_return for a in frame.agents] == [0.0, 1.0, 2.0]
    for agent in frame.agents:
        assert grid[agent.row][agent.col] == str(agent.id)
    assert ("m", "mine") in legend_for(symbols)


def test_object_symbols_are_distinct_lowercase_letters() -> None:
    symbols = object_symbols(["agent", "wall", "mine", "mine_red", "altar", "", "generator"])
    assert symbols["wall"] == "#" and "agent" not in symbols and "" not in symbols
    letters = [symbols[name] for name in ("mine", "mine_red", "altar", "generator")]
    assert len(set(letters)) == 4 and all(c.islower() for c in letters)


def test_play_to_a_plain_stream_prints_one_frame_per_step(run_dir: Path) -> None:
    out = io.StringIO()
    assert play_run(run_dir, steps=4, fps=0, save=None, stream=out, seed=1, actions="greedy") == 0
    frames = frames_of(out.getvalue())
    assert len(frames) == 4
    assert [int(m) for m in STATUS.findall(out.getvalue())] == [1, 2, 3, 4]
    assert "\x1b" not in out.getvalue()
    assert all(frame.split("\n")[1] == "#" * 8 for frame in frames)


def test_play_without_steps_runs_one_whole_episode(run_dir: Path) -> None:
    out = io.StringIO()
    assert play_run(run_dir, steps=None, fps=0, save=None, stream=out, seed=2, actions="sampled") == 0
    assert [int(m) for m in STATUS.findall(out.getvalue())] == [1, 2, 3, 4, 5, 6]
    longer = io.StringIO()
    play_run(run_dir, steps=50, fps=0, save=None, stream=longer, seed=2, actions="sampled")
    assert len(frames_of(longer.getvalue())) == 6, "play stops at the end of the episode"


def test_play_on_a_terminal_redraws_in_place(run_dir: Path) -> None:
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
    for frame in drawn:
        grid = frame.split("\n")[1:8]
        assert grid[0] == grid[-1] == "#" * 8 and sorted(c for c in "".join(grid) if c.isdigit()) == ["0", "1", "2"]


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


def test_save_then_replay_shows_the_same_frames(run_dir: Path, tmp_path: Path) -> None:
    live, recording = io.StringIO(), tmp_path / "episode.jsonl"
    play_run(run_dir, steps=5, fps=0, save=recording, stream=live, seed=3, actions="greedy")
    header = json.loads(recording.read_text().splitlines()[0])
    assert header["format"] == "mettle-play" and header["env"] == "mettagrid:arena" and header["frames"] == 5
    assert (header["width"], header["height"], header["num_agents"]) == (8, 7, 3)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temp file is left behind"
    _, frames = read_recording(recording)
    assert [f.step for f in frames] == [1, 2, 3, 4, 5]
    replayed = io.StringIO()
    assert replay_file(recording, fps=0, stream=replayed) == 0
    assert frames_of(replayed.getvalue()) == frames_of(live.getvalue())


class InterruptedStream(io.StringIO):
    """A stream whose second frame is cut short by Ctrl-C."""

    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        if self.flushes == 2:
            raise KeyboardInterrupt


def test_ctrl_c_stops_play_and_still_saves(run_dir: Path, tmp_path: Path) -> None:
    recording = tmp_path / "episode.jsonl"
    code = play_run(run_dir, steps=5, fps=0, save=recording, stream=InterruptedStream(), seed=3, actions="greedy")
    assert code == 130
    assert [f.step for f in read_recording(recording)[1]] == [1, 2]


def test_replay_is_paced_by_fps(run_dir: Path, tmp_path: Path) -> None:
    recording = tmp_path / "episode.jsonl"
    play_run(run_dir, steps=4, fps=0, save=recording, stream=io.StringIO(), seed=3, actions="greedy")
    start = time.monotonic()
    replay_file(recording, fps=40, stream=io.StringIO())
    assert time.monotonic() - start >= 3 / 40 * 0.9


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "does not exist"),
        ("", "is empty"),
        ("not json at all\n", "line 1 is not valid JSON"),
        ('{"hello": 1}\n', "is not a mettle play recording"),
        ('{"format": "mettle-play", "version": 99}\n', "format version 99"),
        ('{"format": "mettle-play", "version": 1}\n', "holds no frames"),
        ('{"format": "mettle-play", "version": 1}\n{"step": 1}\n', "line 2 is not a valid frame"),
        ('{"format": "mettle-play", "version": 1}\n{"step": 1, "max_steps": 2, "grid": [1], "agents": []}\n',
         "line 2 is not a valid frame"),
    ],
)
def test_replay_of_a_bad_file_is_one_line_naming_it(tmp_path: Path, content: str | None, problem: str) -> None:
    path = tmp_path / "episode.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(problem)) as caught:
        replay_file(path, fps=0, stream=io.StringIO())
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)


def test_play_refuses_other_environments_and_bad_options(tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "config.json").write_text(RunConfig(env=EnvConfig(name="gym:CartPole-v1")).model_dump_json())
    with pytest.raises(ValueError, match="mettle play shows MettaGrid environments; gym:CartPole-v1 is not one"):
        play_run(tmp_path, steps=1, fps=0, save=None, stream=io.StringIO(), seed=0, actions="greedy")
    with pytest.raises(ValueError, match="does not exist"):
        play_run(tmp_path / "nope", steps=1, fps=0, save=None, stream=io.StringIO(), seed=0, actions="greedy")
    with pytest.raises(ValueError, match="--steps 0"):
        play_run(run_dir, steps=0, fps=0, save=None, stream=io.StringIO(), seed=0, actions="greedy")
    with pytest.raises(ValueError, match="--fps -1"):
        play_run(run_dir, steps=1, fps=-1, save=None, stream=io.StringIO(), seed=0, actions="greedy")


@pytest.mark.parametrize(("actions", "mode", "line"), [
    ("auto", "sampled", "actions: sampled (MettaGrid default; --greedy for argmax)"),
    ("greedy", "greedy", "actions: greedy (--greedy; MettaGrid default: sampled)"),
    ("sampled", "sampled", "actions: sampled (--sample; MettaGrid default: sampled)"),
])
def test_play_samples_by_default_says_so_and_records_it(run_dir: Path, tmp_path: Path, actions: str, mode: str,
                                                        line: str) -> None:
    out, recording = io.StringIO(), tmp_path / "episode.jsonl"
    assert play_run(run_dir, steps=3, fps=0, save=recording, stream=out, seed=4, actions=actions) == 0  # type: ignore[arg-type]
    assert out.getvalue().splitlines()[-1] == line
    header = json.loads(recording.read_text().splitlines()[0])
    assert (header["actions"], header["deterministic"]) == (mode, mode == "greedy")


def test_play_by_default_moves_as_sampled_play_does_and_repeats_for_a_seed(run_dir: Path) -> None:
    played: dict[str, list[list[str]]] = {}
    choices: tuple[ActionChoice, ...] = ("auto", "auto", "sampled", "greedy")
    for actions in choices:
        out = io.StringIO()
        play_run(run_dir, steps=None, fps=0, save=None, stream=out, seed=5, actions=actions)
        played.setdefault(actions, []).append(frames_of(out.getvalue()))
    assert played["auto"][0] == played["auto"][1] == played["sampled"][0]
    assert played["greedy"][0] != played["sampled"][0], "the agents move differently when they act greedily"
