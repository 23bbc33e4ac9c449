"""Checkpoints: exact resume, damaged or hostile files, and write failures that lose nothing."""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as save_file_bytes

from mettle.agent.registry import build_policy
from mettle.envs.testing import BanditEnvironment
from mettle.files import atomic_write
from mettle.rl.policy_files import CheckpointError, list_checkpoints, write_manifest
from mettle.rl.trainer import Trainer
from mettle.rl.trainer_config import TrainerConfig
from mettle.rl.training import ContextCheckpointer
from mettle.rl.training import checkpointer as ckpt
from mettle.rl.training.components.signals import StopAtEpoch

BATCH = 64


def config() -> TrainerConfig:
    return TrainerConfig(total_timesteps=6 * BATCH, batch_size=BATCH, minibatch_size=32, bptt_horizon=8,
                         update_epochs=2, seed=3)


def make_trainer(path: Path, kind: str, interval: int = 1, keep_last: int = 3) -> Trainer:
    trainer = Trainer(config(), BanditEnvironment(num_envs=4, seed=5), build_policy(kind, hidden_size=16), "cpu")
    trainer.register(ContextCheckpointer(path, epoch_interval=interval, keep_last=keep_last))
    trainer.restore()
    return trainer


def assert_same_training_state(a: Trainer, b: Trainer) -> None:
    for (name, x), (_, y) in zip(a.context.policy.state_dict().items(), b.context.policy.state_dict().items(),
                                 strict=True):
        assert torch.equal(x, y), name
    opt_a, opt_b = a.context.optimizer.state_dict(), b.context.optimizer.state_dict()
    assert opt_a["param_groups"] == opt_b["param_groups"]
    for key, slot in opt_a["state"].items():
        for field, value in slot.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(opt_b["state"][key][field])), field
    assert a.context.state.agent_step == b.context.state.agent_step
    assert a.context.state.epoch == b.context.state.epoch


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_stop_and_resume_is_bitwise_identical_to_one_run(tmp_path: Path, kind: str) -> None:
    torch.set_num_threads(1)
    straight = make_trainer(tmp_path / "straight", kind, interval=2)
    straight.train()

    first = make_trainer(tmp_path / "split", kind, interval=2)
    first.register(StopAtEpoch(3))
    first.train()
    assert first.context.state.epoch == 3
    second = Trainer.load_or_create(str(tmp_path / "split"), config(), BanditEnvironment(num_envs=4, seed=5),
                                    build_policy(kind, hidden_size=16), "cpu")
    assert second.context.state.epoch == 3
    second.train()
    assert straight.context.state.epoch == 6
    assert_same_training_state(straight, second)


def test_pruning_keeps_the_newest(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, "mlp", interval=1, keep_last=2)
    trainer.train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["00000005", "00000006"]
    assert not list(tmp_path.glob(".staging-*"))
    newest = list_checkpoints(tmp_path)[-1]
    assert json.loads((newest / "policy.json").read_text())["agent_step"] == 6 * BATCH


def test_damaged_newest_checkpoint_is_named_and_the_previous_used(tmp_path: Path, caplog: Any) -> None:
    make_trainer(tmp_path, "mlp").train()
    newest = list_checkpoints(tmp_path)[-1]
    data = (newest / "trainer_state.pt").read_bytes()
    (newest / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        resumed = make_trainer(tmp_path, "mlp")
    assert resumed.context.state.epoch == 5
    assert str(newest) in caplog.text and "truncated or altered" in caplog.text


def test_a_checkpoint_another_rank_cannot_read_is_skipped_on_every_rank(tmp_path: Path, monkeypatch: Any,
                                                                        caplog: Any) -> None:
    make_trainer(tmp_path, "mlp").train()
    newest = list_checkpoints(tmp_path)[-1]
    trainer = Trainer(config(), BanditEnvironment(num_envs=4, seed=5), build_policy("mlp", hidden_size=16), "cpu")
    trainer.register(ContextCheckpointer(tmp_path))
    votes: list[bool] = []

    def another_rank_fails_first(flag: bool) -> bool:  # this rank reads fine; "rank 1" fails on the newest
        votes.append(flag)
        return flag or len(votes) == 1

    monkeypatch.setattr(trainer.context.distributed, "any_rank", another_rank_fails_first)
    previous = list_checkpoints(tmp_path)[-2]
    with caplog.at_level(logging.WARNING):
        assert trainer.restore() == previous
    assert votes == [False, False] and trainer.context.state.epoch == 5
    assert f"{newest} is unreadable on another rank" in caplog.text
    assert (tmp_path / "damaged" / f"{newest.name}-other-rank").is_dir(), "every rank skipped it: set aside"


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    make_trainer(tmp_path, "mlp", keep_last=1).train()
    (list_checkpoints(tmp_path)[-1] / "policy.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        make_trainer(tmp_path, "mlp")
    assert len(list_checkpoints(tmp_path)) == 1, "with none usable nothing is moved: the error repeats, no fresh start"


class Payload:
    """Unpickling this would create a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_checkpoint_with_code_is_refused_and_the_code_never_runs(tmp_path: Path) -> None:
    make_trainer(tmp_path, "mlp", keep_last=1).train()
    newest = list_checkpoints(tmp_path)[-1]
    marker = tmp_path / "pwned"
    state = torch.load(newest / "trainer_state.pt", weights_only=True)
    state["components"]["evil"] = Payload(marker)
    torch.save(state, newest / "trainer_state.pt")
    write_manifest(newest)  # a consistent manifest: only the loader's refusal stands in the way
    with pytest.raises(CheckpointError, match="refused"):
        make_trainer(tmp_path, "mlp")
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        ckpt.load_trainer_state(newest / "trainer_state.pt")
    assert not marker.exists()
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Payload(control)))  # the payload is real: a plain unpickler runs it
    assert control.exists()


def test_write_failure_mid_checkpoint_keeps_the_previous_one(tmp_path: Path, monkeypatch: Any) -> None:
    trainer = make_trainer(tmp_path, "mlp")
    real_save = torch.save
    calls = {"n": 0}

    def failing_save(obj: Any, f: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            f.write(b"partial bytes")
            raise OSError(28, "No space left on device")
        real_save(obj, f)

    monkeypatch.setattr(ckpt.torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left on device"):
        trainer.train()
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["00000001", "00000002"]
    assert not list(tmp_path.glob(".staging-*")), "the partial checkpoint is removed at once"
    resumed = make_trainer(tmp_path, "mlp")
    assert resumed.context.state.epoch == 2 and resumed.context.state.agent_step == 2 * BATCH


# --------------------------------------------------------------------------- damage, fallback and healing
@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six checkpoints of one short run, copied by each test that damages one."""
    path = tmp_path_factory.mktemp("trained")
    make_trainer(path, "mlp", keep_last=6).train()
    return path


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def other_shape_weights(newest: Path) -> None:
    policy = build_policy("mlp", hidden_size=8)
    policy.initialize_to_environment(BanditEnvironment(num_envs=4, seed=5).policy_env_info, "cpu")
    atomic_write(newest / "policy.safetensors",
                      lambda f: f.write(save_file_bytes({k: v.contiguous() for k, v in policy.state_dict().items()})))
    write_manifest(newest)


def hostile_pickle(newest: Path) -> None:
    torch.save({"evil": Payload(newest.parent.parent / "pwned")}, newest / "trainer_state.pt")
    write_manifest(newest)


def hello_state(newest: Path) -> None:
    torch.save({"hello": 1}, newest / "trainer_state.pt")
    write_manifest(newest)


def misshaped_optimizer(newest: Path) -> None:
    state = torch.load(newest / "trainer_state.pt", weights_only=True)
    slot = next(iter(state["optimizer"]["state"].values()))
    slot["exp_avg"] = torch.zeros(3, 3)
    torch.save(state, newest / "trainer_state.pt")
    write_manifest(newest)


def header_flipped_behind_manifest(newest: Path) -> None:
    flip(newest / "policy.safetensors", 10)
    write_manifest(newest)


DAMAGE = {
    "truncated-state": (lambda d: (d / "trainer_state.pt").write_bytes((d / "trainer_state.pt").read_bytes()[:99]),
                        "altered"),
    "flipped-weight-data": (lambda d: flip(d / "policy.safetensors", -5), "altered"),
    "flipped-weight-header": (lambda d: flip(d / "policy.safetensors", 10), "altered"),
    "missing-manifest": (lambda d: (d / "manifest.json").unlink(), "no-manifest"),
    "empty-manifest": (lambda d: (d / "manifest.json").write_text("{}"), "no-manifest"),
    "missing-weights": (lambda d: (d / "policy.safetensors").unlink(), "missing-file"),
    "code-in-state": (hostile_pickle, "refused-code"),
    "hello-state": (hello_state, "does-not-fit"),
    "other-shape-weights": (other_shape_weights, "does-not-fit"),
    "misshaped-optimizer": (misshaped_optimizer, "does-not-fit"),
    "bad-header-matching-manifest": (header_flipped_behind_manifest, "bad-weights"),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damage_falls_back_sets_the_checkpoint_aside_and_heals(trained: Path, tmp_path: Path, case: str,
                                                              caplog: Any) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    newest = list_checkpoints(run)[-1]
    damage, reason = DAMAGE[case]
    damage(newest)
    with caplog.at_level(logging.WARNING):
        trainer = make_trainer(run, "mlp", keep_last=3)
    assert trainer.context.state.epoch == 5 and trainer.context.state.agent_step == 5 * BATCH
    assert str(newest) in caplog.text
    assert [p.name for p in (run / "damaged").iterdir()] == [f"00000006-{reason}"]
    assert list_checkpoints(run)[-1].name == "00000005"
    assert not (tmp_path / "pwned").exists() and not (run / "pwned").exists()
    trainer.train()  # epoch 6 again: written fresh, pruning counts intact checkpoints only
    assert [p.name for p in list_checkpoints(run)] == ["00000004", "00000005", "00000006"]
    for path in list_checkpoints(run):
        ckpt.read_checkpoint(path)
    assert make_trainer(run, "mlp").context.state.epoch == 6


def test_a_damaged_dir_set_aside_twice_keeps_both(trained: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    for _ in range(2):
        (list_checkpoints(run)[-1] / "manifest.json").unlink()
        make_trainer(run, "mlp", keep_last=6).train()
    assert sorted(p.name for p in (run / "damaged").iterdir()) == ["00000006-no-manifest", "00000006-no-manifest-2"]
