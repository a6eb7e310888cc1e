"""Render PNG dashboards of a pad_moe run from its TensorBoard event files.

    python tools/plot_run.py RUN_DIR [--out DIR]

Writes DIR (default RUN_DIR/plots)/losses.png (train/task/aux loss, lr, eval metrics), expert_load.png (heat map:
layer x expert share of tokens, averaged over the run), pad.png (λs, λd and dynamic ratio per PAD layer) and
dynamics.png (paper Fig. 6: parameter and output variance across tokens per MoE layer, at each evaluation).
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import sys
from collections import defaultdict


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(run_dir, "tensorboard", "**", "events.out.tfevents.*"), recursive=True)
    if not files:
        raise SystemExit(f"plot_run: no TensorBoard event files under {run_dir}/tensorboard; is it a pad_moe run dir?")
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series[tag] += [(e.step, e.value) for e in acc.Scalars(tag)]
    return {k: sorted(v) for k, v in series.items()}


def _plot_lines(ax, series, tags, title):
    for tag in tags:
        steps, values = zip(*series[tag])
        ax.plot(steps, values, label=tag.split("/", 1)[-1], marker="." if len(steps) < 30 else None)
    ax.set_title(title)
    ax.set_xlabel("step")
    if tags:
        ax.legend(fontsize=7)


def _panels(series, prefix: str, keys: tuple[str, ...], path: str) -> str | None:
    """One panel per key, one line per layer (tags ``prefix/key/layer``); None when the run has no such tags."""
    import matplotlib.pyplot as plt

    tags = sorted(t for t in series if t.startswith(f"{prefix}/"))
    if not tags:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    for ax, key in zip(axes, keys):
        _plot_lines(ax, series, [t for t in tags if t.startswith(f"{prefix}/{key}/")], key)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(run_dir: str, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    series = read_scalars(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    written = []

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    _plot_lines(axes[0], series, [t for t in ("train/loss", "train/task_loss", "train/aux_loss") if t in series],
                "loss")
    _plot_lines(axes[1], series, [t for t in ("train/lr",) if t in series], "learning rate")
    _plot_lines(axes[2], series, sorted(t for t in series if t.startswith("eval/")), "eval")
    fig.tight_layout()
    written.append(os.path.join(out_dir, "losses.png"))
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    load = defaultdict(dict)
    for tag, values in series.items():
        m = re.fullmatch(r"expert_load/layer(\d+)/e(\d+)", tag)
        if m:
            load[int(m.group(1))][int(m.group(2))] = float(np.mean([v for _, v in values]))
    if load:
        layers, experts = max(load) + 1, max(max(d) for d in load.values()) + 1
        grid = np.full((layers, experts), np.nan)
        for layer, row in load.items():
            for e, v in row.items():
                grid[layer, e] = v
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * experts, 1.2 + 0.45 * layers))
        im = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(experts))
        ax.set_yticks(range(layers))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_title("share of routed tokens (run mean)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        written.append(os.path.join(out_dir, "expert_load.png"))
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)

    for prefix, keys, name in (("pad", ("lambda_s", "lambda_d", "dynamic_ratio"), "pad.png"),
                               ("dynamics", ("parameter_variance", "output_variance"), "dynamics.png")):
        path = _panels(series, prefix, keys, os.path.join(out_dir, name))
        if path:
            written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    args = p.parse_args(argv)
    if not os.path.isdir(args.run_dir):
        print(f"plot_run: {args.run_dir} is not a directory; pass a run directory such as runs/debug", file=sys.stderr)
        return 2
    for path in plot(args.run_dir, args.out or os.path.join(args.run_dir, "plots")):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
