"""How close is Mettle's rollout to the speed of its parts? Its collector per vector step against a floor loop.

    .venv/bin/python bench/rollout_floor.py [--tasks cartpole8,arena] [--rounds 7] [--profile] [--out DIR]

For each task of compare_tasks.py (cartpole8: CartPole-v1, 8 envs x 128 steps, 64x64 tanh actor and critic, as
CleanRL's defaults; arena: mettagrid:arena with the recipe's 16 games and token policy), in one process with one
torch thread, alternating in rounds:

* the floor: one plain loop over the parts, with nothing of Mettle around them, each part timed:
  - env: the env's own vector step (Gymnasium's vector env that Mettle builds for the id; for MettaGrid the bare
    simulator stepping the same games, restarting each when it ends, writing into one preallocated batch);
  - forward: the same policy module that training builds, its layers called directly on the observations;
  - sample: the cheapest exact sampler with log-probs (Gumbel-max, the exponential race, inverse CDF and
    torch.multinomial are timed on the task's logits and checked against the softmax by a chi-square test; the
    cheapest that passes is used);
  - store: writes of obs, action, log-prob, value, reward, terminal and truncation into preallocated tensors;
* Mettle: one rollout of its collector (`mettle_rollout`), timed as a whole, divided by the vector steps in it.

Each round times one rollout of each (arena: `--arena-rollouts` of each); the figures are medians over rounds
and the ratio is the median of each round's Mettle / floor. On a shared machine the CPU time the process used
and the fastest round of each are reported too: contention inflates them less than the wall clock. `--profile`
adds a cProfile of Mettle's rollouts (top functions by own time). Writes rollout_floor.md/json to --out
(default: a new temporary directory).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from scipy import stats

from compare import machine_info, write_report
from compare_tasks import TASKS, parse_tasks
from compare_workers import build_mettle, mettle_config

PARTS = ("env", "forward", "sample", "store")
"""The floor's parts, in the order a step runs them (store: both writes, before and after the env step)."""
Sampler = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""[rows, actions] logits -> (actions [rows] int64, their log-probabilities [rows])."""
Forward = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""(observations [rows, ...], starts [rows] bool) -> (logits [rows, actions], values [rows])."""


# -------------------------------------------------------------------------------------------------- Mettle
def mettle_rollout(trainer: Any) -> tuple[Callable[[], object], int]:
    """Mettle's rollout side: (collect one rollout, vector steps in it). The one place that knows Mettle's API.

    The Collector (`trainer.rollouts.collect`) where the trainer has one, else `CoreTrainingLoop.collect`.
    """
    ctx = trainer.context
    ctx.policy.eval()
    steps = ctx.experience.steps_per_row
    rollouts = getattr(trainer, "rollouts", None)
    if rollouts is not None:
        return (lambda: rollouts.collect(ctx.experience, ctx.state.agent_step)), steps
    return trainer.core_loop.collect, steps


# ------------------------------------------------------------------------------------------------ samplers
def gumbel_max(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax(logits + Gumbel noise), the Gumbel noise as -log of an Exp(1) draw."""
    log_probs = logits.log_softmax(-1)
    actions = (log_probs - torch.empty_like(log_probs).exponential_().log_()).argmax(-1)
    return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def exponential_race(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax(p / E) with E ~ Exp(1): Gumbel-max without the logarithm (the first of independent exponential
    clocks with rates p rings with probability p)."""
    log_probs = logits.log_softmax(-1)
    actions = (log_probs.exp() / torch.empty_like(log_probs).exponential_()).argmax(-1)
    return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def inverse_cdf(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first action whose cumulative probability exceeds a uniform draw (clamped against rounding)."""
    log_probs = logits.log_softmax(-1)
    uniform = torch.empty_like(log_probs[..., :1]).uniform_()
    actions = (log_probs.exp().cumsum(-1) <= uniform).sum(-1).clamp_(max=logits.shape[-1] - 1)
    return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def multinomial(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.multinomial on the probabilities."""
    log_probs = logits.log_softmax(-1)
    actions = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
    return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


SAMPLERS: dict[str, Sampler] = {"gumbel_max": gumbel_max, "exponential_race": exponential_race,
                                "inverse_cdf": inverse_cdf, "multinomial": multinomial}


def exactness(sampler: Sampler, actions: int, draws: int = 400_000, seed: int = 0) -> dict[str, float]:
    """Chi-square test of `sampler`'s draws against the softmax of fixed logits (rows of one batch share them),
    and the largest error of its log-probs; a p-value near zero means the sampler is not exact."""
    torch.manual_seed(seed)
    logits = torch.linspace(-2.0, 1.5, actions).roll(1)
    batch = 4096
    counts = torch.zeros(actions, dtype=torch.int64)
    log_prob_error = 0.0
    expected_log_probs = logits.log_softmax(-1)
    for _ in range(draws // batch):
        chosen, log_probs = sampler(logits.expand(batch, actions).contiguous())
        counts += torch.bincount(chosen, minlength=actions)
        log_prob_error = max(log_prob_error, float((log_probs - expected_log_probs[chosen]).abs().max()))
    total = int(counts.sum())
    probs = expected_log_probs.double().exp().numpy()
    expected = probs / probs.sum() * total
    chi2, p_value = stats.chisquare(counts.double().numpy(), expected)
    return {"draws": total, "chi2": float(chi2), "p_value": float(p_value), "log_prob_error": log_prob_error}


def sampler_costs(logits: torch.Tensor, calls: int = 2000) -> dict[str, float]:
    """Microseconds per call of each sampler on the task's logits, interleaved in five rounds (median)."""
    samples: dict[str, list[float]] = {name: [] for name in SAMPLERS}
    with torch.inference_mode():
        for _ in range(5):
            for name, sampler in SAMPLERS.items():
                started = time.perf_counter()
                for _ in range(calls // 5):
                    sampler(logits)
                samples[name].append((time.perf_counter() - started) / (calls // 5) * 1e6)
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------------------------------- the floor
def policy_forward(policy: Any, rows: int) -> Forward:
    """The policy module's layers called directly, as a hand-written loop would: no interface, no sampling.

    MLPPolicy: torsos and heads, as functions of their weights (cheaper than module calls, and what it runs).
    TokenPolicy and LSTMPolicy: the encoder, one step of the module's nn.LSTM from per-row state kept here
    (zeroed where an episode starts), and the heads.
    """
    from mettle.agent.layers import dense as linear
    from mettle.agent.lstm import LSTMPolicy
    from mettle.agent.mlp import MLPPolicy, torso_features

    if isinstance(policy, MLPPolicy):  # its layers as functions (no module call each), as MLPPolicy runs them
        critic = policy.critic_torso if policy.critic_torso is not None else policy.actor_torso
        actor_head = (policy.actor_head.weight, policy.actor_head.bias)
        critic_head = (policy.critic_head.weight, policy.critic_head.bias)

        def mlp(obs: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = obs.reshape(rows, -1).float()
            actor, values = torso_features(policy.actor_torso, x), torso_features(critic, x)
            return linear(actor_head, actor), linear(critic_head, values)[:, 0]

        return mlp
    if not isinstance(policy, LSTMPolicy):
        raise ValueError(f"no floor forward for {type(policy).__name__}")
    recurrent = policy.is_recurrent
    h = torch.zeros(1, rows, policy.hidden_size)
    c = torch.zeros(1, rows, policy.hidden_size)
    dense = not hasattr(policy, "core")  # LSTMPolicy flattens its Box observations; TokenPolicy reads tokens

    def recurrent_forward(obs: torch.Tensor, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = policy.encoder(obs.reshape(rows, -1).float() if dense else obs)
        if recurrent:
            keep = (~starts).to(h.dtype).unsqueeze(-1)
            h.mul_(keep)
            c.mul_(keep)
            out, (h_next, c_next) = policy.lstm(x.unsqueeze(1), (h, c))
            h.copy_(h_next)
            c.copy_(c_next)
            x = out[:, 0]
        return policy.actor_head(x), policy.critic_head(x)[:, 0]

    return recurrent_forward


class GymFloorEnv:
    """The id's own vector env, as Mettle builds it for the task (CartPole: CartPoleVectorEnv), stepped bare."""

    def __init__(self, mettle_env: Any, seed: int) -> None:
        import gymnasium as gym

        vec = mettle_env.vector_env
        spec = vec.spec
        if isinstance(vec, gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv) or spec is None:
            raise ValueError(f"the floor needs a native vector env; Mettle built {type(vec).__name__}")
        self.vec = gym.make_vec(spec.id, num_envs=vec.num_envs, vectorization_mode="vector_entry_point")
        assert type(self.vec) is type(vec), (type(self.vec), type(vec))
        self.rows = vec.num_envs
        obs, _ = self.vec.reset(seed=seed)
        self.observations = torch.from_numpy(np.asarray(obs, dtype=np.float32).copy())
        self.rewards = np.zeros(self.rows, dtype=np.float32)
        self.terminals = np.zeros(self.rows, dtype=bool)
        self.truncations = np.zeros(self.rows, dtype=bool)
        self.starts = np.ones(self.rows, dtype=bool)
        """Rows whose observation starts an episode (next-step autoreset: after a done step's send)."""
        self._done = np.zeros(self.rows, dtype=bool)

    def step(self, actions: np.ndarray) -> None:
        """One vector step; the new observations land in `observations`, the outcome in the flag arrays."""
        obs, rewards, terminals, truncations, _ = self.vec.step(actions)
        np.copyto(self.starts, self._done)
        self.observations.numpy()[:] = obs
        self.rewards[:], self.terminals[:], self.truncations[:] = rewards, terminals, truncations
        np.logical_or(terminals, truncations, out=self._done)

    def close(self) -> None:
        """Close the vector env."""
        self.vec.close()


class MettaGridFloorEnv:
    """The bare mettagrid simulator stepping the same games Mettle's env steps: one Simulation per game writing
    into views of one batch array, C++ step per game, a fresh Simulation for a game that ended."""

    def __init__(self, mettle_env: Any, seed: int) -> None:
        from mettagrid.mettagrid_c import dtype_actions, dtype_observations
        from mettagrid.simulator.simulator import Buffers

        config, games, agents = mettle_env.config, mettle_env.batch_info.num_envs, mettle_env.batch_info.agents_per_env
        self.config, self.games, self.agents, self.rows = config, games, agents, games * agents
        shape = mettle_env.policy_env_info.observation_space.shape
        self._obs = np.full((self.rows, *shape), 0xFF, dtype=dtype_observations)
        self.observations = torch.from_numpy(self._obs)
        self.rewards = np.zeros(self.rows, dtype=np.float32)
        self.terminals = np.zeros(self.rows, dtype=bool)
        self.truncations = np.zeros(self.rows, dtype=bool)
        self.starts = np.ones(self.rows, dtype=bool)
        self._actions = np.zeros(self.rows, dtype=dtype_actions)

        def views(game: int) -> Any:
            rows = slice(game * agents, (game + 1) * agents)
            return Buffers(observations=self._obs[rows], terminals=self.terminals[rows],
                           truncations=self.truncations[rows], rewards=self.rewards[rows],
                           masks=np.ones(agents, dtype=bool), actions=self._actions[rows],
                           teacher_actions=np.zeros(agents, dtype=dtype_actions),
                           vibe_actions=np.zeros(agents, dtype=dtype_actions))

        self._buffers = [views(game) for game in range(games)]
        self._rng = np.random.default_rng(seed)
        self._configs = [config.model_copy(deep=True) for _ in range(games)]
        self._sims: list[Any] = [None] * games
        for game in range(games):
            self._restart(game, seed + game)
        self._done = np.zeros(games, dtype=bool)

    def _restart(self, game: int, seed: int) -> None:
        """A new Simulation for `game` (its map seeded as Mettle's env seeds it), writing its first observation."""
        from mettagrid.simulator import Simulation

        if self._sims[game] is not None:
            self._sims[game].close()
        builder = self._configs[game].game.map_builder
        if hasattr(builder, "seed"):
            builder.seed = seed
        self._sims[game] = Simulation(self._configs[game], seed=seed, buffers=self._buffers[game])

    def step(self, actions: np.ndarray) -> None:
        """One step of every game (a game that ended restarts instead); outcome into the flag arrays."""
        np.copyto(self._actions, actions, casting="unsafe")
        self.starts[:] = np.repeat(self._done, self.agents)
        for game, sim in enumerate(self._sims):
            if self._done[game]:
                self._restart(game, int(self._rng.integers(2**31)))
            else:
                sim._c_sim.step()
        if self._done.any():  # restarting rows show a fresh start: no reward, no flags
            self.rewards[self.starts] = 0.0
            self.terminals[self.starts] = self.truncations[self.starts] = False
        done = (self.terminals | self.truncations).reshape(self.games, self.agents)
        done.any(axis=1, out=self._done)

    def close(self) -> None:
        """Free every simulation."""
        for sim in self._sims:
            sim.close()


class Floor:
    """The plain rollout loop over the parts, with a timer around each part and preallocated storage."""

    def __init__(self, env: GymFloorEnv | MettaGridFloorEnv, forward: Forward, sample: Sampler, steps: int) -> None:
        self.env, self.forward, self.sample, self.steps = env, forward, sample, steps
        rows = env.rows
        obs = env.observations
        self.store = {
            "observations": torch.zeros((steps, *obs.shape), dtype=obs.dtype),
            "actions": torch.zeros(steps, rows, dtype=torch.int64),
            "log_probs": torch.zeros(steps, rows),
            "values": torch.zeros(steps, rows),
            "rewards": torch.zeros(steps, rows),
            "terminals": torch.zeros(steps, rows, dtype=torch.bool),
            "truncations": torch.zeros(steps, rows, dtype=torch.bool),
        }
        self._outcomes = [(self.store[name].numpy(), getattr(env, name))
                          for name in ("rewards", "terminals", "truncations")]

    def rollout(self) -> dict[str, float]:
        """One rollout of `steps` vector steps; seconds spent in each part and in all (`total`)."""
        env, store, clock = self.env, self.store, time.perf_counter
        spent = dict.fromkeys(PARTS, 0.0)
        started, cpu_started = clock(), time.process_time()
        with torch.inference_mode():
            for t in range(self.steps):
                t0 = clock()
                logits, values = self.forward(env.observations, torch.from_numpy(env.starts))
                t1 = clock()
                actions, log_probs = self.sample(logits)
                t2 = clock()
                store["observations"][t] = env.observations
                store["actions"][t] = actions
                store["log_probs"][t] = log_probs
                store["values"][t] = values
                t3 = clock()
                env.step(actions.numpy())
                t4 = clock()
                for stored, fresh in self._outcomes:
                    stored[t] = fresh
                t5 = clock()
                spent["forward"] += t1 - t0
                spent["sample"] += t2 - t1
                spent["store"] += t3 - t2 + t5 - t4
                spent["env"] += t4 - t3
        spent["total"] = clock() - started
        spent["cpu"] = time.process_time() - cpu_started
        return spent


# ------------------------------------------------------------------------------------------------- measure
def measure_task(task_name: str, rounds: int, arena_rollouts: int, profile: bool, seed: int = 0) -> dict[str, Any]:
    """Floor and Mettle rollouts of one task, interleaved in rounds; medians in microseconds per vector step."""
    task = TASKS[task_name]
    spec = {"task": task.as_dict(), "steps": 10**9, "seed": seed, "overrides": ["overlap=false"]}
    cfg = mettle_config(spec)
    env, trainer = build_mettle(cfg)
    torch.set_num_threads(1)
    collect, steps = mettle_rollout(trainer)
    policy = trainer.context.policy
    floor_env = GymFloorEnv(env, seed) if task.env.startswith("gym:") else MettaGridFloorEnv(env, seed)
    forward = policy_forward(policy, floor_env.rows)
    with torch.inference_mode():
        logits, _ = forward(floor_env.observations, torch.from_numpy(floor_env.starts))
    costs = sampler_costs(logits)
    checks = {name: exactness(sampler, logits.shape[-1]) for name, sampler in SAMPLERS.items()}
    exact = [name for name in SAMPLERS if checks[name]["p_value"] > 1e-4 and checks[name]["log_prob_error"] < 1e-5]
    chosen = min(exact, key=costs.__getitem__)
    floor = Floor(floor_env, forward, SAMPLERS[chosen], steps)
    per_round = arena_rollouts if task.env.startswith("mettagrid:") else 1
    floor.rollout()  # warm-up: allocator, first episodes
    collect()
    collect()
    samples: dict[str, list[float]] = {name: [] for name in (*PARTS, "floor", "mettle", "floor_cpu", "mettle_cpu")}
    per_step = 1e6 / (per_round * steps)
    for _ in range(rounds):
        parts = [floor.rollout() for _ in range(per_round)]
        for name in PARTS:
            samples[name].append(sum(p[name] for p in parts) * per_step)
        samples["floor"].append(sum(p["total"] for p in parts) * per_step)
        samples["floor_cpu"].append(sum(p["cpu"] for p in parts) * per_step)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(per_round):
            collect()
        samples["mettle"].append((time.perf_counter() - started) * per_step)
        samples["mettle_cpu"].append((time.process_time() - cpu_started) * per_step)
    ratios = [m / f for m, f in zip(samples["mettle"], samples["floor"], strict=True)]
    cpu_ratios = [m / f for m, f in zip(samples["mettle_cpu"], samples["floor_cpu"], strict=True)]
    result: dict[str, Any] = {
        "task": task.as_dict(), "rows": floor_env.rows, "vector_steps_per_rollout": steps,
        "rollouts_per_round": per_round, "rounds": rounds, "policy": type(policy).__name__,
        "vector_env": type(getattr(env, "vector_env", env)).__name__,
        "median_us_per_step": {name: statistics.median(values) for name, values in samples.items()},
        "mettle_over_floor": statistics.median(ratios),
        "mettle_over_floor_cpu": statistics.median(cpu_ratios),
        "best_round_us_per_step": {name: min(samples[name]) for name in ("floor", "mettle")},
        "mettle_over_floor_best": min(samples["mettle"]) / min(samples["floor"]),
        "sampler": chosen, "sampler_us": costs, "sampler_exactness": checks,
        "samples_us_per_step": samples,
    }
    if profile:
        result["profile"] = profile_rollouts(collect, max(2, per_round * 2))
    floor_env.close()
    env.close()
    return result


def profile_rollouts(collect: Callable[[], object], rollouts: int, top: int = 30) -> str:
    """cProfile of Mettle's rollouts: the `top` functions by own time."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(rollouts):
        collect()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).strip_dirs().sort_stats("tottime").print_stats(top)
    return out.getvalue()


def render(results: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    """The markdown report."""
    lines = [
        "# Mettle's rollout against the floor of its parts", "",
        f"{machine['date']}, {machine['cpus']} CPUs, load average {machine['load_avg'][0]:.2f}; torch "
        f"{machine['torch']}, one thread. Microseconds per vector step (wall clock), medians of "
        f"{results[0]['rounds']} interleaved rounds; the ratio is the median of the rounds' ratios.", "",
        "| task | rows | env | forward | sample | store | floor | Mettle | Mettle / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        us = r["median_us_per_step"]
        lines.append(f"| {r['task']['name']} | {r['rows']} | {us['env']:.1f} | {us['forward']:.1f} | "
                     f"{us['sample']:.1f} | {us['store']:.1f} | {us['floor']:.1f} | {us['mettle']:.1f} | "
                     f"**{r['mettle_over_floor']:.2f}x** |")
    lines += ["", "Less sensitive to a loaded machine: the CPU time the process used (medians), and the fastest "
              "round of each (contention only adds time):", "",
              "| task | CPU floor | CPU Mettle | CPU ratio | best floor | best Mettle | best ratio |",
              "|---|---|---|---|---|---|---|"]
    for r in results:
        us, best = r["median_us_per_step"], r["best_round_us_per_step"]
        lines.append(f"| {r['task']['name']} | {us['floor_cpu']:.1f} | {us['mettle_cpu']:.1f} | "
                     f"{r['mettle_over_floor_cpu']:.2f}x | {best['floor']:.1f} | {best['mettle']:.1f} | "
                     f"{r['mettle_over_floor_best']:.2f}x |")
    lines += ["", "Samplers on each task's logits (µs per call; p-value of a chi-square test of 400k draws "
              "against the softmax; the floor uses the cheapest exact one):", ""]
    for r in results:
        shown = ", ".join(f"{name} {r['sampler_us'][name]:.1f} (p={r['sampler_exactness'][name]['p_value']:.2f})"
                          for name in SAMPLERS)
        lines.append(f"- {r['task']['name']} ({r['policy']}, {r['vector_env']}): {shown}; floor: {r['sampler']}")
    lines.append("")
    for r in results:
        if "profile" in r:
            lines += [f"## cProfile of Mettle's rollout, {r['task']['name']}", "", "```",
                      r["profile"].strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write rollout_floor.md/json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="cartpole8,arena", help="compare_tasks.py names (default cartpole8,arena)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of floor and Mettle (median)")
    parser.add_argument("--arena-rollouts", type=int, default=2, help="MettaGrid rollouts per round and side")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of Mettle's rollouts to the report")
    parser.add_argument("--out", default=None,
                        help="directory for rollout_floor.md and .json (default: a new temporary directory)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    results = [measure_task(task.name, max(1, args.rounds), max(1, args.arena_rollouts), args.profile)
               for task in parse_tasks(args.tasks)]
    write_report(args.out, "rollout_floor", {"machine": machine, "results": results}, render(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
