"""create_optimizer builds the configured optimizer, and each one actually trains and checkpoints; only the
explicit flatten_parameters step changes a model."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import schedulefree
import torch
from torch import nn

from mettle.rl.trainer_config import OptimizerConfig
from mettle.rl.training.optimizer import (
    CombinedOptimizer,
    FlatOptimizer,
    clip_gradients,
    create_optimizer,
    flat_gradients,
    flatten_parameters,
    get_learning_rate,
    muon_param_split,
    set_learning_rate,
    set_optimizer_mode,
    zero_gradients,
)

ALL_TYPES = ["adam", "adamw", "sgd", "muon", "adamw_schedulefree"]


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))


def _data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 4, generator=gen)
    y = (x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]])) + 0.3 * torch.sin(x[:, :1])
    return x, y


def _loss(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = data
    return nn.functional.mse_loss(model(x), y)


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, data: Any = None) -> None:
    data = data or _data()
    set_optimizer_mode(opt, training=True)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        _loss(model, data).backward()
        opt.step()


def _build(cfg: OptimizerConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer as the Trainer builds it: parameters flattened first (explicitly), then create_optimizer."""
    return create_optimizer(cfg, model, flatten_parameters(model))


def _cfg(kind: str, **kw: Any) -> OptimizerConfig:
    return OptimizerConfig(type=kind, **kw)


def _roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


HYPER = {
    "learning_rate": 0.02,
    "beta1": 0.8,
    "beta2": 0.95,
    "eps": 1e-6,
    "weight_decay": 0.01,
    "momentum": 0.7,
}


@pytest.mark.parametrize(
    ("kind", "cls", "expect"),
    [
        ("adam", torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01}),
        ("adamw", torch.optim.AdamW, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01}),
        ("sgd", torch.optim.SGD, {"lr": 0.02, "momentum": 0.7, "weight_decay": 0.01}),
        (
            "adamw_schedulefree",
            schedulefree.AdamWScheduleFree,
            {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.01, "warmup_steps": 5},
        ),
    ],
)
def test_builds_configured_class(kind: str, cls: type, expect: dict[str, Any]) -> None:
    model = _mlp()
    opt = _build(_cfg(kind, warmup_steps=5, **HYPER), model)
    assert type(opt.inner if isinstance(opt, FlatOptimizer) else opt) is cls
    assert isinstance(opt, FlatOptimizer) == (kind in ("adam", "adamw", "sgd"))
    (group,) = opt.param_groups
    assert {k: group[k] for k in expect} == expect
    assert [id(p) for p in group["params"]] == [id(p) for p in model.parameters()]


def test_muon_builds_combined_with_configured_groups() -> None:
    opt = _build(_cfg("muon", **HYPER), _mlp())
    assert isinstance(opt, CombinedOptimizer)
    assert [type(o) for o in opt.optimizers] == [torch.optim.Muon, torch.optim.AdamW]
    muon_group, adamw_group = opt.param_groups
    assert muon_group["lr"] == adamw_group["lr"] == 0.02
    assert muon_group["momentum"] == 0.8
    assert muon_group["weight_decay"] == adamw_group["weight_decay"] == 0.01
    assert muon_group["adjust_lr_fn"] == "match_rms_adamw"
    assert adamw_group["betas"] == (0.8, 0.95)
    assert adamw_group["eps"] == 1e-6


def test_frozen_parameters_are_left_out() -> None:
    model = _mlp()
    model[0].weight.requires_grad_(False)
    for kind in ALL_TYPES:
        opt = _build(_cfg(kind), model)
        ids = [id(p) for g in opt.param_groups for p in g["params"]]
        assert id(model[0].weight) not in ids
        assert len(ids) == 3


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_each_optimizer_reduces_regression_loss(kind: str) -> None:
    model = _mlp()
    opt = _build(_cfg(kind, learning_rate=0.03, momentum=0.9), model)
    data = _data()
    with torch.no_grad():
        before = _loss(model, data).item()
    _train(model, opt, 50, data)
    set_optimizer_mode(opt, training=False)
    with torch.no_grad():
        after = _loss(model, data).item()
    assert after < 0.5 * before, (kind, before, after)


class _Mixed(nn.Module):
    """Linear layers plus an embedding, a norm and a frozen matrix, to exercise the Muon split."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.hidden = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3, bias=False)
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.hidden(self.embed(idx)))))


def test_muon_split_puts_each_trainable_param_in_exactly_one_group() -> None:
    model = _Mixed()
    muon, other = muon_param_split(model)
    assert [id(p) for p in muon] == [id(model.hidden.weight), id(model.head.weight)]
    expected_other = [model.embed.weight, model.hidden.bias, model.norm.weight, model.norm.bias]
    assert [id(p) for p in other] == [id(p) for p in expected_other]
    opt = _build(_cfg("muon"), model)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    assert len(ids) == len(set(ids))
    assert [id(p) for p in opt.param_groups[0]["params"]] == [id(p) for p in muon]


def test_muon_without_linear_layers_is_adamw_only() -> None:
    model = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3))
    opt = _build(_cfg("muon"), model)
    assert [type(o) for o in opt.optimizers] == [torch.optim.AdamW]


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def _assert_checkpoint_resumes(kind: str) -> None:
    """Save model+optimizer, load into fresh copies, and check one more step is bitwise identical."""
    cfg = _cfg(kind, learning_rate=0.01, weight_decay=0.01)
    model = _mlp()
    opt = _build(cfg, model)
    _train(model, opt, 5)
    set_optimizer_mode(opt, training=False)
    saved = _roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict()})

    fresh = _mlp(seed=123)
    fresh.load_state_dict(saved["model"])
    fresh_opt = _build(cfg, fresh)
    fresh_opt.load_state_dict(saved["optimizer"])
    _assert_same_params(model, fresh)

    data = _data(seed=7)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 1, data)
    _train(fresh, fresh_opt, 1, data)
    set_optimizer_mode(opt, training=False)
    set_optimizer_mode(fresh_opt, training=False)
    _assert_same_params(model, fresh)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_muon_state_dict_roundtrip_gives_identical_updates() -> None:
    _assert_checkpoint_resumes("muon")


def test_muon_state_dict_holds_state_of_both_inner_optimizers() -> None:
    model = _mlp()
    opt = _build(_cfg("muon"), model)
    _train(model, opt, 2)
    state = opt.state_dict()["state"]
    assert set(state) == {0, 1, 2, 3}
    assert {"momentum_buffer"} == set(state[0]) == set(state[1])
    assert {"step", "exp_avg", "exp_avg_sq"} == set(state[2]) == set(state[3])


def test_muon_load_state_dict_relinks_inner_optimizers() -> None:
    model = _mlp()
    opt = _build(_cfg("muon"), model)
    _train(model, opt, 2)
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    set_learning_rate(opt, 0.123)
    assert [g["lr"] for o in opt.optimizers for g in o.param_groups] == [0.123, 0.123]
    assert all(o.state is opt.state for o in opt.optimizers)


def test_muon_deepcopy_keeps_inner_optimizers_linked() -> None:
    model = _mlp()
    opt = _build(_cfg("muon"), model)
    _train(model, opt, 2)
    clone = copy.deepcopy(opt)
    assert all(o.state is clone.state for o in clone.optimizers)
    assert clone.optimizers[0].param_groups[0] is clone.param_groups[0]


def test_lambda_lr_schedules_every_muon_group() -> None:
    model = _mlp()
    opt = _build(_cfg("muon", learning_rate=0.01), model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: 1.0 - 0.25 * epoch)
    for _ in range(2):
        _train(model, opt, 1)
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.005, 0.005])
    assert [o.param_groups[0]["lr"] for o in opt.optimizers] == pytest.approx([0.005, 0.005])
    assert get_learning_rate(opt) == pytest.approx(0.005)


def test_combined_step_evaluates_closure_once() -> None:
    model = _mlp()
    opt = _build(_cfg("muon"), model)
    calls = []

    def closure() -> float:
        calls.append(1)
        opt.zero_grad()
        loss = _loss(model, _data())
        loss.backward()
        return loss.item()

    assert isinstance(opt.step(closure), float)
    assert len(calls) == 1


def test_schedulefree_mode_switches_between_distinct_weights() -> None:
    model = _mlp()
    opt = _build(_cfg("adamw_schedulefree", learning_rate=0.01), model)
    _train(model, opt, 10)
    train_weights = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(opt, training=False)
    assert opt.param_groups[0]["train_mode"] is False
    eval_weights = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(train_weights, eval_weights, strict=True))
    set_optimizer_mode(opt, training=True)
    assert opt.param_groups[0]["train_mode"] is True
    for a, p in zip(train_weights, model.parameters(), strict=True):
        torch.testing.assert_close(a, p)


def test_schedulefree_step_requires_train_mode() -> None:
    model = _mlp()
    opt = _build(_cfg("adamw_schedulefree"), model)
    set_optimizer_mode(opt, training=False)
    _loss(model, _data()).backward()
    with pytest.raises(Exception, match="train mode"):
        opt.step()


def test_schedulefree_state_dict_roundtrip_gives_identical_updates() -> None:
    _assert_checkpoint_resumes("adamw_schedulefree")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_plain_state_dict_roundtrip_gives_identical_updates(kind: str) -> None:
    _assert_checkpoint_resumes(kind)


def test_set_optimizer_mode_is_noop_without_modes() -> None:
    model = _mlp()
    opt = _build(_cfg("adam"), model)
    _train(model, opt, 3)
    before = [p.detach().clone() for p in model.parameters()]
    set_optimizer_mode(opt, training=False)
    set_optimizer_mode(opt, training=True)
    for a, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, p)


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_set_and_get_learning_rate(kind: str) -> None:
    opt = _build(_cfg(kind, learning_rate=0.01), _mlp())
    assert get_learning_rate(opt) == pytest.approx(0.01)
    set_learning_rate(opt, 0.002)
    assert get_learning_rate(opt) == pytest.approx(0.002)
    assert all(g["lr"] == pytest.approx(0.002) for g in opt.param_groups)


def test_set_learning_rate_changes_step_size() -> None:
    data = _data()
    deltas = []
    for lr in (0.01, 0.001):
        model = _mlp()
        opt = _build(_cfg("sgd", learning_rate=0.5), model)
        set_learning_rate(opt, lr)
        start = model[2].bias.detach().clone()
        _train(model, opt, 1, data)
        deltas.append((model[2].bias - start).abs().item())
    assert deltas[0] == pytest.approx(10 * deltas[1], rel=1e-4)


@pytest.mark.parametrize("kind", ["adam", "adamw"])
def test_adam_on_cpu_uses_the_fused_kernel(kind: str) -> None:
    optimizer = _build(OptimizerConfig(type=kind), nn.Linear(4, 2))
    assert optimizer.param_groups[0]["fused"] is True


@pytest.mark.parametrize("max_norm", [1e-3, 1e3])
def test_flat_gradients_clip_and_zero_like_torch(max_norm: float) -> None:
    """One flat buffer gives clip_grad_norm_'s norm and scaled gradients, and re-attaches a dropped .grad."""
    model, data = _mlp(), _data()
    reference = copy.deepcopy(model)
    optimizer = _build(_cfg("adam"), model)
    for _ in range(2):  # the second pass runs on the re-attached views
        zero_gradients(optimizer)
        reference.zero_grad(set_to_none=True)
        for net in (model, reference):
            net(data[0]).pow(2).mean().backward()
        norm = clip_gradients(optimizer, max_norm)
        want = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)
        torch.testing.assert_close(norm, want)
        for p, q in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
        optimizer.zero_grad(set_to_none=True)  # as any caller may


PLAIN = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


def _plain(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    """The torch optimizer create_optimizer would build for `kind` with HYPER, stepping each tensor on its own."""
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.7, weight_decay=0.01)
    return PLAIN[kind](model.parameters(), lr=0.02, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.01, fused=True)


@pytest.mark.parametrize("kind", ["adam", "adamw", "sgd"])
def test_flat_optimizer_steps_and_saves_like_the_per_tensor_one(kind: str) -> None:
    flat_model, plain_model = _mlp(), _mlp()
    flat, plain = _build(_cfg(kind, **HYPER), flat_model), _plain(kind, plain_model)
    assert isinstance(flat, FlatOptimizer)
    data = _data()
    for step in range(12):
        for model, opt in ((flat_model, flat), (plain_model, plain)):
            # a caller that drops the gradients (module.zero_grad) must not make the flat step miss them
            (model.zero_grad(set_to_none=True) if step % 2 else opt.zero_grad(set_to_none=True))
            _loss(model, data).backward()
            opt.step()
    _assert_close_params(flat_model, plain_model)
    mine, theirs = _roundtrip(flat.state_dict()), _roundtrip(plain.state_dict())
    assert mine["param_groups"] == theirs["param_groups"]
    assert mine["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert mine["state"][index].keys() == state.keys()
        for key, value in state.items():
            torch.testing.assert_close(mine["state"][index][key], value, msg=f"{key} of parameter {index}")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_flat_optimizer_resumes_from_a_per_tensor_optimizers_checkpoint(kind: str) -> None:
    plain_model = _mlp()
    plain = _plain(kind, plain_model)
    _train(plain_model, plain, 5)
    saved = _roundtrip({"model": plain_model.state_dict(), "optimizer": plain.state_dict()})
    flat_model = _mlp(seed=9)
    flat_model.load_state_dict(saved["model"])
    flat = _build(_cfg(kind, **HYPER), flat_model)
    flat.load_state_dict(saved["optimizer"])
    data = _data(seed=3)
    _train(plain_model, plain, 4, data)
    _train(flat_model, flat, 4, data)
    _assert_close_params(flat_model, plain_model)


def test_flat_optimizer_refuses_a_policy_whose_tensors_were_replaced() -> None:
    model = _mlp()
    opt = _build(_cfg("adam"), model)
    model.to(torch.float64).to(torch.float32)  # new tensors: the optimizer would step a buffer nobody reads
    _loss(model, _data()).backward()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer: flatten and build "
                                           "the optimizer after moving"):
        opt.step()


def _assert_close_params(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-6, atol=1e-7, msg=name)


def test_flat_optimizer_loaded_before_its_first_step_still_saves_its_state() -> None:
    """A resume from a checkpoint written before any update: the first step must still fill the saved state."""
    model = _mlp()
    opt = _build(_cfg("adam"), model)
    opt.load_state_dict(_roundtrip(_build(_cfg("adam"), _mlp()).state_dict()))
    _train(model, opt, 2)
    state = opt.state_dict()["state"]
    assert sorted(state) == list(range(4)) and all(set(s) == {"step", "exp_avg", "exp_avg_sq"} for s in state.values())
    assert all(float(s["step"]) == 2.0 for s in state.values())


def test_a_plain_optimizer_resumes_from_a_flat_checkpoint() -> None:
    """Each parameter gets its own step in the saved state, so a per-tensor Adam counts steps once each."""
    flat_model = _mlp()
    flat = _build(_cfg("adam", **HYPER), flat_model)
    _train(flat_model, flat, 2)
    saved = _roundtrip({"model": flat_model.state_dict(), "optimizer": flat.state_dict()})
    plain_model = _mlp(seed=5)
    plain_model.load_state_dict(saved["model"])
    plain = _plain("adam", plain_model)
    plain.load_state_dict(saved["optimizer"])
    _train(plain_model, plain, 1)
    _train(flat_model, flat, 1)
    assert all(float(s["step"]) == 3.0 for s in plain.state_dict()["state"].values())
    _assert_close_params(flat_model, plain_model)


def test_flat_optimizer_handles_a_zero_dim_parameter() -> None:
    """A scalar parameter's moments are 0-dim like `step`: they are told apart by name."""
    model = nn.Module()
    model.scale = nn.Parameter(torch.tensor(0.5))
    model.weight = nn.Parameter(torch.ones(3))
    opt = _build(_cfg("adam"), model)
    for _ in range(2):
        opt.zero_grad()
        (model.scale * model.weight).sum().backward()
        opt.step()
    fresh = nn.Module()
    fresh.scale, fresh.weight = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.ones(3))
    fresh_opt = _build(_cfg("adam"), fresh)
    fresh_opt.load_state_dict(_roundtrip(opt.state_dict()))
    fresh_opt.zero_grad()
    (fresh.scale * fresh.weight).sum().backward()
    fresh_opt.step()
    assert float(fresh_opt.state_dict()["state"][0]["step"]) == 3.0


def test_flat_optimizer_refuses_state_for_only_some_parameters() -> None:
    model = _mlp()
    plain_model = _mlp()
    plain = _plain("adam", plain_model)
    plain_model[0].weight.grad = torch.ones_like(plain_model[0].weight)  # only one parameter has a gradient
    plain.step()
    saved = _roundtrip(plain.state_dict())
    with pytest.raises(ValueError, match="entries for only some parameters"):
        _build(_cfg("adam"), model).load_state_dict(saved)


@pytest.mark.parametrize("kind", ALL_TYPES)
def test_create_optimizer_leaves_the_model_as_it_was(kind: str) -> None:
    """Without the explicit flatten step every type steps the parameters it was given, where they are."""
    model = _mlp()
    where = [p.data_ptr() for p in model.parameters()]
    opt = create_optimizer(_cfg(kind), model)
    assert not isinstance(opt, FlatOptimizer) and flat_gradients(opt) is None
    assert [p.data_ptr() for p in model.parameters()] == where
    _train(model, opt, 2)
    assert [p.data_ptr() for p in model.parameters()] == where


def test_flatten_parameters_seats_every_trainable_parameter_on_one_tensor() -> None:
    model = _mlp()
    model[0].bias.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    flat = flatten_parameters(model)
    assert flat is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert flat.params == trainable and flat.flat.numel() == sum(p.numel() for p in trainable)
    assert {p.untyped_storage().data_ptr() for p in trainable} == {flat.flat.untyped_storage().data_ptr()}
    assert model[0].bias.untyped_storage().data_ptr() != flat.flat.untyped_storage().data_ptr()
    for a, p in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, p)


def test_flatten_parameters_changes_nothing_where_they_cannot_share_a_tensor() -> None:
    model = _mlp()
    model[2].double()  # two dtypes: no one flat tensor holds both
    where = [p.data_ptr() for p in model.parameters()]
    assert flatten_parameters(model) is None
    assert [p.data_ptr() for p in model.parameters()] == where


def test_create_optimizer_refuses_the_flat_parameters_of_another_model() -> None:
    with pytest.raises(ValueError, match="flat parameters of another module"):
        create_optimizer(_cfg("adam"), _mlp(), flatten_parameters(_mlp()))

