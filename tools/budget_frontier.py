#!/usr/bin/env python
"""The budget frontier: how many steps does a grown student need to reach the tuned random-init target?

Issue 15's protocol gives the grown students T/3 steps and asks whether they reach the target (random init of
the grown architecture, tuned, after T steps). A miss at T/3 leaves open *how far* off the growth is: does it
need 2T/3, or is it never better than random init at any budget? This tool answers that by running
``tools/reproduce_net2net.py`` once per student budget N (``--student-steps N``) for one model, into
``OUT/n<N>/``, all sharing one cache (``OUT/cache``: the teacher, the grown models and the target run are made
once), and tabulating every arm's final test metric against N, paired per seed with the target.

For each arm and N: the mean +- sem final test metric, the paired difference to the target (same seed; positive
is better for accuracy and for bits per character alike), and on how many seeds the arm is at least as good as
the target. Every arm's rate (and +sp point) is re-tuned on validation at each N, exactly as in the main
protocol; the target is the same run for every N.

Outputs: ``OUT/frontier.md`` (the table), ``OUT/frontier.json`` (its rows) and ``OUT/<model>-frontier.png``.

Usage::

    python tools/budget_frontier.py --only mnist1d-cnn --steps 1000 1500 2000 3000 --out /tmp/frontier \\
        -- --arms widen/random-init-T/3 widen/net2net widen/net2net+sp teacher --sp-grid 0.2:0.3 0.6:0.3
    python tools/budget_frontier.py --only mnist1d-cnn --out /tmp/frontier --table-only   # tabulate again

Everything after ``--`` goes to ``reproduce_net2net.py`` unchanged (``--only``, ``--out`` and
``--student-steps`` are this tool's). Needs the experiment extras, like ``reproduce_net2net.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path

TARGET_ARM = "widen/random-init"
# the arms that reproduce_net2net.py names after T/3 run N steps here
BUDGET_NAMES = {"random-init-T/3": "random init, N steps", "teacher+T/3": "teacher + N steps"}


class FrontierError(Exception):
    """The budget runs in OUT cannot be compared (a different T or target between them)."""


def frontier_label(row: dict) -> str:
    return f"{row['growth']}/{BUDGET_NAMES.get(row['arm'], row['arm'])}"


def reproduce_module():
    """tools/reproduce_net2net.py as a module (registered before it runs: its dataclasses look it up)."""
    name = "reproduce_net2net"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def mean_sem(values: list[float]) -> tuple[float, float]:
    return sum(values) / len(values), reproduce_module().sem(values)


def finals_by_seed(entry: dict) -> dict[int, float]:
    return {curve["seed"]: curve["test"][-1] for curve in entry["curves"]}


def budget_runs(out: Path, model: str) -> list[tuple[int, dict]]:
    """(N, the model's experiment from OUT/n<N>/results.json) for every budget run so far, by N."""
    runs = []
    for folder in out.glob("n*"):
        results = folder / "results.json"
        if not (folder.name[1:].isdigit() and results.is_file()):
            continue
        experiment = json.loads(results.read_text())["experiments"].get(model)
        if experiment:
            runs.append((int(folder.name[1:]), experiment))
    return sorted(runs, key=lambda run: run[0])


def frontier_rows(model: str, runs: list[tuple[int, dict]]) -> list[dict]:
    """One row per (N, arm): final metric, paired difference to the target and seeds at the target.

    Raises:
        FrontierError: the runs do not share T and the target's final metrics (folders of different runs).
    """
    rows = []
    first_T, first_target = (runs[0][1]["T"], finals_by_seed(runs[0][1]["arms"][TARGET_ARM])) if runs else (0, {})
    for steps, exp in runs:
        better = 1 if exp["metric"] == "acc" else -1   # paired differences: positive is better
        target = finals_by_seed(exp["arms"][TARGET_ARM])
        if (exp["T"], target) != (first_T, first_target):
            raise FrontierError(f"n{steps}: T {exp['T']} and target {sorted(target.items())} differ from "
                                f"n{runs[0][0]}'s (T {first_T}, {sorted(first_target.items())}): not one sweep")
        target_mean, target_sem = mean_sem(list(target.values()))
        for key, entry in exp["arms"].items():
            if key == TARGET_ARM:
                continue
            finals = finals_by_seed(entry)
            paired = [better * (finals[s] - target[s]) for s in finals if s in target]
            final_mean, final_sem = mean_sem(list(finals.values()))
            paired_mean, paired_sem = mean_sem(paired) if paired else (math.nan, math.nan)
            rows.append({"experiment": model, "metric": exp["metric"], "T": exp["T"], "student_steps": steps,
                         "growth": entry["growth"], "arm": entry["arm"], "lr": entry["lr"],
                         "shrink": entry.get("shrink"), "fresh": entry.get("fresh"),
                         "weight_decay": entry.get("weight_decay", 0.0), "noise": entry.get("noise"),
                         "final_mean": final_mean, "final_sem": final_sem,
                         "paired_mean": paired_mean, "paired_sem": paired_sem,
                         "seeds_at_target": sum(d >= -1e-9 for d in paired), "seeds": len(paired),
                         "target_mean": target_mean, "target_sem": target_sem})
    return rows


def format_frontier(rows: list[dict]) -> str:
    if not rows:
        return "no budget runs found"
    scale, digits = (100, 2) if rows[0]["metric"] == "acc" else (1, 3)
    unit = "%" if rows[0]["metric"] == "acc" else "bpc"
    lines = [f"| student steps (T = {rows[0]['T']}) | arm | lr | λ/p | final test, {unit} (mean +- sem) "
             "| paired vs target (+ is better) | seeds at or past the target |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        point = "-" if r["shrink"] is None else f"{r['shrink']:g}/{r['fresh']:g}"
        point += f", wd {r['weight_decay']:g}" if r.get("weight_decay") else ""
        point += f", noise {r['noise']:g}" if r.get("noise") is not None else ""
        paired = round(scale * r["paired_mean"], digits) + 0.0   # + 0.0: no "-0.00"
        when = " (the target's budget)" if r["student_steps"] == r["T"] else ""
        lines.append(f"| {r['student_steps']}{when} | {frontier_label(r)} | {r['lr']:g} | {point} | "
                     f"{scale * r['final_mean']:.{digits}f} +- {scale * r['final_sem']:.{digits}f} | "
                     f"{paired:+.{digits}f} +- {scale * r['paired_sem']:.{digits}f} | "
                     f"{r['seeds_at_target']}/{r['seeds']} |")
    lines.append(f"\ntarget (random init at T = {rows[0]['T']}): {scale * rows[0]['target_mean']:.{digits}f} "
                 f"+- {scale * rows[0]['target_sem']:.{digits}f} {unit}")
    return "\n".join(lines)


def plot_frontier(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale = 100 if rows[0]["metric"] == "acc" else 1
    fig, ax = plt.subplots(figsize=(7, 4.2))
    arms = dict.fromkeys(frontier_label(r) for r in rows)
    for offset, arm in enumerate(arms):
        own = [r for r in rows if frontier_label(r) == arm]
        jitter = (offset - (len(arms) - 1) / 2) * 0.01 * own[-1]["student_steps"]   # error bars side by side
        ax.errorbar([r["student_steps"] + jitter for r in own], [scale * r["final_mean"] for r in own],
                    yerr=[scale * r["final_sem"] for r in own], marker="o", capsize=3, label=arm)
    target, target_sem = scale * rows[0]["target_mean"], scale * rows[0]["target_sem"]
    ax.axhline(target, color="black", ls=":", lw=1, label=f"target: random init at T = {rows[0]['T']}")
    ax.axhspan(target - target_sem, target + target_sem, color="black", alpha=0.08, lw=0)
    ax.axvline(rows[0]["T"] / 3, color="tab:gray", ls="--", lw=0.8, label="T/3")
    ax.set_xlabel("student training steps (each arm: its own tuned peak lr, 5 % warmup, cosine to zero)")
    ax.set_ylabel("final test accuracy (%)" if scale == 100 else "final test bits per character (lower is better)")
    ax.set_title(f"{rows[0]['experiment']}: final test metric against the student's budget "
                 f"(mean +- sem, {rows[0]['seeds']} seeds)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def share_cache(link: Path) -> None:
    """Make ``OUT/n<N>/cache`` a relative link to ``OUT/cache`` (replacing a stale link; refusing a folder,
    which would hold runs of its own that the other budgets do not share)."""
    if link.is_symlink():
        if link.resolve() == (link.parent.parent / "cache").resolve():
            return
        link.unlink()
    elif link.exists():
        raise FrontierError(f"{link} is a folder of its own, not the shared cache: move it away first")
    link.symlink_to(Path("..") / "cache", target_is_directory=True)


def run_budgets(model: str, budgets: list[int], out: Path, passthrough: list[str]) -> int:
    """reproduce_net2net.py once per budget, into OUT/n<N> with OUT/cache shared; the worst exit status."""
    reproduce = reproduce_module()
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    status = 0
    for steps in budgets:
        folder = out / f"n{steps}"
        folder.mkdir(exist_ok=True)
        share_cache(folder / "cache")
        reproduce.log(f"budget frontier: {model}, students {steps} steps -> {folder}")
        status = max(status, reproduce.main(["--only", model, "--student-steps", str(steps), "--out", str(folder),
                                             *passthrough]))
    return status


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", required=True, help="the model (one of reproduce_net2net.py's experiments)")
    p.add_argument("--steps", type=int, nargs="+", metavar="N", help="the student budgets to run")
    p.add_argument("--out", type=Path, required=True, help="folder of the runs (OUT/n<N>) and the frontier")
    p.add_argument("--table-only", action="store_true", help="tabulate the runs in OUT, run nothing")
    args = p.parse_args(own)
    if not args.table_only and not args.steps:
        p.error("--steps N [N ...] is needed unless --table-only")
    if any(n < 1 for n in args.steps or []):
        p.error("--steps: every budget must be at least 1")
    reproduce = reproduce_module()
    try:
        theirs = reproduce.parse_args(passthrough)
    except SystemExit:
        p.error(f"after '--': {' '.join(passthrough)}: not options of reproduce_net2net.py (its message above)")
    if theirs.only or theirs.student_steps is not None or theirs.out != reproduce.DEFAULT_OUT:
        p.error("--only, --out and --student-steps after '--': they are this tool's own options")
    args.passthrough = passthrough
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        status = 0 if args.table_only else run_budgets(args.only, args.steps, args.out, args.passthrough)
        rows = frontier_rows(args.only, budget_runs(args.out, args.only))
    except FrontierError as exc:
        print(f"budget_frontier: {exc}", file=sys.stderr)
        return 2
    table = format_frontier(rows)
    print(table, flush=True)
    if rows:
        (args.out / "frontier.md").write_text(table + "\n")
        (args.out / "frontier.json").write_text(json.dumps(rows, indent=1))
        plot_frontier(rows, args.out / f"{args.only}-frontier.png")
    return status or (0 if rows else 1)


if __name__ == "__main__":
    sys.exit(main())
