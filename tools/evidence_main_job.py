#!/usr/bin/env python
"""The main job's evidence grid: static / MoE / PAD (κ sweep) × seeds × VADER tasks, each cell a real ``padmoe train``
run under the deepspeed launcher (pad_moe.train.compare.run_mode), then mean ± std per (task, mode, κ) as Markdown.

    python tools/evidence_main_job.py --out runs/evidence --seeds 0 1 2 --kappas 0.7 0.5 0.3 0.1 \
        --tasks vader-movies vader-movies-reg [key=value ...]

Resumable: a cell whose summary.json exists is not re-run. Checkpoints are deleted after each cell (the grid would
otherwise keep ~0.4 GB per cell); summaries, TensorBoard logs and the resolved config stay. ``--sweep-task`` limits
the κ sweep to one task (the other task gets static / moe / PAD at ``--main-kappa`` only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys

from pad_moe.train.compare import REPO_ROOT, run_mode

CONFIG = os.path.join(REPO_ROOT, "configs", "minilm_vader.yaml")


def cells(tasks, seeds, kappas, main_kappa, sweep_task):
    for task in tasks:
        pads = kappas if sweep_task in (None, task) else [main_kappa]
        for seed in seeds:
            yield task, "static", None, seed
            yield task, "moe", None, seed
            for kappa in pads:
                yield task, "pad", kappa, seed


def run_cell(out: str, task: str, mode: str, kappa, seed: int, ranks: int, overrides: list[str]) -> dict:
    tag = f"{task}-{mode}" + (f"-k{kappa:g}" if kappa is not None else "") + f"-s{seed}"
    run_dir = os.path.join(out, tag)
    path = os.path.join(run_dir, "summary.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    args = [*overrides, f"output_dir={out}", f"data.task={task}", f"train.seed={seed}", f"partition.seed={seed}"]
    if kappa is not None:
        args.append(f"partition.kappa={kappa}")
    summary = run_mode(CONFIG, mode, tag, ranks, args)
    shutil.rmtree(os.path.join(run_dir, "checkpoints"), ignore_errors=True)
    return summary


def aggregate(results: list[tuple[str, str, float | None, int, dict]]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for task, mode, kappa, _seed, summary in results:
        groups.setdefault((task, mode, kappa), []).append(summary)
    lines = ["| task | mode | κ | seeds | params (training) | params (compact) | dev metric (mean ± std) | per seed | "
             "wall (mean) |", "|---|---|---|---|---|---|---|---|---|"]
    for (task, mode, kappa), runs in groups.items():
        metric = runs[0]["main_metric"]
        values = [next(iter(r["eval"].values()))[metric] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {task} | {mode} | {'' if kappa is None else f'{kappa:g}'} | {len(runs)} | "
                     f"{runs[0]['params_training'] / 1e6:.2f}M | {runs[0]['params_compact'] / 1e6:.2f}M | "
                     f"{metric} {statistics.mean(values):.4f} ± {std:.4f} | "
                     f"{' '.join(f'{v:.4f}' for v in values)} | "
                     f"{statistics.mean(r['wall_time_s'] for r in runs):.0f}s |")
    return "\n".join(lines)


def collect(out: str) -> list[tuple[str, str, float | None, int, dict]]:
    """Every finished cell under ``out`` (run directories named by run_cell)."""
    import re

    results = []
    for name in sorted(os.listdir(out)):
        m = re.fullmatch(r"(.+)-(static|moe|pad)(?:-k([0-9.]+))?-s(\d+)", name)
        path = os.path.join(out, name, "summary.json")
        if m and os.path.exists(path):
            with open(path) as f:
                summary = json.load(f)
            results.append((m[1], m[2], float(m[3]) if m[3] else None, int(m[4]), summary))
    order = {"static": 0, "moe": 1, "pad": 2}
    return sorted(results, key=lambda r: (r[0], order[r[1]], -(r[2] or 0), r[3]))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/minilm_vader.yaml")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "evidence"))
    p.add_argument("--tasks", nargs="+", default=["vader-movies", "vader-movies-reg"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--kappas", nargs="+", type=float, default=[0.7, 0.5, 0.3, 0.1])
    p.add_argument("--main-kappa", type=float, default=0.5)
    p.add_argument("--sweep-task", default=None, help="run the κ sweep on this task only")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only aggregate the finished cells under --out")
    args = p.parse_args(argv)
    if args.report:
        print(aggregate(collect(args.out)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = []
    for task, mode, kappa, seed in cells(args.tasks, args.seeds, args.kappas, args.main_kappa, args.sweep_task):
        summary = run_cell(args.out, task, mode, kappa, seed, args.ranks, args.overrides)
        results.append((task, mode, kappa, seed, summary))
        report = aggregate(results)
        with open(os.path.join(args.out, "evidence.md"), "w") as f:
            f.write(f"overrides: {' '.join(args.overrides)}\n\n{report}\n")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
