"""Trainer: the facade that wires config, environment, policy and components, then runs epochs."""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mettle.agent.policy import Policy
from mettle.profiling.stopwatch import Stopwatch
from mettle.rl.hyperparameters import Hyperparameters
from mettle.rl.loss import Loss, losses_from_config
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import (
    ComponentContext,
    ContextCheckpointer,
    CoreTrainingLoop,
    DistributedHelper,
    Experience,
    TrainerCallback,
    TrainerComponent,
    TrainerState,
    TrainingEnvironment,
)
from mettle.rl.training.collector import Collector, RolloutSource
from mettle.rl.training.component import crossed_interval
from mettle.rl.training.optimizer import create_optimizer, flatten_parameters, set_optimizer_mode
from mettle.rl.training.overlap import OverlappedRollouts, rollout_source
from mettle.runtime import check_torch_compile, keep_freed_memory

logger = logging.getLogger(__name__)


class Trainer:
    """Main trainer facade that coordinates all training components."""

    def __init__(
        self,
        cfg: TrainerConfig,
        env: TrainingEnvironment,
        policy: Policy,
        device: Any,
        distributed_helper: DistributedHelper | None = None,
        run_name: str | None = None,
    ) -> None:
        self._cfg = cfg
        if cfg.keep_freed_memory:
            keep_freed_memory()
        device = torch.device(device)
        self._distributed = distributed_helper or DistributedHelper(device)
        cfg.check_rows(env.batch_info.num_rows)
        seed = cfg.seed + self._distributed.seed_offset()
        seed_everything(seed)
        policy.initialize_to_environment(env.policy_env_info, device)
        if cfg.torch_compile:
            check_torch_compile(device)
            policy.compile_hot_path()
        experience = Experience(
            cfg.batch_size, cfg.bptt_horizon, env.batch_info.num_rows, policy.get_agent_experience_spec(), device
        )
        self._context = ComponentContext(
            config=cfg,
            state=TrainerState(hyperparameters=Hyperparameters.from_config(cfg)),
            policy=policy,
            env=env,
            experience=experience,
            optimizer=create_optimizer(cfg.optimizer, policy, flatten_parameters(policy)),
            stopwatch=Stopwatch(),
            distributed=self._distributed,
            device=device,
            run_name=run_name,
            generator=torch.Generator().manual_seed(seed),
        )
        losses = losses_from_config(self._context)  # first: a teacher may set up CUDA, which rules out a fork
        self._core = CoreTrainingLoop(self._context)
        self._rollouts = rollout_source(self._context, Collector(env, policy, device, self._context.stopwatch, seed))
        self._context.core_loop, self._context.rollouts = self._core, self._rollouts
        self._components = self._context.components
        self._sealed_by: str | None = None
        """Set by restore() or train(): after them a new loss would miss its saved state or its first rollout."""
        for loss in losses:
            self.add_loss(loss)

    @property
    def context(self) -> ComponentContext:
        """Return the shared trainer context."""
        return self._context

    @property
    def core_loop(self) -> CoreTrainingLoop:
        """Advantages and the update (its losses' update state is part of a checkpoint)."""
        return self._core

    @property
    def rollouts(self) -> RolloutSource:
        """Where rollouts come from: the Collector, or with overlap the actor process that owns one."""
        return self._rollouts

    @property
    def overlapped(self) -> bool:
        """Whether rollouts run in an actor process while the learner updates (overlap=true, and it could start)."""
        return isinstance(self._rollouts, OverlappedRollouts)

    @property
    def losses(self) -> list[Loss]:
        """The terms of the objective, in the order they are summed (config's first, then added ones)."""
        return list(self._core.losses)

    def add_loss(self, loss: Loss) -> Loss:
        """Add a term to the objective (a Loss subclass of your own), before restore() and train()."""
        if self._sealed_by is not None:
            raise RuntimeError(f"add_loss({type(loss).__name__}) after {self._sealed_by}(): add losses right after "
                               "constructing the Trainer (or pass them to build_run), so they get their experience "
                               "fields and checkpointed state")
        self._core.add_loss(loss)
        self._rollouts.add_loss(loss)
        return loss

    @property
    def components(self) -> list[TrainerComponent]:
        """Registered components, in registration (and callback) order."""
        return list(self._components)

    def train(self) -> TrainerState:
        """Run the main training loop.

        Runs epochs until `total_timesteps` agent steps, or until a component sets
        `context.stop_requested`; either way `on_training_complete` follows (a checkpoint, a summary).
        """
        state = self._context.state
        self._sealed_by = self._sealed_by or "train"
        if not self._core.losses:
            raise ValueError("no loss to train on: enable losses.ppo_actor, ppo_critic or kickstarter, or add one "
                             "with Trainer.add_loss")
        self._core.gradient_path()  # gradient=analytic that cannot apply fails here, before any rollout
        self._warn_unclaimed_state()
        try:
            while state.agent_step < self._cfg.total_timesteps and not self._stop_requested():
                self._run_epoch()
            self._invoke(TrainerCallback.TRAINING_COMPLETE)
            self._rollouts.stop()
        except BaseException as error:
            self._rollouts.abort()
            self._notify_failure(error)
            raise
        return state

    def _run_epoch(self) -> None:
        ctx = self._context
        started, first_step = time.perf_counter(), ctx.state.agent_step
        infos = self.rollout_phase()
        ctx.stats.episodes = [info for rank in ctx.distributed.all_gather_object(infos) for info in rank]
        self._invoke(TrainerCallback.STEP, ctx.stats.episodes)
        self._invoke(TrainerCallback.ROLLOUT_END)
        ctx.stats.losses = self._core.training_phase()
        self._core.update_observation_statistics()
        ctx.state.epoch += 1
        elapsed = max(time.perf_counter() - started, 1e-9)
        ctx.stats.steps_per_second = (ctx.state.agent_step - first_step) / elapsed
        self._invoke_epoch_end(ctx.state.epoch - 1, ctx.state.epoch)

    def rollout_phase(self) -> list[dict[str, Any]]:
        """Collect the next rollout into the Experience with the acting weights (its rewards scaled when rewards are
        normalised); the infos of episodes that ended, with their returns as the environment gave them."""
        ctx = self._context
        set_optimizer_mode(ctx.optimizer, training=False)
        ctx.policy.eval()
        infos = self._rollouts.collect(ctx.experience, ctx.state.agent_step)
        self._core.scale_rewards()
        if self._rollouts.lagged:
            self._core.score_lagged_rollout()
        ctx.state.agent_step += ctx.rollout_agent_steps
        return infos

    def _stop_requested(self) -> bool:
        """A stop asked for on any rank stops every rank at the same epoch (one asked during the vote: the next)."""
        agreed = self._distributed.any_rank(self._context.stop_requested)
        self._context.stop_requested = self._context.stop_requested or agreed
        return agreed

    def _warn_unclaimed_state(self) -> None:
        """Saved state that no registered component took is ignored: say which, rather than resume without it."""
        checkpointer = self._checkpointer()
        if checkpointer is None or not self._distributed.is_master():  # other ranks skip master-only components
            return
        for key in sorted(checkpointer.unclaimed):
            logger.warning("the checkpoint holds state for component %r, but no registered component has that "
                           "state_key: its state is ignored (register it before train() to restore it)", key)

    def _invoke(self, callback: TrainerCallback, *args: Any) -> None:
        for component in self._components:
            getattr(component, callback.value)(*args)

    def _invoke_epoch_end(self, previous: int, current: int) -> None:
        for component in self._components:
            if crossed_interval(previous, current, component.epoch_interval):
                component.on_epoch_end(current)

    def _notify_failure(self, error: BaseException) -> None:
        for component in self._components:
            try:
                component.on_failure(error)
            except Exception as hook_error:  # keep telling the others; the original error wins
                error.add_note(f"{type(component).__name__}.on_failure also raised: {hook_error!r}")

    @staticmethod
    def load_or_create(
        checkpoint_path: str,
        cfg: TrainerConfig,
        training_env: TrainingEnvironment,
        policy: Policy,
        device: Any,
        distributed_helper: DistributedHelper | None = None,
        run_name: str | None = None,
    ) -> Trainer:
        """Create a trainer from a configuration.

        Args:
            distributed_helper: Optional helper to reuse existing process group
        """
        trainer = Trainer(cfg, training_env, policy, device, distributed_helper, run_name)
        trainer.register(ContextCheckpointer(checkpoint_path))
        trainer.restore()
        return trainer

    def register(self, component: TrainerComponent) -> TrainerComponent | None:
        """Register a training component.

        Args:
            component: Training component to register

        Returns:
            The component, or None when it is master-only and this rank is not the master (it is not registered).
        """
        if component.master_only and not self._distributed.is_master():
            return None
        if any(existing.state_key == component.state_key for existing in self._components):
            raise ValueError(f"a component with state_key {component.state_key!r} is already registered")
        component.register(self._context)
        self._components.append(component)
        checkpointer = self._checkpointer()
        if checkpointer is not None:  # registered after restore(): it still gets its saved state
            checkpointer.hand_state_to(component)
        return component

    def restore(self) -> Path | None:
        """Restore trainer state from checkpoints.

        This should be called after setup() to restore any saved state.
        Returns the checkpoint directory restored from, or None (no checkpointer, or no checkpoint yet).
        """
        self._sealed_by = self._sealed_by or "restore"
        checkpointer = self._checkpointer()
        return checkpointer.restore() if checkpointer is not None else None

    def _checkpointer(self) -> ContextCheckpointer | None:
        """The registered checkpointer, which restore() reads from (at most one: they share a state_key)."""
        return next((c for c in self._components if isinstance(c, ContextCheckpointer)), None)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch so a run is reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
