"""The markdown page bench/compare.py writes from its report dict (results.md)."""

from __future__ import annotations

from typing import Any

SPS_TARGET = 2.0
"""Mettle must train CartPole-v1 (8 envs, matched settings) at least this many times faster than SB3 (issue 14)."""
PLAIN_TARGET = 1.5
"""... and at least this many times faster than the plain single-file PyTorch PPO (bench/plain_ppo.py)."""
SOLVE_TARGET = 1 / 3
"""Mettle's time to the threshold must be at most this fraction of SB3's (rl-zoo tuned)."""
ARENA_TARGET = 0.2
"""mettagrid:arena training agent-steps/s as a fraction of the raw simulator's (issue 14)."""
SYSTEM_NAMES = {"mettle": "Mettle", "sb3": "SB3", "plain_ppo": "plain PPO", "raw_gym": "raw env",
                "raw_mettagrid": "raw env", "mettle_env": "Mettle env adapter"}


def num(value: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or a dash when missing."""
    return "–" if value is None else f"{value:,.{digits}f}"


def ratio(value: float | None) -> str:
    """A ratio like 3.10x, or a dash."""
    return "–" if value is None else f"{value:.2f}x"


def render_markdown(report: dict[str, Any]) -> str:
    """The whole page: machine, throughput, Mettle's time split, time to solve, targets."""
    parts = [header(report), throughput_table(report), variants_table(report), split_table(report)]
    solves = {name: entry["solve"] for name, entry in report["tasks"].items() if "solve" in entry}
    parts += [solve_section(name, solve, report) for name, solve in solves.items()]
    parts.append(targets(report))
    return "\n\n".join(part for part in parts if part) + "\n"


def header(report: dict[str, Any]) -> str:
    """Title, the conditions of the run, and the caveat that matters most on a shared machine."""
    m = report["machine"]
    quick = "\n\n**--quick smoke run: too short to be a measurement.**" if report["quick"] else ""
    return (f"# Mettle vs Stable-Baselines3 PPO vs raw environment\n\n"
            f"{m['date']}, {m['cpus']} CPUs ({m.get('cpu_model', 'model not recorded')}), "
            f"load average {m['load_avg'][0]:.2f} at start and "
            f"{m['load_avg_end'][0]:.2f} at the end (the machine may be shared: compare ratios, not absolutes); "
            f"Python {m['python']}, torch {m['torch']} ({m['torch_threads']} thread for every system), "
            f"stable-baselines3 {m['stable_baselines3']}; CPU only; total {report['wall_s']:.0f} s.{quick}")


def throughput_table(report: dict[str, Any]) -> str:
    """Median agent-steps/s per system and the ratios, one row per task."""
    rows = ["## Throughput, matched settings (agent-steps/s, median of runs)", "",
            "Same envs, steps per env per rollout (= Mettle batch_size / envs), minibatch, update epochs, "
            "separate 64x64 tanh actor and critic, Adam; SB3 reads Monitor-wrapped DummyVecEnv, Mettle its own "
            "adapter over the env's native vector class where Gymnasium registers one (CartPoleVectorEnv), else "
            "SyncVectorEnv. Raw env: that same bare vector env (MettaGrid: the bare simulator) with uniformly random "
            "actions. Plain PPO: bench/plain_ppo.py, a single-file plain-PyTorch PPO on that bare vector env.", "",
            "| task | rows | batch / minibatch / epochs | steps x runs | Mettle | SB3 | Mettle ÷ SB3 | plain PPO "
            "| Mettle ÷ plain | raw env | Mettle ÷ raw | Mettle env adapter | adapter ÷ raw |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["tasks"].items():
        t, config = entry["throughput"], first_config(entry)
        med, r = t["median_sps"], t["ratios"]
        raw = med.get("raw_gym") or med.get("raw_mettagrid")
        rows.append(f"| {name} | {rows_text(entry)} | {sizes(config)} | {t['steps']:,} x {t['repeats']} "
                    f"| {num(med['mettle'])} | {num(med.get('sb3'))} | {ratio(r['mettle_over_sb3'])} "
                    f"| {num(med.get('plain_ppo'))} | {ratio(r.get('mettle_over_plain'))} | {num(raw)} "
                    f"| {ratio(r['mettle_over_raw'])} | {num(med['mettle_env'])} | {ratio(r['adapter_over_raw'])} |")
    return "\n".join(rows)


def variants_table(report: dict[str, Any]) -> str:
    """Each Mettle variant (overlap on/off, --variant) with its overrides and its ratios; empty with one variant."""
    rows = ["## Mettle variants (agent-steps/s, median of runs; interleaved with the systems above)", "",
            "| task | variant | overrides | Mettle | ÷ first variant | ÷ SB3 | ÷ plain PPO | ÷ raw "
            "| ÷ raw, median of rounds |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, entry in report["tasks"].items():
        t = entry["throughput"]
        for variant, overrides in t.get("variants", {}).items():
            r = t["ratios"]["variants"][variant]
            rows.append(f"| {name} | {variant} | {' '.join(overrides) or '(none)'} | {num(t['median_sps'][variant])} "
                        f"| {ratio(r['over_mettle'])} | {ratio(r['over_sb3'])} | {ratio(r['over_plain'])} "
                        f"| {ratio(r['over_raw'])} | {ratio(r.get('paired_over_raw'))} |")
    several = any(len(e["throughput"].get("variants", {})) > 1 for e in report["tasks"].values())
    return "\n".join(rows) if several else ""


def first_config(entry: dict[str, Any]) -> dict[str, Any] | None:
    """The resolved Mettle config of the first successful throughput run."""
    for run in entry["throughput"]["runs"]["mettle"]:
        if "config" in run:
            return run["config"]
    return None


def rows_text(entry: dict[str, Any]) -> str:
    """Envs (x agents per env) as the trainer sees them."""
    run = next((r for r in entry["throughput"]["runs"]["mettle"] if "rows" in r), {})
    envs, agents = entry["task"]["num_envs"], run.get("agents_per_env", 1)
    return f"{envs}" if agents == 1 else f"{envs} x {agents} agents"


def sizes(config: dict[str, Any] | None) -> str:
    """batch / minibatch / update epochs from the resolved config."""
    if config is None:
        return "–"
    t = config["trainer"]
    return f"{t['batch_size']} / {t['minibatch_size']} / {t['update_epochs']}"


def split_table(report: dict[str, Any]) -> str:
    """Where Mettle's training time went, from its own stopwatch (the median-speed run of each task)."""
    rows = ["## Mettle's time split (its median-speed throughput run, Mettle's stopwatch)", "",
            "| task | env step | policy inference | other rollout (buffer, copies) | update | wall |",
            "|---|---|---|---|---|---|"]
    for name, entry in report["tasks"].items():
        runs = sorted((r for r in entry["throughput"]["runs"]["mettle"] if "stopwatch_s" in r), key=lambda r: r["sps"])
        if not runs:
            continue
        run = runs[(len(runs) - 1) // 2]
        sw, wall = run["stopwatch_s"], run["wall_s"]
        env, infer, rollout, train = (sw.get(k, 0.0) for k in ("rollout.env", "rollout.inference", "rollout", "train"))
        cells = [env, infer, rollout - env - infer, train]
        rows.append(f"| {name} | " + " | ".join(f"{s:.2f} s ({100 * s / wall:.0f}%)" for s in cells)
                    + f" | {wall:.2f} s |")
    return "\n".join(rows) if len(rows) > 4 else ""


def solve_section(name: str, solve: dict[str, Any], report: dict[str, Any]) -> str:
    """Per-seed times to the threshold for each trainer, the medians and their ratio."""
    zoo = report["sb3_zoo_cartpole"]
    rows = [f"## Time to mean return {solve['threshold']:.0f} ({name})", "",
            f"Rule, the same for both: wall time from the start of training to the first rollout end at which the "
            f"last {solve['window']} finished training episodes (sampled actions) average >= {solve['threshold']:.0f}."
            f" Mettle: its CartPole recipe (CLASSIC_CONTROL) unchanged. SB3: rl-zoo's tuned CartPole-v1 entry "
            f"(n_envs {zoo['n_envs']}, n_steps {zoo['n_steps']}, batch {zoo['batch_size']}, gamma {zoo['gamma']}, "
            f"gae_lambda {zoo['gae_lambda']}, n_epochs {zoo['n_epochs']}, ent_coef {zoo['ent_coef']}, "
            f"lr {zoo['learning_rate']}, clip {zoo['clip_range']}, {zoo['n_timesteps']:,} steps).", "",
            "| system | per seed: seconds (agent steps) | reached | median s | median steps |", "|---|---|---|---|---|"]
    for kind in solve["runs"]:
        label = "SB3 (rl-zoo tuned)" if kind == "sb3_zoo" else f"{kind} (recipe)"
        seeds = ", ".join(seed_text(r) for r in solve["runs"][kind])
        med = solve["medians"][kind]
        rows.append(f"| {label} | {seeds} | {solve['reached'][kind]}/{len(solve['runs'][kind])} "
                    f"| {num(med['solved_s'], 1)} | {num(med['solved_step'])} |")
    rows += ["", f"Mettle ÷ SB3 median time: **{ratio(solve['mettle_over_sb3_time'])}**"]
    for name, value in solve.get("steps_over_mettle", {}).items():
        if name != "mettle":
            rows.append(f"{name} ÷ mettle median steps to {solve['threshold']:.0f}: **{ratio(value)}** (learning kept: "
                        "<= 1.25x)")
    return "\n".join(rows)


def seed_text(result: dict[str, Any]) -> str:
    """One seed's outcome."""
    if "error" in result:
        return "error"
    if result.get("solved_s") is None:
        return f"not reached in {result['wall_s']:.0f} s"
    return f"{result['solved_s']:.1f} ({result['solved_step']:,})"


def targets(report: dict[str, Any]) -> str:
    """The issue's targets, each with the measured value and whether it is met."""
    lines = ["## Targets"]
    tasks = report["tasks"]
    if "cartpole8" in tasks:
        for label, ratios in variant_ratios(tasks["cartpole8"]["throughput"]):
            value = ratios.get("over_sb3")
            lines.append(f"- CartPole-v1, 8 envs, matched: Mettle{label} ÷ SB3 agent-steps/s >= {SPS_TARGET:.0f}x: "
                         f"measured {ratio(value)} — {verdict(value, lambda v: v >= SPS_TARGET)}")
            value = ratios.get("over_plain")
            lines.append(f"- CartPole-v1, 8 envs, matched: Mettle{label} ÷ plain PPO agent-steps/s >= "
                         f"{PLAIN_TARGET}x: measured {ratio(value)} — {verdict(value, lambda v: v >= PLAIN_TARGET)}")
        solve = tasks["cartpole8"].get("solve")
        if solve:
            value = solve["mettle_over_sb3_time"]
            lines.append(f"- CartPole-v1 time to {solve['threshold']:.0f}: Mettle ÷ SB3 (median) <= 0.33x: "
                         f"measured {ratio(value)} — {verdict(value, lambda v: v <= SOLVE_TARGET)}")
    if "arena" in tasks:
        for label, ratios in variant_ratios(tasks["arena"]["throughput"]):
            value, paired = ratios.get("over_raw"), ratios.get("paired_over_raw")
            lines.append(f"- mettagrid:arena: Mettle{label} training ÷ raw simulator agent-steps/s >= "
                         f"{ARENA_TARGET}x: measured {ratio(value)} (median of rounds, each run over the raw run "
                         f"of its round: {ratio(paired)}) — {verdict(value, lambda v: v >= ARENA_TARGET)}")
    return "\n".join(lines)


def variant_ratios(throughput: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(" (overrides)", ratios) for each Mettle variant, or one unlabelled entry when there are no variants."""
    variants = throughput.get("variants", {})
    if not variants:
        r = throughput["ratios"]
        return [("", {"over_sb3": r.get("mettle_over_sb3"), "over_plain": r.get("mettle_over_plain"),
                      "over_raw": r.get("mettle_over_raw")})]
    return [(f" ({' '.join(overrides) or 'defaults'})", throughput["ratios"]["variants"][name])
            for name, overrides in variants.items()]


def verdict(value: float | None, test: Any) -> str:
    """met / NOT met / unknown."""
    if value is None:
        return "unknown (a run failed or did not reach the threshold)"
    return "met" if test(value) else "NOT met"
