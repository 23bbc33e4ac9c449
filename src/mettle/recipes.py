"""Per-environment default hyperparameters, applied before the user's overrides."""

from __future__ import annotations

CLASSIC_CONTROL = [
    "total_timesteps=200000",
    "batch_size=512",
    "minibatch_size=128",
    "bptt_horizon=16",
    "update_epochs=10",
    "advantage.gamma=0.98",
    "advantage.gae_lambda=0.8",
    "optimizer.learning_rate=0.002",
    "ppo.entropy_coef=0.0",
    "ppo.clip_value_loss=false",
    "env.num_envs=8",
]
"""Value clipping is off: its range is in return units (CartPole's reach ~50), so a 0.2 clip held the critic back
and doubled the steps to a mean return of 475 (median of 16 seeds: about 38k steps with it, 20k without)."""

RECURRENT = ["policy.hidden_size=128", "bptt_horizon=32", "batch_size=2048", "minibatch_size=512",
             "total_timesteps=600000", "optimizer.learning_rate=0.001", "advantage.gamma=0.99",
             "advantage.gae_lambda=0.95", "ppo.clip_value_loss=true"]
"""On top of CLASSIC_CONTROL for the LSTM policy; keeps value clipping, with which it was verified."""


OVERLAP = ["overlap=true"]
"""Rollout k+1 runs beside update k. Feed-forward CartPole (bench/compare.py, 2 cores, 2026-12-02): 1.63x the
agent-steps/s of synchronous training on 8 envs and 1.04x its median steps to a mean return of 475 over 8 seeds,
so 0.76x its wall time. MettaGrid (bench/mettagrid_learning.py, 10 minutes each, one seed): reward per agent 19.1
vs 18.8 on navigation and 30.6 vs 18.3 on arena, at 1.73x and 1.54x the agent-steps/s. Not for the LSTM on
CartPole: its learning with the lag is unmeasured."""


METTAGRID = [
    "policy.kind=token",
    "policy.hidden_size=128",
    "env.num_envs=16",
    "total_timesteps=50000000",
    "batch_size=6144",
    "minibatch_size=768",
    "bptt_horizon=16",
    "update_epochs=2",
    "optimizer.learning_rate=0.001",
    "ppo.entropy_coef=0.01",
    "advantage.gamma=0.99",
    "advantage.gae_lambda=0.95",
    *OVERLAP,
]
"""Tuned for 2 CPU cores: many small updates (16 per 6144 steps) learn navigation and arena in minutes; the
batch is a multiple of rows x bptt for both tasks (16 games of 4 or 12 agents, x16)."""


CONTINUOUS_CONTROL = [
    "total_timesteps=1000000",
    "env.num_envs=8",
    "batch_size=2048",
    "minibatch_size=64",
    "bptt_horizon=16",
    "update_epochs=10",
    "optimizer.learning_rate=0.0003",
    "optimizer.eps=0.00001",
    "advantage.gamma=0.99",
    "advantage.gae_lambda=0.95",
    "ppo.clip_coef=0.2",
    "ppo.entropy_coef=0.0",
    "ppo.max_grad_norm=0.5",
    "ppo.clip_value_loss=false",
    "env.normalize_observations=true",
    "env.normalize_rewards=true",
    "policy.log_std_init=-1",
]
"""Box actions (a Gaussian head), from the PPO settings CleanRL and SB3 publish for MuJoCo: a 2048-step rollout,
32 minibatches, 10 update epochs, lr 3e-4, no entropy bonus, observations and rewards normalised by running
statistics (clipped to +-10), as their MuJoCo runs do. The Gaussian starts at std e^-1 (rl-zoo's tuned MuJoCo
entries start at e^-2): on HalfCheetah-v5 this alone took the 1M-step return from 1,685 (std 1) to 4,152
(bench/halfcheetah.py, seed 0). Value clipping stays off, as for CartPole (its range is in
return units); with normalised rewards it has not been measured here."""

PENDULUM = ["advantage.gamma=0.9", "optimizer.learning_rate=0.001", "total_timesteps=500000",
            "policy.log_std_init=0"]
"""On top of CONTINUOUS_CONTROL for Pendulum: the shorter horizon rl-zoo uses (gamma 0.9, lr 1e-3), chosen when
rewards were not yet normalised and its reward (-16 to 0 per step) made values of ~-1,600 at gamma 0.99; and std 1
at first, because swinging up needs the exploration (bench/continuous_learning.py, seed 0: -400 reached in 22 s
with log-std 0, in 66 s with -1)."""


HALFCHEETAH = ["batch_size=512", "minibatch_size=64", "update_epochs=20", "optimizer.learning_rate=0.0001",
               "advantage.gamma=0.98", "advantage.gae_lambda=0.92", "ppo.clip_coef=0.1", "ppo.value_coef=0.58",
               "ppo.max_grad_norm=0.8", "ppo.entropy_coef=0.0004", "policy.log_std_init=-2"]
"""On top of CONTINUOUS_CONTROL for HalfCheetah: rl-zoo's tuned HalfCheetah entry (512-step rollouts, minibatch 64,
20 epochs, gamma 0.98, lambda 0.92, clip 0.1, std e^-2 at first) on Mettle's 64x64 tanh torsos, with lr 1e-4 (the
entry's 2e-5 is for 256-wide ReLU layers). bench/halfcheetah.py, 1M steps, seeds 0-2: 4,742, 4,836, 4,301 (mean
4,626) where CONTINUOUS_CONTROL alone gave 4,152, 3,525, 1,745. Tried and dropped: ReLU torsos (seed 0: 3,756 at
363k steps, then collapsed to 1,420), lr annealed 1e-4 -> 0 (seed 0: 1,312 at 941k)."""


def recipe_for(env_name: str, policy_kind: str | None) -> list[str]:
    """Overrides that suit `env_name` (and a recurrent policy), as key=value strings."""
    if "CartPole" in env_name:
        return CLASSIC_CONTROL + (RECURRENT if policy_kind == "lstm" else OVERLAP)
    if env_name.startswith("mettagrid:"):
        return METTAGRID
    if env_name.startswith("gym:") and continuous_gym_id(env_name.partition(":")[2]):
        return CONTINUOUS_CONTROL + continuous_tuning(env_name)
    return []


def continuous_tuning(env_name: str) -> list[str]:
    """The tuned entry for a continuous-control env, where there is one (as rl-zoo keeps per env)."""
    if "Pendulum" in env_name:
        return PENDULUM
    if "HalfCheetah" in env_name:
        return HALFCHEETAH
    return []


def continuous_gym_id(env_id: str) -> bool:
    """Whether a Gymnasium id has Box actions (it is built once to see; gymnasium is imported only for gym ids)."""
    from mettle.envs.gymnasium import has_box_actions

    return has_box_actions(env_id)
