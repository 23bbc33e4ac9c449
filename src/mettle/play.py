"""`mettle play`: watch a trained policy play one MettaGrid episode as text, record it, and replay the recording.

A frame is the map drawn one character per cell, then status lines:

    mettagrid:arena  step 12/256  return 3.00  inventory: ore=2 heart=3
    ##########
    #0..m....#
    #..a...1.#
    ##########
    0: 2.00 ore=1 heart=2   1: 1.00 ore=1 heart=1
    legend: # wall  . empty  a altar  m mine  0-9 A-Z agents by id (@ id 36+)

Actions are sampled from the policy unless `--greedy` asks for each head's argmax: greedy MettaGrid agents block
each other and stand still. After the episode one line says which mode was used.

Agents show their id (0-9, then A-Z); every other object type gets a lowercase letter (its first free letter),
walls `#`, empty cells `.`. Returns are the rewards each agent has collected so far this episode.

Recording (`--save FILE`) is JSON lines, written atomically once the episode ends (or is interrupted):

* line 1, the header: `{"format": "mettle-play", "version": 1, "env": ..., "seed": ..., "policy": ...,
  "deterministic": ..., "actions": "sampled" | "greedy", "width": W, "height": H, "num_agents": A,
  "legend": [[symbol, meaning], ...], "frames": N}`;
* then one line per step: `{"step": t, "max_steps": T, "grid": [row strings], "agents": [{"id", "row", "col",
  "return", "inventory": {resource: count}}]}`.

Replay rebuilds each frame from that data with the same `render_frame`, so it shows exactly what was shown
live, without mettagrid, torch or the policy.
"""

from __future__ import annotations

import json
import string
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mettle.config import ConfigError
from mettle.errors import one_line
from mettle.files import atomic_write

if TYPE_CHECKING:
    from mettagrid.simulator import Simulation

    from mettle.agent.policy import Policy
    from mettle.envs.mettagrid import MettaGridEnvironment
    from mettle.rl.evaluate import ActionChoice

__all__ = [
    "FORMAT",
    "VERSION",
    "AgentState",
    "FrameData",
    "object_symbols",
    "play_run",
    "read_recording",
    "render_frame",
    "replay_file",
    "snapshot",
    "write_recording",
]

FORMAT = "mettle-play"
"""The header's `format` value: marks a file as a `mettle play` recording."""
VERSION = 1
"""Recording format version; readers refuse newer ones."""
WALL, EMPTY, CROWD, UNKNOWN = "#", ".", "@", "?"
"""Walls, empty cells, agents with ids past AGENT_SYMBOLS, objects without a free letter."""
AGENT_SYMBOLS = string.digits + string.ascii_uppercase
"""Agent id -> symbol: digits and capitals never clash with the lowercase letters of object types."""
AGENT_LEGEND = ("0-9 A-Z", f"agents by id ({CROWD} id {len(AGENT_SYMBOLS)}+)")
CLEAR, HOME, ERASE_LINE, ERASE_BELOW = "\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
INTERRUPTED = 130
"""play_run's return code after Ctrl-C (the shell's code for SIGINT); what was played is still saved."""
STATUS_WIDTH = 100
"""Per-agent entries are packed into lines of at most this many characters (or the map's width)."""


# ---------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class AgentState:
    """One agent in one frame: where it stands, what it carries, what it has earned this episode."""

    id: int
    row: int
    col: int
    total_return: float
    inventory: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The agent as one recording entry."""
        return {"id": self.id, "row": self.row, "col": self.col, "return": self.total_return,
                "inventory": dict(self.inventory)}

    @classmethod
    def from_json(cls, data: Any) -> AgentState:
        """Parse and type-check a recording entry (TypeError/KeyError/ValueError on bad data)."""
        inventory = {str(k): _int(v, f"inventory.{k}") for k, v in _mapping(data["inventory"], "inventory").items()}
        return cls(_int(data["id"], "id"), _int(data["row"], "row"), _int(data["col"], "col"),
                   _number(data["return"], "return"), inventory)


@dataclass(frozen=True)
class FrameData:
    """Everything one frame shows, in plain data: the map as symbol rows and each agent's state."""

    step: int
    max_steps: int
    grid: tuple[str, ...]
    agents: tuple[AgentState, ...]

    def to_json(self) -> dict[str, Any]:
        """The frame as one recording line."""
        return {"step": self.step, "max_steps": self.max_steps, "grid": list(self.grid),
                "agents": [agent.to_json() for agent in self.agents]}

    @classmethod
    def from_json(cls, data: Any) -> FrameData:
        """Parse and type-check a recording line (TypeError/KeyError/ValueError on bad data)."""
        grid, agents = data["grid"], data["agents"]
        if not isinstance(grid, list) or not all(isinstance(row, str) for row in grid):
            raise TypeError("grid must be a list of strings")
        if not isinstance(agents, list):
            raise TypeError("agents must be a list")
        return cls(_int(data["step"], "step"), _int(data["max_steps"], "max_steps"), tuple(grid),
                   tuple(AgentState.from_json(agent) for agent in agents))


def _int(value: Any, name: str) -> int:
    """An integer field of a recording (bools are refused)."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    """A numeric field of a recording."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    """An object field of a recording."""
    if not isinstance(value, dict):
        raise TypeError(f"{name} must be an object, got {value!r}")
    return value


# ---------------------------------------------------------------------------------- rendering
def agent_symbol(agent_id: int) -> str:
    """An agent's map character: its id as a digit or capital, `@` past 36 agents."""
    return AGENT_SYMBOLS[agent_id] if 0 <= agent_id < len(AGENT_SYMBOLS) else CROWD


def object_symbols(type_names: Iterable[str]) -> dict[str, str]:
    """Object type -> lowercase letter (first free letter of its name, else any free one); walls are `#`."""
    symbols: dict[str, str] = {"wall": WALL}
    taken = set()
    for name in dict.fromkeys(n for n in type_names if n and n not in ("agent", "wall")):
        candidates = [c for c in name.lower() if c in string.ascii_lowercase] + list(string.ascii_lowercase)
        symbol = next((c for c in candidates if c not in taken), UNKNOWN)
        taken.add(symbol)
        symbols[name] = symbol
    return symbols


def legend_for(symbols: Mapping[str, str]) -> list[tuple[str, str]]:
    """(symbol, meaning) pairs for walls, empty cells, each object type and the agents."""
    objects = sorted((s, name) for name, s in symbols.items() if s != WALL)
    return [(WALL, "wall"), (EMPTY, "empty"), *objects, AGENT_LEGEND]


def render_frame(frame: FrameData, title: str = "", legend: Sequence[Sequence[str]] = ()) -> str:
    """The text of one frame (status line, map rows, agents, legend), with no trailing newline."""
    lines = [_status_line(frame, title), *frame.grid]
    width = max(STATUS_WIDTH, *(len(row) for row in frame.grid)) if frame.grid else STATUS_WIDTH
    lines += _pack([_agent_entry(agent) for agent in frame.agents], width)
    if legend:
        lines.append("legend: " + "  ".join(f"{symbol} {meaning}" for symbol, meaning in legend))
    return "\n".join(lines)


def _status_line(frame: FrameData, title: str) -> str:
    """Step counter, total return and the agents' summed inventory."""
    limit = f"/{frame.max_steps}" if frame.max_steps > 0 else ""
    total = sum(agent.total_return for agent in frame.agents)
    carried: dict[str, int] = {}
    for agent in frame.agents:
        for item, count in agent.inventory.items():
            carried[item] = carried.get(item, 0) + count
    parts = [title, f"step {frame.step}{limit}", f"return {total:.2f}"]
    if carried:
        parts.append("inventory: " + " ".join(f"{item}={count}" for item, count in carried.items()))
    return "  ".join(part for part in parts if part)


def _agent_entry(agent: AgentState) -> str:
    """`<symbol>: <return> item=count...` for one agent."""
    items = "".join(f" {item}={count}" for item, count in agent.inventory.items() if count)
    return f"{agent_symbol(agent.id)}: {agent.total_return:.2f}{items}"


def _pack(entries: Sequence[str], width: int, gap: str = "   ") -> list[str]:
    """Entries joined by `gap`, broken into lines of at most `width` characters (a long entry gets its own)."""
    lines: list[str] = []
    for entry in entries:
        if lines and len(lines[-1]) + len(gap) + len(entry) <= width:
            lines[-1] += gap + entry
        else:
            lines.append(entry)
    return lines


# ---------------------------------------------------------------------------------- reading a simulation
def snapshot(sim: Simulation, symbols: Mapping[str, str], returns: Sequence[float], max_steps: int) -> FrameData:
    """The simulation's current map and agents as plain frame data (agents drawn over objects over walls)."""
    height, width = sim.map_height, sim.map_width
    cells = [[EMPTY] * width for _ in range(height)]
    agents: list[AgentState] = []
    resources = sim.resource_names
    objects = sorted(sim.grid_objects().values(), key=lambda o: (o["type_name"] == "agent", o["type_name"] != "wall"))
    for obj in objects:
        row, col = int(obj["r"]), int(obj["c"])
        if "agent_id" in obj:
            agent_id = int(obj["agent_id"])
            inventory = {_resource(resources, k): int(v) for k, v in obj.get("inventory", {}).items()}
            agents.append(AgentState(agent_id, row, col, float(returns[agent_id]), inventory))
            symbol = agent_symbol(agent_id)
        else:
            symbol = symbols.get(obj["type_name"], UNKNOWN)
        if 0 <= row < height and 0 <= col < width:
            cells[row][col] = symbol
    agents.sort(key=lambda agent: agent.id)
    return FrameData(int(sim.current_step), max_steps, tuple("".join(r) for r in cells), tuple(agents))


def _resource(names: Sequence[str], key: int | str) -> str:
    """A resource's name from the id grid_objects reports (the id itself if unnamed)."""
    return names[key] if isinstance(key, int) and 0 <= key < len(names) else str(key)


# ---------------------------------------------------------------------------------- terminal output
class FrameView:
    """Shows frames on a stream: redrawn in place with ANSI codes on a terminal, one after another otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.live = _isatty(stream)
        self._shown = 0

    def show(self, text: str) -> None:
        """Draw one frame (a terminal's first frame clears the screen and hides the cursor)."""
        if not self.live:
            self.stream.write(text + "\n\n")
        else:
            start = CLEAR + HIDE_CURSOR if self._shown == 0 else ""
            body = "\n".join(line + ERASE_LINE for line in text.split("\n"))
            self.stream.write(start + HOME + body + ERASE_BELOW)
        self._shown += 1
        self.stream.flush()

    def close(self) -> None:
        """Leave a terminal usable: cursor back on, below the last frame."""
        if self.live and self._shown:
            self.stream.write("\n" + SHOW_CURSOR)
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    """Whether the stream is a terminal (streams without isatty are not)."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Pacer:
    """Holds frames to `fps` per second (0: as fast as possible), measured from the previous frame."""

    def __init__(self, fps: float) -> None:
        check_fps(fps)
        self.interval = 1.0 / fps if fps > 0 else 0.0
        self._next: float | None = None

    def wait(self) -> None:
        """Sleep until the next frame is due."""
        now = time.monotonic()
        if self._next is not None and now < self._next:
            time.sleep(self._next - now)
            now = self._next
        self._next = now + self.interval


def check_fps(fps: float) -> None:
    """Refuse negative or non-finite frame rates with a one-line fix."""
    if not fps >= 0 or fps == float("inf"):
        raise ConfigError(f"--fps {fps} must be a finite number >= 0 (0: as fast as possible)")


# ---------------------------------------------------------------------------------- playing a run
def play_run(
    run_path: Path,
    steps: int | None,
    fps: float,
    save: Path | None,
    stream: TextIO,
    seed: int,
    actions: ActionChoice = "auto",
) -> int:
    """Run a trained run's newest policy for one episode (at most `steps` steps), drawing every step; 0 when done.

    `actions` "auto" samples (MettaGrid's default); the mode used is said on `stream` after the episode.
    Ctrl-C stops early and returns 130; what was played is still written to `save`. User errors
    (no such run, not a MettaGrid run, bad options) raise ConfigError (a ValueError) with a one-line message.
    """
    import torch

    from mettle.rl.evaluate import actions_line, isolated_rng, resolve_actions
    from mettle.run import load_newest_policy, load_run_config
    from mettle.runtime import use_torch_threads

    _check_play_options(run_path, steps, fps, seed)
    cfg = load_run_config(run_path)
    use_torch_threads(cfg.torch_threads)
    title = cfg.env.name
    target = mettagrid_target(title)
    mode = resolve_actions(actions, title)
    device = _usable_device(cfg.device)
    policy, policy_info, policy_dir = load_newest_policy(run_path, device)
    env = _make_env(target, cfg.env.kwargs, seed)
    try:
        _check_compatible(title, policy_info, env)
        sim = env.simulations[0]
        symbols = object_symbols(sim.object_type_names if sim is not None else ())
        legend = legend_for(symbols)
        with isolated_rng(seed, torch.device(device)):  # a sampled episode repeats for a --seed
            frames, interrupted = _play_episode(env, policy, device, mode == "greedy", steps, symbols,
                                                lambda f: render_frame(f, title, legend), FrameView(stream),
                                                Pacer(fps))
    finally:
        env.close()
    stream.write(actions_line(actions, title) + "\n")
    stream.flush()
    if save is not None:
        header = {"env": title, "seed": seed, "policy": str(policy_dir), "deterministic": mode == "greedy",
                  "actions": mode}
        write_recording(save, header, legend, frames)
    return INTERRUPTED if interrupted else 0


def _check_play_options(run_path: Path, steps: int | None, fps: float, seed: int) -> None:
    """Fail before loading anything when an option cannot work."""
    if not Path(run_path).exists():
        raise ConfigError(f"run directory {run_path} does not exist")
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps {steps} must be at least 1")
    if seed < 0:
        raise ConfigError(f"--seed {seed} must be >= 0")
    check_fps(fps)


def mettagrid_target(env_name: str) -> str:
    """The task or config file of a `mettagrid:` env name; other families cannot be drawn."""
    family, _, target = env_name.partition(":")
    if family != "mettagrid" or not target:
        raise ConfigError(f"mettle play shows MettaGrid environments; {env_name} is not one")
    return target


def _usable_device(device: str) -> str:
    """The run's device, or the CPU when it names a GPU this machine lacks (watching needs no GPU)."""
    import torch

    return device if not device.startswith("cuda") or torch.cuda.is_available() else "cpu"


def _make_env(target: str, kwargs: Mapping[str, Any], seed: int) -> MettaGridEnvironment:
    """One game of the run's task, in this process (whatever vectorisation the run trained with)."""
    from mettle.envs.mettagrid import make_mettagrid_environment

    try:
        return make_mettagrid_environment(target, num_envs=1, seed=seed, **dict(kwargs))
    except ValueError as error:
        raise ConfigError(str(error).splitlines()[0]) from None


def _check_compatible(name: str, policy_info: Any, env: MettaGridEnvironment) -> None:
    """The saved policy must fit the game's observations and actions (the run's kwargs may have changed)."""
    info = env.policy_env_info
    same_obs = tuple(policy_info.observation_space.shape) == info.observation_space.shape
    if not same_obs or policy_info.action_space != info.action_space:
        raise ConfigError(
            f"the policy was saved for observations {policy_info.observation_space.shape} and actions "
            f"{policy_info.action_space}, but {name} now has {info.observation_space.shape} and {info.action_space}"
        )


def _play_episode(
    env: MettaGridEnvironment,
    policy: Policy,
    device: str,
    deterministic: bool,
    steps: int | None,
    symbols: Mapping[str, str],
    render: Callable[[FrameData], str],
    view: FrameView,
    pacer: Pacer,
) -> tuple[list[FrameData], bool]:
    """Step the game with the policy until the episode ends or `steps` were played; draw after every step."""
    import numpy as np

    policy.reset_memory()
    policy.eval()
    returns = np.zeros(env.batch_info.num_rows, dtype=np.float64)
    max_steps = int(env.config.game.max_steps)
    frames: list[FrameData] = []
    batch = env.get_observations()
    try:
        while steps is None or len(frames) < steps:
            env.send_actions(policy.act(batch, device, deterministic))
            batch = env.get_observations()
            returns += batch.rewards
            sim = env.simulations[0]
            assert sim is not None
            frames.append(snapshot(sim, symbols, returns.tolist(), max_steps))
            pacer.wait()
            view.show(render(frames[-1]))
            if bool(np.any(batch.terminals) or np.any(batch.truncations)):
                break
    except KeyboardInterrupt:
        return frames, True
    finally:
        view.close()
    return frames, False


# ---------------------------------------------------------------------------------- recordings
def write_recording(
    path: Path, header: Mapping[str, Any], legend: Sequence[Sequence[str]], frames: Sequence[FrameData]
) -> None:
    """Write header and frames as JSON lines via a temp file and a rename, so no reader sees half a file."""
    path = Path(path)
    grid = frames[0].grid if frames else ()
    shape = {"width": max((len(row) for row in grid), default=0), "height": len(grid),
             "num_agents": len(frames[0].agents) if frames else 0}
    first = {"format": FORMAT, "version": VERSION, **header, **shape, "legend": [list(pair) for pair in legend],
             "frames": len(frames)}
    lines = [json.dumps(first), *(json.dumps(frame.to_json()) for frame in frames)]
    try:
        atomic_write(path, lambda handle: handle.write(("\n".join(lines) + "\n").encode()))
    except OSError as error:
        raise ConfigError(f"cannot write recording {path}: {error.strerror or error}") from None


def read_recording(path: Path) -> tuple[dict[str, Any], list[FrameData]]:
    """Header and frames of a recording; any problem is one ConfigError line naming the file."""
    path = Path(path)
    lines = _recording_lines(path)
    header = _parse_line(path, 1, lines[0])
    _check_header(path, header)
    frames = [_parse_frame(path, number, line) for number, line in enumerate(lines[1:], start=2) if line.strip()]
    if not frames:
        raise ConfigError(f"replay file {path} holds no frames")
    return header, frames


def _recording_lines(path: Path) -> list[str]:
    """The file's lines; missing, unreadable or empty files are refused."""
    if not path.exists():
        raise ConfigError(f"replay file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"replay file {path}: cannot read it ({one_line(error)})") from None
    if not text.strip():
        raise ConfigError(f"replay file {path} is empty, not a mettle play recording")
    return text.splitlines()


def _parse_line(path: Path, number: int, line: str) -> Any:
    """One JSON line, or a ConfigError naming file and line."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ConfigError(f"replay file {path}: line {number} is not valid JSON ({error.msg}); "
                          "is it a mettle play recording?") from None


def _check_header(path: Path, header: Any) -> None:
    """The first line must be a mettle-play header of a version this code reads."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ConfigError(f"replay file {path} is not a mettle play recording (its first line has no "
                          f'"format": "{FORMAT}")')
    version = header.get("version")
    if not isinstance(version, int) or not 1 <= version <= VERSION:
        raise ConfigError(f"replay file {path} has format version {version!r}; this mettle reads version {VERSION}")
    legend = header.get("legend", [])
    if not isinstance(legend, list) or not all(isinstance(p, list) and len(p) == 2 for p in legend):
        raise ConfigError(f"replay file {path}: the header's legend must be a list of [symbol, meaning] pairs")


def _parse_frame(path: Path, number: int, line: str) -> FrameData:
    """One frame line, or a ConfigError naming file, line and problem."""
    data = _parse_line(path, number, line)
    try:
        return FrameData.from_json(_mapping(data, "frame"))
    except KeyError as error:
        raise ConfigError(f"replay file {path}: line {number} is not a valid frame (missing {error})") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"replay file {path}: line {number} is not a valid frame ({one_line(error)})") from None


def replay_file(path: Path, fps: float, stream: TextIO) -> int:
    """Show a recording as it was shown live; 0 when done, 130 after Ctrl-C."""
    check_fps(fps)
    header, frames = read_recording(path)
    title, legend = str(header.get("env", "")), [tuple(str(x) for x in pair) for pair in header.get("legend", [])]
    view, pacer = FrameView(stream), Pacer(fps)
    try:
        for frame in frames:
            pacer.wait()
            view.show(render_frame(frame, title, legend))
    except KeyboardInterrupt:
        return INTERRUPTED
    finally:
        view.close()
    return 0
