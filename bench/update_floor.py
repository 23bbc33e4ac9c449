"""What bounds Mettle ÷ SB3 on cartpole8: both trainers' phases timed in one process, against a bare PyTorch floor.

    .venv/bin/python bench/update_floor.py [--repeats 5] [--out DIR]

With compare.py's matched cartpole8 settings (8 envs, 1024-step rollouts, minibatch 256, 10 epochs: 40
gradient steps per rollout, 64x64 tanh actor and critic, one torch thread) it times, alternating:

* SB3: one `collect_rollouts` and one `train()` on the same PPO object;
* Mettle: one `rollout_phase()` and one `training_phase()` on the same Trainer;
* the floor: a PPO gradient step written as plainly as PyTorch allows (two nn.Sequential MLPs, the clipped
  loss inline, backward, gradient clipping, fused Adam) on a fixed 256-row minibatch.

From these it derives the best Mettle ÷ SB3 throughput a single core allows: SB3's epoch time over (Mettle's
rollout + 40 floor steps), and over 40 floor steps alone (a free rollout). Writes update_floor.md/json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from compare import machine_info, write_report
from compare_tasks import TASKS
from compare_workers import build_mettle, mettle_config, sb3_matched_kwargs

ROWS = 256
"""Minibatch rows, as in compare.py's cartpole8."""


def floor_step() -> Callable[[], None]:
    """A minimal PPO gradient step at cartpole8's sizes: nothing a trainer could leave out."""
    def torso(out: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, out))

    actor, critic = torso(2), torso(1)
    params = [*actor.parameters(), *critic.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, fused=True)
    gen = torch.Generator().manual_seed(0)
    obs, advantages, returns = (torch.randn(ROWS, 4, generator=gen), torch.randn(ROWS, generator=gen),
                                torch.randn(ROWS, generator=gen))
    actions, old_log_probs = torch.randint(0, 2, (ROWS, 1), generator=gen), torch.full((ROWS,), -0.69)

    def step() -> None:
        log_probs = F.log_softmax(actor(obs), dim=-1)
        ratio = (log_probs.gather(1, actions).squeeze(1) - old_log_probs).exp()
        policy_loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
        value_loss = 0.5 * (critic(obs).squeeze(1) - returns).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        (policy_loss + 0.5 * value_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()

    return step


def sb3_phases() -> tuple[Callable[[], None], Callable[[], None], int]:
    """SB3 PPO with matched settings: (collect one rollout, train on it, gradient steps per train)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import CallbackList
    from stable_baselines3.common.env_util import make_vec_env

    spec = {"task": TASKS["cartpole8"].as_dict(), "steps": None, "seed": 0}
    kwargs = sb3_matched_kwargs(spec)
    model = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=0), seed=0, device="cpu", **kwargs)
    model._setup_learn(total_timesteps=10**9)
    callback = CallbackList([])
    callback.init_callback(model)

    def collect() -> None:
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_rollout_steps=model.n_steps)

    collect()  # train() needs a filled buffer
    steps = kwargs["n_epochs"] * (kwargs["n_steps"] * 8 // kwargs["batch_size"])
    return collect, model.train, steps


def mettle_phases(gradient: str = "auto") -> tuple[Callable[[], None], Callable[[], None], int]:
    """Mettle's Trainer with the same settings: (one rollout phase, one training phase, gradient steps)."""
    # synchronous: this bench times the rollout and update phases one after the other (overlap hides the rollout)
    overrides = ["overlap=false", f"gradient={gradient}"]
    spec = {"task": TASKS["cartpole8"].as_dict(), "steps": 10**9, "seed": 0, "overrides": overrides}
    cfg = mettle_config(spec)
    _, trainer = build_mettle(cfg)
    trainer.rollout_phase()
    return (trainer.rollout_phase, trainer.core_loop.training_phase,
            cfg.trainer.update_epochs * cfg.trainer.minibatches_per_epoch)


def timed(fn: Callable[[], None], calls: int = 1) -> float:
    """Seconds per call."""
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def measure(repeats: int) -> dict[str, Any]:
    """Every phase `repeats` times, interleaved; medians in milliseconds per 1024-step epoch or per step."""
    torch.set_num_threads(1)
    sb3_collect, sb3_train, sb3_steps = sb3_phases()
    mettle_collect, mettle_train, mettle_steps = mettle_phases()
    _, autograd_train, _ = mettle_phases("autograd")
    floor = floor_step()
    timed(floor, 50)  # warm-up
    samples: dict[str, list[float]] = {k: [] for k in ("sb3_rollout", "sb3_update", "mettle_rollout",
                                                       "mettle_update", "mettle_autograd_update", "floor_step")}
    for _ in range(repeats):
        samples["sb3_rollout"].append(timed(sb3_collect) * 1e3)
        samples["sb3_update"].append(timed(sb3_train) * 1e3)
        samples["mettle_rollout"].append(timed(mettle_collect) * 1e3)
        for _ in range(3):  # the update ratios are the target: three tight pairs per repeat, each its own sample
            samples["mettle_update"].append(timed(mettle_train) * 1e3)
            samples["floor_step"].append(timed(floor, sb3_steps) * 1e3)
            samples["mettle_autograd_update"].append(timed(autograd_train) * 1e3)
    ms = {k: statistics.median(v) for k, v in samples.items()}
    pairs = zip(samples["mettle_update"], samples["mettle_autograd_update"], samples["floor_step"], strict=True)
    ratios = [(m / mettle_steps / f, a / mettle_steps / f) for m, a, f in pairs]
    sb3_epoch, floor_update = ms["sb3_rollout"] + ms["sb3_update"], ms["floor_step"] * mettle_steps
    return {
        "gradient_steps_per_epoch": {"sb3": sb3_steps, "mettle": mettle_steps},
        "median_ms": ms,
        "per_gradient_step_ms": {"sb3": ms["sb3_update"] / sb3_steps, "mettle": ms["mettle_update"] / mettle_steps,
                                 "mettle_autograd": ms["mettle_autograd_update"] / mettle_steps,
                                 "floor": ms["floor_step"]},
        "step_over_floor": {"mettle": statistics.median(r[0] for r in ratios),
                            "mettle_autograd": statistics.median(r[1] for r in ratios),
                            "pairs": len(ratios)},
        "mettle_over_sb3_now": sb3_epoch / (ms["mettle_rollout"] + ms["mettle_update"]),
        "bound_mettle_rollout_floor_update": sb3_epoch / (ms["mettle_rollout"] + floor_update),
        "bound_free_rollout_floor_update": sb3_epoch / floor_update,
        "samples": samples,
    }


def render(result: dict[str, Any], machine: dict[str, Any]) -> str:
    """The markdown report."""
    ms, step, over = result["median_ms"], result["per_gradient_step_ms"], result["step_over_floor"]
    with_rollout, free_rollout = result["bound_mettle_rollout_floor_update"], result["bound_free_rollout_floor_update"]
    return "\n".join([
        "# What bounds Mettle ÷ SB3 on cartpole8 (matched settings)", "",
        f"{machine['date']}, {machine['cpus']} CPUs, load average {machine['load_avg'][0]:.2f}; torch "
        f"{machine['torch']}, one thread. Medians of interleaved repeats, one 1024-step epoch each.", "",
        "| | rollout (ms / 1024 steps) | update (ms / 40 gradient steps) | ms per gradient step |",
        "|---|---|---|---|",
        f"| SB3 | {ms['sb3_rollout']:.1f} | {ms['sb3_update']:.1f} | {step['sb3']:.3f} |",
        f"| Mettle | {ms['mettle_rollout']:.1f} | {ms['mettle_update']:.1f} | {step['mettle']:.3f} |",
        f"| Mettle, gradient=autograd | – | {ms['mettle_autograd_update']:.1f} | {step['mettle_autograd']:.3f} |",
        f"| bare PyTorch floor | – | {ms['floor_step'] * 40:.1f} | {step['floor']:.3f} |", "",
        f"- Mettle's gradient step ÷ the floor's: **{over['mettle']:.2f}x** (gradient=autograd: "
        f"{over['mettle_autograd']:.2f}x); medians of {over['pairs']} back-to-back pairs",
        f"- Mettle ÷ SB3 now (phases only): **{result['mettle_over_sb3_now']:.2f}x**",
        f"- bound with Mettle's rollout and a floor-speed update: **{with_rollout:.2f}x**",
        f"- bound with a free rollout and a floor-speed update: **{free_rollout:.2f}x**",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write update_floor.md/json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats of every phase (median)")
    parser.add_argument("--out", default=None,
                        help="directory for update_floor.md and .json (default: a new temporary directory)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    machine = machine_info()
    result = measure(max(1, args.repeats))
    write_report(args.out, "update_floor", {"machine": machine, **result}, render(result, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
