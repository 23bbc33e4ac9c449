"""MettaScope replays of MettaGrid games: mettagrid's own writer attached to each game, and a reader that only parses.

Writing is `mettagrid.simulator.ReplayLogWriter`, one per simulation: at each episode end it writes
`<uuid>.json.z`, zlib-compressed JSON in replay format version 4, the file MettaScope opens. A shared
`ReplayBudget` says how many episodes an environment still records and collects the paths written.

Reading (`read_replay`) is zlib and `json.loads` only, so nothing in a file can run code. In the format,
`objects` is a list of dicts whose fields are either a constant or a list of `[step, value]` changes;
replay step `i` is the state after the game's step `i + 1`, and `max_steps` is the number of steps recorded.
"""

from __future__ import annotations

import json
import zlib
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mettagrid.simulator import ReplayLogWriter

from mettle.errors import ConfigError, one_line

__all__ = ["REPLAY_SUFFIX", "REPLAY_VERSION", "GameReplayWriter", "ReplayBudget", "ReplayFrame", "read_replay",
           "replay_frames"]

REPLAY_VERSION = 4
"""The replay format version mettagrid 0.26 writes and MettaScope reads; the reader refuses others."""
REPLAY_SUFFIX = ".json.z"
"""mettagrid names replays `<episode uuid>.json.z` (the `.z`: zlib)."""
MAX_REPLAY_BYTES = 1 << 30
"""A replay that inflates past this is refused rather than filling memory."""
MAX_REPLAY_STEPS = 1_000_000
"""Replays claiming more steps are refused (playback builds one frame per step)."""


# ---------------------------------------------------------------------------------- writing
@dataclass
class ReplayBudget:
    """How many episodes an environment's games may still record (None: all), and the replays written."""

    directory: Path
    episodes: int | None = None
    started: int = 0
    written: list[Path] = field(default_factory=list)

    def take(self) -> bool:
        """Claim one episode for recording, if any are left: the first episodes to start are the ones recorded."""
        if self.episodes is not None and self.started >= self.episodes:
            return False
        self.started += 1
        return True


class GameReplayWriter(ReplayLogWriter):
    """mettagrid's writer for one simulation, recording only the episodes its budget allows."""

    def __init__(self, budget: ReplayBudget) -> None:
        super().__init__(str(budget.directory))
        self._budget = budget
        self._recording = False

    def on_episode_start(self) -> None:
        """Record this episode if the budget has one left."""
        self._recording = self._budget.take()
        if self._recording:
            super().on_episode_start()

    def on_step(self) -> None:
        """Log the step (objects, actions, rewards) while recording."""
        if self._recording:
            super().on_step()

    def on_episode_end(self) -> None:
        """Write the replay and note its path."""
        if self._recording:
            self._recording = False
            super().on_episode_end()
            self._budget.written.append(Path(self._episode_paths[self._episode_id]))

    def finish(self) -> None:
        """Write the episode in progress as it stands (play stopped early); nothing when none is being recorded."""
        if self._recording and self._episode_replay.step > 0:
            self.on_episode_end()


# ---------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class ReplayFrame:
    """One recorded step: the objects alive then, as grid-object dicts (type_name, r, c, agent_id), and returns."""

    step: int
    """The game's step this state followed (1 for the first recorded state)."""
    objects: dict[int, dict[str, Any]]
    returns: tuple[float, ...]


def read_replay(path: Path) -> dict[str, Any]:
    """A replay file's data, checked enough to play back; any problem is one ConfigError line naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"replay file {path} does not exist") from None
    except OSError as error:
        raise ConfigError(f"replay file {path}: cannot read it ({one_line(error)})") from None
    return _check_replay(path, _parse(path, _inflate(path, raw)))


def _inflate(path: Path, raw: bytes) -> bytes:
    """The zlib stream's contents (bounded by MAX_REPLAY_BYTES)."""
    if not raw:
        raise ConfigError(f"replay file {path} is empty, not a MettaScope replay")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, MAX_REPLAY_BYTES)
    except zlib.error:
        raise ConfigError(f"replay file {path} is not a MettaScope replay (not zlib-compressed .json.z data)") from None
    if inflater.unconsumed_tail:
        raise ConfigError(f"replay file {path} inflates past {MAX_REPLAY_BYTES} bytes; refusing it")
    if not inflater.eof:
        raise ConfigError(f"replay file {path} is cut short (its zlib stream does not end)")
    return text


def _parse(path: Path, text: bytes) -> Any:
    """The JSON document (json only: nothing read can run code)."""
    try:
        return json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"replay file {path} is not a MettaScope replay: its content is not JSON "
                          f"({one_line(error)})") from None


def _check_replay(path: Path, data: Any) -> dict[str, Any]:
    """Version 4 with the fields playback reads, of the right kinds."""
    if not isinstance(data, dict):
        raise ConfigError(f"replay file {path} is not a MettaScope replay (its JSON is not an object)")
    version = data.get("version")
    if version != REPLAY_VERSION:
        raise ConfigError(f"replay file {path} has replay format version {version!r}; this mettle reads version "
                          f"{REPLAY_VERSION}")
    if isinstance(data.get("max_steps"), int) and not 0 <= data["max_steps"] <= MAX_REPLAY_STEPS:
        raise ConfigError(f"replay file {path}: 'max_steps' {data['max_steps']} is not in [0, {MAX_REPLAY_STEPS}]")
    kinds = {"num_agents": int, "max_steps": int, "objects": list, "type_names": list, "map_size": list}
    for name, kind in kinds.items():
        if not isinstance(data.get(name), kind) or isinstance(data.get(name), bool):
            raise ConfigError(f"replay file {path}: field {name!r} must be a {kind.__name__}, got "
                              f"{type(data.get(name)).__name__}")
    size = data["map_size"]
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in size):
        raise ConfigError(f"replay file {path}: 'map_size' must be [width, height], got {size!r}")
    if not all(isinstance(obj, dict) for obj in data["objects"]):
        raise ConfigError(f"replay file {path}: every entry of 'objects' must be an object")
    return data


def replay_frames(data: dict[str, Any], path: Path | None = None) -> list[ReplayFrame]:
    """Every recorded step's objects and returns; a malformed object is one ConfigError line."""
    try:
        objects = [_Timeline.of(obj, index) for index, obj in enumerate(data["objects"])]
        return [_frame(objects, data["num_agents"], step) for step in range(data["max_steps"])]
    except (TypeError, ValueError, KeyError, IndexError) as error:
        raise ConfigError(f"replay file {path or ''}: an object is malformed ({one_line(error, with_type=True)})"
                          ) from None


def _frame(objects: list[_Timeline], num_agents: int, step: int) -> ReplayFrame:
    """The state recorded at replay step `step`."""
    alive: dict[int, dict[str, Any]] = {}
    returns = [0.0] * num_agents
    for obj in objects:
        if not obj.at("alive", step):
            continue
        col, row = (int(v) for v in obj.at("location", step))
        entry: dict[str, Any] = {"type_name": str(obj.at("type_name", step)), "r": row, "c": col}
        if obj.has("agent_id"):
            agent = int(obj.at("agent_id", step))
            entry["agent_id"] = agent
            returns[agent] = float(obj.at("total_reward", step))
        alive[int(obj.at("id", step))] = entry
    return ReplayFrame(step + 1, alive, tuple(returns))


@dataclass(frozen=True)
class _Timeline:
    """The fields playback reads of one replay object, each as (steps of its changes, values), for bisection."""

    fields: dict[str, tuple[list[int], list[Any]]]

    @classmethod
    def of(cls, obj: dict[str, Any], index: int) -> _Timeline:
        """Index an object's fields; `alive`, `id` and `total_reward` may be absent."""
        defaults: dict[str, Any] = {"alive": True, "id": index, "total_reward": 0.0}
        fields: dict[str, tuple[list[int], list[Any]]] = {}
        for name in ("alive", "id", "location", "type_name", "agent_id", "total_reward"):
            if name in obj or name in defaults:
                fields[name] = _changes(obj.get(name, defaults.get(name)))
        return cls(fields)

    def has(self, name: str) -> bool:
        """Whether the object has this field (agents have agent_id)."""
        return name in self.fields

    def at(self, name: str, step: int) -> Any:
        """The field's value at `step`: its last change at or before it (the first value before any)."""
        steps, values = self.fields[name]
        return values[max(bisect_right(steps, step) - 1, 0)]


def _changes(value: Any) -> tuple[list[int], list[Any]]:
    """A field as (steps, values): a list of `[step, value]` changes, or a constant as one change at step 0."""
    if _is_changes(value):
        return [int(at) for at, _ in value], [v for _, v in value]
    return [0], [value]


def _is_changes(value: Any) -> bool:
    """Whether a field is a list of `[step, value]` changes rather than a constant (a location is `[col, row]`)."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(item, list) and len(item) == 2 and isinstance(item[0], int) and not isinstance(item[0], bool)
        for item in value)
