"""Collector: the rollout side of training, which steps the environment with the acting policy into Experience.

The synchronous loop owns one Collector and fills the learner's Experience with it; with `overlap=true` the
actor process owns one and fills a shared slot (overlap.py). Either way a rollout reads as one loop:
take the env's next batch of rows, store the outcome of their previous decision, decide, store and send.
A row whose buffer is full keeps its decision (held) for the next rollout, which is what makes a resumed
run continue exactly; `state_dict` carries the held decisions, the policy's memory, the env's own state
and each loss's rollout state. The Collector stores observations and rewards as the env gives them and never
changes normalisation statistics: the learner updates them from its copy of each rollout (`normalization.py`),
so synchronous and overlapped training take one path.

With a task family and a curriculum, the Collector also hands each env instance its next task: when a batch
reports that an instance's episode ended, its `TaskSampler` draws the task the instance restarts with (from the
plan the learner's curriculum set for this rollout), before the actions that restart it are sent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from mettle.agent.policy import PolicyOutput
from mettle.contracts import EnvBatch, EnvStateError
from mettle.rl.loss.base import Loss, RolloutBatch, load_loss_states

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.contracts import TrainingEnvironment
    from mettle.profiling.stopwatch import Stopwatch
    from mettle.rl.training.curriculum import TaskPlan, TaskSampler
    from mettle.rl.training.experience import Experience

logger = logging.getLogger(__name__)

OVERLAP_KEY = "overlap"
"""Where a rollout state holds what only overlapped training has (the rollout collected ahead, the actor's RNG)."""


class RolloutSource(Protocol):
    """Where the learner's rollouts come from: a Collector in this process, or the actor process (overlap)."""

    lagged: bool
    """Whether a rollout may come from weights older than the learner's (V-trace then recomputes its ratios)."""

    def add_loss(self, loss: Loss) -> None:
        """Run this loss's rollout hook on every step from now on."""

    def collect(self, experience: Experience, agent_step: int) -> list[dict[str, Any]]:
        """Fill `experience` with the rollout that starts at `agent_step`; the infos of episodes that ended."""

    def state_dict(self) -> dict[str, Any]:
        """What the rollouts need to continue exactly after a resume."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from what `state_dict` returned."""

    def use_tasks(self, sampler: TaskSampler) -> None:
        """Draw each env instance's next task with `sampler` (a task family's env; before the first rollout)."""

    def set_task_plan(self, plan: TaskPlan) -> None:
        """The curriculum's plan for the rollouts commanded from now on."""

    def stop(self) -> None:
        """Training is done: end any helper process, keeping the state for checkpoints."""

    def abort(self) -> None:
        """Training failed: end any helper process at once."""


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

    def kept(self) -> Decision:
        """This decision with copies of what may still be the env's own arrays (it refills them on later steps)."""
        return replace(self, observations=self.observations.clone(), mask=self.mask.clone(),
                       starts=self.starts.clone(), extras={k: v.clone() for k, v in self.extras.items()})


class Collector:
    """Steps one environment with one acting policy and fills an Experience, one rollout per `collect`."""

    lagged = False

    def __init__(self, env: TrainingEnvironment, policy: Policy, device: torch.device, stopwatch: Stopwatch,
                 seed: int) -> None:
        self.env, self.policy, self.device, self.stopwatch = env, policy, device, stopwatch
        self.seed = seed
        """The env's reset seed (the run's seed plus this rank's offset)."""
        self.losses: list[Loss] = []
        self._hooked: list[Loss] = []
        """The losses with a rollout hook or fields of their own (the PPO terms have neither)."""
        self._unchecked: set[str] = set()
        """Losses whose rollout hook has not yet been checked against their declared fields."""
        self._held: dict[int, Decision] = {}
        """Decisions taken for rows whose buffer was full: stored and sent first in the next rollout."""
        self._awaiting: set[int] = set()
        """Rows (by first row) whose last decision was sent and whose outcome is not stored yet."""
        self._env_started = False
        self._refit_held = False
        """Held decisions came from a checkpoint, perhaps of a run with other losses: refit their fields first."""
        self.tasks: TaskSampler | None = None
        """Draws the task each env instance plays next (None: the env plays one task)."""

    def add_loss(self, loss: Loss) -> None:
        """Run this loss's `on_rollout_step` on every step (if it has one); its fields are checked on its first step."""
        self.losses.append(loss)
        if type(loss).on_rollout_step is not Loss.on_rollout_step or loss.experience_spec():
            self._hooked.append(loss)
            self._unchecked.add(loss.name)

    def act_on(self, policy: Policy, device: torch.device) -> None:
        """Act with `policy` on `device` from now on (the actor's copy), holding the same decisions there."""
        moved = device != self.device
        self.policy, self.device = policy, device
        if moved:
            self._held = {start: decision_from_dict(decision_to_dict(d), device) for start, d in self._held.items()}

    def use_tasks(self, sampler: TaskSampler) -> None:
        """Draw each env instance's next task with `sampler`, from the first episode on."""
        self.tasks = sampler

    def set_task_plan(self, plan: TaskPlan) -> None:
        """Draw tasks from `plan` from now on."""
        if self.tasks is None:
            raise RuntimeError("set_task_plan without use_tasks: this Collector's env plays one task")
        self.tasks.set_plan(plan)

    # ----------------------------------------------------------------- rollout
    def collect(self, experience: Experience, agent_step: int) -> list[dict[str, Any]]:
        """Step the env with the policy until `experience` is full; return the infos of episodes that ended."""
        if not self._env_started:
            if self.tasks is not None:
                self._assign_tasks(range(self.env.batch_info.num_envs))
            self.env.reset(seed=self.seed)
            self._env_started = True
        experience.reset()
        infos: list[dict[str, Any]] = []
        with self.stopwatch("rollout"), torch.inference_mode():
            held, self._held = self._held, {}
            for decision in held.values():
                if self._refit_held:
                    self._refit_fields(decision, agent_step)
                self._commit(decision, experience)
            self._refit_held = False
            while not experience.full:
                self._step(experience, agent_step, infos)
        return infos

    def _step(self, experience: Experience, agent_step: int, infos: list[dict[str, Any]]) -> None:
        """One batch of rows: store the outcome of their last decision, decide, then store and send (or hold)."""
        with self.stopwatch("rollout.env"):
            batch = self.env.get_observations()
            if batch.infos and self.tasks is not None:  # instances that ended restart with their next task
                self._assign_tasks(sorted({int(info["env_id"]) for info in batch.infos}))
        infos.extend(batch.infos)
        rows = batch.rows
        if rows.start in self._awaiting:
            experience.store_outcome(rows, batch.rewards, batch.terminals, batch.truncations)
            self._awaiting.discard(rows.start)
        decision = self._decide(batch, agent_step)
        if experience.rows_full(rows):
            experience.set_bootstrap(rows, decision.output.values[:, 0])
            self._held[rows.start] = decision.kept()
        else:
            self._commit(decision, experience)

    def _assign_tasks(self, instances: Iterable[int]) -> None:
        """Draw the next task of each instance, in order, and hand them to the env."""
        assert self.tasks is not None
        self.env.assign_tasks({instance: self.tasks.next_task() for instance in instances})

    def _decide(self, batch: EnvBatch, agent_step: int) -> Decision:
        """The policy's choice for the batch (and the losses' fields), on the acting device."""
        with self.stopwatch("rollout.inference"):
            obs = on_device(batch.observations, None, self.device)
            starts = on_device(batch.starts, torch.bool, self.device)
            mask = on_device(batch.mask, torch.bool, self.device)
            output = self.policy(obs.unsqueeze(1), starts.unsqueeze(1), rows=batch.rows)
            extras: dict[str, torch.Tensor] = {}
            if self._hooked:
                extras = self._loss_fields(RolloutBatch(batch.rows, obs, starts, mask, agent_step), output)
        return Decision(batch.rows, obs, mask, starts, output, extras)

    def _loss_fields(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        """The fields of every loss with a rollout hook; one that leaves out or adds a field is named (first step)."""
        fields: dict[str, torch.Tensor] = {}
        for loss in self._hooked:
            filled = loss.on_rollout_step(batch, output)
            if loss.name in self._unchecked:
                check_loss_fields(loss, filled)
                self._unchecked.discard(loss.name)
            fields.update(filled)
        return fields

    def _commit(self, decision: Decision, experience: Experience) -> None:
        """Store the decision in `experience` and send its actions to the env."""
        output = decision.output
        experience.store_decision(decision.rows, output, decision.observations, decision.mask, decision.starts,
                                  decision.extras)
        actions = output.actions.numpy()[:, 0] if output.actions.is_cpu else output.actions[:, 0].cpu().numpy()
        with self.stopwatch("rollout.env"):
            self.env.send_actions(actions, decision.rows)
        self._awaiting.add(decision.rows.start)

    # ------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        """What the next rollout needs to continue exactly: held decisions, policy memory, the env's state."""
        return {
            "env_started": self._env_started,
            "awaiting": sorted(self._awaiting),
            "pending": [decision_to_dict(d) for d in self._held.values()],
            "policy_memory": {k: v.detach().cpu() for k, v in self.policy.memory_state().items()},
            "env": self.env.state_dict(),
            "loss_rollout": {loss.name: loss.rollout_state_dict() for loss in self.losses},
            "tasks": self.tasks.state_dict() if self.tasks is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict`'s output; without usable env state every episode restarts, and says so."""
        if (state.get(OVERLAP_KEY) or {}).get("ready") is not None:
            logger.warning("the checkpoint holds a rollout collected ahead by overlapped training; with overlap off "
                           "it is dropped and collected again, so this resume is not exact")
        load_loss_states(self.losses, state.get("loss_rollout", {}), rollout=True)
        self._load_task_sampler(state.get("tasks"))
        if not state["env_started"]:
            self.restart()
            return
        problem = self._load_env_state(state["env"])
        if problem is not None:
            logger.warning("%s: every episode restarts, so this resume is not exact (%s)", type(self.env).__name__,
                           problem)
            self.restart()
            return
        self.policy.load_memory_state({k: v.to(self.device) for k, v in state["policy_memory"].items()})
        decisions = [decision_from_dict(d, self.device) for d in state["pending"]]
        self._held = {d.rows.start: d for d in decisions}
        self._refit_held = True
        self._awaiting = set(state["awaiting"])
        self._env_started = True

    def _load_task_sampler(self, saved: dict[str, Any] | None) -> None:
        """Continue the task draws where the checkpoint left them (a run without a family saved none)."""
        if self.tasks is None or saved is None:
            if (self.tasks is None) != (saved is None):
                logger.warning("the checkpoint was written %s a task curriculum and this run has %s: task draws "
                               "start afresh", "with" if saved else "without", "one" if self.tasks else "none")
            return
        self.tasks.load_state_dict(saved)

    def _load_env_state(self, env_state: dict[str, Any] | None) -> str | None:
        """Restore the env from a checkpoint; why it could not be, or None once it is."""
        if env_state is None:
            return "the checkpoint holds no environment state: this environment cannot save it"
        try:
            self.env.load_state_dict(env_state)
        except (EnvStateError, NotImplementedError) as error:
            return str(error)
        return None

    def _refit_fields(self, decision: Decision, agent_step: int) -> None:
        """A held decision from a run with other losses: drop fields no loss here fills, fill those it lacks."""
        declared = {name for loss in self.losses for name in loss.experience_spec()}
        decision.extras = {k: v for k, v in decision.extras.items() if k in declared}
        batch = RolloutBatch(decision.rows, decision.observations, decision.starts, decision.mask, agent_step)
        for loss in self.losses:
            if not loss.experience_spec().keys() <= decision.extras.keys():
                decision.extras.update(loss.on_rollout_step(batch, decision.output))

    def restart(self) -> None:
        """Forget held decisions and policy memory: the next rollout resets the environment."""
        self._held, self._awaiting, self._env_started = {}, set(), False
        self.policy.reset_memory()

    def stop(self) -> None:
        """Nothing runs apart from training here."""

    def abort(self) -> None:
        """Nothing runs apart from training here."""


def on_device(array: np.ndarray | torch.Tensor, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """The env's array as a tensor on `device`: on the CPU a view of it when the dtype already fits (no copy)."""
    tensor = torch.from_numpy(array) if isinstance(array, np.ndarray) else array
    if dtype is not None and tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor if tensor.device == device else tensor.to(device)  # blocking: the env refills its arrays


def check_loss_fields(loss: Loss, filled: dict[str, torch.Tensor]) -> None:
    """A loss's rollout hook must return exactly the fields its `experience_spec` declares."""
    declared = loss.experience_spec().keys()
    if filled.keys() != declared:
        raise ValueError(f"{type(loss).__name__}.on_rollout_step returned fields {sorted(filled)}, but "
                         f"experience_spec declares {sorted(declared)}; return exactly the declared ones")


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
