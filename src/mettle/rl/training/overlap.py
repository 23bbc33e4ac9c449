"""Overlapped training, learner side: rollout k+1 is collected by the actor process while the learner updates on k.

Schedule (fixed, so a seed gives one run whatever the timing): when the learner takes rollout k for update
k, it publishes its weights (those from before update k) and commands rollout k+1 into the other of two
shared-memory buffers. Rollouts 0 and 1 therefore both use the initial weights, and rollout k+1 the weights
from before update k: a policy lag of exactly one update phase. With V-trace the learner recomputes the
importance ratios (learner over behaviour policy) of each rollout before its update.

The learner sends a rollout command only once its weights for it are published, so the actor never waits
on a version counter in a loop: the command is the signal and names the version (checked on load).
A checkpoint waits for the rollout in flight and holds it (its buffer and episode infos) together with
the actor's rollout state (env, held decisions, policy memory) and RNG, so a resumed run continues with it.
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
from mettle.rl.training.actor import ActorProcess, SharedWeights, shared
from mettle.rl.training.experience import Experience
from mettle.rl.training.optimizer import set_optimizer_mode

if TYPE_CHECKING:
    from mettle.agent.policy import Policy
    from mettle.rl.training.core import CoreTrainingLoop

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


class OverlappedRollouts:
    """Double-buffered rollouts from a forked actor, on the fixed one-update lag; checkpointed exactly."""

    def __init__(self, core: CoreTrainingLoop, actor_device: torch.device) -> None:
        ctx = core.context
        self.core, self.actor_device = core, actor_device
        self.learner_experience = ctx.experience
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
        """A stopped actor's rollout state, which the learner's env has not caught up with."""
        self._state_cache: dict[str, Any] | None = None

    @functools.cached_property
    def slots(self) -> list[Experience]:
        """The two rollout buffers, made when first used (after every loss has added its fields)."""
        return [self._shared_experience(), self._shared_experience()]

    def _shared_experience(self) -> Experience:
        """A CPU rollout buffer in shared memory, with the learner's fields and shapes."""
        exp = self.learner_experience
        spec = {name: TensorSpec(tuple(buf.shape[2:]), buf.dtype) for name, buf in exp.buffers.items()}
        slot = Experience(exp.batch_size, exp.horizon, exp.num_rows, spec, "cpu")
        for tensor in (*slot.buffers.values(), slot.bootstrap, slot.log_ratio):
            shared(tensor)
        return slot

    # ------------------------------------------------------------------ epoch
    def next_rollout(self) -> list[dict[str, Any]]:
        """Rollout k for the learner (waiting if needed) after commanding rollout k+1; return k's episode infos."""
        step, rollout_steps = self.core.context.state.agent_step, self.core.context.rollout_agent_steps
        if self.ready is None:
            if self.in_flight is None:
                self._command(0, step)
            self._wait()
        assert self.ready is not None
        slot, infos = self.ready
        self.ready = None
        self._command(1 - slot, step + rollout_steps)
        self._hand_to_learner(slot)
        if self.core.context.config.advantage.method == "vtrace":
            self._learner_log_ratio()
        return infos

    def _command(self, slot: int, agent_step: int) -> None:
        """Publish the learner's weights (eval mode: what a rollout would use) and start a rollout into `slot`
        that begins at `agent_step` (what the actor's losses read, as the learner's would in a synchronous run)."""
        ctx = self.core.context
        if self.actor is None:
            self._start_actor()
        assert self.actor is not None and self.weights is not None
        set_optimizer_mode(ctx.optimizer, training=False)
        self.version += 1
        self.weights.publish(ctx.policy.state_dict(), self.version)
        self.actor.send(("rollout", self.version, slot, agent_step))
        self.in_flight, self._state_cache = slot, None

    def _wait(self) -> None:
        """Wait for the rollout in flight; the learner's stopwatch counts the wait, `actor.*` the actor's figures."""
        assert self.actor is not None and self.in_flight is not None
        stopwatch = self.core.context.stopwatch
        with stopwatch("rollout"):
            infos, timing = self.actor.receive()
        for name, seconds in timing.items():
            stopwatch.add(f"actor.{name}", seconds)
        self.ready, self.in_flight = (self.in_flight, infos), None

    def _hand_to_learner(self, slot: int) -> None:
        """Train on the slot itself when the learner is on the CPU, else on a device copy of it."""
        ctx, source = self.core.context, self.slots[slot]
        target = self.learner_experience
        if target.device == source.device:
            ctx.experience = source
            return
        for name, tensor in source.buffers.items():
            target.buffers[name].copy_(tensor, non_blocking=True)
        target.bootstrap.copy_(source.bootstrap, non_blocking=True)
        target.log_ratio.zero_()
        ctx.experience = target

    def _learner_log_ratio(self) -> None:
        """V-trace's ratios for the lagged data: log pi_learner - log mu_behaviour, from the learner's forward pass."""
        ctx, exp = self.core.context, self.core.context.experience
        set_optimizer_mode(ctx.optimizer, training=True)
        ctx.policy.train()
        with ctx.stopwatch("train"), torch.no_grad():
            every = torch.arange(exp.segments, device=exp.device)
            for idx in torch.split(every, ctx.config.minibatch_segments):
                data = {name: buf[idx] for name, buf in exp.buffers.items()}
                memory = {name: data[name][:, 0] for name in self.core.memory_fields}
                output = ctx.policy(data["observations"], data["starts"], actions=data["actions"], memory=memory)
                exp.log_ratio[idx] = output.log_prob - data["log_probs"]

    # ------------------------------------------------------------------ actor
    def _start_actor(self) -> None:
        """Fork the actor from the learner's rollout state (catching up first on a stopped actor's state)."""
        core, ctx = self.core, self.core.context
        if self.parked is not None:
            core.load_rollout_state(self.parked["rollout"])
            self.actor_rng, self.parked = self.parked["rng"], None
        if self.weights is None:
            self.weights = SharedWeights(ctx.policy.state_dict())
        assert len(self.slots) == 2  # made here, before the fork, so both processes share them
        moved = self._actor_policy() if self.actor_device.type == "cpu" else None
        seed = ctx.config.seed + ctx.distributed.seed_offset() + ACTOR_SEED_OFFSET
        rng = self.actor_rng

        def setup() -> None:
            """In the actor: its own RNG stream, its policy copy on its device, buffers in shared memory."""
            from mettle.rl.training.checkpointer import set_rng_state

            if rng is None:
                torch.manual_seed(seed)
            else:
                set_rng_state(rng)
            policy, pending = moved if moved is not None else self._actor_policy()
            core.context = copy.copy(ctx)
            core.context.policy, core.context.device = policy, self.actor_device
            core.adopt_pending(pending)
            policy.eval()

        self.actor = ActorProcess(self._serve, setup)

    def _actor_policy(self) -> tuple[Policy, dict[int, Any]]:
        """The policy and held decisions the actor uses, moved to its device (copies only when it differs)."""
        ctx, device = self.core.context, self.actor_device
        if device == ctx.device:
            return ctx.policy, self.core.pending_decisions(device)
        policy = copy.deepcopy(ctx.policy).to(device)
        policy.load_memory_state({k: v.to(device) for k, v in ctx.policy.memory_state().items()})
        return policy, self.core.pending_decisions(device)

    def _serve(self, request: tuple[Any, ...]) -> Any:
        """In the actor: run one request from the learner."""
        from mettle.rl.training.checkpointer import rng_state

        core, ctx = self.core, self.core.context
        if request[0] == "state":
            return {"rollout": core.rollout_state_dict(), "rng": rng_state()}
        _, version, slot, agent_step = request
        assert self.weights is not None
        self.weights.load_into(ctx.policy, version)
        ctx.state.agent_step = agent_step
        ctx.experience = self.slots[slot]
        before = {name: ctx.stopwatch.elapsed(name) for name in TIMERS}
        infos = core.collect()
        return infos, {name: ctx.stopwatch.elapsed(name) - before[name] for name in TIMERS}

    def stop(self) -> None:
        """End the actor between rollouts, keeping its rollout state (parked) and any finished rollout."""
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
        """The actor's rollout state and RNG once the rollout in flight is done (cached until the next command)."""
        if self.in_flight is not None:
            self._wait()
        if self._state_cache is None:
            assert self.actor is not None
            self._state_cache = self.actor.request(("state",))
        return self._state_cache

    def state_dict(self) -> dict[str, Any]:
        """The rollout state of whoever holds it (the actor, parked, or the learner), and the rollout held."""
        if self.actor is not None:
            state = self._actor_state()
        elif self.parked is not None:
            state = self.parked
        else:
            state = {"rollout": self.core.rollout_state_dict(), "rng": self.actor_rng}
        ready = None
        if self.ready is not None:
            slot, infos = self.ready
            source = self.slots[slot]
            ready = {"buffers": {k: v.clone() for k, v in source.buffers.items()},
                     "bootstrap": source.bootstrap.clone(), "infos": infos}
        return {**state["rollout"], "overlap": {"ready": ready, "actor_rng": state["rng"]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the learner takes the rollout state (the next actor inherits it) and the rollout held."""
        self.abort()
        self.parked, self.ready = None, None
        self.core.load_rollout_state(state)
        overlap = state.get("overlap") or {}
        self.actor_rng = overlap.get("actor_rng")
        ready = overlap.get("ready")
        if ready is not None:
            slot = self.slots[0]
            for name, tensor in ready["buffers"].items():
                slot.buffers[name].copy_(tensor)
            slot.bootstrap.copy_(ready["bootstrap"])
            slot.log_ratio.zero_()
            self.ready = (0, list(ready["infos"]))
