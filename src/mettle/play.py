"""`mettle play`: watch a trained policy play one MettaGrid episode, save it as a MettaScope replay, play replays back.

Saving (`--save [DIR]`) is mettagrid's own `ReplayLogWriter` (see mettle.envs.mettagrid_replays): one
`<uuid>.json.z` per episode, the file MettaScope opens, in DIR (default RUN_DIR/replays/); an episode cut
short by `--steps` or Ctrl-C is written as far as it went. `--replay FILE` reads such a file (zlib and JSON
only) and shows it the way play shows a live game.

A frame is a status line, the map and each agent's return so far:

    mettagrid:arena  step 12/256  return 3.00
    <map>
    0: 2.00   1: 1.00
    legend: ...

On a terminal the map is mettagrid's miniscope `MapBuffer` (emoji; the game's `render.symbols` first, object
types it has no symbol for as full-width letters), redrawn in place. Anywhere else (a log, a pipe) the frames
follow one another as plain ASCII, which mettagrid does not draw: walls `#`, empty `.`, agents by id (0-9,
A-Z, `@` past 36), every other object type a lowercase letter.

Actions are sampled from the policy unless `--greedy` asks for each head's argmax: greedy MettaGrid agents block
each other and stand still. After the episode one line says which mode was used.
"""

from __future__ import annotations

import string
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from mettle.config import ConfigError

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.envs.mettagrid import MettaGridEnvironment
    from mettle.rl.evaluate import ActionChoice

__all__ = ["MapDrawing", "default_replay_dir", "object_symbols", "play_run", "replay_file"]

WALL, EMPTY, CROWD, UNKNOWN = "#", ".", "@", "?"
"""Walls, empty cells, agents with ids past AGENT_SYMBOLS, objects without a free letter (ASCII maps)."""
AGENT_SYMBOLS = string.digits + string.ascii_uppercase
"""Agent id -> symbol: digits and capitals never clash with the lowercase letters of object types."""
CLEAR, HOME, ERASE_LINE, ERASE_BELOW = "\x1b[2J", "\x1b[H", "\x1b[K", "\x1b[J"
HIDE_CURSOR, SHOW_CURSOR = "\x1b[?25l", "\x1b[?25h"
INTERRUPTED = 130
"""play_run's return code after Ctrl-C (the shell's code for SIGINT); what was played is still saved."""
STATUS_WIDTH = 100
"""Per-agent entries are packed into lines of at most this many characters."""


# ---------------------------------------------------------------------------------- frames
@dataclass(frozen=True)
class Frame:
    """What one frame shows: grid objects (type_name, r, c, agent_id) after a step, and each agent's return."""

    step: int
    max_steps: int
    objects: Mapping[int, Mapping[str, Any]]
    returns: Sequence[float]


def agent_symbol(agent_id: int) -> str:
    """An agent's ASCII character: its id as a digit or capital, `@` past 36 agents."""
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


def full_width(letter: str) -> str:
    """A lowercase letter as its full-width form, two columns like the emoji around it."""
    return chr(0xFF41 + ord(letter) - ord("a")) if letter in string.ascii_lowercase else "❓"


class MapDrawing:
    """The text of frames: mettagrid's MapBuffer (emoji) on a terminal, ASCII elsewhere."""

    def __init__(self, type_names: Sequence[str], width: int, height: int, game_symbols: Mapping[str, str],
                 emoji: bool) -> None:
        self.letters = object_symbols(type_names)
        self.width, self.height = width, height
        self.symbols = _emoji_symbols(self.letters, game_symbols) if emoji else None
        self.buffer = _map_buffer(self.symbols, height, width) if self.symbols is not None else None

    def render(self, frame: Frame, title: str) -> str:
        """Status line, map, agents' returns and legend, with no trailing newline."""
        grid = self.buffer.render_full_map(dict(frame.objects)) if self.buffer else self._ascii(frame.objects)
        lines = [_status_line(frame, title), grid]
        lines += _pack([f"{self._agent(agent)}: {value:.2f}" for agent, value in enumerate(frame.returns)],
                       STATUS_WIDTH)
        lines.append("legend: " + "  ".join(f"{symbol} {meaning}" for symbol, meaning in self._legend()))
        return "\n".join(lines)

    def _ascii(self, objects: Mapping[int, Mapping[str, Any]]) -> str:
        """One character per cell; agents over objects over walls."""
        cells = [[EMPTY] * self.width for _ in range(self.height)]
        order = sorted(objects.values(), key=lambda o: ("agent_id" in o, o["type_name"] != "wall"))
        for obj in order:
            row, col = int(obj["r"]), int(obj["c"])
            symbol = agent_symbol(int(obj["agent_id"])) if "agent_id" in obj else \
                self.letters.get(obj["type_name"], UNKNOWN)
            if 0 <= row < self.height and 0 <= col < self.width:
                cells[row][col] = symbol
        return "\n".join("".join(row) for row in cells)

    def _agent(self, agent_id: int) -> str:
        """An agent as the map shows it (mettagrid's coloured squares for ids 0-9 on a terminal)."""
        if self.symbols is None:
            return agent_symbol(agent_id)
        from mettagrid.renderer.miniscope.symbol import get_symbol_for_object

        return f"{get_symbol_for_object({'type_name': 'agent', 'agent_id': agent_id}, self.symbols)} {agent_id}"

    def _legend(self) -> list[tuple[str, str]]:
        """(symbol, meaning) for walls, empty cells and each object type (agents: in the returns line)."""
        if self.symbols is not None:
            named = [(self.symbols[name], name) for name in self.letters]
            return [*named, (self.symbols["empty"].strip(), "empty")]
        objects = sorted((s, name) for name, s in self.letters.items() if s != WALL)
        return [(WALL, "wall"), (EMPTY, "empty"), *objects, ("0-9 A-Z", f"agents by id ({CROWD} id 36+)")]


def _emoji_symbols(letters: Mapping[str, str], game_symbols: Mapping[str, str]) -> dict[str, str]:
    """mettagrid's default symbols, the game's own over them, and full-width letters for types still without one."""
    from mettagrid.renderer.miniscope.symbol import DEFAULT_SYMBOL_MAP

    symbols = {**DEFAULT_SYMBOL_MAP, **game_symbols}
    for name, letter in letters.items():
        symbols.setdefault(name, full_width(letter))
    return symbols


def _map_buffer(symbols: dict[str, str], height: int, width: int) -> Any:
    """mettagrid's miniscope MapBuffer, which draws grid objects with `symbols`."""
    from mettagrid.renderer.miniscope.buffer import MapBuffer

    return MapBuffer(symbols, initial_height=height, initial_width=width)


def _status_line(frame: Frame, title: str) -> str:
    """Title, step counter and the agents' summed return."""
    limit = f"/{frame.max_steps}" if frame.max_steps > 0 else ""
    parts = [title, f"step {frame.step}{limit}", f"return {sum(frame.returns):.2f}"]
    return "  ".join(part for part in parts if part)


def _pack(entries: Sequence[str], width: int, gap: str = "   ") -> list[str]:
    """Entries joined by `gap`, broken into lines of at most `width` characters (a long entry gets its own)."""
    lines: list[str] = []
    for entry in entries:
        if lines and len(lines[-1]) + len(gap) + len(entry) <= width:
            lines[-1] += gap + entry
        else:
            lines.append(entry)
    return lines


# ---------------------------------------------------------------------------------- terminal output
class FrameView:
    """Shows frames on a stream: redrawn in place with ANSI codes on a terminal, one after another otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        isatty = getattr(stream, "isatty", None)
        self.live = bool(isatty and isatty())
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


def show_frames(frames: Iterable[Frame], draw: Callable[[Frame], str], stream: TextIO, fps: float) -> bool:
    """Draw each frame as it comes, paced; True when Ctrl-C stopped it."""
    view, pacer = FrameView(stream), Pacer(fps)
    try:
        for frame in frames:
            pacer.wait()
            view.show(draw(frame))
    except KeyboardInterrupt:
        return True
    finally:
        view.close()
    return False


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

    `save` is a directory for the episode's MettaScope replay (its path goes to stderr). `actions` "auto" samples
    (MettaGrid's default); the mode used is said on `stream` after the episode. Ctrl-C stops early and returns
    130; what was played is still saved. User errors (no such run, not a MettaGrid run, bad options) raise
    ConfigError (a ValueError) with a one-line message.
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
    if save is not None:
        _make_replay_dir(save)
    device = _usable_device(cfg.device)
    policy, policy_info, _ = load_newest_policy(run_path, device)
    env = _make_env(target, cfg.env.kwargs, seed)
    try:
        _check_compatible(title, policy_info, env)
        if save is not None:
            env.record_replays(save, episodes=1)
            env.reset(seed)  # the episode starts again, now with mettagrid's replay writer attached
        drawing = _drawing_for(env, FrameView(stream).live)
        with isolated_rng(seed, torch.device(device)):  # a sampled episode repeats for a --seed
            frames = _episode_frames(env, policy, device, mode == "greedy", steps)
            interrupted = show_frames(frames, lambda frame: drawing.render(frame, title), stream, fps)
        written = env.finish_replays()
    finally:
        env.close()
    stream.write(actions_line(actions, title) + "\n")
    stream.flush()
    for path in written:
        print(f"replay {path} (open it in MettaScope, or `mettle play --replay {path}`)", file=sys.stderr)
    return INTERRUPTED if interrupted else 0


def default_replay_dir(run_path: Path) -> Path:
    """RUN_DIR/replays of the run holding `run_path` (a run or one of its checkpoint directories)."""
    for candidate in (run_path, *run_path.parents[:3]):
        if (candidate / "config.json").exists():
            return candidate / "replays"
    return run_path / "replays"


def _make_replay_dir(directory: Path) -> None:
    """Create the replay directory up front, so a bad --save fails before the episode."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"--save {directory}: cannot create the replay directory ({error.strerror or error})"
                          ) from None


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
    """The task or config file of a `mettagrid:` env name; other families have no MettaGrid replays or maps."""
    family, _, target = env_name.partition(":")
    if family != "mettagrid" or not target:
        raise ConfigError(f"mettle play shows and saves MettaGrid environments; {env_name} is not one")
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


def _drawing_for(env: MettaGridEnvironment, emoji: bool) -> MapDrawing:
    """How this game's frames are drawn."""
    sim = env.simulations[0]
    assert sim is not None
    return MapDrawing(sim.object_type_names, sim.map_width, sim.map_height, env.config.game.render.symbols, emoji)


def _episode_frames(env: MettaGridEnvironment, policy: Policy, device: str, deterministic: bool,
                    steps: int | None) -> Iterable[Frame]:
    """Step the game with the policy until the episode ends or `steps` were played, one frame per step."""
    import numpy as np

    policy.reset_memory()
    policy.eval()
    returns = np.zeros(env.batch_info.num_rows, dtype=np.float64)
    max_steps = int(env.config.game.max_steps)
    batch = env.get_observations()
    played = 0
    while steps is None or played < steps:
        env.send_actions(policy.act(batch, device, deterministic))
        batch = env.get_observations()
        returns += batch.rewards
        played += 1
        sim = env.simulations[0]
        assert sim is not None
        yield Frame(int(sim.current_step), max_steps, sim.grid_objects(), tuple(returns.tolist()))
        if bool(np.any(batch.terminals) or np.any(batch.truncations)):
            return


# ---------------------------------------------------------------------------------- replays
def replay_file(path: Path, fps: float, stream: TextIO) -> int:
    """Show a MettaScope replay the way play shows a live game; 0 when done, 130 after Ctrl-C."""
    from mettle.envs.mettagrid_replays import read_replay, replay_frames

    check_fps(fps)
    data = read_replay(path)
    recorded = replay_frames(data, path)
    if not recorded:
        raise ConfigError(f"replay file {path} holds no steps")
    game = _mapping(_mapping(data.get("mg_config")).get("game"))
    limit = game.get("max_steps")
    max_steps = limit if isinstance(limit, int) and not isinstance(limit, bool) else int(data["max_steps"])
    width, height = (int(v) for v in data["map_size"][:2])
    symbols = {str(k): str(v) for k, v in _mapping(_mapping(game.get("render")).get("symbols")).items()}
    drawing = MapDrawing([str(n) for n in data["type_names"]], width, height, symbols, FrameView(stream).live)
    frames = (Frame(frame.step, max_steps, frame.objects, frame.returns) for frame in recorded)
    return INTERRUPTED if show_frames(frames, lambda frame: drawing.render(frame, Path(path).name), stream, fps) else 0


def _mapping(value: Any) -> Mapping[str, Any]:
    """An optional JSON object of a replay ({} when absent or not an object)."""
    return value if isinstance(value, dict) else {}
