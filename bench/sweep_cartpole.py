"""Does `mettle sweep` find a CartPole setting that learns? The issue's 6-trial sweep, run as a user runs it.

    mettle sweep --env gym:CartPole-v1 --sweep cartpole --trials 6 \\
        optimizer.learning_rate='log(1e-4,3e-3)' update_epochs='int(2,10)' total_timesteps=50000

in a fresh sweep directory (`python -m mettle`, this checkout), then reads the study's best trial from the sweep's
best.json. Its score is the mean return of the last 20 training episodes (the evaluator is off). Target: the best
trial reaches a mean return of 475 (`--check` exits 1 when it does not). Every trial stays in OUT/cartpole/ as a
run directory, with trials.txt, the plots and study.db.

    .venv/bin/python bench/sweep_cartpole.py --out /tmp/sweepbench --check
    .venv/bin/python bench/sweep_cartpole.py --trials 2 --jobs 2 --out /tmp/sweepbench-quick
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET = 475.0
SPACE = ["optimizer.learning_rate=log(1e-4,3e-3)", "update_epochs=int(2,10)"]


def parse() -> argparse.Namespace:
    """The bench's options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="trials in the study (default 6, the issue's)")
    parser.add_argument("--jobs", type=int, default=1, help="trials at once (default 1)")
    parser.add_argument("--total-timesteps", type=int, default=50_000, help="agent steps per trial (default 50000)")
    parser.add_argument("--out", type=Path, default=None, help="where the sweep is written (default: a new temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="key=value",
                        help="another override for every trial (repeatable)")
    parser.add_argument("--target", type=float, default=TARGET, help=f"best mean return to reach (default {TARGET})")
    parser.add_argument("--check", action="store_true", help="exit 1 when the best trial misses the target")
    return parser.parse_args()


def main() -> int:
    """Run the sweep, print the best trial and its command, write sweep_cartpole.json; with --check, exit 1 on a
    miss."""
    args = parse()
    out = args.out or Path(tempfile.mkdtemp(prefix="sweep-cartpole-"))
    out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mettle", "sweep", "--env", "gym:CartPole-v1", "--sweep", "cartpole",
               "--sweep-dir", str(out), "--trials", str(args.trials), "--jobs", str(args.jobs), *SPACE,
               f"total_timesteps={args.total_timesteps}", *args.set]
    print("running:", " ".join(command), flush=True)
    started = time.monotonic()
    code = subprocess.run(command, stdout=subprocess.DEVNULL, check=False).returncode
    wall = time.monotonic() - started
    sweep = out / "cartpole"
    print((sweep / "trials.txt").read_text() if (sweep / "trials.txt").exists() else "no trials.txt", end="")
    best_file = sweep / "best.json"
    if code != 0 or not best_file.exists():
        print(f"the sweep failed (exit {code}); see {sweep}", file=sys.stderr)
        return 1
    best = json.loads(best_file.read_text())
    reached = best["value"] >= args.target
    summary = {"trials": args.trials, "jobs": args.jobs, "total_timesteps": args.total_timesteps, "wall_s": wall,
               "best": best, "target": args.target, "reached": reached, "sweep_dir": str(sweep)}
    (out / "sweep_cartpole.json").write_text(json.dumps(summary, indent=2))
    print(f"best trial {best['number']}: mean return {best['value']:.1f} (target {args.target:g}: "
          f"{'reached' if reached else 'MISSED'}); {args.trials} trials in {wall:.0f} s")
    print(f"train it with: {best['command']}")
    return 0 if reached or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
