"""CoreTrainingLoop: one epoch is a rollout phase that fills Experience, then a PPO update."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mettle.agent.policy import PolicyOutput
from mettle.rl import advantage as adv
from mettle.rl.loss.base import Loss, RolloutBatch
from mettle.rl.training.analytic import AnalyticPPOGradient, analytic_problem
from mettle.rl.training.context import ComponentContext
from mettle.rl.training.environment import EnvBatch, EnvStateError
from mettle.rl.training.optimizer import (
    clip_gradients,
    flat_gradients,
    set_learning_rate,
    set_optimizer_mode,
    zero_gradients,
)
from mettle.rl.training.overlap import OverlappedRollouts, fork_problem

logger = logging.getLogger(__name__)

NON_MEMORY_FIELDS = frozenset({"observations", "actions"})


@dataclass
class Decision:
    """The policy's choice for one batch of rows, not yet stored or sent."""

    rows: slice
    observations: torch.Tensor
    mask: torch.Tensor
    starts: torch.Tensor
    output: PolicyOutput
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """The losses' experience fields for this step (`Loss.on_rollout_step`)."""


class CoreTrainingLoop:
    """Runs the two phases of an epoch; the Trainer adds callbacks and bookkeeping around it."""

    def __init__(self, context: ComponentContext, losses: Sequence[Loss]) -> None:
        self.context = context
        self.losses: list[Loss] = []
        self._declared: dict[str, frozenset[str]] = {}
        """Each loss's experience fields, as allocated (checked against what its rollout hook returns)."""
        for loss in losses:
            self.add_loss(loss)
        self.train_policy = context.distributed.wrap_policy(context.policy)
        self.memory_fields = [k for k in context.policy.get_agent_experience_spec() if k not in NON_MEMORY_FIELDS]
        self._pending: dict[int, Decision] = {}
        self._awaiting: set[int] = set()
        self._env_started = False
        self._gradient_said = False
        self._overlap = self._overlapped_rollouts()

    def add_loss(self, loss: Loss) -> None:
        """Add a term to the objective, allocating the experience fields it declares (before rollouts start)."""
        taken = [other.name for other in self.losses]
        if loss.name in taken:
            raise ValueError(f"a loss named {loss.name!r} is already added ({taken}); give {type(loss).__name__} "
                             "another `name`")
        spec = loss.experience_spec()
        self.context.experience.add_fields(spec)
        self.losses.append(loss)
        self._declared[loss.name] = frozenset(spec)

    def _overlapped_rollouts(self) -> OverlappedRollouts | None:
        """The actor side when `overlap` is on and a forked actor can run here; else None (synchronous, said once)."""
        ctx = self.context
        if not ctx.config.overlap:
            return None
        actor_device = torch.device(ctx.config.actor_device or ctx.device)
        problem = fork_problem(actor_device)
        if problem is not None:
            logger.warning("overlap=true: training synchronously instead, because %s", problem)
            return None
        return OverlappedRollouts(self, actor_device)

    @property
    def overlapped(self) -> bool:
        """Whether rollouts run in an actor process while the learner updates (overlap=true, and it could start)."""
        return self._overlap is not None

    # ----------------------------------------------------------------- rollout
    def rollout_phase(self) -> list[dict[str, Any]]:
        """Fill the experience buffer (or take the actor's next rollout); return the infos of episodes that finished."""
        ctx = self.context
        set_optimizer_mode(ctx.optimizer, training=False)
        ctx.policy.eval()
        infos = self._overlap.next_rollout() if self._overlap is not None else self.collect()
        ctx.state.agent_step += ctx.rollout_agent_steps
        return infos

    def collect(self) -> list[dict[str, Any]]:
        """Step the env with the policy until the experience buffer is full (the learner's, or in the actor)."""
        ctx, exp = self.context, self.context.experience
        if not self._env_started:
            ctx.env.reset(seed=ctx.config.seed + ctx.distributed.seed_offset())
            self._env_started = True
        exp.reset()
        infos: list[dict[str, Any]] = []
        with ctx.stopwatch("rollout"):
            pending, self._pending = self._pending, {}
            for decision in pending.values():
                self._commit(decision)
            while not exp.full:
                self._step(infos)
        return infos

    def stop_actor(self) -> None:
        """End the actor process between rollouts (training is done); its state stays for checkpoints and resumes."""
        if self._overlap is not None:
            self._overlap.stop()

    def abort_actor(self) -> None:
        """End the actor process at once (training failed)."""
        if self._overlap is not None:
            self._overlap.abort()

    def _step(self, infos: list[dict[str, Any]]) -> None:
        ctx, exp = self.context, self.context.experience
        with ctx.stopwatch("rollout.env"):
            batch = ctx.env.get_observations()
        infos.extend(batch.infos)
        if batch.rows.start in self._awaiting:
            self._store_outcome(batch)
        decision = self._decide(batch)
        if exp.rows_full(batch.rows):
            exp.set_bootstrap(batch.rows, decision.output.values[:, 0])
            self._pending[batch.rows.start] = decision
        else:
            self._commit(decision)

    def _store_outcome(self, batch: EnvBatch) -> None:
        device = self.context.experience.device
        self.context.experience.store_outcome(
            batch.rows,
            torch.as_tensor(batch.rewards, dtype=torch.float32).to(device),
            torch.as_tensor(batch.terminals, dtype=torch.bool).to(device),
            torch.as_tensor(batch.truncations, dtype=torch.bool).to(device),
        )
        self._awaiting.discard(batch.rows.start)

    def _decide(self, batch: EnvBatch) -> Decision:
        ctx = self.context
        with ctx.stopwatch("rollout.inference"), torch.inference_mode():
            obs = torch.as_tensor(batch.observations).to(ctx.device, non_blocking=True)
            starts = torch.as_tensor(batch.starts, dtype=torch.bool).to(ctx.device)
            mask = torch.as_tensor(batch.mask, dtype=torch.bool).to(ctx.device)
            output = ctx.policy(obs.unsqueeze(1), starts.unsqueeze(1), rows=batch.rows)
            extras = self._loss_fields(RolloutBatch(batch.rows, obs, starts, mask), output)
        return Decision(batch.rows, obs, mask, starts, output, extras)

    def _loss_fields(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        """Every loss's fields for this step; a loss that leaves out or adds a field is named."""
        fields: dict[str, torch.Tensor] = {}
        for loss in self.losses:
            filled = loss.on_rollout_step(batch, output)
            declared = self._declared[loss.name]
            if filled.keys() != declared:
                raise ValueError(f"{type(loss).__name__}.on_rollout_step returned fields {sorted(filled)}, but "
                                 f"experience_spec declares {sorted(declared)}; return exactly the declared ones")
            fields.update(filled)
        return fields

    def _commit(self, decision: Decision) -> None:
        ctx = self.context
        with torch.inference_mode():
            ctx.experience.store_decision(
                decision.rows, decision.output, decision.observations, decision.mask, decision.starts,
                decision.extras,
            )
        actions = decision.output.actions[:, 0].cpu().numpy()
        with ctx.stopwatch("rollout.env"):
            ctx.env.send_actions(actions, decision.rows)
        self._awaiting.add(decision.rows.start)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """Rollout progress between epochs: held decisions, policy memory, the env's own state (and, overlapped, the
        rollout collected ahead, with the actor's RNG)."""
        rollouts = self._overlap.state_dict() if self._overlap is not None else self.rollout_state_dict()
        return {**rollouts, "losses": {loss.name: loss.state_dict() for loss in self.losses}}

    def rollout_state_dict(self) -> dict[str, Any]:
        """What this process's rollouts need to continue exactly: held decisions, policy memory and the env's state."""
        ctx = self.context
        return {
            "env_started": self._env_started,
            "awaiting": sorted(self._awaiting),
            "pending": [decision_to_dict(d) for d in self._pending.values()],
            "policy_memory": {k: v.detach().cpu() for k, v in ctx.policy.memory_state().items()},
            "env": ctx.env.state_dict(),
            "loss_rollout": {loss.name: loss.rollout_state_dict() for loss in self.losses},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume rollouts where `state_dict` left them; without usable env state the env restarts, and says so."""
        self._load_loss_states(state.get("losses", {}), rollout=False)
        if self._overlap is not None:
            self._overlap.load_state_dict(state)
            return
        if (state.get("overlap") or {}).get("ready") is not None:
            logger.warning("the checkpoint holds a rollout collected ahead by overlapped training; with overlap off "
                           "it is dropped and collected again, so this resume is not exact")
        self.load_rollout_state(state)

    def load_rollout_state(self, state: dict[str, Any]) -> None:
        """Restore this process's env, held decisions and policy memory from `rollout_state_dict`'s output."""
        ctx = self.context
        self._load_loss_states(state.get("loss_rollout", {}), rollout=True)
        if not state["env_started"]:
            self._restart_rollouts()
            return
        problem = self._load_env_state(state["env"])
        if problem is not None:
            logger.warning("%s: every episode restarts, so this resume is not exact (%s)",
                           type(ctx.env).__name__, problem)
            self._restart_rollouts()
            return
        ctx.policy.load_memory_state({k: v.to(ctx.device) for k, v in state["policy_memory"].items()})
        decisions = [decision_from_dict(d, ctx.device) for d in state["pending"]]
        for decision in decisions:
            self._refit_fields(decision)
        self._pending = {d.rows.start: d for d in decisions}
        self._awaiting = set(state["awaiting"])
        self._env_started = True

    def _refit_fields(self, decision: Decision) -> None:
        """A held decision from a run with other losses: drop fields no loss here declares, fill those it lacks."""
        decision.extras = {k: v for k, v in decision.extras.items() if k in self.context.experience.buffers}
        batch = RolloutBatch(decision.rows, decision.observations, decision.starts, decision.mask)
        with torch.inference_mode():
            for loss in self.losses:
                if not self._declared[loss.name] <= decision.extras.keys():
                    decision.extras.update(loss.on_rollout_step(batch, decision.output))

    def _load_loss_states(self, saved: dict[str, Any], rollout: bool) -> None:
        """Hand each loss its saved update (or `rollout`) state; one with state but none saved starts fresh."""
        kind = "rollout_state_dict" if rollout else "state_dict"
        for loss in self.losses:
            load, current = ((loss.load_rollout_state_dict, loss.rollout_state_dict) if rollout
                             else (loss.load_state_dict, loss.state_dict))
            if loss.name in saved:
                load(saved[loss.name])
            elif current():
                logger.warning("the checkpoint holds no %s for loss %r (added since it was written): it starts "
                               "fresh", kind, loss.name)
        for name in sorted(set(saved) - {loss.name for loss in self.losses}):
            logger.warning("the checkpoint holds a %s for loss %r, which this run does not have: it is ignored",
                           kind, name)

    def pending_decisions(self, device: torch.device) -> dict[int, Decision]:
        """The held decisions, on `device` (the actor's)."""
        return {start: decision_from_dict(decision_to_dict(d), device) for start, d in self._pending.items()}

    def adopt_pending(self, pending: dict[int, Decision]) -> None:
        """Hold these decisions instead (the actor's copies, on its device)."""
        self._pending = pending

    def _load_env_state(self, env_state: dict[str, Any] | None) -> str | None:
        """Restore the env from a checkpoint; why it could not be, or None once it is."""
        if env_state is None:
            return "the checkpoint holds no environment state: this environment cannot save it"
        try:
            self.context.env.load_state_dict(env_state)
        except (EnvStateError, NotImplementedError) as error:
            return str(error)
        return None

    def _restart_rollouts(self) -> None:
        """Forget held decisions and policy memory: the next rollout resets the environment."""
        self._pending, self._awaiting, self._env_started = {}, set(), False
        self.context.policy.reset_memory()

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
        problem = "gradient=autograd" if choice == "autograd" else analytic_problem(policy, self.losses)
        if problem is not None and choice == "analytic":
            raise ValueError(f"gradient=analytic cannot be used: {problem}; set gradient=auto or gradient=autograd")
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


def decision_to_dict(decision: Decision) -> dict[str, Any]:
    """A held decision as plain tensors, for checkpoints."""
    out = decision.output
    return {
        "rows": [decision.rows.start, decision.rows.stop],
        "observations": decision.observations.cpu(), "mask": decision.mask.cpu(), "starts": decision.starts.cpu(),
        "actions": out.actions.cpu(), "log_prob": out.log_prob.cpu(), "entropy": out.entropy.cpu(),
        "values": out.values.cpu(), "memory": {k: v.cpu() for k, v in out.memory.items()},
        "extras": {k: v.cpu() for k, v in decision.extras.items()},
    }


def decision_from_dict(data: dict[str, Any], device: torch.device) -> Decision:
    """Inverse of `decision_to_dict`."""
    output = PolicyOutput(
        actions=data["actions"].to(device), log_prob=data["log_prob"].to(device), entropy=data["entropy"].to(device),
        values=data["values"].to(device), memory={k: v.to(device) for k, v in data["memory"].items()},
    )
    start, stop = data["rows"]
    extras = {k: v.to(device) for k, v in data.get("extras", {}).items()}
    return Decision(slice(start, stop), data["observations"].to(device), data["mask"].to(device),
                    data["starts"].to(device), output, extras)
