"""PPO in one file of plain PyTorch, the baseline a user would write or pick (CleanRL's style, our own code).

    .venv/bin/python bench/plain_ppo.py [--env CartPole-v1] [--num-envs 8] [--total-timesteps 49152] [--seed 0]
    .venv/bin/python bench/plain_ppo.py --env HalfCheetah-v5 --num-envs 1 --num-steps 2048 --minibatch-size 64 \
        --learning-rate 3e-4 --adam-eps 1e-5 --value-clip-coef 0.2 --anneal-lr true --normalize true

A vectorised Gymnasium env (the id's own vector class where it registers one, else SyncVectorEnv), separate
64x64 tanh actor and critic MLPs with orthogonal init, GAE with truncations bootstrapped from the critic, the
clipped surrogate and (optionally clipped) value loss, an entropy bonus, per-minibatch advantage
normalisation, gradient clipping and Adam. A Box action space gets a diagonal Gaussian with a state-independent
log-std; with `normalize`, each sub-env is wrapped as CleanRL's continuous PPO does (actions clipped to bounds,
observations and rewards normalised by Gymnasium's running-statistics wrappers, both clipped to +-10), and the
returns reported are the raw ones (RecordEpisodeStatistics, innermost). bench/compare.py runs it with the same
settings as Mettle and SB3 (`compare_workers.plain_settings`) and reports agent-steps/s: every env step of every
env counts, as for the raw env and Mettle.

Gymnasium 1.x vector envs reset a finished env on the *next* step (NEXT_STEP autoreset): the step after an
episode ends returns the reset observation, ignores the action and gives no reward. Such steps are stored but
left out of the loss; the value the critic gives there (of the episode's final observation) is what a
truncated episode bootstraps from.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Distribution, Normal


@dataclass
class Settings:
    """Every knob of a run; defaults are Mettle's CartPole recipe as compare.py's cartpole8 uses it."""

    env: str = "CartPole-v1"
    num_envs: int = 8
    num_steps: int = 128
    """Steps per env per rollout."""
    total_timesteps: int = 49_152
    minibatch_size: int = 256
    update_epochs: int = 10
    learning_rate: float = 2e-3
    adam_eps: float = 1e-8
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip_coef: float = 0.2
    value_clip_coef: float | None = None
    """None: the value loss is not clipped."""
    entropy_coef: float = 0.0
    value_coef: float = 0.5
    max_grad_norm: float = 0.5
    hidden_size: int = 64
    seed: int = 0
    anneal_lr: bool = False
    """Decay the learning rate linearly to 0 over the run (CleanRL's default)."""
    normalize: bool = False
    """Clip actions and normalise observations and rewards per sub-env with Gymnasium's wrappers (CleanRL's
    continuous-control recipe)."""


def layer(in_features: int, out_features: int, gain: float) -> nn.Linear:
    """Orthogonal weights, zero bias: the usual PPO init."""
    linear = nn.Linear(in_features, out_features)
    nn.init.orthogonal_(linear.weight, gain)
    nn.init.zeros_(linear.bias)
    return linear


class ActorCritic(nn.Module):
    """Two separate tanh MLPs: logits (or a Gaussian's mean, `action_dims` > 0) and a value from one observation."""

    def __init__(self, obs_size: int, num_actions: int, hidden: int, action_dims: int = 0) -> None:
        super().__init__()
        root2 = math.sqrt(2)
        self.actor = nn.Sequential(layer(obs_size, hidden, root2), nn.Tanh(), layer(hidden, hidden, root2), nn.Tanh(),
                                   layer(hidden, action_dims or num_actions, 0.01))
        self.critic = nn.Sequential(layer(obs_size, hidden, root2), nn.Tanh(), layer(hidden, hidden, root2), nn.Tanh(),
                                    layer(hidden, 1, 1.0))
        self.log_std = nn.Parameter(torch.zeros(action_dims)) if action_dims else None

    def forward(self, obs: torch.Tensor) -> tuple[Distribution, torch.Tensor]:
        """The action distribution and the value of each observation."""
        value = self.critic(obs).squeeze(-1)
        if self.log_std is None:
            return Categorical(logits=self.actor(obs)), value
        mean = self.actor(obs)
        return Normal(mean, self.log_std.expand_as(mean).exp()), value


def log_prob(dist: Distribution, action: torch.Tensor) -> torch.Tensor:
    """Log-probability of whole actions: a Gaussian's sums over its dimensions."""
    return dist.log_prob(action).sum(-1) if isinstance(dist, Normal) else dist.log_prob(action)


def entropy(dist: Distribution) -> torch.Tensor:
    """Entropy of whole actions (summed over a Gaussian's dimensions)."""
    return dist.entropy().sum(-1) if isinstance(dist, Normal) else dist.entropy()


def normalizing_wrappers(gamma: float) -> list[Any]:
    """CleanRL's per-env wrappers for continuous control; episode statistics first, so returns stay raw."""
    clip = lambda x: np.clip(x, -10.0, 10.0)  # noqa: E731
    return [gym.wrappers.RecordEpisodeStatistics, gym.wrappers.ClipAction, gym.wrappers.NormalizeObservation,
            lambda env: gym.wrappers.TransformObservation(env, clip, env.observation_space),
            lambda env: gym.wrappers.NormalizeReward(env, gamma=gamma),
            lambda env: gym.wrappers.TransformReward(env, clip)]


def make_env(s: Settings) -> gym.vector.VectorEnv:
    """The env id's own vector class where it has one (CartPole does), else SyncVectorEnv."""
    if s.normalize:
        return gym.make_vec(s.env, num_envs=s.num_envs, vectorization_mode="sync",
                            wrappers=normalizing_wrappers(s.gamma))
    if gym.spec(s.env).vector_entry_point is not None:
        return gym.make_vec(s.env, num_envs=s.num_envs, vectorization_mode="vector_entry_point")
    return gym.make_vec(s.env, num_envs=s.num_envs, vectorization_mode="sync")


def raw_returns(info: dict[str, Any], step_returns: np.ndarray, ended: np.ndarray) -> list[float]:
    """Returns of the episodes that ended this step: RecordEpisodeStatistics' (raw) where the env records them,
    else the sums of the rewards seen."""
    if "episode" in info:
        return [float(r) for r in info["episode"]["r"][info["_episode"]]]
    return step_returns[ended].tolist()


def gae(rewards: torch.Tensor, values: torch.Tensor, last_value: torch.Tensor, terminated: torch.Tensor,
        ended: torch.Tensor, gamma: float, lam: float) -> torch.Tensor:
    """Advantages [T, N]: bootstrap unless terminated; the recursion stops where an episode ended (either way)."""
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(last_value)
    next_value = last_value
    for t in reversed(range(rewards.shape[0])):
        delta = rewards[t] + gamma * next_value * (1.0 - terminated[t]) - values[t]
        running = delta + gamma * lam * (1.0 - ended[t]) * running
        advantages[t] = running
        next_value = values[t]
    return advantages


def train(s: Settings) -> dict[str, Any]:
    """Train for `total_timesteps` env steps; return throughput and the last episodes' mean return."""
    torch.manual_seed(s.seed)
    envs = make_env(s)
    obs_size = int(np.prod(envs.single_observation_space.shape))
    space = envs.single_action_space
    action_dims = int(np.prod(space.shape)) if isinstance(space, gym.spaces.Box) else 0
    model = ActorCritic(obs_size, 0 if action_dims else int(space.n), s.hidden_size, action_dims)
    optimizer = torch.optim.Adam(model.parameters(), lr=s.learning_rate, eps=s.adam_eps)
    T, N = s.num_steps, s.num_envs
    obs_buf = torch.zeros(T, N, obs_size)
    actions = torch.zeros(T, N, action_dims) if action_dims else torch.zeros(T, N)
    log_probs, values, rewards = (torch.zeros(T, N) for _ in range(3))
    terminated, ended, valid = (torch.zeros(T, N) for _ in range(3))

    obs_np, _ = envs.reset(seed=s.seed)
    resetting = np.zeros(N, dtype=bool)  # this step only resets the env (NEXT_STEP autoreset)
    returns = np.zeros(N)
    finished: list[float] = []
    steps, started = 0, time.perf_counter()
    while steps < s.total_timesteps:
        if s.anneal_lr:
            optimizer.param_groups[0]["lr"] = s.learning_rate * (1.0 - steps / s.total_timesteps)
        # ---- rollout
        for t in range(T):
            obs = torch.as_tensor(obs_np, dtype=torch.float32)
            with torch.inference_mode():
                dist, value = model(obs)
                action = dist.sample()
            obs_buf[t], actions[t], log_probs[t], values[t] = obs, action, log_prob(dist, action), value
            valid[t] = torch.as_tensor(~resetting, dtype=torch.float32)
            obs_np, reward, term, trunc, info = envs.step(action.numpy())
            rewards[t] = torch.as_tensor(reward, dtype=torch.float32)
            terminated[t] = torch.as_tensor(term, dtype=torch.float32)
            ended[t] = torch.as_tensor(term | trunc, dtype=torch.float32)
            returns += reward
            finished.extend(raw_returns(info, returns, term | trunc))
            returns[term | trunc] = 0.0
            resetting = term | trunc
        steps += T * N
        with torch.inference_mode():
            _, last_value = model(torch.as_tensor(obs_np, dtype=torch.float32))
        advantages = gae(rewards, values, last_value, terminated, ended, s.gamma, s.gae_lambda)
        targets = advantages + values

        # ---- update, on the steps that were real decisions
        keep = valid.flatten().nonzero().squeeze(1)
        b_obs, b_actions = obs_buf.flatten(0, 1)[keep], actions.flatten(0, 1)[keep]
        b_log_probs = log_probs.flatten()[keep]
        b_adv, b_targets, b_values = advantages.flatten()[keep], targets.flatten()[keep], values.flatten()[keep]
        for _ in range(s.update_epochs):
            for idx in torch.randperm(len(keep)).split(s.minibatch_size):
                dist, value = model(b_obs[idx])
                log_ratio = log_prob(dist, b_actions[idx]) - b_log_probs[idx]
                ratio = log_ratio.exp()
                adv = b_adv[idx]
                adv = (adv - adv.mean()) / (adv.std() + 1e-8) if len(idx) > 1 else adv
                clipped_ratio = ratio.clamp(1 - s.clip_coef, 1 + s.clip_coef)
                policy_loss = torch.max(-adv * ratio, -adv * clipped_ratio).mean()
                value_error = (value - b_targets[idx]).pow(2)
                if s.value_clip_coef is not None:
                    old = b_values[idx]
                    clipped_value = old + (value - old).clamp(-s.value_clip_coef, s.value_clip_coef)
                    value_error = torch.max(value_error, (clipped_value - b_targets[idx]).pow(2))
                value_loss = 0.5 * value_error.mean()
                loss = policy_loss - s.entropy_coef * entropy(dist).mean() + s.value_coef * value_loss
                optimizer.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), s.max_grad_norm)
                optimizer.step()
    wall = time.perf_counter() - started
    envs.close()
    recent = finished[-20:]
    return {"agent_steps": steps, "wall_s": wall, "sps": steps / wall,
            "recent_mean_return": float(np.mean(recent)) if recent else None, "settings": asdict(s)}


def parse_bool(text: str) -> bool:
    """`true`/`false` (any case) or 1/0."""
    return text.strip().lower() in ("true", "1", "yes")


def main(argv: list[str] | None = None) -> int:
    """Parse `--field value` for every Settings field, train on one torch thread, print the result as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Settings):
        default = getattr(Settings, f.name)
        kind = float if f.name == "value_clip_coef" else parse_bool if isinstance(default, bool) else type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(1)
    print(json.dumps(train(Settings(**vars(args))), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
