"""Build the policy optimizer from OptimizerConfig, plus mode, learning-rate and gradient helpers for the trainer.

Nothing here changes a policy unasked: `flatten_parameters` is the one step that re-seats a policy's tensors (on
one flat tensor, for one-call optimizer steps), and the Trainer calls it explicitly before `create_optimizer`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import schedulefree
import torch
from torch import nn

from mettle.rl.trainer_config import OptimizerConfig

__all__ = [
    "CombinedOptimizer",
    "FlatGradients",
    "FlatOptimizer",
    "FlatParameters",
    "clip_gradients",
    "create_optimizer",
    "flat_gradients",
    "flatten_parameters",
    "get_learning_rate",
    "muon_param_split",
    "set_learning_rate",
    "set_optimizer_mode",
    "zero_gradients",
]

# Muon scales each matrix's orthogonalised step to RMS 0.2*lr (Moonshot's AdamW-matched rule), so the
# configured learning_rate and any schedule are shared by every group instead of a separate Muon lr.
_MUON_LR_ADJUST = "match_rms_adamw"


class CombinedOptimizer(torch.optim.Optimizer):
    """Several optimizers behind one Optimizer, so step/zero_grad/state_dict/schedules see just one."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        if not optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self.optimizers = list(optimizers)
        super().__init__([group for opt in self.optimizers for group in opt.param_groups], defaults={})
        self._link_inner()

    def _link_inner(self) -> None:
        """Share our group dicts and state with the inner optimizers so lr changes and loads reach them."""
        start = 0
        for opt in self.optimizers:
            count = len(opt.param_groups)
            opt.param_groups = self.param_groups[start : start + count]
            opt.state = self.state
            start += count

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Evaluate the closure once, then let each inner optimizer update its own parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as a plain Optimizer would (which replaces groups and state), then re-share them."""
        super().load_state_dict(state_dict)
        self._link_inner()

    def __getstate__(self) -> dict[str, Any]:
        """Keep the inner optimizers when pickled or deep-copied; the base class would drop them."""
        return {**super().__getstate__(), "optimizers": self.optimizers}


def muon_param_split(policy: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable params as (Muon: nn.Linear weight matrices, AdamW: the rest), since Muon needs 2-D matrices.

    Input and output Linear layers stay on Muon: an arbitrary policy carries no marker of which Linear is an
    input or a head. Embeddings, convolutions, recurrent cells, norms and biases go to AdamW.
    """
    linear_weights = {id(m.weight) for m in policy.modules() if isinstance(m, nn.Linear)}
    params = [p for p in policy.parameters() if p.requires_grad]
    muon = [p for p in params if id(p) in linear_weights and p.ndim == 2]
    muon_ids = {id(p) for p in muon}
    return muon, [p for p in params if id(p) not in muon_ids]


def _fusable(params: list[nn.Parameter]) -> bool:
    """Fused Adam (one kernel for all parameters: ~3x faster steps for small policies) on CPU and CUDA floats."""
    return bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)


def _adam(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Adam with L2 weight decay folded into the gradient."""
    lr, wd = cfg.learning_rate, cfg.weight_decay
    return torch.optim.Adam(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd,
                            fused=_fusable(params))


def _adamw(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """AdamW with decoupled weight decay."""
    lr, wd = cfg.learning_rate, cfg.weight_decay
    return torch.optim.AdamW(params, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=wd,
                             fused=_fusable(params))


def _sgd(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD with (optional) heavy-ball momentum and L2 weight decay."""
    return torch.optim.SGD(params, lr=cfg.learning_rate, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def _schedulefree(cfg: OptimizerConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """Schedule-free AdamW: iterate averaging replaces the lr schedule; warm-up is built in."""
    optimizer: torch.optim.Optimizer = schedulefree.AdamWScheduleFree(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        warmup_steps=cfg.warmup_steps,
    )
    return optimizer


def _muon(cfg: OptimizerConfig, policy: nn.Module) -> CombinedOptimizer:
    """Muon (momentum = beta1) on Linear weight matrices and AdamW on the rest, as one optimizer."""
    muon_params, other_params = muon_param_split(policy)
    inner: list[torch.optim.Optimizer] = []
    if muon_params:
        inner.append(
            torch.optim.Muon(
                muon_params,
                lr=cfg.learning_rate,
                weight_decay=cfg.weight_decay,
                momentum=cfg.beta1,
                adjust_lr_fn=_MUON_LR_ADJUST,
            )
        )
    if other_params:
        inner.append(_adamw(cfg, other_params))
    if not inner:
        raise ValueError("optimizer got an empty parameter list: the policy has no trainable parameters")
    return CombinedOptimizer(inner)


_ELEMENTWISE = frozenset({"adam", "adamw", "sgd"})
"""Optimizers whose update of an element reads only that element's state: they can step one flat tensor."""

_BUILDERS: dict[str, Callable[[OptimizerConfig, list[nn.Parameter]], torch.optim.Optimizer]] = {
    "adam": _adam,
    "adamw": _adamw,
    "sgd": _sgd,
    "adamw_schedulefree": _schedulefree,
}


def create_optimizer(cfg: OptimizerConfig, policy: nn.Module, flat: FlatParameters | None = None,
                     ) -> torch.optim.Optimizer:
    """A new optimizer of the configured type and settings over `policy`'s trainable parameters; the policy is
    not changed.

    With `flat` (what `flatten_parameters(policy)` returned), adam, adamw and sgd step that one flat tensor in a
    single call: a FlatOptimizer, outwardly the per-parameter optimizer (same `param_groups`, same `state_dict`
    layout). Other types ignore it; without it every type steps each parameter on its own.
    """
    if cfg.type == "muon":
        return _muon(cfg, policy)
    if cfg.type not in _BUILDERS:
        raise ValueError(f"unknown optimizer type {cfg.type!r}; expected muon or one of {sorted(_BUILDERS)}")
    params = trainable_parameters(policy)
    build = functools.partial(_BUILDERS[cfg.type], cfg)
    if flat is None or cfg.type not in _ELEMENTWISE:
        return build(params)
    if [id(p) for p in flat.params] != [id(p) for p in params]:
        raise ValueError("create_optimizer got flat parameters of another module (or of an earlier set of its "
                         "parameters): pass what flatten_parameters(policy) returned for this policy")
    return FlatOptimizer(flat, build)


def trainable_parameters(policy: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer steps, in `policy.parameters()` order."""
    return [p for p in policy.parameters() if p.requires_grad]


def flatten_parameters(policy: nn.Module) -> FlatParameters | None:
    """Re-seat `policy`'s trainable parameters as views of one flat tensor, so an elementwise optimizer steps
    them in one call (pass the result to `create_optimizer`); None, and nothing changed, where they cannot share
    one (several devices or dtypes, sparse or non-contiguous).

    This changes the policy in place, on purpose: call it once the policy is initialised and on its device.
    Moving or re-assigning its tensors afterwards undoes the sharing, and the FlatOptimizer's step then fails
    with a message rather than training tensors the policy no longer uses.
    """
    params = trainable_parameters(policy)
    return FlatParameters(params) if FlatGradients.supports(params) else None


def set_optimizer_mode(optimizer: torch.optim.Optimizer, training: bool) -> None:
    """Schedule-free params hold the gradient point in training, the averaged weights in eval; else no-op."""
    switch = getattr(optimizer, "train" if training else "eval", None)
    if callable(switch):
        switch()


def get_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The nominal learning rate, for logging; every group shares it (Muon's is RMS-matched to AdamW)."""
    return float(optimizer.param_groups[0]["lr"])


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the same nominal learning rate on every group, as schedules do."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


class FlatGradients:
    """Every parameter's `.grad` as a view of one flat buffer, so zeroing and clipping are one op each.

    At CartPole's sizes the per-tensor loops of `zero_grad` and `clip_grad_norm_` cost more than the maths
    (bench/update_floor.py). Backward accumulates into the views in place; if anything replaces or drops a
    `.grad` (e.g. `zero_grad(set_to_none=True)`), `zero_()` notices and re-attaches the views.
    """

    def __init__(self, params: Sequence[torch.Tensor]) -> None:
        self.params = list(params)
        first = self.params[0]
        self.buffer = torch.zeros(sum(p.numel() for p in self.params), dtype=first.dtype, device=first.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()

    @staticmethod
    def supports(params: Sequence[torch.Tensor]) -> bool:
        """One buffer needs one device and one floating dtype (and dense, contiguous parameters)."""
        if not params:
            return False
        first = params[0]
        return first.is_floating_point() and all(
            p.device == first.device and p.dtype == first.dtype and p.layout == torch.strided and p.is_contiguous()
            for p in params
        )

    def zero_(self) -> None:
        """Zero every gradient, re-attaching any parameter whose `.grad` is no longer its view."""
        self.buffer.zero_()
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:
                p.grad = view

    def gather_(self) -> None:
        """Make the buffer hold every current gradient: one that is no longer its view is copied in and re-attached
        (a missing one counts as zero)."""
        for p, view in zip(self.params, self.views, strict=True):
            if p.grad is not view:
                if p.grad is None:
                    view.zero_()
                else:
                    view.copy_(p.grad)
                p.grad = view

    def clip_(self, max_norm: float) -> torch.Tensor:
        """Scale gradients to a total 2-norm of at most `max_norm`; return the norm before clipping.

        The same rule as `torch.nn.utils.clip_grad_norm_` (coefficient max_norm / (norm + 1e-6), capped at 1).
        """
        norm: torch.Tensor = torch.linalg.vector_norm(self.buffer)
        self.buffer.mul_((max_norm / (norm + 1e-6)).clamp_(max=1.0))
        return norm


def flat_gradients(optimizer: torch.optim.Optimizer) -> FlatGradients | None:
    """The gradient buffer of an optimizer that steps one flat tensor (a FlatOptimizer); None: per-parameter ones."""
    return optimizer.gradients if isinstance(optimizer, FlatOptimizer) else None


def zero_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Zero the gradients before a backward: one op on the flat buffer where there is one."""
    flat = flat_gradients(optimizer)
    if flat is None:
        optimizer.zero_grad(set_to_none=True)
    else:
        flat.zero_()


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Clip the optimizer's gradients to a total norm of `max_norm`; return the norm before clipping."""
    flat = flat_gradients(optimizer)
    if flat is None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm: torch.Tensor = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        return norm
    return flat.clip_(max_norm)


class FlatParameters:
    """Parameters that live as views of one flat Parameter, their gradients as views of one buffer (FlatGradients).

    Built by `flatten_parameters`, which is what re-seats the parameters' tensors; a FlatOptimizer steps `flat`.
    """

    def __init__(self, params: Sequence[nn.Parameter]) -> None:
        self.params = list(params)
        self.flat = nn.Parameter(torch.cat([p.detach().reshape(-1) for p in self.params]))
        for p, view in zip(self.params, self.views(self.flat.data), strict=True):
            p.data = view
        self.gradients = FlatGradients(self.params)

    def views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's part of a flat tensor, shaped like the parameter."""
        sizes = [p.numel() for p in self.params]
        return [part.view_as(p) for p, part in zip(self.params, torch.split(flat, sizes), strict=True)]

    def check_seated(self) -> None:
        """Fail clearly if something replaced a parameter's tensor (e.g. `policy.to(...)` after flattening)."""
        storage = self.flat.untyped_storage().data_ptr()
        for index, p in enumerate(self.params):
            if p.untyped_storage().data_ptr() != storage:
                raise RuntimeError(f"parameter {index} {tuple(p.shape)} no longer lives in the optimizer's flat "
                                   "buffer: flatten and build the optimizer after moving or re-assigning the "
                                   "policy's tensors")


class FlatOptimizer(torch.optim.Optimizer):
    """An elementwise optimizer (Adam, AdamW, SGD) stepping every parameter as one flat tensor.

    The parameters are views of one flat Parameter and their gradients views of one buffer (`FlatParameters`,
    made by `flatten_parameters`); the inner optimizer steps the flat Parameter: one call where a per-layer
    optimizer loops in Python over every tensor (Adam's step is about twice as fast at CartPole's 12 tensors,
    bench/update_floor.py). Outwardly it is the per-parameter optimizer it equals: `param_groups` list each
    parameter and `state_dict`/`load_state_dict` use the per-parameter layout, so checkpoints do not change.
    """

    def __init__(self, flat: FlatParameters, build: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
        self.seating = flat
        self.params, self.gradients, self.flat = flat.params, flat.gradients, flat.flat
        self.inner = build([self.flat])
        settings = {key: value for key, value in self.inner.param_groups[0].items() if key != "params"}
        super().__init__(self.params, settings)

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Each parameter's part of a flat tensor, shaped like the parameter."""
        return self.seating.views(flat)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the flat gradient buffer (the parameters' gradients stay its views)."""
        self.gradients.zero_()

    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Step the flat parameter with the inner optimizer, under this optimizer's current settings (lr...)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.seating.check_seated()
        self.gradients.gather_()
        self.flat.grad = self.gradients.buffer
        group = self.param_groups[0]
        self.inner.param_groups[0].update({key: value for key, value in group.items() if key != "params"})
        self.inner.step()
        if not self.state.get(self.params[0]):  # the inner optimizer made its state on this first step
            self._share_state()
        return loss

    def _share_state(self) -> None:
        """Expose the inner optimizer's flat state per parameter, as views (scalars such as `step` are shared)."""
        self.state.clear()
        flat_state = self.inner.state.get(self.flat, {})
        parts = {key: self._views(value) for key, value in flat_state.items() if _per_element(key, value, self.flat)}
        for index, p in enumerate(self.params):
            if flat_state:
                self.state[p] = {key: parts[key][index] if key in parts else value for key, value in flat_state.items()}

    def state_dict(self) -> dict[str, Any]:
        """The per-parameter state dict a plain optimizer writes: each parameter gets its own copy of scalars."""
        saved = super().state_dict()
        saved["state"] = {index: {key: value.clone() if isinstance(value, torch.Tensor) and key == "step" else value
                                  for key, value in state.items()} for index, state in saved["state"].items()}
        return saved

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a per-parameter state dict (ours or the plain optimizer's), then rebuild the flat state from it."""
        super().load_state_dict(state_dict)
        per_param = [self.state.get(p, {}) for p in self.params]
        self.inner.state.clear()
        if any(per_param):
            if not all(state.keys() == per_param[0].keys() for state in per_param):
                raise ValueError("the optimizer state holds entries for only some parameters, and one flat tensor "
                                 "keeps one state for all: resume from a checkpoint of this trainer, or start the "
                                 "optimizer fresh")
            self.inner.state[self.flat] = {
                key: torch.cat([state[key].reshape(-1) for state in per_param])
                if _per_element(key, value, self.params[0]) else value
                for key, value in per_param[0].items()
            }
        self._share_state()
        group = self.param_groups[0]
        self.inner.param_groups[0].update({key: value for key, value in group.items() if key != "params"})

    def __getstate__(self) -> dict[str, Any]:
        """Keep the inner optimizer and flat buffers when pickled or deep-copied; the base class would drop them."""
        kept = ("seating", "params", "gradients", "flat", "inner")
        return {**super().__getstate__(), **{k: self.__dict__[k] for k in kept}}


def _per_element(key: str, value: Any, param: torch.Tensor) -> bool:
    """Whether an optimizer state entry holds one value per element of `param`; `step` is the one scalar of
    Adam, AdamW and SGD (by name, as a 0-dim parameter's moments are 0-dim too)."""
    return key != "step" and isinstance(value, torch.Tensor) and value.shape == param.shape
