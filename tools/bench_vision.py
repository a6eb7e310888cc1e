#!/usr/bin/env python
"""Train-step throughput (samples/s) of a vision model with static / DY-Conv / PAD / CondConv convolutions.

One process; every configuration runs ``--warmup`` untimed steps and then ``--steps`` timed SGD steps (forward, cross
entropy, backward, momentum update) on a fixed random batch, and the configurations are interleaved over ``--rounds``
so that a busy machine slows them alike. Reports samples/s from the best and the median step, by wall clock and by
this process's CPU time (the steadier measure on a shared CPU machine; use --threads 1 there).

    python tools/bench_vision.py --model resnet18 --image-size 32 --batch 64 \
        --convs static,dyconv,pad:0.1,pad:0.3,pad:0.5,condconv --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from pad_moe.vision.models import create_model


def parse_conv(spec: str) -> tuple[str, float | None, str]:
    """'pad:0.3@grouped' -> ('pad', 0.3, 'grouped'); 'dyconv' -> ('dyconv', None, default impl)."""
    impl = None
    if "@" in spec:
        spec, impl = spec.split("@", 1)
    conv, _, kappa = spec.partition(":")
    return conv, (float(kappa) if kappa else None), impl


def build(args, spec: str, device: torch.device):
    conv, kappa, impl = parse_conv(spec)
    torch.manual_seed(0)
    model = create_model(args.model, conv, kappa=kappa, num_classes=args.num_classes, in_chans=args.in_chans,
                         image_size=args.image_size, impl=impl or args.impl, temperature=1.0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def train_step(model, optimizer, x, y) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def timed_steps(model, optimizer, x, y, steps: int, device: torch.device) -> list[tuple[float, float]]:
    """(wall seconds, this process's CPU seconds) per step. On a shared CPU machine the CPU time is the steadier
    measure of the work (it excludes time spent waiting for a core); on a GPU only the wall time means anything."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        train_step(model, optimizer, x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--convs", default="static,dyconv,pad:0.1,pad:0.2,pad:0.3,pad:0.4,pad:0.5,condconv",
                   help="comma-separated conv[:kappa][@impl] specs")
    p.add_argument("--impl", default="auto", help="default kernel path: auto | grouped | mix | bmm")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.in_chans, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    specs = [s.strip() for s in args.convs.split(",") if s.strip()]
    times: dict[str, list[tuple[float, float]]] = {s: [] for s in specs}
    for round_index in range(args.rounds):
        for spec in specs:
            model, optimizer = build(args, spec, device)
            model.train()
            timed_steps(model, optimizer, x, y, args.warmup, device)
            new = timed_steps(model, optimizer, x, y, args.steps, device)
            times[spec] += new
            del model, optimizer
            print(f"round {round_index + 1}/{args.rounds} {spec:>16s}: best step {min(w for w, _ in new):.2f} s wall, "
                  f"{min(c for _, c in new):.2f} s CPU", file=sys.stderr, flush=True)
    results = []
    for spec in specs:
        wall, cpu = [w for w, _ in times[spec]], [c for _, c in times[spec]]
        results.append({"conv": spec, "samples_per_s_best": args.batch / min(wall),
                        "samples_per_s_median": args.batch / statistics.median(wall),
                        "samples_per_cpu_s_best": args.batch / min(cpu),
                        "samples_per_cpu_s_median": args.batch / statistics.median(cpu),
                        "steps_timed": len(wall)})
    key = "samples_per_cpu_s_best" if device.type == "cpu" else "samples_per_s_best"
    for row in results:
        row["ratio_to_first"] = row[key] / results[0][key]
    print(f"{'conv':>16s} {'wall best':>10s} {'wall med':>9s} {'CPU best':>9s} {'CPU med':>8s} {'ratio':>6s}   "
          f"(samples/s; ratio of {key})")
    for r in results:
        print(f"{r['conv']:>16s} {r['samples_per_s_best']:10.2f} {r['samples_per_s_median']:9.2f} "
              f"{r['samples_per_cpu_s_best']:9.2f} {r['samples_per_cpu_s_median']:8.2f} {r['ratio_to_first']:6.2f}")
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                    load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
        with open(args.json, "w") as f:
            json.dump({"settings": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
