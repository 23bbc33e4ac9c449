"""One measurement per process (so imports, threads and allocator state never leak between the systems compared).

Run by bench/compare.py as `python bench/compare_workers.py SPEC_JSON OUT_JSON`; SPEC_JSON names a `kind`:

* mettle / sb3: train with matched settings, or (solve) until the rolling mean return reaches a threshold;
* sb3_zoo: Stable-Baselines3 with rl-baselines3-zoo's tuned CartPole-v1 settings;
* plain_ppo: our single-file plain-PyTorch PPO (bench/plain_ppo.py) with the matched settings;
* raw_gym / raw_mettagrid: the bare simulator stepped with uniformly random actions (no policy, no adapter);
* mettle_env: Mettle's environment adapter stepped with random actions (adapter overhead, no policy).
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compare_tasks import RETURN_WINDOW, SB3_ZOO_CARTPOLE

WARMUP_EPOCHS = 2
"""Epochs left out of `warm_sps`: the first ones pay one-off costs such as torch.compile."""
RANDOM_CHUNK = 1024
"""Random actions are drawn this many steps at a time, so drawing them costs the raw loops almost nothing."""


# ---------------------------------------------------------------------------------------------- Mettle
def mettle_config(spec: dict[str, Any]) -> Any:
    """The recipe for the task's env, then the task's overrides, the variant's (`spec["overrides"]`, e.g.
    `overlap=true`), then this run's steps, seed and env count."""
    from mettle.config import build_run_config
    from mettle.recipes import recipe_for

    task = spec["task"]
    extra = [f"total_timesteps={spec['steps']}"] if spec.get("steps") else []
    overrides = [*recipe_for(task["env"], None), f"env.name={task['env']}", f"env.num_envs={task['num_envs']}",
                 *task["overrides"], *spec.get("overrides", ()), *extra, f"seed={spec['seed']}"]
    return build_run_config(overrides)


def make_return_probe(threshold: float | None, max_seconds: float | None) -> Any:
    """A TrainerComponent that tracks the rolling mean return and stops at the threshold or the time limit."""
    from mettle.rl.training import TrainerComponent

    class ReturnProbe(TrainerComponent):
        """Reads the episodes that finished in each rollout; times are from `started` (set before train())."""

        def __init__(self) -> None:
            """Start the clock now; run_mettle restarts it right before train()."""
            super().__init__(epoch_interval=1)
            self.started = time.perf_counter()
            self.returns: deque[float] = deque(maxlen=RETURN_WINDOW)
            self.result: dict[str, Any] = {"solved_s": None, "solved_step": None, "timed_out": False}
            self.marks: list[tuple[float, int]] = []
            """(seconds, agent_step) at each rollout end, for the throughput after warm-up."""

        def on_step(self, infos: list[dict[str, Any]]) -> None:
            """At each rollout end: the same test as the SB3 callback, so both are timed alike."""
            self.returns.extend(float(info["episode_return"]) for info in infos)
            elapsed = time.perf_counter() - self.started
            self.marks.append((elapsed, self.context.state.agent_step))
            if threshold is not None and self.result["solved_s"] is None and solved(self.returns, threshold):
                self.result.update(solved_s=elapsed, solved_step=self.context.state.agent_step)
                self.context.stop_requested = True
            if max_seconds is not None and elapsed > max_seconds and self.result["solved_s"] is None:
                self.result["timed_out"] = True
                self.context.stop_requested = True

    return ReturnProbe()


def warm_sps(marks: list[tuple[float, int]], warmup_epochs: int) -> float | None:
    """Agent-steps/s after the first `warmup_epochs` epochs (compiles, caches, heap growth), or None if too short.

    Timed between two rollout ends, so the window holds as many updates as rollouts.
    """
    if len(marks) < warmup_epochs + 2:
        return None
    (start_s, start_step), (end_s, end_step) = marks[warmup_epochs], marks[-1]
    return (end_step - start_step) / (end_s - start_s)


def solved(returns: deque[float], threshold: float) -> bool:
    """A full window of finished episodes whose mean return reaches the threshold."""
    return len(returns) == returns.maxlen and sum(returns) / len(returns) >= threshold


def build_mettle(cfg: Any) -> tuple[Any, Any]:
    """The env and Trainer of `mettle train` for a resolved config (its components, e.g. the recipe's schedules),
    without a run directory: nothing is written to disk."""
    from mettle.run import build_run

    run = build_run(cfg)
    return run.env, run.trainer


def run_mettle(spec: dict[str, Any]) -> dict[str, Any]:
    """Train Mettle for `steps` (or to the threshold) and report agent-steps/s and the stopwatch breakdown."""
    cfg = mettle_config(spec)
    env, trainer = build_mettle(cfg)
    try:
        probe = trainer.register(make_return_probe(spec.get("threshold"), spec.get("max_seconds")))
        probe.started = started = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - started
    finally:
        env.close()
    steps, batch = trainer.context.state.agent_step, env.batch_info
    recent = list(probe.returns)
    return {"agent_steps": steps, "wall_s": wall, "sps": steps / wall, **probe.result,
            "warm_sps": warm_sps(probe.marks, spec.get("warmup_epochs", WARMUP_EPOCHS)),
            "rows": batch.num_rows, "agents_per_env": batch.agents_per_env,
            "recent_mean_return": float(np.mean(recent)) if recent else None,
            "stopwatch_s": trainer.context.stopwatch.summary(), "config": cfg.model_dump(mode="json")}


# ----------------------------------------------------------------------------------------- Stable-Baselines3
def sb3_matched_kwargs(spec: dict[str, Any]) -> dict[str, Any]:
    """PPO arguments that mirror the resolved Mettle config: rollout, minibatch, epochs, loss and network."""
    cfg = mettle_config(spec)
    t, hidden = cfg.trainer, cfg.policy.hidden_size
    return {
        "n_steps": t.batch_size // cfg.env.num_envs, "batch_size": t.minibatch_size, "n_epochs": t.update_epochs,
        "learning_rate": t.optimizer.learning_rate, "gamma": t.advantage.gamma, "gae_lambda": t.advantage.gae_lambda,
        "clip_range": t.ppo.clip_coef, "ent_coef": t.ppo.entropy_coef, "vf_coef": t.ppo.value_coef,
        "max_grad_norm": t.ppo.max_grad_norm,
        "clip_range_vf": t.ppo.value_clip_coef if t.ppo.clip_value_loss else None,
        "policy_kwargs": {"net_arch": {"pi": [hidden, hidden], "vf": [hidden, hidden]},
                          "activation_fn": torch.nn.Tanh, "optimizer_kwargs": {"eps": t.optimizer.eps}},
    }


def linear(start: float) -> Callable[[float], float]:
    """rl-zoo's `lin_x`: x times the fraction of training left (SB3 passes 1 -> 0)."""
    return lambda progress_remaining: progress_remaining * start


def sb3_zoo_kwargs() -> dict[str, Any]:
    """PPO arguments from rl-zoo's CartPole-v1 entry (default MlpPolicy: 64x64 tanh, separate pi/vf)."""
    zoo = SB3_ZOO_CARTPOLE
    kwargs = {key: zoo[key] for key in ("n_steps", "batch_size", "gae_lambda", "gamma", "n_epochs", "ent_coef")}
    kwargs["learning_rate"] = linear(float(zoo["learning_rate"].removeprefix("lin_")))
    kwargs["clip_range"] = linear(float(zoo["clip_range"].removeprefix("lin_")))
    return kwargs


def make_sb3_callback(threshold: float | None, max_seconds: float | None, started: list[float]) -> Any:
    """A callback with the same rule as ReturnProbe, checked at each rollout end."""
    from stable_baselines3.common.callbacks import BaseCallback

    class ReturnCallback(BaseCallback):
        """Reads Monitor's episode returns (ep_info_buffer) when a rollout ends; stops on the next step."""

        def __init__(self) -> None:
            """No result yet."""
            super().__init__()
            self.result: dict[str, Any] = {"solved_s": None, "solved_step": None, "timed_out": False}
            self.stop = False

        def _on_step(self) -> bool:
            """Returning False is SB3's only way to stop learn() early."""
            return not self.stop

        def _on_rollout_end(self) -> None:
            """The threshold and time-limit test, at the same point of the loop as Mettle's on_step."""
            elapsed = time.perf_counter() - started[0]
            returns = deque((float(e["r"]) for e in self.model.ep_info_buffer), maxlen=RETURN_WINDOW)
            if threshold is not None and self.result["solved_s"] is None and solved(returns, threshold):
                self.result.update(solved_s=elapsed, solved_step=self.model.num_timesteps)
                self.stop = True
            if max_seconds is not None and elapsed > max_seconds and self.result["solved_s"] is None:
                self.result["timed_out"] = self.stop = True

    return ReturnCallback()


def run_sb3(spec: dict[str, Any]) -> dict[str, Any]:
    """Train SB3 PPO (matched to Mettle, or rl-zoo's tuned settings) on CPU and report the same figures."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env

    zoo = spec["kind"] == "sb3_zoo"
    kwargs = sb3_zoo_kwargs() if zoo else sb3_matched_kwargs(spec)
    n_envs = SB3_ZOO_CARTPOLE["n_envs"] if zoo else spec["task"]["num_envs"]
    steps = SB3_ZOO_CARTPOLE["n_timesteps"] if zoo else spec["steps"]
    env = make_vec_env(spec["task"]["env"].removeprefix("gym:"), n_envs=n_envs, seed=spec["seed"])
    model = PPO("MlpPolicy", env, seed=spec["seed"], device="cpu", verbose=0, **kwargs)
    started = [time.perf_counter()]
    callback = make_sb3_callback(spec.get("threshold"), spec.get("max_seconds"), started)
    model.learn(total_timesteps=steps, callback=callback)
    wall = time.perf_counter() - started[0]
    env.close()
    recent = [float(e["r"]) for e in model.ep_info_buffer][-RETURN_WINDOW:]
    shown = {k: (v if not callable(v) else "linear") for k, v in kwargs.items() if k != "policy_kwargs"}
    return {"agent_steps": model.num_timesteps, "wall_s": wall, "sps": model.num_timesteps / wall,
            **callback.result, "recent_mean_return": float(np.mean(recent)) if recent else None,
            "settings": {"n_envs": n_envs, "total_timesteps": steps, **shown}}


# ------------------------------------------------------------------------------------ plain PyTorch PPO
def plain_settings(spec: dict[str, Any]) -> Any:
    """bench/plain_ppo.py's Settings mirroring the resolved Mettle config, as `sb3_matched_kwargs` does for SB3."""
    from plain_ppo import Settings

    cfg = mettle_config(spec)
    t = cfg.trainer
    return Settings(
        env=spec["task"]["env"].removeprefix("gym:"), num_envs=cfg.env.num_envs,
        num_steps=t.batch_size // cfg.env.num_envs, total_timesteps=spec["steps"], minibatch_size=t.minibatch_size,
        update_epochs=t.update_epochs, learning_rate=t.optimizer.learning_rate, adam_eps=t.optimizer.eps,
        gamma=t.advantage.gamma, gae_lambda=t.advantage.gae_lambda, clip_coef=t.ppo.clip_coef,
        value_clip_coef=t.ppo.value_clip_coef if t.ppo.clip_value_loss else None, entropy_coef=t.ppo.entropy_coef,
        value_coef=t.ppo.value_coef, max_grad_norm=t.ppo.max_grad_norm, hidden_size=cfg.policy.hidden_size,
        seed=spec["seed"],
    )


def run_plain_ppo(spec: dict[str, Any]) -> dict[str, Any]:
    """Train the single-file plain-PyTorch PPO with the matched settings."""
    from plain_ppo import train

    result: dict[str, Any] = train(plain_settings(spec))
    return result


# ------------------------------------------------------------------------------------------ raw envs
def timed_loop(step: Callable[[int], None], iterations: int, rows: int) -> dict[str, Any]:
    """Call `step(i)` `iterations` times; agent-steps/s counts every row of every step."""
    started = time.perf_counter()
    for i in range(iterations):
        step(i)
    wall = time.perf_counter() - started
    return {"agent_steps": iterations * rows, "wall_s": wall, "sps": iterations * rows / wall}


def run_raw_gym(spec: dict[str, Any]) -> dict[str, Any]:
    """The fastest bare Gymnasium vector env (the id's own vectorised class, else SyncVectorEnv), random actions."""
    import gymnasium as gym

    n, env_id = spec["task"]["num_envs"], spec["task"]["env"].removeprefix("gym:")
    if gym.spec(env_id).vector_entry_point is not None:
        vec = gym.make_vec(env_id, num_envs=n, vectorization_mode="vector_entry_point")
    else:
        vec = gym.vector.SyncVectorEnv([lambda: gym.make(env_id)] * n, copy=False,
                                       autoreset_mode=gym.vector.AutoresetMode.NEXT_STEP)
    vec.reset(seed=spec["seed"])
    rng = np.random.default_rng(spec["seed"])
    actions = rng.integers(0, vec.single_action_space.n, size=(RANDOM_CHUNK, n))
    result = timed_loop(lambda i: vec.step(actions[i % RANDOM_CHUNK]), spec["steps"] // n, n)
    result["vector_env"] = type(vec.unwrapped).__name__
    vec.close()
    return result


def run_raw_mettagrid(spec: dict[str, Any]) -> dict[str, Any]:
    """MettaGrid simulations stepped directly in C++ with random actions; a finished game is rebuilt."""
    from mettagrid.simulator import Simulation

    from mettle.envs.mettagrid import load_mettagrid_config

    config, n = load_mettagrid_config(spec["task"]["env"].removeprefix("mettagrid:")), spec["task"]["num_envs"]
    rng = np.random.default_rng(spec["seed"])
    games = [RawGame(Simulation(config, seed=spec["seed"] + e)) for e in range(n)]
    agents, num_actions = config.game.num_agents, len(games[0].sim.action_names)
    actions = rng.integers(0, num_actions, size=(RANDOM_CHUNK, n, agents), dtype=np.int32)
    restarts = [0]

    def step(i: int) -> None:
        """One step of every game, rebuilding finished ones as Mettle's adapter does."""
        for e, game in enumerate(games):
            if game.done():
                game.sim.close()
                restarts[0] += 1
                games[e] = game = RawGame(Simulation(config, seed=spec["seed"] + n * restarts[0] + e))
            game.actions[:] = actions[i % RANDOM_CHUNK, e]
            game.c_sim.step()

    result = timed_loop(step, spec["steps"] // (n * agents), n * agents)
    for game in games:
        game.sim.close()
    return {**result, "restarts": restarts[0]}


class RawGame:
    """One simulation with its C++ buffers looked up once, so the raw loop pays no per-step lookups."""

    def __init__(self, sim: Any) -> None:
        """Keep the simulation and views of its action and done buffers."""
        self.sim, self.c_sim = sim, sim._c_sim
        self.actions = self.c_sim.actions()
        self.terminals, self.truncations = self.c_sim.terminals(), self.c_sim.truncations()

    def done(self) -> bool:
        """Every agent finished (MettaGrid ends all agents of a game together)."""
        return bool(self.truncations.all() or self.terminals.all())


def run_mettle_env(spec: dict[str, Any]) -> dict[str, Any]:
    """Mettle's TrainingEnvironment for the task (same config as training) stepped with random actions."""
    from mettle.envs.factory import make_environment

    cfg = mettle_config({**spec, "steps": None})
    env = make_environment(cfg.env, seed=spec["seed"])
    rows, nvec = env.batch_info.num_rows, np.asarray(env.policy_env_info.action_nvec)
    rng = np.random.default_rng(spec["seed"])
    actions = (rng.random((RANDOM_CHUNK, rows, len(nvec))) * nvec).astype(np.int64)
    env.reset(seed=spec["seed"])

    def step(i: int) -> None:
        """What the rollout does with the env, minus the policy."""
        env.get_observations()
        env.send_actions(actions[i % RANDOM_CHUNK])

    result = timed_loop(step, spec["steps"] // rows, rows)
    env.close()
    return result


RUNNERS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "mettle": run_mettle, "sb3": run_sb3, "sb3_zoo": run_sb3, "plain_ppo": run_plain_ppo,
    "raw_gym": run_raw_gym, "raw_mettagrid": run_raw_mettagrid, "mettle_env": run_mettle_env,
}


def main(argv: list[str]) -> int:
    """Read the spec, pin torch to one thread (both trainers alike), run, write the result JSON."""
    spec = json.loads(argv[0])
    torch.set_num_threads(spec.get("torch_threads", 1))
    result = RUNNERS[spec["kind"]](spec)
    result["torch_threads"] = torch.get_num_threads()
    Path(argv[1]).write_text(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
