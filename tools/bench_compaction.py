#!/usr/bin/env python
"""Does κ buy training savings for an upcycled model? Step time and memory of the main job's model (configs/
minilm_vader.yaml: MiniLM-2L upcycled to 8 experts top-2, 2 CPU ranks, ep 2, ZeRO-2, dropless) after the warm-up
partition, per variant, all in one invocation (a real ``padmoe train`` under the launcher each):

  moe            fully dynamic MoE
  pad-element    PAD κ (the main job: element masks, trains at MoE size plus the static copy)
  pad-neuron     PAD κ, neuron masks, not compacted
  pad-compact    PAD κ, neuron masks, compacted in place after the warm-up partition (engine rebuilt)

    python tools/bench_compaction.py [--steps 40] [--kappa 0.5] [--out runs/bench-compaction] [key=value ...]

Step time: the median of this rank's forward+backward+optimizer step (summary ``step_seconds``) over the steps after
the partition; the ratio is against ``moe`` measured in the same invocation. Memory: rank 0's model-state bytes at the
end (parameters, fp32 master partitions, optimizer state, gradient partitions) and resident memory at the end and at
its peak (the peak of a compacted run is its warm-up phase at full size). Keep the machine otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from pad_moe.train.compare import REPO_ROOT, run_mode

CONFIG = os.path.join(REPO_ROOT, "configs", "minilm_vader.yaml")
VARIANTS = {
    "moe": ("moe", []),
    "pad-element": ("pad", []),
    "pad-neuron": ("pad", ["moe.granularity=neuron"]),
    "pad-compact": ("pad", ["moe.granularity=neuron", "moe.compact=true"]),
}


def post_partition_median(summary: dict, warmup: int) -> float:
    steps = summary["step_seconds"][warmup + 1:]  # the partition step itself also pays IMP / the rebuild
    return statistics.median(steps)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kappa", type=float, default=0.5)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "bench-compaction"))
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = p.parse_args(argv)
    if args.steps <= args.warmup + 2:
        raise SystemExit(f"--steps={args.steps} must exceed --warmup={args.warmup} by at least 3")
    taken = [n for n in args.variants if os.path.exists(os.path.join(args.out, f"bench-{n}"))]
    if taken:
        raise SystemExit(f"--out={args.out} already holds runs of {', '.join(taken)}; pass a new --out")
    common = [f"train.steps={args.steps}", f"partition.warmup_steps={args.warmup}", f"partition.kappa={args.kappa}",
              "data.max_eval=64", "train.eval_every=0", f"output_dir={args.out}", *args.overrides]
    rows = {}
    for name in args.variants:
        mode, extra = VARIANTS[name]
        summary = run_mode(CONFIG, mode, f"bench-{name}", 2, [*common, *extra])
        rows[name] = {"step_s": post_partition_median(summary, args.warmup), **summary["memory"],
                      "params_training": summary["params_training"], "params_compact": summary["params_compact"]}
    base = rows.get("moe")
    print(f"\nκ={args.kappa}, {args.steps} steps, warm-up {args.warmup}; step = median after the partition\n")
    print("| variant | params training | params stored | step (s) | × MoE step | model state / rank (MB) | "
          "× MoE | RSS end (MB) | RSS peak (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "-"
        mem = f"{r['state_bytes'] / base['state_bytes']:.2f}" if base else "-"
        print(f"| {name} | {r['params_training'] / 1e6:.2f}M | {r['params_compact'] / 1e6:.2f}M | {r['step_s']:.3f} | "
              f"{ratio} | {r['state_bytes'] / 2**20:.0f} | {mem} | {r['rss_bytes'] / 2**20:.0f} | "
              f"{r['rss_peak_bytes'] / 2**20:.0f} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "bench_compaction.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
