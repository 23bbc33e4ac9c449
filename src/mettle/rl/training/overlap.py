"""Overlapped training, learner side: rollout k+1 is collected by the actor process while the learner updates on k.

Schedule (fixed, so a seed gives one run whatever the timing): when the learner takes rollout k for update
k, it publishes its weights (those from before update k) and commands rollout k+1 into the other of two
shared-memory buffers. Rollouts 0 and 1 therefore both use the initial weights, and rollout k+1 the weights
from before update k: a policy lag of exactly one update phase. With V-trace the learner recomputes the
importance ratios (learner over behaviour policy) of each rollout before its update. The published state dict
holds the policy's buffers too, so an observation normaliser's statistics (which the learner updates after each
update, `normalization.py`) reach the actor with the weights they were current with, on the same lag.

The actor process owns the rollout side: a Collector (forked from this process's, so it inherits the env,
its workers and the held decisions) that fills the shared slots. The learner talks to it only through the
slots, the shared weights and commands; it copies each finished slot into its own Experience. The learner
sends a rollout command only once its weights for it are published, so the actor never waits on a version
counter in a loop: the command is the signal and names the version (checked on load). A checkpoint waits
for the rollout in flight and holds it (its buffer and episode infos) together with the actor's Collector
state (env, held decisions, policy memory, the losses' rollout state) and RNG, so a resumed run continues
with it.
"""

from __future__ import annotations

import copy
import functools
import logging
import multiprocessing as mp
import sys
from typing import TYPE_CHECKING, Any

import torch

from mettle.agent.policy import TensorSpec
from mettle.rl.loss.base import Loss
from mettle.rl.training.actor import ActorProcess, SharedWeights, shared
from mettle.rl.training.collector import OVERLAP_KEY, Collector, RolloutSource
from mettle.rl.training.curriculum import TaskPlan
from mettle.rl.training.experience import Experience
from mettle.rl.training.rng import rng_state, set_rng_state

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.rl.training.context import ComponentContext
    from mettle.rl.training.curriculum import TaskSampler

logger = logging.getLogger(__name__)

ACTOR_SEED_OFFSET = 7_919_993
"""Added to a rank's seed for the actor's own RNG stream (action sampling), apart from the learner's."""
TIMERS = ("rollout", "rollout.env", "rollout.inference")
"""The actor's stopwatch figures, reported in the learner's stopwatch under `actor.`."""


def fork_problem(actor_device: torch.device) -> str | None:
    """Why the actor cannot be forked here (None when it can): no fork, or CUDA already set up in this process."""
    if not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        return f"the actor needs the 'fork' start method, which {sys.platform} does not offer safely"
    if actor_device.type == "cuda" and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return "a forked actor cannot use CUDA once this process has (use actor_device=cpu)"
    return None


def rollout_source(context: ComponentContext, collector: Collector) -> RolloutSource:
    """The forked actor around `collector` when `overlap` is on and it can run here; else `collector` itself
    (synchronous, said once)."""
    if not context.config.overlap:
        return collector
    actor_device = torch.device(context.config.actor_device or context.device)
    problem = fork_problem(actor_device)
    if problem is not None:
        logger.warning("overlap=true: training synchronously instead, because %s", problem)
        return collector
    return OverlappedRollouts(context, collector, actor_device)


class OverlappedRollouts:
    """Double-buffered rollouts from a forked actor, on the fixed one-update lag; checkpointed exactly."""

    lagged = True

    def __init__(self, context: ComponentContext, collector: Collector, actor_device: torch.device) -> None:
        self.context = context
        """The learner's: its policy's weights are published, its Experience gives the slots their shape."""
        self.collector = collector
        """The Collector the next actor is forked with; while no actor runs it holds the rollout state."""
        self.actor_device = actor_device
        self.weights: SharedWeights | None = None
        self.actor: ActorProcess | None = None
        self.version = 0
        """Rollout commands sent so far; the weights of command v carry version v."""
        self.in_flight: int | None = None
        """The slot the actor is filling."""
        self.ready: tuple[int, list[dict[str, Any]]] | None = None
        """A finished rollout not yet trained on: its slot and episode infos."""
        self.actor_rng: dict[str, Any] | None = None
        """The RNG state the next actor starts from (None: a fresh stream from the seed)."""
        self.parked: dict[str, Any] | None = None
        """A stopped actor's Collector state, which `collector` (and the learner's env) has not caught up with."""
        self.plan: TaskPlan | None = None
        """The curriculum's plan, sent with each rollout command (None: the env plays one task)."""
        self._state_cache: dict[str, Any] | None = None

    def add_loss(self, loss: Loss) -> None:
        """The actor runs this loss's rollout hook (added before the actor starts)."""
        self.collector.add_loss(loss)

    def use_tasks(self, sampler: TaskSampler) -> None:
        """The actor's Collector draws env tasks with (its forked copy of) `sampler`."""
        self.collector.use_tasks(sampler)

    def set_task_plan(self, plan: TaskPlan) -> None:
        """Send `plan` with the next rollout commands (the actor's sampler takes it before collecting)."""
        self.plan = plan

    @functools.cached_property
    def slots(self) -> list[Experience]:
        """The two rollout buffers, made when first used (after every loss has added its fields)."""
        return [self._shared_experience(), self._shared_experience()]

    def _shared_experience(self) -> Experience:
        """A CPU rollout buffer in shared memory, with the learner's fields and shapes."""
        exp = self.context.experience
        spec = {name: TensorSpec(tuple(buf.shape[2:]), buf.dtype) for name, buf in exp.buffers.items()}
        slot = Experience(exp.batch_size, exp.horizon, exp.num_rows, spec, "cpu")
        for tensor in (*slot.buffers.values(), slot.bootstrap, slot.log_ratio):
            shared(tensor)
        return slot

    # ------------------------------------------------------------------ epoch
    def collect(self, experience: Experience, agent_step: int) -> list[dict[str, Any]]:
        """Rollout k into `experience` (waiting if needed) after commanding rollout k+1; return k's episode infos.

        The learner's policy must be in acting mode (its weights are published for rollout k+1)."""
        if self.ready is None:
            if self.in_flight is None:
                self._command(0, agent_step)
            self._wait()
        assert self.ready is not None
        slot, infos = self.ready
        self.ready = None
        self._command(1 - slot, agent_step + self.context.rollout_agent_steps)
        copy_rollout(self.slots[slot], experience)
        return infos

    def _command(self, slot: int, agent_step: int) -> None:
        """Publish the learner's weights and start a rollout into `slot` that begins at `agent_step`."""
        if self.actor is None:
            self._start_actor()
        assert self.actor is not None and self.weights is not None
        self.version += 1
        self.weights.publish(self.context.policy.state_dict(), self.version)
        plan = self.plan.to_dict() if self.plan is not None else None
        self.actor.send(("rollout", self.version, slot, agent_step, plan))
        self.in_flight, self._state_cache = slot, None

    def _wait(self) -> None:
        """Wait for the rollout in flight; the learner's stopwatch counts the wait, `actor.*` the actor's figures."""
        assert self.actor is not None and self.in_flight is not None
        stopwatch = self.context.stopwatch
        with stopwatch("rollout"):
            infos, timing = self.actor.receive()
        for name, seconds in timing.items():
            stopwatch.add(f"actor.{name}", seconds)
        self.ready, self.in_flight = (self.in_flight, infos), None

    # ------------------------------------------------------------------ actor
    def _start_actor(self) -> None:
        """Fork the actor with the Collector (catching it up first on a stopped actor's state)."""
        ctx, collector = self.context, self.collector
        problem = fork_problem(self.actor_device)
        if problem is not None:  # e.g. a loss added after the Trainer was built set up CUDA here
            raise RuntimeError(f"overlap=true: the actor process cannot start, because {problem}")
        if self.parked is not None:
            collector.load_state_dict(self.parked["rollout"])
            self.actor_rng, self.parked = self.parked["rng"], None
        if self.weights is None:
            self.weights = SharedWeights(ctx.policy.state_dict())
        assert len(self.slots) == 2  # made here, before the fork, so both processes share them
        moved = self._actor_policy() if self.actor_device.type == "cpu" else None
        seed = ctx.config.seed + ctx.distributed.seed_offset() + ACTOR_SEED_OFFSET
        rng = self.actor_rng

        def setup() -> None:
            """In the actor: its own RNG stream, and its Collector acting with a policy copy on its device."""
            if rng is None:
                torch.manual_seed(seed)
            else:
                set_rng_state(rng)
            collector.act_on(moved if moved is not None else self._actor_policy(), self.actor_device)
            collector.policy.eval()

        self.actor = ActorProcess(self._serve, setup)

    def _actor_policy(self) -> Policy:
        """The policy the actor acts with: the learner's (forked) on the same device, else a copy on its own."""
        policy, device = self.context.policy, self.actor_device
        if device == self.context.device:
            return policy
        moved = copy.deepcopy(policy).to(device)
        moved.load_memory_state({k: v.to(device) for k, v in policy.memory_state().items()})
        return moved

    def _serve(self, request: tuple[Any, ...]) -> Any:
        """In the actor: run one request from the learner with the actor's own Collector."""
        collector = self.collector
        if request[0] == "state":
            return {"rollout": collector.state_dict(), "rng": rng_state()}
        _, version, slot, agent_step, plan = request
        assert self.weights is not None
        self.weights.load_into(collector.policy, version)
        if plan is not None:
            collector.set_task_plan(TaskPlan.from_dict(plan))
        stopwatch = collector.stopwatch
        before = {name: stopwatch.elapsed(name) for name in TIMERS}
        infos = collector.collect(self.slots[slot], agent_step)
        return infos, {name: stopwatch.elapsed(name) - before[name] for name in TIMERS}

    def stop(self) -> None:
        """End the actor between rollouts, keeping its Collector state (parked) and any finished rollout."""
        if self.actor is None:
            return
        if not self.actor.failed:
            self.parked = self._actor_state()
        self.abort()

    def abort(self) -> None:
        """End the actor at once (after a failure); what it was collecting is lost."""
        actor, self.actor, self.in_flight = self.actor, None, None
        if actor is not None:
            actor.close()

    # ------------------------------------------------------------------ checkpoint
    def _actor_state(self) -> dict[str, Any]:
        """The actor's Collector state and RNG once the rollout in flight is done (cached until the next command)."""
        if self.in_flight is not None:
            self._wait()
        if self._state_cache is None:
            assert self.actor is not None
            self._state_cache = self.actor.request(("state",))
        return self._state_cache

    def state_dict(self) -> dict[str, Any]:
        """The Collector state of whoever holds it (the actor, parked, or this process), and the rollout held."""
        if self.actor is not None:
            state = self._actor_state()
        elif self.parked is not None:
            state = self.parked
        else:
            state = {"rollout": self.collector.state_dict(), "rng": self.actor_rng}
        ready = None
        if self.ready is not None:
            slot, infos = self.ready
            source = self.slots[slot]
            ready = {"buffers": {k: v.clone() for k, v in source.buffers.items()},
                     "bootstrap": source.bootstrap.clone(), "infos": infos}
        return {**state["rollout"], OVERLAP_KEY: {"ready": ready, "actor_rng": state["rng"]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the Collector takes the rollout state (the next actor inherits it), the slot the rollout held."""
        self.abort()
        self.parked, self.ready = None, None
        self.collector.load_state_dict({k: v for k, v in state.items() if k != OVERLAP_KEY})
        overlap = state.get(OVERLAP_KEY) or {}
        self.actor_rng = overlap.get("actor_rng")
        ready = overlap.get("ready")
        if ready is not None:
            slot = self.slots[0]
            for name, tensor in ready["buffers"].items():
                slot.buffers[name].copy_(tensor)
            slot.bootstrap.copy_(ready["bootstrap"])
            self.ready = (0, list(ready["infos"]))


def copy_rollout(source: Experience, target: Experience) -> None:
    """Hand a finished slot to the learner: its steps and bootstrap values, with V-trace ratios still to compute."""
    for name, tensor in source.buffers.items():
        target.buffers[name].copy_(tensor, non_blocking=True)
    target.bootstrap.copy_(source.bootstrap, non_blocking=True)
    target.log_ratio.zero_()
