#!/usr/bin/env python
"""The main job's evidence: studies of static / MoE / PAD on the VADER tasks, each cell a real ``padmoe train`` run
under the deepspeed launcher (pad_moe.train.compare.run_mode) at the main job's model and recipe
(configs/minilm_vader.yaml) with one full epoch of the full training split and the full dev set.

    python tools/evidence_main_job.py --study main [--study kappa ...] [--out runs/evidence-epoch] \
        [--record docs/evidence/epoch] [key=value ...]
    python tools/evidence_main_job.py --report [--record docs/evidence/epoch]      # tables of the finished cells

Studies (issue 14, in priority order):
  main     static / moe / pad κ=0.5, seeds 0-4, vader-movies and vader-movies-reg
  kappa    pad κ 0.7 / 0.5 / 0.3 / 0.1, seeds 0-2, vader-movies
  domains  static / moe / pad κ=0.5 on the four corpora pooled (vader-all), seeds 0-2, per-domain dev metrics
  methods  partition random / one-shot (IMP with T=1) / IMP, MoE-P, at κ=0.5, seeds 0-2, vader-movies
  scale    scale factors none / static / dynamic / both / unconstrained at κ=0.5, seeds 0-2, vader-movies
  full6    main on the full 6-layer MiniLM (model.preset=minilm), seeds 0-2, vader-movies

Cells are shared between studies (the κ=0.5 IMP cell of ``kappa`` is the one of ``main``). Runs go under ``--out``
(scratch: TensorBoard logs, resolved configs); each finished cell's summary is copied to ``--record`` (a tracked
folder, ``<tag>.json``) and appended to its ``cells.jsonl`` with wall time and the commit that ran it, so the grid
survives a fresh checkout. Resumable: a cell in the record is not re-run, a cell interrupted half way starts again. A
seed sets train.seed, partition.seed and data.seed (data order): the same seed gives every mode the same data order
and head initialisation, so differences are paired: ``--report`` prints mean ± std per variant and the paired
differences with 95 % t intervals.
Checkpoints are deleted after each cell (~0.4 GB each); summaries, TensorBoard logs and resolved configs stay.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field

from pad_moe.train.compare import REPO_ROOT, run_mode

CONFIG = os.path.join(REPO_ROOT, "configs", "minilm_vader.yaml")
RECORD = os.path.join(REPO_ROOT, "docs", "evidence", "epoch")
ONE_EPOCH = ["train.steps=0", "train.epochs=1", "data.max_train=null", "data.max_eval=null"]
MOVIES, REGRESSION, POOLED = "vader-movies", "vader-movies-reg", "vader-all"


@dataclass(frozen=True)
class Variant:
    """One model variant of a study: a name for the tables, the mode, and its config overrides."""

    name: str
    mode: str
    overrides: tuple[str, ...] = field(default=())


STATIC, MOE = Variant("static", "static"), Variant("moe", "moe")


def pad(kappa: float, tag: str = "", *overrides: str) -> Variant:
    return Variant(f"pad{tag}-k{kappa:g}", "pad", (f"partition.kappa={kappa}", *overrides))


PAD = pad(0.5)
STUDIES: dict[str, tuple[tuple[str, ...], tuple[int, ...], tuple[Variant, ...], tuple[str, ...]]] = {
    # name: (tasks, seeds, variants, extra overrides)
    "main": ((MOVIES, REGRESSION), (0, 1, 2, 3, 4), (STATIC, MOE, PAD), ()),
    "kappa": ((MOVIES,), (0, 1, 2), (pad(0.7), PAD, pad(0.3), pad(0.1)), ()),
    "domains": ((POOLED,), (0, 1, 2), (STATIC, MOE, PAD), ()),
    "methods": ((MOVIES,), (0, 1, 2), (pad(0.5, "-random", "partition.method=random"),
                                        pad(0.5, "-oneshot", "partition.iterations=1"), PAD,
                                        pad(0.5, "-moe_p", "partition.method=moe_p")), ()),
    "scale": ((MOVIES,), (0, 1, 2), tuple(pad(0.5, f"-scale_{m}", f"moe.scale_mode={m}")
                                          for m in ("none", "static", "dynamic", "both", "unconstrained")), ()),
    "full6": ((MOVIES,), (0, 1, 2), (STATIC, MOE, PAD), ("model.preset=minilm",)),
    # the paper's small-task regime (its largest gains are on RTE / STS-B): a fixed 2,490-sentence subset, 5 epochs
    "small5": ((MOVIES, REGRESSION), (0, 1, 2, 3, 4), (STATIC, MOE, PAD), ("data.max_train=2490", "train.epochs=5")),
}
PREFIXED = ("full6", "small5")
"""Studies whose cells are tagged with the study's name (they differ from the one-epoch cells of the same variant)."""
OWN_RECORD = {"small5": os.path.join(REPO_ROOT, "docs", "evidence", "small5")}
"""Studies recorded in a folder of their own (their cells must never mix with the one-epoch record)."""
PAIRS = (("pad-k0.5", "moe"), ("pad-k0.5", "static"), ("moe", "static"), ("pad-random-k0.5", "pad-k0.5"),
         ("pad-oneshot-k0.5", "pad-k0.5"), ("pad-moe_p-k0.5", "pad-k0.5"), ("pad-random-k0.5", "pad-oneshot-k0.5"))
TAG = re.compile(r"(?P<study>(?:full6|small5)-)?(?P<task>vader-[a-z]+(?:-reg)?)-(?P<variant>.+)-s(?P<seed>\d+)")


def cells(studies: list[str]):
    """(tag, task, variant, seed, extra overrides) of every cell of ``studies``, each cell once, seed-major so that
    an interrupted grid leaves complete seeds (every variant of a seed) behind."""
    seen = set()
    for study in studies:
        tasks, seeds, variants, extra = STUDIES[study]
        prefix = f"{study}-" if study in PREFIXED else ""
        for task in tasks:
            for seed in seeds:
                for variant in variants:
                    tag = f"{prefix}{task}-{variant.name}-s{seed}"
                    if tag not in seen:
                        seen.add(tag)
                        yield tag, task, variant, seed, extra


def run_cell(out: str, record: str, tag: str, task: str, variant: Variant, seed: int, extra, ranks: int,
             overrides: list[str]) -> dict:
    kept = os.path.join(record, f"{tag}.json")
    if os.path.exists(kept):
        with open(kept) as f:
            return json.load(f)
    shutil.rmtree(os.path.join(out, tag), ignore_errors=True)  # a cell killed half way starts again
    args = [*ONE_EPOCH, *extra, *variant.overrides, *overrides, f"output_dir={out}", f"data.task={task}",
            f"train.seed={seed}", f"partition.seed={seed}", f"data.seed={seed}"]
    t0 = time.time()
    summary = run_mode(CONFIG, variant.mode, tag, ranks, args)
    shutil.rmtree(os.path.join(out, tag, "checkpoints"), ignore_errors=True)
    os.makedirs(record, exist_ok=True)
    with open(kept + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(kept + ".tmp", kept)  # a half-written record would count as finished
    with open(os.path.join(record, "cells.jsonl"), "a") as f:
        f.write(json.dumps({"tag": tag, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
                            "command_s": round(time.time() - t0, 1), "train_s": round(summary["wall_time_s"], 1),
                            "args": args}) + "\n")
    return summary


def _commit() -> str:
    try:
        return subprocess.run(["git", "-C", REPO_ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# -- report -------------------------------------------------------------------------------------------------------
def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the two-sided Student-t confidence interval of the mean (n ≥ 2)."""
    from scipy import stats

    mean = statistics.mean(values)
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    return mean, mean - half, mean + half


def collect(record: str) -> dict[tuple[str, str], dict[int, dict]]:
    """{(study-prefixed task, variant): {seed: summary}} of every finished cell in ``record``."""
    found: dict[tuple[str, str], dict[int, dict]] = {}
    for name in sorted(os.listdir(record)) if os.path.isdir(record) else []:
        m = TAG.fullmatch(name.removesuffix(".json"))
        if m and name.endswith(".json"):
            with open(os.path.join(record, name)) as f:
                task = (m["study"] or "") + m["task"]
                found.setdefault((task, m["variant"]), {})[int(m["seed"])] = json.load(f)
    return found


def _metric(summary: dict, split: str | None = None) -> float:
    evals = summary["eval"]
    return evals[split or next(iter(evals))][summary["main_metric"]]


def _parameter_variance(runs: dict[int, dict]) -> str:
    """Mean over seeds and MoE layers of the final evaluation's dynamics/parameter_variance (how far the experts
    a token sees differ; 0 for a dense model)."""
    values = [v for r in runs.values() for k, v in (r.get("dynamics") or {}).items() if "parameter_variance" in k]
    return f"{statistics.mean(values):.2e}" if values else "–"


def _variant_order(name: str) -> tuple:
    base = {"static": 0, "moe": 1}.get(name)
    if base is not None:
        return (base, 0.0, "")
    kappa = float(name.rsplit("-k", 1)[1])
    return (2, -kappa, name)


def report(record: str) -> str:
    found = collect(record)
    lines = ["| task | variant | seeds | params (training) | params (stored) | dev metric mean ± std | per seed | "
             "parameter variance (Fig. 6) |", "|---|---|---|---|---|---|---|---|"]
    for task, variant in sorted(found, key=lambda k: (k[0], _variant_order(k[1]))):
        runs = found[task, variant]
        values = [_metric(runs[s]) for s in sorted(runs)]
        first = runs[min(runs)]
        std = statistics.stdev(values) if len(values) > 1 else float("nan")
        lines.append(f"| {task} | {variant} | {len(values)} | {first['params_training'] / 1e6:.2f}M | "
                     f"{first['params_compact'] / 1e6:.2f}M | {first['main_metric']} {statistics.mean(values):.4f} "
                     f"± {std:.4f} | {' '.join(f'{v:.4f}' for v in values)} | {_parameter_variance(runs)} |")
    lines += ["", "Paired differences (same seed: same data order and head initialisation), 95 % t interval:", "",
              "| task | difference | seeds | mean | 95 % CI | per seed |", "|---|---|---|---|---|---|"]
    for task in sorted({t for t, _ in found}):
        for a, b in PAIRS:
            if (task, a) not in found or (task, b) not in found:
                continue
            seeds = sorted(set(found[task, a]) & set(found[task, b]))
            diffs = [_metric(found[task, a][s]) - _metric(found[task, b][s]) for s in seeds]
            if len(diffs) < 2:
                continue
            mean, low, high = t_interval(diffs)
            lines.append(f"| {task} | {a} − {b} | {len(diffs)} | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] | "
                         f"{' '.join(f'{d:+.4f}' for d in diffs)} |")
    domain_lines = _domain_table(found)
    return "\n".join(lines + domain_lines)


def _domain_table(found) -> list[str]:
    rows = [(t, v) for t, v in found if t == POOLED]
    if not rows:
        return []
    splits = [s for s in next(iter(found[rows[0]].values()))["eval"] if s != "validation"]
    lines = ["", f"Per-domain dev metric on {POOLED} (mean over seeds):", "",
             "| variant | seeds | " + " | ".join(splits) + " |", "|---|---|" + "---|" * len(splits)]
    for _, variant in sorted(rows, key=lambda k: _variant_order(k[1])):
        runs = found[POOLED, variant]
        means = [statistics.mean(_metric(r, s) for r in runs.values()) for s in splits]
        lines.append(f"| {variant} | {len(runs)} | " + " | ".join(f"{m:.4f}" for m in means) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/minilm_vader.yaml (for every cell)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "evidence-epoch"), help="scratch run folders")
    p.add_argument("--record", default=None, help="tracked folder of finished cells (<tag>.json, cells.jsonl); "
                   f"default {os.path.relpath(RECORD, REPO_ROOT)}, or the study's own folder (small5)")
    p.add_argument("--study", action="append", choices=list(STUDIES), help="repeatable; default: main")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--report", action="store_true", help="only tabulate the finished cells under --out")
    args = p.parse_args(argv)
    studies = args.study or ["main"]
    own = {OWN_RECORD.get(study, RECORD) for study in studies}
    if len(own) > 1:
        p.error(f"--study {' '.join(studies)}: {', '.join(s for s in studies if s in OWN_RECORD)} is recorded in a "
                "folder of its own; run it in a separate invocation")
    args.record = args.record or own.pop()
    if args.report:
        print(report(args.record))
        return 0
    os.makedirs(args.out, exist_ok=True)
    for tag, task, variant, seed, extra in cells(studies):
        run_cell(args.out, args.record, tag, task, variant, seed, extra, args.ranks, args.overrides)
        with open(os.path.join(args.out, "evidence.md"), "w") as f:
            f.write(report(args.record) + "\n")
    print(report(args.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
