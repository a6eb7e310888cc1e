"""Train one config in several modes (static / moe / pad) under the deepspeed launcher and print a comparison table.

    python -m pad_moe.train.compare CONFIG [--modes static moe pad] [--ranks 2] [key=value ...]

Each mode is a separate run ``RUN_DIR = output_dir/<name>-<mode>`` (TensorBoard logs, PNG dashboards in plots/), so the
runs are exactly what ``padmoe train`` produces; the table reads their summary.json files.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from pad_moe.config import load_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def run_mode(config: str, mode: str, name: str, ranks: int, overrides: list[str]) -> dict:
    """Launch one training run; return its summary (raises with the run's last output when it fails)."""
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(ranks), "--module", "pad_moe.cli", "train", config, *overrides,
           f"moe.mode={mode}", f"name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    print(f"[compare] {mode}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-25:])
        raise SystemExit(f"[compare] {mode} failed (exit {proc.returncode}):\n{tail}")
    cfg = load_config(config, [*overrides, f"moe.mode={mode}", f"name={name}"])
    with open(os.path.join(cfg.run_dir, "summary.json")) as f:
        summary = json.load(f)
    summary["run_dir"] = cfg.run_dir
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "plot_run.py"), cfg.run_dir],
                   stdout=subprocess.DEVNULL, cwd=REPO_ROOT, check=False)
    return summary


def table(summaries: list[dict]) -> str:
    rows = [("mode", "params (training)", "params (compact)", "dev metric", "wall time", "run dir")]
    for s in summaries:
        split, metrics = next(iter(s["eval"].items()))
        metric = f"{s['main_metric']}={metrics[s['main_metric']]:.4f}"
        rows.append((s["mode"], _fmt_params(s["params_training"]), _fmt_params(s["params_compact"]), metric,
                     f"{s['wall_time_s']:.0f}s", s["run_dir"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--modes", nargs="+", default=["static", "moe", "pad"], choices=["static", "moe", "pad"])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--name", default=None, help="run name prefix (default: the config's name + a time stamp)")
    args = p.parse_args(argv)
    try:
        base = load_config(args.config, args.overrides)
    except ValueError as err:
        print(f"compare: error: {err}", file=sys.stderr)
        return 2
    prefix = args.name or f"{base.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    summaries = [run_mode(args.config, mode, f"{prefix}-{mode}", args.ranks, args.overrides) for mode in args.modes]
    print()
    print(table(summaries))
    out = os.path.join(base.output_dir, f"{prefix}-comparison.json")
    with open(out, "w") as f:
        json.dump(summaries, f, indent=1)
    print(f"\n(summaries: {out}; TensorBoard: tensorboard --logdir {base.output_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
