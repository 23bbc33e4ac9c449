"""CoreTrainingLoop: the learner's half of an epoch, advantages and the PPO update, on a filled Experience."""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch

from mettle.agent.policy import NON_MEMORY_FIELDS
from mettle.rl import advantage as adv
from mettle.rl.loss.base import Loss, load_loss_states
from mettle.rl.training.analytic import AnalyticPPOGradient, analytic_problem, analytic_refusal
from mettle.rl.training.context import ComponentContext
from mettle.rl.training.normalization import RewardScaler, update_observation_statistics
from mettle.rl.training.optimizer import (
    clip_gradients,
    flat_gradients,
    set_learning_rate,
    set_optimizer_mode,
    zero_gradients,
)

logger = logging.getLogger(__name__)


class CoreTrainingLoop:
    """Turns a collected rollout into advantages and minibatch updates; the Trainer adds callbacks around it."""

    def __init__(self, context: ComponentContext) -> None:
        self.context = context
        self.losses: list[Loss] = []
        self.train_policy = context.distributed.wrap_policy(context.policy)
        self.memory_fields = [k for k in context.policy.get_agent_experience_spec() if k not in NON_MEMORY_FIELDS]
        self._gradient_said = False
        self.reward_scaler: RewardScaler | None = None
        """Scales each rollout's rewards by the running spread of the discounted return (None: rewards as given)."""

    def add_loss(self, loss: Loss) -> None:
        """Add a term to the objective, allocating the experience fields it declares (before rollouts start)."""
        taken = [other.name for other in self.losses]
        if loss.name in taken:
            raise ValueError(f"a loss named {loss.name!r} is already added ({taken}); give {type(loss).__name__} "
                             "another `name`")
        self.context.experience.add_fields(loss.experience_spec())
        self.losses.append(loss)

    def normalize_rewards(self) -> RewardScaler:
        """Scale every rollout's rewards from now on (`env.normalize_rewards`; before restore, so it gets its state)."""
        exp = self.context.experience
        self.reward_scaler = RewardScaler(self.context.config.advantage.gamma, exp.num_rows, exp.device)
        return self.reward_scaler

    def scale_rewards(self) -> None:
        """The rollout just collected, with its rewards scaled when rewards are normalised (once per rollout)."""
        if self.reward_scaler is not None:
            self.reward_scaler.scale(self.context.experience, self.context.distributed.all_reduce_sum)

    def update_observation_statistics(self) -> None:
        """After the update: fold the rollout's live observations (every rank's) into the policy's normaliser."""
        normalizer = self.context.policy.observation_normalizer
        if normalizer is not None:
            update_observation_statistics(normalizer, self.context.experience, self.context.distributed.all_reduce_sum)

    def state_dict(self) -> dict[str, Any]:
        """Each loss's update state and the reward scaler's (the rollout side's is the Collector's)."""
        scaler = self.reward_scaler
        return {"losses": {loss.name: loss.state_dict() for loss in self.losses},
                "reward_scaler": scaler.state_dict() if scaler is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Give each loss its saved update state, and the reward scaler its statistics."""
        load_loss_states(self.losses, state.get("losses", {}), rollout=False)
        saved = state.get("reward_scaler")
        if self.reward_scaler is not None and saved is not None:
            self.reward_scaler.load_state_dict(saved)
        elif (self.reward_scaler is None) != (saved is None):
            logger.warning("the checkpoint was written %s reward normalisation and this run has it %s: its "
                           "statistics start afresh", "with" if saved is not None else "without",
                           "on" if self.reward_scaler is not None else "off")

    # ---------------------------------------------------------------- training
    def training_phase(self) -> dict[str, float]:
        """Run `update_epochs` passes of minibatch PPO (live values from TrainerState); return mean diagnostics."""
        ctx, cfg, live = self.context, self.context.config, self.context.state.hyperparameters
        set_learning_rate(ctx.optimizer, live.learning_rate)
        set_optimizer_mode(ctx.optimizer, training=True)
        ctx.policy.train()
        sums: dict[str, list[torch.Tensor]] = defaultdict(list)
        analytic = self.gradient_path()
        with ctx.stopwatch("train"):
            for epoch in range(live.update_epochs):
                if epoch == 0 or cfg.advantage.method == "vtrace":
                    advantages, returns = self.compute_advantages()
                for minibatch in ctx.experience.minibatches(
                    advantages, returns, cfg.minibatch_segments, cfg.sampling, self._progress(), ctx.generator
                ):
                    for name, value in self._update(minibatch, analytic).items():
                        sums[name].append(value)
                if cfg.ppo.target_kl is not None and self._recent_kl(sums) > cfg.ppo.target_kl:
                    break
        for loss in self.losses:
            loss.on_update_end()
        set_optimizer_mode(ctx.optimizer, training=False)
        metrics = self._aggregate(sums)
        metrics["explained_variance"] = self._explained_variance(returns)
        metrics["update_epochs_run"] = float(epoch + 1)
        return metrics

    def gradient_path(self) -> AnalyticPPOGradient | None:
        """The hand-written PPO gradient when `config.gradient` allows it and it applies; None: autograd."""
        choice, policy = self.context.config.gradient, self.context.policy
        refusal = analytic_refusal(choice, policy, self.losses)
        if refusal is not None:
            raise ValueError(refusal)
        problem = "gradient=autograd" if choice == "autograd" else analytic_problem(policy, self.losses)
        if not self._gradient_said:
            logger.debug("gradient steps: %s", "analytic" if problem is None else f"autograd ({problem})")
            self._gradient_said = True
        return None if problem is not None else AnalyticPPOGradient(policy, self.losses)  # type: ignore[arg-type]

    def _update(self, minibatch: Any, analytic: AnalyticPPOGradient | None) -> dict[str, torch.Tensor]:
        ctx = self.context
        zero_gradients(ctx.optimizer)
        if analytic is None:
            metrics, log_prob = self._autograd_step(minibatch)
        else:
            metrics, log_prob = analytic(minibatch)
            self._average_gradients()
        metrics["grad_norm"] = clip_gradients(ctx.optimizer, ctx.config.ppo.max_grad_norm)
        ctx.optimizer.step()
        if ctx.config.advantage.method == "vtrace":  # the next epoch's V-trace reads the learner's ratios
            ctx.experience.log_ratio[minibatch.indices] = log_prob.detach() - minibatch.data["log_probs"]
        return {name: value.detach().float() for name, value in metrics.items()}

    def _autograd_step(self, minibatch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Backward through the policy and the sum of the losses; return (diagnostics, log-probs)."""
        data = minibatch.data
        memory = {name: data[name][:, 0] for name in self.memory_fields}
        output = self.train_policy(data["observations"], data["starts"], actions=data["actions"], memory=memory)
        metrics: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for loss in self.losses:
            value, named = loss(minibatch, output)
            metrics.update({f"{loss.name}/{name}": diagnostic for name, diagnostic in named.items()})
            total = value if total is None else total + value
        assert total is not None, "Trainer.train() refuses to start without a loss"
        total.backward()  # type: ignore[no-untyped-call]
        return metrics, output.log_prob

    def _average_gradients(self) -> None:
        """Mean of the gradients over ranks, as DDP's backward would take (the analytic step bypasses DDP)."""
        dist, optimizer = self.context.distributed, self.context.optimizer
        if not dist.is_distributed:
            return
        flat = flat_gradients(optimizer)
        grads = [flat.buffer] if flat is not None else [
            p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        for grad in grads:
            grad.copy_(dist.all_reduce_mean(grad))

    def score_lagged_rollout(self) -> None:
        """V-trace on a rollout from older weights (overlap): log pi_learner - log mu_behaviour, by the learner."""
        ctx, exp = self.context, self.context.experience
        if ctx.config.advantage.method != "vtrace":
            return
        set_optimizer_mode(ctx.optimizer, training=True)
        ctx.policy.train()
        with ctx.stopwatch("train"), torch.no_grad():
            every = torch.arange(exp.segments, device=exp.device)
            for idx in torch.split(every, ctx.config.minibatch_segments):
                data = {name: buf[idx] for name, buf in exp.buffers.items()}
                memory = {name: data[name][:, 0] for name in self.memory_fields}
                output = ctx.policy(data["observations"], data["starts"], actions=data["actions"], memory=memory)
                exp.log_ratio[idx] = output.log_prob - data["log_probs"]

    def _recent_kl(self, sums: dict[str, list[torch.Tensor]]) -> float:
        """Mean approx-KL of the last update epoch over all ranks, so every rank stops together."""
        recent = torch.stack(sums["ppo_actor/approx_kl"][-self.context.config.minibatches_per_epoch :]).mean()
        return float(self.context.distributed.all_reduce_mean(recent))

    def _aggregate(self, sums: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """Mean of each diagnostic over minibatches and ranks."""
        names = sorted(sums)
        means = torch.stack([torch.stack(sums[name]).mean() for name in names])
        values: list[float] = self.context.distributed.all_reduce_mean(means).tolist()
        return dict(zip(names, values, strict=True))

    def compute_advantages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Advantages (normalised if configured) and value targets for the whole buffer, [segments, T]."""
        cfg, exp = self.context.config.advantage, self.context.experience
        series = {name: exp.as_row_series(exp.buffers[name]) for name in
                  ("rewards", "values", "terminals", "truncations", "mask")}
        args = (series["rewards"], series["values"], exp.bootstrap, series["terminals"], series["truncations"])
        if cfg.method == "vtrace":
            log_rhos = exp.as_row_series(exp.log_ratio)
            advantages, targets = adv.vtrace(*args, log_rhos, cfg.gamma, cfg.gae_lambda,
                                             cfg.vtrace_rho_clip, cfg.vtrace_c_clip)
        else:
            advantages = adv.gae(*args, cfg.gamma, cfg.gae_lambda)
            targets = advantages + series["values"]
        if cfg.normalize:
            sums = self.context.distributed.all_reduce_sum(adv.moment_sums(advantages, series["mask"]))
            advantages = adv.normalize(advantages, sums, series["mask"])
        return exp.from_row_series(advantages), exp.from_row_series(targets)

    def _explained_variance(self, returns: torch.Tensor) -> float:
        """How much of the returns' variance the value head explains, over the valid rows of every rank."""
        mask = self.context.experience.buffers["mask"]
        values = self.context.experience.buffers["values"]
        return adv.explained_variance(values[mask], returns[mask], self.context.distributed.all_reduce_sum)

    def _progress(self) -> float:
        state, cfg = self.context.state, self.context.config
        return state.agent_step / cfg.total_timesteps
