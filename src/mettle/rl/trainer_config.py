"""TrainerConfig: every knob of the PPO trainer, validated before training starts."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=True)


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

    total_timesteps: int = Field(1_000_000, gt=0)
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
    """PPO loss."""
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    """Minibatch sampling."""
    torch_compile: bool = False
    """Compile the policy's hot path with torch.compile (`Policy.compile_hot_path`); the first epochs pay
    the compile (seconds to a minute). It pays off for the token policy on CPU, not for small MLPs: see
    bench/speedups.py. Needs a C++ compiler on CPU. Compiled code draws random numbers its own way, so a
    seed gives a different (equally valid) run than in eager mode."""
    keep_freed_memory: bool = True
    """Let glibc reuse freed memory instead of unmapping it (`mettle.runtime.keep_freed_memory`), so large
    temporary tensors do not page-fault on every allocation; process-wide."""

    @model_validator(mode="after")
    def _check_sizes(self) -> TrainerConfig:
        if self.minibatch_size > self.batch_size:
            raise ValueError(
                f"minibatch_size {self.minibatch_size} is larger than batch_size {self.batch_size}; "
                f"set minibatch_size <= {self.batch_size} or batch_size >= {self.minibatch_size}"
            )
        if self.batch_size % self.minibatch_size:
            fix = math.ceil(self.batch_size / self.minibatch_size) * self.minibatch_size
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of minibatch_size {self.minibatch_size}; "
                f"try batch_size={fix}"
            )
        if self.minibatch_size % self.bptt_horizon:
            fix = math.ceil(self.minibatch_size / self.bptt_horizon) * self.bptt_horizon
            raise ValueError(
                f"minibatch_size {self.minibatch_size} is not a multiple of bptt_horizon {self.bptt_horizon}; "
                f"try minibatch_size={fix}"
            )
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

    def check_rows(self, num_rows: int) -> None:
        """Fail with a computed fix unless every agent row fills whole bptt windows each epoch."""
        if self.batch_size % (num_rows * self.bptt_horizon):
            step = num_rows * self.bptt_horizon
            fix = max(step, round(self.batch_size / step) * step)
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of agent rows x bptt_horizon "
                f"({num_rows} x {self.bptt_horizon} = {step}); try batch_size={fix}"
            )
