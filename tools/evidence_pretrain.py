#!/usr/bin/env python
"""PAD where MoE matters (issue 24): language-model pre-training from scratch at equal active compute, each cell a
real ``padmoe train`` under the deepspeed launcher (configs/lm_pretrain.yaml: Mixtral-style, 4 layers, H=128, 8
experts of F=256 top-2, 500 steps of 16 × 128 tokens on WordNet glosses + VADER, held-out split never trained on).

    python tools/evidence_pretrain.py [--variant NAME ...] [--seeds 0 1 2] [--ranks 1] [--out runs/evidence-pretrain] \
        [--record docs/evidence/pretrain] [key=value ...]
    python tools/evidence_pretrain.py --report [--record docs/evidence/pretrain] [--png-dir docs/evidence/pretrain]

Variants (priority order; the default runs them all, seed-major so an interrupted grid leaves complete seeds):
  dense       Llama with the MoE's active FFN width (k × expert width = 512): same tokens, same schedule
  moe         the Mixtral MoE (dropless, its router's load-balancing loss)
  pad-w125    PAD κ=0.5 element: fully dynamic for 125 steps, then IMP, then trained on
  pad-w250    the same with a 250-step warm-up
  pad-neuron  PAD κ=0.5 neuron granularity, 250-step warm-up (compacted at export; the HF-MoE path trains it
              uncompacted, so its training step is not cheaper: see docs/results.md)
  dense-half  upcycling's first stage: Llama with the expert width (F=256), the first 250 steps' tokens
  up-moe      its folder upcycled (padmoe upcycle: 8 copies of each MLP, a router seeded by the cell's seed) to the
              Mixtral shape of the moe cells, trained on the other 250 steps' tokens (train.data_offset_steps=250)
  up-pad      the same upcycled model as PAD κ=0.5 element, partitioned 125 steps into the second stage

The staged cells see exactly the tokens of the one-stage cells of the same seed (same data.seed, the second stage
offset by 250 steps); each stage has its own warm-up and decay of the learning rate (the staged recipe).

A seed sets train.seed (initialisation, router), data.seed (data order) and partition.seed, so differences at one
seed are paired. Each finished cell's summary goes to ``--record/<tag>.json`` and ``cells.jsonl`` (commit, wall time);
a recorded cell is never re-run, one cut off half way starts again. The moe cells keep their trained HF folder
(``--out/<tag>/hf_model``), which tools/evidence_compress.py compresses; checkpoints are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from evidence_main_job import _commit, t_interval  # noqa: E402

from pad_moe.train.compare import REPO_ROOT, run_mode  # noqa: E402

CONFIG = os.path.join(REPO_ROOT, "configs", "lm_pretrain.yaml")
RECORD = os.path.join(REPO_ROOT, "docs", "evidence", "pretrain")
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "dense": ("static", ("model.family=llama", "model.ffn_size=512")),
    "moe": ("moe", ()),
    "pad-w125": ("pad", ("partition.warmup_steps=125",)),
    "pad-w250": ("pad", ("partition.warmup_steps=250",)),
    "pad-neuron": ("pad", ("partition.warmup_steps=250", "moe.granularity=neuron")),
    "dense-half": ("static", ("model.family=llama", "model.ffn_size=256", "train.steps=250")),
    "up-moe": ("moe", ("train.steps=250", "train.data_offset_steps=250")),
    "up-pad": ("pad", ("train.steps=250", "train.data_offset_steps=250", "partition.warmup_steps=125")),
}
STAGED = ("up-moe", "up-pad")
"""Variants trained from the dense-half cell of their seed, upcycled."""
FROM_FOLDER = ("model.family=null", "model.hidden_size=null", "model.ffn_size=null", "model.num_layers=null",
               "model.num_heads=null", "model.vocab_size=null", "model.max_seq_len=null")
KEEP_MODEL = ("moe", "up-moe", "dense-half")
"""Variants whose trained HF folder is kept (``--out/<tag>/hf_model``): compress evidence and the second stage."""
PAIRS = (("moe", "dense"), ("pad-w125", "moe"), ("pad-w250", "moe"), ("pad-neuron", "moe"), ("pad-w250", "dense"),
         ("up-moe", "moe"), ("up-moe", "dense"), ("up-pad", "up-moe"), ("up-pad", "moe"))


def cells(variants, seeds):
    for seed in seeds:
        for name in variants:
            yield f"{name}-s{seed}", name, seed


def upcycled_source(out: str, record: str, seed: int, ranks: int, overrides: list[str], rebuild: bool) -> str:
    """The Mixtral folder of seed ``seed``'s second stage: dense-half-s<seed>'s model, upcycled (once)."""
    folder = os.path.join(out, f"upcycled-s{seed}")
    if os.path.isdir(folder):
        return folder
    dense = os.path.join(out, f"dense-half-s{seed}", "hf_model")
    if not os.path.isdir(dense):
        run_cell(out, record, f"dense-half-s{seed}", "dense-half", seed, ranks, overrides, rebuild=True)
    subprocess.run([sys.executable, "-m", "pad_moe.cli", "upcycle", dense, "--out", folder, "--experts", "8", "--k",
                    "2", "--seed", str(seed)], check=True, cwd=REPO_ROOT)
    return folder


def run_cell(out: str, record: str, tag: str, name: str, seed: int, ranks: int, overrides: list[str],
             rebuild: bool = False) -> dict:
    """One cell: its recorded summary, or a run of it. ``rebuild``: a recorded cell whose kept folder is gone (a new
    checkout) runs again for the folder; its held-out metrics must equal the record's (the record is kept)."""
    kept = os.path.join(record, f"{tag}.json")
    recorded = None
    if os.path.exists(kept):
        with open(kept) as f:
            recorded = json.load(f)
        if not (rebuild and name in KEEP_MODEL and not os.path.isdir(os.path.join(out, tag, "hf_model"))):
            return recorded
    shutil.rmtree(os.path.join(out, tag), ignore_errors=True)  # a cell cut off half way starts again
    mode, extra = VARIANTS[name]
    source = [f"model.path={upcycled_source(out, record, seed, ranks, overrides, rebuild)}", *FROM_FOLDER] \
        if name in STAGED else []
    args = [*extra, *source, *overrides, f"output_dir={out}", f"train.seed={seed}", f"data.seed={seed}",
            f"partition.seed={seed}"]
    t0 = time.time()
    summary = run_mode(CONFIG, mode, tag, ranks, args)
    if recorded is not None:  # a rebuild: same commit-independent recipe, so the same numbers
        then, now = heldout(recorded), heldout(summary)
        line = {"tag": tag, "rebuilt": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
                "command_s": round(time.time() - t0, 1), "perplexity_recorded": then, "perplexity_rebuilt": now,
                "relative_difference": abs(now - then) / then}
        with open(os.path.join(record, "rebuilds.jsonl"), "a") as f:
            f.write(json.dumps(line) + "\n")
        print(f"[evidence] rebuilt {tag}: held-out perplexity {now:.4f} (recorded {then:.4f})", flush=True)
        shutil.rmtree(os.path.join(out, tag, "checkpoints"), ignore_errors=True)
        return recorded
    shutil.rmtree(os.path.join(out, tag, "checkpoints"), ignore_errors=True)
    partition_file = os.path.join(out, tag, "partition", "record.json")
    if os.path.isfile(partition_file):
        with open(partition_file) as f:
            summary["partition"] = json.load(f)
    os.makedirs(record, exist_ok=True)
    with open(kept + ".tmp", "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(kept + ".tmp", kept)  # a half-written record would count as finished
    with open(os.path.join(record, "cells.jsonl"), "a") as f:
        f.write(json.dumps({"tag": tag, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": _commit(),
                            "command_s": round(time.time() - t0, 1), "train_s": round(summary["wall_time_s"], 1),
                            "ranks": ranks, "args": args}) + "\n")
    return summary


# -- report -------------------------------------------------------------------------------------------------------
def collect(record: str) -> dict[str, dict[int, dict]]:
    found: dict[str, dict[int, dict]] = {}
    for file in sorted(os.listdir(record)) if os.path.isdir(record) else []:
        stem = file.removesuffix(".json")
        name, _, seed = stem.rpartition("-s")
        if file.endswith(".json") and name in VARIANTS and seed.isdigit():
            with open(os.path.join(record, file)) as f:
                found.setdefault(name, {})[int(seed)] = json.load(f)
    return found


def heldout(summary: dict, metric: str = "perplexity") -> float:
    return summary["eval"]["heldout"][metric]


def median_step(summary: dict) -> float:
    steps = summary.get("step_seconds") or [float("nan")]
    return statistics.median(steps)


def divergence(summary: dict) -> float | None:
    per_layer = (summary.get("partition") or {}).get("expert_divergence") or {}
    return statistics.mean(per_layer.values()) if per_layer else None


def report(record: str) -> str:
    found = collect(record)
    lines = ["| variant | seeds | params (training) | params (stored) | held-out perplexity mean ± std | next-token "
             "accuracy | median step (s) | model state (MiB) | expert divergence at partition | per seed (ppl) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in (v for v in VARIANTS if v in found):
        runs = [found[name][s] for s in sorted(found[name])]
        ppl = [heldout(r) for r in runs]
        std = f"{statistics.stdev(ppl):.2f}" if len(ppl) > 1 else "–"
        div = [d for d in (divergence(r) for r in runs) if d is not None]
        lines.append(f"| {name} | {len(runs)} | {runs[0]['params_training'] / 1e6:.2f}M | "
                     f"{runs[0]['params_compact'] / 1e6:.2f}M | {statistics.mean(ppl):.2f} ± {std} | "
                     f"{statistics.mean(heldout(r, 'token_accuracy') for r in runs):.4f} | "
                     f"{statistics.mean(median_step(r) for r in runs):.3f} | "
                     f"{runs[0]['memory']['state_bytes'] / 2**20:.1f} | "
                     f"{f'{statistics.mean(div):.3f}' if div else '–'} | {' '.join(f'{p:.2f}' for p in ppl)} |")
    lines += ["", "Paired differences of held-out perplexity (same seed: same data order), 95 % t interval "
              "(negative: the first is better):", "",
              "| difference | seeds | mean | 95 % CI | per seed |", "|---|---|---|---|---|"]
    for a, b in PAIRS:
        if a not in found or b not in found:
            continue
        seeds = sorted(set(found[a]) & set(found[b]))
        diffs = [heldout(found[a][s]) - heldout(found[b][s]) for s in seeds]
        if len(diffs) < 2:
            if diffs:
                lines.append(f"| {a} − {b} | 1 | {diffs[0]:+.2f} | (one seed) | |")
            continue
        mean, low, high = t_interval(diffs)
        lines.append(f"| {a} − {b} | {len(diffs)} | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] | "
                     f"{' '.join(f'{d:+.2f}' for d in diffs)} |")
    return "\n".join(lines)


def plot(record: str, folder: str) -> list[str]:
    """Two PNGs: held-out perplexity vs stored parameters and vs training wall time (one point per cell), and the
    training loss curves per variant (mean over seeds, 25-step running mean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = collect(record)
    if not found:
        return []
    os.makedirs(folder, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, runs in found.items():
        xs = [r["params_compact"] / 1e6 for r in runs.values()]
        # an upcycled cell's cost includes its first stage: the dense-half run of its seed
        first = found.get("dense-half", {}) if name in STAGED else {}
        ts = [(r["wall_time_s"] + first.get(seed, {}).get("wall_time_s", 0)) / 60 for seed, r in runs.items()]
        ys = [heldout(r) for r in runs.values()]
        axes[0].scatter(xs, ys, label=name)
        axes[1].scatter(ts, ys, label=name)
    axes[0].set(xlabel="stored parameters (M)", ylabel="held-out perplexity", title="frontier: size")
    axes[1].set(xlabel="training wall time (min; up-*: both stages)", ylabel="held-out perplexity",
                title="frontier: time (dense/moe/pad-w* on a shared CPU)")
    axes[0].legend()
    fig.tight_layout()
    paths = [os.path.join(folder, "pretrain-frontier.png")]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, runs in found.items():
        curves = [r["losses"] for r in runs.values()]
        n = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(n)]
        smooth = [statistics.mean(mean[max(0, i - 24):i + 1]) for i in range(n)]
        ax.plot(range(1, n + 1), smooth, label=f"{name} ({len(curves)} seeds)")
    ax.set(xlabel="step", ylabel="training loss (25-step mean)", title="pre-training loss per variant")
    ax.legend()
    fig.tight_layout()
    paths.append(os.path.join(folder, "pretrain-loss.png"))
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/lm_pretrain.yaml (every cell)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "evidence-pretrain"), help="scratch run folders")
    p.add_argument("--record", default=RECORD, help="tracked folder of finished cells (<tag>.json, cells.jsonl)")
    p.add_argument("--variant", action="append", choices=list(VARIANTS), help="repeatable; default: all")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ranks", type=int, default=1)
    p.add_argument("--rebuild-models", action="store_true",
                   help="run recorded moe / dense-half / up-moe cells again whose HF folder is gone (a new checkout)")
    p.add_argument("--report", action="store_true", help="only tabulate (and plot) the recorded cells")
    p.add_argument("--png-dir", default=None, help="with --report: write the PNGs here")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.record))
        if args.png_dir:
            print("\n".join(plot(args.record, args.png_dir)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    for tag, name, seed in cells(args.variant or list(VARIANTS), args.seeds):
        run_cell(args.out, args.record, tag, name, seed, args.ranks, args.overrides, args.rebuild_models)
        with open(os.path.join(args.out, "evidence.md"), "w") as f:
            f.write(report(args.record) + "\n")
    print(report(args.record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
