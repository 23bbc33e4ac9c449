"""Kickstarting: distil a trained teacher's action distribution and values into the policy, annealed to zero.

The teacher acts beside the policy in the rollout (under inference_mode, its mode action so it draws no
random numbers) and its logits and value are stored in the experience, so no update runs it again.
Both weights fall linearly from their configured values at agent step 0 to zero at `anneal_steps`; a
rollout whose update would weigh the teacher at zero does not run it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mettle.agent.distributions import kl_divergence
from mettle.agent.policy import Policy, PolicyOutput, TensorSpec
from mettle.contracts import PolicyEnvInfo
from mettle.rl.loss.base import Loss, RolloutBatch, masked_mean
from mettle.rl.policy_files import CheckpointError, newest_usable_policy
from mettle.rl.trainer_config import KickstarterConfig

if TYPE_CHECKING:
    from mettle.rl.loss.trainer_view import TrainerView, TrainingProgress
    from mettle.rl.minibatch import Minibatch

logger = logging.getLogger(__name__)

TEACHER_LOGITS = "kickstarter_teacher_logits"
TEACHER_VALUES = "kickstarter_teacher_values"


class Kickstarter(Loss):
    """KL(teacher || student) over actions plus squared error to the teacher's value, weights annealed."""

    name = "kickstarter"

    def __init__(self, cfg: KickstarterConfig, teacher: Policy, nvec: tuple[int, ...], state: TrainingProgress,
                 rollout_steps: int, teacher_digest: str = "") -> None:
        self.cfg, self.teacher, self.nvec, self.state = cfg, teacher, nvec, state
        self.rollout_steps = rollout_steps
        """Agent steps one rollout adds (all ranks): the update that trains on a rollout sees this many more."""
        self.teacher_digest = teacher_digest
        """A hash of the teacher's weights, so a resume notices a teacher that changed under it."""
        teacher.eval()
        teacher.requires_grad_(False)
        self._teacher_device = next(teacher.parameters()).device

    @classmethod
    def from_config(cls, cfg: KickstarterConfig, context: TrainerView) -> Kickstarter:
        """Load the teacher (on the device where rollouts run) and check it reads this env and acts in its space."""
        assert cfg.teacher is not None  # the config refuses an enabled kickstarter without one
        refuse_continuous_actions(context.env.policy_env_info)
        path, config = Path(cfg.teacher), context.config
        if not path.exists():
            raise ValueError(f"losses.kickstarter.teacher: {path} does not exist; give a Mettle run directory or "
                             "one of its checkpoints/<epoch> directories")
        device = torch.device(config.actor_device or context.device) if config.overlap else context.device
        try:
            teacher, info, used = newest_usable_policy(path, device)
        except CheckpointError as error:
            raise ValueError(f"losses.kickstarter.teacher: {error}") from None
        check_teacher_fits(info, context.env.policy_env_info, used)
        logger.info("kickstarting from the teacher in %s", used)
        return cls(cfg, teacher, info.action_nvec, context.state, context.rollout_agent_steps,
                   weights_digest(teacher))

    def coefficient(self, agent_step: int) -> float:
        """The share (1 -> 0) of the configured weights in force at `agent_step`."""
        return max(0.0, 1.0 - agent_step / self.cfg.anneal_steps)

    def experience_spec(self) -> dict[str, TensorSpec]:
        """The teacher's flat logits and value at every step."""
        return {TEACHER_LOGITS: TensorSpec((sum(self.nvec),), torch.float32),
                TEACHER_VALUES: TensorSpec((), torch.float32)}

    def on_rollout_step(self, batch: RolloutBatch, output: PolicyOutput) -> dict[str, torch.Tensor]:
        """Run the teacher on the step the student saw, unless the update on this rollout no longer weighs it."""
        n = batch.observations.shape[0]
        if self.coefficient(batch.agent_step + self.rollout_steps) == 0.0:
            device = batch.observations.device
            return {TEACHER_LOGITS: torch.zeros(n, sum(self.nvec), device=device),
                    TEACHER_VALUES: torch.zeros(n, device=device)}
        if self._teacher_device != batch.observations.device:  # the actor may run on another device
            self.teacher.to(batch.observations.device)
            self._teacher_device = batch.observations.device
        taught = self.teacher(batch.observations.unsqueeze(1), batch.starts.unsqueeze(1), rows=batch.rows,
                              deterministic=True)
        if taught.logits is None:
            raise ValueError(f"losses.kickstarter.teacher: its {type(self.teacher).__name__} returns no logits; a "
                             "teacher's forward must set PolicyOutput.logits")
        return {TEACHER_LOGITS: taught.logits[:, 0].float(), TEACHER_VALUES: taught.values[:, 0].float()}

    def __call__(self, minibatch: Minibatch, output: PolicyOutput) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        share = self.coefficient(self.state.agent_step)
        if share == 0.0:  # annealed: the rollout stored no teacher outputs; a zero term keeps backward valid alone
            return 0.0 * output.values.sum(), {"action_coef": torch.tensor(0.0), "value_coef": torch.tensor(0.0)}
        if output.logits is None:
            raise ValueError(f"the kickstarter needs the student's logits, but {type(output).__name__}.logits is "
                             "None; return them from the policy's forward")
        kl = masked_mean(kl_divergence(minibatch.data[TEACHER_LOGITS], output.logits, self.nvec), minibatch)
        value_error = masked_mean((output.values - minibatch.data[TEACHER_VALUES]).pow(2), minibatch)
        action_coef, value_coef = share * self.cfg.action_coef, share * self.cfg.value_coef
        metrics = {"kl": kl.detach(), "value_mse": value_error.detach(),
                   "action_coef": torch.tensor(action_coef), "value_coef": torch.tensor(value_coef)}
        return action_coef * kl + value_coef * value_error, metrics

    def rollout_state_dict(self) -> dict[str, Any]:
        """The teacher's per-row recurrent memory (empty for a feed-forward teacher)."""
        return {"memory": {k: v.detach().cpu() for k, v in self.teacher.memory_state().items()},
                "teacher_digest": self.teacher_digest}

    def load_rollout_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the teacher's memory; a teacher whose weights changed since the checkpoint is named."""
        if state.get("teacher_digest") not in (None, self.teacher_digest):
            logger.warning("kickstarter: the teacher's weights differ from those the checkpoint was trained with "
                           "(a newer teacher checkpoint?), so this resume is not exact")
        memory = state.get("memory", {})
        self.teacher.load_memory_state({k: v.to(self._teacher_device) for k, v in memory.items()})


def check_teacher_fits(teacher: PolicyEnvInfo, student: PolicyEnvInfo, source: Path) -> None:
    """The teacher must act in the student's action space and read its observations: one line if not."""
    if teacher.action_layout != student.action_layout:
        raise ValueError(f"losses.kickstarter.teacher: {source} acts in {describe(teacher.action_space)}, this "
                         f"environment in {describe(student.action_space)}; use a teacher trained on this "
                         "environment's action space")
    if teacher.observation_space != student.observation_space:
        raise ValueError(f"losses.kickstarter.teacher: {source} reads observations "
                         f"{describe(teacher.observation_space)}, this environment gives "
                         f"{describe(student.observation_space)}; use a teacher trained on these observations")


def refuse_continuous_actions(student: PolicyEnvInfo) -> None:
    """The kickstarter distils categorical heads through their logits: a Box policy's Gaussian is not one."""
    if student.continuous_actions:
        raise ValueError(f"losses.kickstarter: this environment's actions are {describe(student.action_space)} "
                         "(a Gaussian head), and the kickstarter distils categorical action heads only; set "
                         "losses.kickstarter.enabled=false")


def describe(space: Any) -> str:
    """A space in a few words (its repr without the long bounds)."""
    shape = getattr(space, "shape", None)
    nvec = getattr(space, "nvec", None)
    if nvec is not None:
        return f"MultiDiscrete{list(map(int, nvec))}"
    if hasattr(space, "n"):
        return f"Discrete({int(space.n)})"
    return f"{type(space).__name__}{tuple(shape) if shape is not None else ''}"


def weights_digest(policy: Policy) -> str:
    """A short hash of the policy's weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(policy.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # any dtype
    return digest.hexdigest()[:16]
