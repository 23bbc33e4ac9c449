"""TrainerConfig: every knob of the PPO trainer, validated before training starts."""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Collection
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

logger = logging.getLogger(__name__)

SIZE_FIELDS = ("batch_size", "minibatch_size")
"""The sizes that are fitted to the environment's agent rows when the user leaves them unset."""

MAX_STEPS = 2**62
"""Bound on agent-step counts: they are kept in int64 tensors and summed over ranks."""
DEVICE_PATTERN = re.compile(r"(cpu|cuda)(:\d+)?")

DEFER_SIZE_CHECK = "defer_size_check"
"""Validation-context key: leave the size rules to `fit_sizes_to_rows`, which knows the agent rows."""


class _Config(BaseModel):
    """Read-only once built (`frozen`): a run's config says what was asked; what changes lives in TrainerState."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class OptimizerConfig(_Config):
    """Which optimizer updates the policy, and its hyperparameters."""

    type: Literal["adam", "adamw", "sgd", "muon", "adamw_schedulefree"] = "adam"
    """adam, adamw, sgd, muon (torch.optim.Muon on 2-D weights, AdamW elsewhere), adamw_schedulefree."""
    learning_rate: float = Field(3e-4, gt=0, le=1)
    """Step size."""
    beta1: float = Field(0.9, ge=0, lt=1)
    """First-moment decay (Adam family); momentum for Muon."""
    beta2: float = Field(0.999, ge=0, lt=1)
    """Second-moment decay (Adam family)."""
    eps: float = Field(1e-8, gt=0, le=1e-2)
    """Denominator epsilon (Adam family)."""
    weight_decay: float = Field(0.0, ge=0, le=1)
    """Decoupled (adamw, muon, schedule-free) or L2 (adam, sgd) weight decay."""
    momentum: float = Field(0.0, ge=0, lt=1)
    """SGD momentum."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of learning-rate warm-up (schedule-free AdamW only)."""


class AdvantageConfig(_Config):
    """How returns and advantages are estimated from a rollout."""

    method: Literal["gae", "vtrace"] = "gae"
    """gae: generalised advantage estimation; vtrace: GAE corrected by clipped importance ratios."""
    gamma: float = Field(0.99, gt=0, le=1)
    """Discount factor."""
    gae_lambda: float = Field(0.95, ge=0, le=1)
    """Bias/variance trade-off of the advantage estimate (lambda)."""
    vtrace_rho_clip: float = Field(1.0, gt=0)
    """V-trace: clip on the importance ratio weighting the TD error (rho bar)."""
    vtrace_c_clip: float = Field(1.0, gt=0)
    """V-trace: clip on the importance ratio carrying the trace (c bar)."""
    normalize: bool = True
    """Normalise advantages to zero mean, unit std over the whole batch (all ranks)."""


class PPOConfig(_Config):
    """The clipped-surrogate PPO loss and gradient handling."""

    clip_coef: float = Field(0.2, gt=0, le=1)
    """Policy ratio clip range: ratios outside [1-c, 1+c] give no gradient."""
    clip_value_loss: bool = True
    """Clip the value update around the rollout's value estimate."""
    value_clip_coef: float = Field(0.2, gt=0)
    """Clip range for the value update when `clip_value_loss`."""
    value_coef: float = Field(0.5, ge=0)
    """Weight of the value loss in the total loss."""
    entropy_coef: float = Field(0.0, ge=0)
    """Weight of the entropy bonus (subtracted from the loss)."""
    max_grad_norm: float = Field(0.5, gt=0)
    """Global gradient norm clip before each optimizer step."""
    target_kl: float | None = Field(None, gt=0)
    """Stop the update epochs early once approx-KL exceeds this (None: never)."""


class PPOLossConfig(_Config):
    """One of PPO's two terms; its coefficients live in `ppo`."""

    enabled: bool = True
    """Include this term (turn both off to train on other losses alone, e.g. pure distillation)."""


class KickstarterConfig(_Config):
    """Distil a trained teacher into the policy: KL to the teacher's actions and MSE to its values, annealed."""

    enabled: bool = False
    """Include the kickstarting terms."""
    teacher: str | None = None
    """A Mettle run directory (its newest usable checkpoint) or one checkpoint directory; its policy may have
    another architecture, but the same action space."""
    action_coef: float = Field(1.0, ge=0)
    """Weight of KL(teacher || student) over the action distribution at the start of training."""
    value_coef: float = Field(0.0, ge=0)
    """Weight of the squared error to the teacher's value at the start of training. Off by default: the error is in
    return units, and at weights of 0.1 to 1 its gradient dominated the clipped gradient norm on navigation, so the
    student learned its actions more slowly than from scratch (bench/kickstart.py)."""
    anneal_steps: int = Field(1_000_000, gt=0)
    """Agent steps over which both weights fall linearly to zero; from then on the teacher is not run."""

    @model_validator(mode="after")
    def _check_teacher(self) -> KickstarterConfig:
        """An enabled kickstarter needs a teacher."""
        if self.enabled and not self.teacher:
            raise ValueError("losses.kickstarter.teacher is not set; set it to a Mettle run directory or "
                             "checkpoint, e.g. losses.kickstarter.teacher=runs/teacher")
        return self


class LossesConfig(_Config):
    """The terms of the objective, by name; users add their own from Python with `Trainer.add_loss`."""

    ppo_actor: PPOLossConfig = Field(default_factory=PPOLossConfig)
    """PPO's clipped surrogate and entropy bonus."""
    ppo_critic: PPOLossConfig = Field(default_factory=PPOLossConfig)
    """PPO's value regression."""
    kickstarter: KickstarterConfig = Field(default_factory=KickstarterConfig)
    """Distillation from a teacher run (off by default)."""


class SamplingConfig(_Config):
    """How minibatches of whole rows are drawn from the experience buffer."""

    method: Literal["sequential", "prioritized"] = "sequential"
    """sequential: each row once per update epoch, shuffled; prioritized: rows drawn by advantage size."""
    prio_alpha: float = Field(0.0, ge=0)
    """Prioritized: sampling probability grows as |advantage| ** alpha (0 = uniform)."""
    prio_beta0: float = Field(0.6, ge=0, le=1)
    """Prioritized: importance-weight exponent at the start, annealed to 1 over training."""


class TrainerConfig(_Config):
    """All trainer hyperparameters; derived sizes are properties."""

    total_timesteps: int = Field(1_000_000, gt=0, le=MAX_STEPS)
    """Agent steps (summed over all agents and ranks) to train for."""
    batch_size: int = Field(8192, gt=0)
    """Agent steps collected per epoch on each rank."""
    minibatch_size: int = Field(2048, gt=0)
    """Agent steps per gradient step."""
    bptt_horizon: int = Field(16, gt=0)
    """Length of each stored row window; recurrent policies backpropagate through it."""
    update_epochs: int = Field(4, gt=0, le=1000)
    """Passes over the batch per epoch."""
    seed: int = Field(0, ge=0)
    """Seed for python, numpy, torch and the environments."""
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    """Optimizer."""
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig)
    """Advantage estimation."""
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """PPO loss coefficients and gradient handling."""
    losses: LossesConfig = Field(default_factory=LossesConfig)
    """Which loss terms make up the objective."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Minibatch sampling."""
    overlap: bool = False
    """Collect the next rollout in an actor process (forked, one torch thread) while the learner updates on the
    last one. The actor acts with the weights from before the update in progress: a policy lag of exactly one
    update phase, on a fixed schedule, so a seed still gives one run and resume stays exact. PPO's ratio is
    taken against the behaviour policy, and `advantage.method=vtrace` corrects the value targets for the lag.
    Needs the 'fork' start method (Linux); elsewhere training stays synchronous, with a warning."""
    actor_device: str | None = None
    """Torch device of the actor's policy copy when `overlap` (None: the learner's device), e.g. cpu beside a
    GPU learner. A forked actor cannot use CUDA once the learner has, so a CUDA learner needs actor_device=cpu."""
    torch_compile: bool = False
    """Compile the policy's hot path with torch.compile (`Policy.compile_hot_path`); the first epochs pay
    the compile (seconds to a minute). It pays off for the token policy on CPU, not for small MLPs: see
    bench/speedups.py. Needs a C++ compiler on CPU. Compiled code draws random numbers its own way, so a
    seed gives a different (equally valid) run than in eager mode."""
    gradient: Literal["auto", "analytic", "autograd"] = "auto"
    """How each gradient step is computed. `analytic`: the PPO actor and critic gradient of an MLPPolicy written
    out by hand (`mettle.rl.training.analytic`), about twice as fast as autograd at CartPole's sizes and equal
    to it up to float rounding; it needs exactly those two losses and an unfrozen MLPPolicy. `autograd`: any
    policy and losses. `auto`: analytic wherever it applies."""
    keep_freed_memory: bool = True
    """Let glibc reuse freed memory instead of unmapping it (`mettle.runtime.keep_freed_memory`), so large
    temporary tensors do not page-fault on every allocation; process-wide."""

    @field_validator("actor_device")
    @classmethod
    def _known_actor_device(cls, value: str | None) -> str | None:
        """The actor trains on a device Mettle supports (whether this machine has it is checked at build)."""
        return None if value is None else check_device_name(value, "actor_device")

    @model_validator(mode="after")
    def _check_sizes(self, info: ValidationInfo) -> TrainerConfig:
        """Size rules (with the agent rows when the context has num_rows), unless deferred until the rows are known."""
        context = info.context or {}
        if not context.get(DEFER_SIZE_CHECK):
            self.check_rows(context.get("num_rows"))
        return self

    @model_validator(mode="after")
    def _check_losses(self) -> TrainerConfig:
        """target_kl reads the PPO actor's approx-KL, so it needs that term."""
        if self.ppo.target_kl is not None and not self.losses.ppo_actor.enabled:
            raise ValueError("ppo.target_kl needs losses.ppo_actor.enabled=true (it stops on the PPO actor's "
                             "approx_kl); unset ppo.target_kl or enable the PPO actor loss")
        return self

    @property
    def segments(self) -> int:
        """Rows of the experience buffer ([segments, bptt_horizon])."""
        return self.batch_size // self.bptt_horizon

    @property
    def minibatch_segments(self) -> int:
        """Rows per minibatch."""
        return self.minibatch_size // self.bptt_horizon

    @property
    def minibatches_per_epoch(self) -> int:
        """Gradient steps per update epoch."""
        return self.batch_size // self.minibatch_size

    def check_rows(self, num_rows: int | None) -> None:
        """Fail with one fix that passes every size rule unless the sizes fit (agent rows too, when known)."""
        error = size_error(self.batch_size, self.minibatch_size, self.bptt_horizon, num_rows)
        if error:
            raise ValueError(error)


def size_problem(
    batch: int, minibatch: int, bptt: int, num_rows: int | None = None, among: Collection[str] = SIZE_FIELDS
) -> str | None:
    """The first size rule the values break, naming one field and value; only rules on fields in `among` count."""
    rules = [
        (SIZE_FIELDS, minibatch > batch, f"minibatch_size {minibatch} is larger than batch_size {batch}"),
        (SIZE_FIELDS, batch % minibatch != 0, f"batch_size {batch} is not a multiple of minibatch_size {minibatch}"),
        (("minibatch_size",), minibatch % bptt != 0,
         f"minibatch_size {minibatch} is not a multiple of bptt_horizon {bptt}"),
        (("batch_size",), bool(num_rows) and batch % (bptt * (num_rows or 1)) != 0,
         f"batch_size {batch} must be a multiple of agent rows x bptt_horizon "
         f"({num_rows} x {bptt} = {bptt * (num_rows or 1)})"),
    ]
    return next((text for fields, broken, text in rules if broken and set(fields) <= set(among)), None)


def size_error(
    batch: int, minibatch: int, bptt: int, num_rows: int | None = None, problem: str | None = None
) -> str | None:
    """One line: the broken size rule (default: the first) and a fix that passes all of them at once; None if none."""
    problem = problem or size_problem(batch, minibatch, bptt, num_rows)
    if problem is None:
        return None
    fixed = nearest_sizes(batch, minibatch, bptt, num_rows)
    assert fixed is not None  # with nothing kept there is always a fit
    return f"{problem}; try {format_sizes(fixed, batch, minibatch)}"


def format_sizes(fixed: tuple[int, int], batch: int, minibatch: int) -> str:
    """The changed sizes as key=value overrides, ready to paste after `mettle train`."""
    pairs = zip(SIZE_FIELDS, fixed, (batch, minibatch), strict=True)
    return " ".join(f"{name}={new}" for name, new, old in pairs if new != old)


def nearest_sizes(
    batch: int, minibatch: int, bptt: int, num_rows: int | None = None, keep: Collection[str] = ()
) -> tuple[int, int] | None:
    """The (batch_size, minibatch_size) closest to the given ones that passes every size rule; None if `keep` forbids.

    bptt_horizon never changes (it shapes the policy). Closeness is the summed |log ratio| of the two sizes;
    without a row count an unchanged batch_size wins, since it may be the one multiple of the rows that works.
    """
    step = bptt * (num_rows or 1)
    options = [(b, _nearest_minibatch(b, bptt, minibatch)) for b in _multiples_around(batch, step)]
    if minibatch % bptt == 0:
        options += [(b, minibatch) for b in _multiples_around(batch, math.lcm(step, minibatch))]
    options = [o for o in options if _keeps(o, batch, minibatch, keep)]
    if not options:
        return None

    def cost(option: tuple[int, int]) -> tuple[bool, float, int, tuple[int, int]]:
        moved = (option[0] != batch) + (option[1] != minibatch)
        distance = abs(math.log(option[0] / batch)) + abs(math.log(option[1] / minibatch))
        return num_rows is None and option[0] != batch, round(distance, 12), moved, option

    return min(options, key=cost)


def _keeps(option: tuple[int, int], batch: int, minibatch: int, keep: Collection[str]) -> bool:
    return ("batch_size" not in keep or option[0] == batch) and ("minibatch_size" not in keep or option[1] == minibatch)


def _multiples_around(value: int, step: int) -> list[int]:
    """The multiples of `step` just below and above `value` (never below `step`)."""
    return sorted({max(step, value // step * step), max(step, -(-value // step) * step)})


def _nearest_minibatch(batch: int, bptt: int, target: int) -> int:
    """The multiple of bptt that divides batch and is closest to target (ties: the larger, fewer steps)."""
    windows = batch // bptt
    divisors = {d for i in range(1, math.isqrt(windows) + 1) if windows % i == 0 for d in (i, windows // i)}
    return min((d * bptt for d in divisors), key=lambda m: (round(abs(math.log(m / target)), 12), -m))


def fit_sizes_to_rows(cfg: TrainerConfig, num_rows: int, explicit: Collection[str]) -> TrainerConfig:
    """cfg with the sizes not in `explicit` moved to the nearest that fit `num_rows`, so defaults suit any env.

    Logs one line when it changes a size; raises ValueError (one line, with a fix that passes every rule) when
    the explicitly set sizes cannot be kept.
    """
    batch, minibatch, bptt = cfg.batch_size, cfg.minibatch_size, cfg.bptt_horizon
    if size_problem(batch, minibatch, bptt, num_rows) is None:
        return cfg
    fixed = nearest_sizes(batch, minibatch, bptt, num_rows, keep=set(SIZE_FIELDS) & set(explicit))
    if fixed is None:
        problem = size_problem(batch, minibatch, bptt, num_rows, among=explicit)  # blame a value the user set
        raise ValueError(size_error(batch, minibatch, bptt, num_rows, problem))
    logger.info(
        "batch_size %d / minibatch_size %d do not fit %d agent rows x bptt_horizon %d; using %s (set them to choose)",
        batch, minibatch, num_rows, bptt, format_sizes(fixed, batch, minibatch),
    )
    data = cfg.model_dump() | dict(zip(SIZE_FIELDS, fixed, strict=True))
    return type(cfg).model_validate(data, context={"num_rows": num_rows})



def check_device_name(value: str, field: str) -> str:
    """`value` if it names a device Mettle trains on (cpu, cuda, cuda:N), else a ValueError naming the fix."""
    if not DEVICE_PATTERN.fullmatch(value):
        raise ValueError(f"{field} {value!r} is not a device Mettle trains on; use cpu, cuda or cuda:N")
    return value
