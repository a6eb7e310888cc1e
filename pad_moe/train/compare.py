"""Train one config in several modes (static / moe / pad) under the deepspeed launcher and print a comparison table.

    python -m pad_moe.train.compare CONFIG [--modes static moe pad] [--ranks 2] [key=value ...]

Each mode is a separate run ``RUN_DIR = output_dir/<name>-<mode>`` (TensorBoard logs, PNG dashboards in plots/), so the
runs are exactly what ``padmoe train`` produces; the table reads their summary.json files and
``output_dir/<name>-comparison.png`` shows the dev metric and the stored parameters per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
    from pad_moe.distributed import free_port

    # a free rendezvous port: DeepSpeed's default (29500) is taken by any other job on the machine
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "pad_moe.cli", "train",
           config, *overrides,
           f"moe.mode={mode}", f"name={name}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    print(f"[compare] {mode}: {' '.join(cmd[1:])}", flush=True)
    proc = subprocess.Popen(cmd, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    tail = follow_progress(proc.stdout, name)
    if proc.wait() != 0:
        raise SystemExit(f"[compare] {mode} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    cfg = load_config(config, [*overrides, f"moe.mode={mode}", f"name={name}"])
    with open(os.path.join(cfg.run_dir, "summary.json")) as f:
        summary = json.load(f)
    summary["run_dir"] = cfg.run_dir
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "tools", "plot_run.py"), cfg.run_dir],
                   stdout=subprocess.DEVNULL, cwd=REPO_ROOT, check=False)
    return summary


_BAR = re.compile(r"(\d+)/(\d+) \[([0-9:]+)<([0-9:?]+)[^\]]*?(?:loss=([0-9.naif]+))?\]")


def follow_progress(stream, label: str, out=None, keep: int = 25) -> list[str]:
    """Show the run's progress bar as one live line on ``out`` (default stderr; on a terminal it is rewritten in
    place, otherwise printed at every 10 % of the steps) and return the last ``keep`` lines of its output for an
    error message. The run's own output is otherwise kept off the screen (the final table is the report)."""
    out = out or sys.stderr
    live = out.isatty()
    tail: list[str] = []
    shown, pending = -1, ""
    while True:
        chunk = stream.read(256)
        if not chunk:
            break
        pending += chunk
        *parts, pending = re.split(r"[\r\n]", pending)
        for part in parts:
            if not part.strip():
                continue
            tail = (tail + [part])[-keep:]
            m = _BAR.search(part)
            if m is None:
                continue
            step, total, elapsed, eta, loss = m.groups()
            decile = int(step) * 10 // max(int(total), 1)
            if not live and decile == shown:
                continue
            shown = decile
            line = f"[compare] {label}: step {step}/{total}" + (f" loss {loss}" if loss else "") + \
                f" elapsed {elapsed} ETA {eta}"
            print(f"\r{line:<78}" if live else line, end="" if live else "\n", file=out, flush=True)
    if live and shown >= 0:
        print(file=out, flush=True)
    return tail


EVIDENCE = "docs/results.md (tools/evidence_main_job.py: 5 seeds, paired differences with 95 % CIs)"
"""Where the many-seed answer to "does PAD beat MoE and static?" is; one comparison run is a single seed."""


def dev_metric(summary: dict) -> tuple[str, float]:
    """(metric name, value) on the first evaluation split, the one the tables compare."""
    metrics = next(iter(summary["eval"].values()))
    return summary["main_metric"], metrics[summary["main_metric"]]


def plot_comparison(summaries: list[dict], path: str) -> str:
    """One PNG: the dev metric per mode (left) and parameters per mode, stored (compact) and while training (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [s["mode"] for s in summaries]
    metric = dev_metric(summaries[0])[0]
    values = [dev_metric(s)[1] for s in summaries]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(modes, values, color=["#7f7f7f", "#1f77b4", "#d62728"][: len(modes)])
    left.bar_label(bars, fmt="%.4f")
    low = min(values)
    left.set_ylim(max(0.0, low - 0.1), min(1.0, max(values) + 0.05) if max(values) <= 1 else max(values) * 1.05)
    left.set_title(f"dev {metric} (seed {summaries[0].get('seed', '?')})")
    x = range(len(modes))
    stored = [s["params_compact"] / 1e6 for s in summaries]
    training = [s["params_training"] / 1e6 for s in summaries]
    right.bar([i - 0.2 for i in x], training, width=0.4, label="while training", color="#c7c7c7")
    bars = right.bar([i + 0.2 for i in x], stored, width=0.4, label="stored (compact)", color="#2ca02c")
    right.bar_label(bars, fmt="%.1fM")
    right.set_xticks(list(x), modes)
    right.set_ylabel("parameters (M)")
    right.set_title("parameters")
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def table(summaries: list[dict]) -> str:
    rows = [("mode", "params (training)", "params (compact)", "dev metric", "wall time", "run dir")]
    for s in summaries:
        name, value = dev_metric(s)
        metric = f"{name}={value:.4f}"
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
    png = plot_comparison(summaries, os.path.join(base.output_dir, f"{prefix}-comparison.png"))
    print(f"\n1 seed (train.seed={base.train.seed}) per mode: one run is not evidence; the answer over seeds is in "
          f"{EVIDENCE}.")
    print(f"(summaries: {out}; plot: {png}; TensorBoard: tensorboard --logdir {base.output_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
