"""Real multi-process training: torchrun, gloo on CPU, two ranks (and two 'nodes' on 127.0.0.1)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mettle.rl.policy_files import list_checkpoints
from mettle.rl.training.checkpointer import read_checkpoint

WORKER = str(Path(__file__).with_name("ddp_worker.py"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *extra, *args]


def run_workers(out: Path, *worker_args: str) -> list[dict[str, Any]]:
    port = free_port()
    command = torchrun(WORKER, "--out", str(out), *worker_args,
                       extra=("--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """Two ranks, 4 unbroken epochs, run once: checked in itself, and the run a split one must end equal to."""
    out = tmp_path_factory.mktemp("straight")
    return out, run_workers(out, "--epochs", "4")


def test_two_ranks_stay_identical_and_count_all_steps(straight: tuple[Path, list[dict[str, Any]]]) -> None:
    out, (rank0, rank1) = straight
    assert rank0["world"] == rank1["world"] == 2
    assert len(rank0["checksums"]) == 4 * 2 * 2  # epochs x update epochs x minibatches
    assert rank0["checksums"] == rank1["checksums"], "parameters differ between ranks after an optimizer step"
    assert rank0["agent_step"] == rank1["agent_step"] == 4 * 128 * 2
    steps = [e["agent_step"] for e in rank0["epochs"]]
    assert steps == [256, 512, 768, 1024], "agent_step grows by the batches of both ranks"
    assert [e["losses"] for e in rank0["epochs"]] == [e["losses"] for e in rank1["epochs"]], "losses are all-reduced"
    assert [e["episodes"] for e in rank0["epochs"]] == [e["episodes"] for e in rank1["epochs"]]
    assert rank0["epochs"][-1]["episodes"] == 2 * 4 * 128 // 8 // 4, "episodes of both ranks are gathered"
    checkpoints = list_checkpoints(out / "checkpoints")
    assert [p.name for p in checkpoints] == ["00000002", "00000004"]
    state, _ = read_checkpoint(checkpoints[-1])
    assert len(state["ranks"]) == 2 and state["trainer"]["agent_step"] == 1024
    assert not list((out / "checkpoints").glob(".staging*"))


def test_resume_under_two_ranks_restores_both_identically(straight: tuple[Path, list[dict[str, Any]]],
                                                          tmp_path: Path) -> None:
    _, full = straight
    split = tmp_path / "split"
    run_workers(split, "--epochs", "4", "--stop-at", "2")
    resumed = run_workers(split, "--epochs", "4")
    assert resumed[0]["start_epoch"] == resumed[1]["start_epoch"] == 2
    assert resumed[0]["final"] == resumed[1]["final"] == full[0]["final"], "resumed ranks match an unbroken run"


def test_overlap_under_two_ranks_trains_in_step_and_resumes_exactly(tmp_path: Path) -> None:
    """Each rank forks its own actor; parameters stay equal across ranks, and a split run equals the unbroken one."""
    full = run_workers(tmp_path / "straight", "--epochs", "4", "--overlap")
    assert full[0]["overlapped"] and full[1]["overlapped"]
    assert full[0]["checksums"] == full[1]["checksums"], "parameters differ between ranks after an optimizer step"
    assert full[0]["agent_step"] == full[1]["agent_step"] == 4 * 128 * 2
    assert [e["episodes"] for e in full[0]["epochs"]] == [e["episodes"] for e in full[1]["epochs"]]
    run_workers(tmp_path / "split", "--epochs", "4", "--stop-at", "2", "--overlap")
    resumed = run_workers(tmp_path / "split", "--epochs", "4", "--overlap")
    assert resumed[0]["start_epoch"] == 2
    assert resumed[0]["final"] == resumed[1]["final"] == full[0]["final"], "resumed ranks match an unbroken run"


def test_analytic_gradient_under_two_ranks_averages_as_ddp_does(tmp_path: Path) -> None:
    """The hand-written gradient bypasses DDP's backward: the ranks still agree, and train as autograd under DDP."""
    args = ("--epochs", "3", "--env", "cartpole", "--policy", "mlp", "--gradient")
    analytic = run_workers(tmp_path / "analytic", *args, "analytic")
    autograd = run_workers(tmp_path / "autograd", *args, "autograd")
    assert analytic[0]["checksums"] == analytic[1]["checksums"], "parameters differ between ranks"
    assert analytic[0]["weights"] == pytest.approx(autograd[0]["weights"], rel=1e-3, abs=1e-5)
    assert [e["losses"] for e in analytic[0]["epochs"]] == [e["losses"] for e in analytic[1]["epochs"]]


def test_normalisation_statistics_merge_both_ranks_streams_into_the_same_figures(tmp_path: Path) -> None:
    """Each rank's live observations differ; both end with the statistics of the two streams together, and with the
    same reward statistics (each keeps its own rows' running returns)."""
    rank0, rank1 = run_workers(tmp_path, "--epochs", "3", "--env", "cartpole", "--policy", "mlp", "--normalize")
    first, second = rank0["normalization"], rank1["normalization"]
    assert first["seen"] != second["seen"], "each rank collects its own stream"
    both = np.array(first["seen"] + second["seen"])
    for record in (first, second):
        assert record["count"] == len(both)
        np.testing.assert_allclose(record["mean"], both.mean(axis=0), rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(np.array(record["m2"]) / len(both), both.var(axis=0), rtol=1e-9)
    assert (first["mean"], first["m2"]) == (second["mean"], second["m2"]), "ranks normalise bit for bit alike"
    assert {k: first["returns"][k] for k in ("count", "mean", "m2")} == \
        {k: second["returns"][k] for k in ("count", "mean", "m2")}
    assert first["returns"]["count"] == len(both), "a return per live step of either rank"
    assert rank0["checksums"] == rank1["checksums"], "parameters stay equal across ranks"


def test_kickstarted_student_under_two_ranks_stays_identical(tmp_path: Path) -> None:
    """An LSTM teacher kickstarts an MLP student on CartPole; both ranks anneal by the global agent step."""
    teacher = subprocess.run([sys.executable, WORKER, "--out", str(tmp_path / "teacher"), "--epochs", "2", "--env",
                              "cartpole", "--policy", "lstm"], capture_output=True, text=True, timeout=240)
    assert teacher.returncode == 0, teacher.stderr[-3000:]  # one process: the teacher's own training is not the test
    rank0, rank1 = run_workers(tmp_path / "student", "--epochs", "4", "--env", "cartpole", "--policy", "mlp",
                               "--teacher", str(tmp_path / "teacher"), "--anneal-steps", "768")
    assert rank0["checksums"] == rank1["checksums"], "parameters differ between ranks after an optimizer step"
    assert len(rank0["checksums"]) == 4 * 2 * 2 and rank0["final"] == rank1["final"]
    assert [e["losses"] for e in rank0["epochs"]] == [e["losses"] for e in rank1["epochs"]], "losses are all-reduced"
    losses = [e["losses"] for e in rank0["epochs"]]
    # each update sees the 2 x 128 steps of its rollout counted: coefficients at 256, 512, 768, 1024 of 768
    assert [e["kickstarter/action_coef"] for e in losses] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-6)
    assert [e["kickstarter/value_coef"] for e in losses] == pytest.approx([2 / 3, 1 / 3, 0.0, 0.0], abs=1e-6)
    assert all(e["kickstarter/kl"] > 0 and e["kickstarter/value_mse"] > 0 for e in losses[:2]), "teacher != student"
    assert not any("kickstarter/kl" in e for e in losses[2:]), "once annealed the teacher is not run"
    assert all("ppo_actor/policy_loss" in e and "ppo_critic/value_loss" in e for e in losses)


def test_cli_under_torchrun_writes_only_from_rank_zero(tmp_path: Path) -> None:
    port = free_port()
    command = torchrun("-m", "mettle", "--", "train", "--env", "gym:CartPole-v1", "--run", "r", "--run-dir",
                       str(tmp_path), "total_timesteps=8192", "progress_interval_s=0.01",
                       extra=("--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("training gym:CartPole-v1 with mlp policy on 2 ranks") == 1
    assert result.stdout.count("done epoch") == 1, "progress comes from rank 0 only"
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"checkpoints", "config.json", "policy.json",
                                                           "policy.safetensors", "manifest.json", "metrics.jsonl",
                                                           "tensorboard", "heartbeat.json"}
    steps = [json.loads(line)["step"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 8192, "one metrics line per epoch, from rank 0 only"
    state, _ = read_checkpoint(list_checkpoints(tmp_path / "r" / "checkpoints")[-1])
    assert state["trainer"]["agent_step"] == 8192 and len(state["ranks"]) == 2


def test_two_nodes_on_loopback_train_together(tmp_path: Path) -> None:
    port = free_port()
    common = ("--nnodes=2", "--master-addr=127.0.0.1", f"--master-port={port}")
    procs = [subprocess.Popen(torchrun(WORKER, "--out", str(tmp_path), "--epochs", "2", nproc=1,
                                       extra=(*common, f"--node-rank={node}")),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["world"] == 2 and rank0["checksums"] == rank1["checksums"]
    assert rank0["agent_step"] == 2 * 128 * 2


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    children = [int(p) for p in out.split()]
    return children + [d for c in children for d in descendants(c)]


def test_killing_one_rank_ends_the_other_with_an_error(tmp_path: Path) -> None:
    port = free_port()
    command = torchrun(WORKER, "--out", str(tmp_path), "--epochs", "100000",
                       extra=("--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}"))
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.time() + 60
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        time.sleep(1.0)
        workers = [p for p in descendants(proc.pid) if "ddp_worker" in Path(f"/proc/{p}/cmdline").read_text()]
    assert len(workers) == 2, "both ranks started"
    time.sleep(3.0)
    os.kill(workers[1], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)  # raises if torchrun and rank 0 are still running a minute later
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert re.search(rf"exitcode\s*: -9 \(pid: {workers[1]}\)", err), err[-3000:]  # torchrun names the killed rank
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


@pytest.fixture(autouse=True, scope="module")
def _quiet_threads() -> Iterator[None]:
    """One OpenMP thread per rank (module-wide, so the module's shared runs get it too): ranks share two cores."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


def test_a_curriculum_under_two_ranks_merges_their_episodes_into_one_plan(tmp_path: Path) -> None:
    """Both ranks feed their curriculum every rank's episodes: each epoch their samplers hold the same plan."""
    family = {"name": "tiny-arena", "base": {"task": "arena", "args": {"num_agents": 2, "width": 7, "height": 7,
                                                                       "mines": 1, "altars": 1, "max_steps": 12}},
              "parameters": {"max_steps": {"paths": ["game.max_steps"], "choices": [8, 12, 16]}}}
    (tmp_path / "family.json").write_text(json.dumps(family))
    port = free_port()
    command = torchrun("-m", "mettle", "--", "train", "--env", f"mettagrid:{tmp_path / 'family.json'}", "--run", "r",
                       "--run-dir", str(tmp_path), "env.num_envs=4", "batch_size=256", "minibatch_size=128",
                       "bptt_horizon=16", "total_timesteps=4096", "policy.hidden_size=32", "overlap=false",
                       "curriculum.pool_size=4", "curriculum.min_completions=2", "checkpoint_interval=1",
                       extra=("--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={port}"))
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert sum(r.get("curriculum/evicted", 0) for r in records) > 0, "the pool turned over"
    plans = []
    for checkpoint in list_checkpoints(tmp_path / "r" / "checkpoints"):
        state, _ = read_checkpoint(checkpoint)
        samplers = [rank["core_loop"]["tasks"] for rank in state["ranks"]]
        assert samplers[0]["plan"] == samplers[1]["plan"], f"ranks sample from different plans at {checkpoint.name}"
        assert samplers[0]["rng"] != samplers[1]["rng"], "each rank draws with its own stream"
        assert samplers[0]["plan"]["task_ids"] == state["components"]["curriculum"]["task_ids"].tolist()
        plans.append(samplers[0]["plan"])
    assert len({json.dumps(plan) for plan in plans}) > 2, "the plan moved as episodes came in"
