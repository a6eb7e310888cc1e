#!/usr/bin/env python
"""Training-step and inference throughput (samples/s) of vision models with static / DY-Conv / PAD / CondConv
convolutions, as ratios to the static model, with each model's multiply-adds as a fraction of the static model's.

One process; for every model, every configuration runs ``--warmup`` untimed and then ``--steps`` timed SGD steps
(forward, cross entropy, backward, momentum update) on a fixed random batch, then as many timed inference forwards
(eval mode, no_grad); configurations are interleaved over ``--rounds`` so that a busy machine slows them alike. Reports
samples/s from the best and the median step, by wall clock and by this process's CPU time (the steadier measure on a
shared CPU machine; use --threads 1 there; on a GPU only wall time means anything). The static model is always
measured: it is the baseline of every ratio.

    python tools/bench_vision.py --models resnet18,mobilenetv2_100 --image-size 32 --batch 64 \\
        --convs static,dyconv,pad:0.1,pad:0.5,condconv --json bench.json

A spec is conv[:kappa][@impl]; impl (auto | reference | grouped | mix | bmm | chunked | tiled) forces one kernel path,
e.g. dyconv@reference for the reference rule next to the default auto. --check compares, once per model and spec
before timing, the logits and every gradient with impl=reference (fp32, TF32 off, BatchNorm in eval mode) and exits 1
when a relative error (max |Δ| / max |reference| per tensor, the latter at least 1e-6 of the largest gradient) exceeds
--check-tolerance. The layers themselves agree to
1e-5 (tests/test_vision_fast_conv.py); a whole model's small gradients are sums with cancellation.
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

from pad_moe.vision.accounting import count
from pad_moe.vision.kernels import IMPLS
from pad_moe.vision.models import CONV_TYPES, MODELS, check_conv, create_model


def parse_conv(spec: str) -> tuple[str, float | None, str | None]:
    """'pad:0.3@tiled' -> ('pad', 0.3, 'tiled'); 'dyconv' -> ('dyconv', None, None). ValueError on a bad spec."""
    impl = None
    if "@" in spec:
        spec, impl = spec.split("@", 1)
        if impl not in IMPLS:
            raise ValueError(f"impl {impl!r} in a --convs spec is unknown; choose one of {', '.join(IMPLS)}")
    conv, _, kappa = spec.partition(":")
    if conv not in CONV_TYPES:
        raise ValueError(f"conv {conv!r} in a --convs spec is unknown; choose one of {', '.join(CONV_TYPES)}")
    try:
        value = float(kappa) if kappa else None
    except ValueError:
        raise ValueError(f"kappa {kappa!r} in the --convs spec {spec!r} is not a number") from None
    check_conv(conv, value)
    return conv, value, impl


def build(args, name: str, spec: str, device: torch.device, impl: str | None = None):
    conv, kappa, spec_impl = parse_conv(spec)
    torch.manual_seed(0)
    model = create_model(name, conv, kappa=kappa, num_classes=args.num_classes, in_chans=args.in_chans,
                         image_size=args.image_size, impl=impl or spec_impl or args.impl, temperature=1.0).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return model, optimizer


def train_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def infer_step(model, x) -> None:
    with torch.no_grad():
        model(x)


def timed(fn, steps: int, device: torch.device) -> list[tuple[float, float]]:
    """(wall seconds, this process's CPU seconds) per call."""
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return times


def measure(args, name: str, spec: str, x, y, device, kinds) -> dict[str, list[tuple[float, float]]]:
    """Timed training steps, then (``infer`` in kinds) timed inference forwards of a freshly built model."""
    model, optimizer = build(args, name, spec, device)
    model.train()
    timed(lambda: train_step(model, optimizer, x, y), args.warmup, device)
    out = {"train": timed(lambda: train_step(model, optimizer, x, y), args.steps, device)}
    if "infer" in kinds:
        model.eval()
        timed(lambda: infer_step(model, x), args.warmup, device)
        out["infer"] = timed(lambda: infer_step(model, x), args.steps, device)
    return out


def check_against_reference(args, name: str, spec: str, x, y, device) -> float:
    """Largest relative error (max |Δ| / max |reference|, per tensor) of logits and gradients vs impl=reference."""
    outputs = []
    for impl in (None, "reference"):
        model, _ = build(args, name, spec, device, impl)
        model.eval()  # batch statistics of small maps would amplify rounding far beyond any path difference
        logits = model(x)
        F.cross_entropy(logits, y).backward()
        outputs.append([logits.detach()] + [p.grad for p in model.parameters() if p.grad is not None])
    # relative to each tensor's largest entry, but not below 1e-6 of the largest gradient: at initialisation some deep
    # attention gradients are ~1e-17, rounding noise around zero
    floor = 1e-6 * max(float(g.abs().max()) for g in outputs[1][1:])
    errors = [float((a - b).abs().max()) / max(float(b.abs().max()), floor) for a, b in zip(*outputs)]
    return max(errors)


def summarize(batch: int, times: list[tuple[float, float]]) -> dict:
    wall, cpu = [w for w, _ in times], [c for _, c in times]
    return {"samples_per_s_best": batch / min(wall), "samples_per_s_median": batch / statistics.median(wall),
            "samples_per_cpu_s_best": batch / min(cpu), "samples_per_cpu_s_median": batch / statistics.median(cpu),
            "steps_timed": len(wall)}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--models", "--model", dest="models", default="resnet18,mobilenetv2_100",
                   help=f"comma-separated, from {', '.join(sorted(MODELS))}")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--convs", default="static,dyconv,pad:0.1,pad:0.5,condconv",
                   help="comma-separated conv[:kappa][@impl] specs (static is always measured)")
    p.add_argument("--impl", default="auto", help=f"default kernel path: {' | '.join(IMPLS)}")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--no-inference", action="store_true", help="time training steps only")
    p.add_argument("--check", action="store_true", help="compare every spec with impl=reference first")
    p.add_argument("--check-tolerance", type=float, default=1e-3,
                   help="largest relative error --check accepts (whole models: the reference paths themselves differ "
                        "by up to 4e-4 on ResNet-18 CondConv's router gradients, sums with cancellation)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here (a new file)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    for name in args.models:
        if name not in MODELS:
            raise ValueError(f"model {name!r} is unknown; choose one of {', '.join(sorted(MODELS))}")
    if args.impl not in IMPLS:
        raise ValueError(f"--impl {args.impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    specs = [s.strip() for s in args.convs.split(",") if s.strip()]
    for spec in specs:
        parse_conv(spec)
    args.specs = list(dict.fromkeys((["static"] if "static" not in specs else []) + specs))
    for label in ("image_size", "in_chans", "num_classes", "batch", "steps", "rounds", "threads"):
        if getattr(args, label) < 1:
            raise ValueError(f"--{label.replace('_', '-')}={getattr(args, label)} must be >= 1")
    if args.warmup < 0:
        raise ValueError(f"--warmup={args.warmup} must be >= 0")
    if not args.models or not args.specs:
        raise ValueError("--models and --convs must name at least one model and conv")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")
    if args.json and os.path.exists(args.json):
        raise ValueError(f"--json {args.json} exists; choose a new path")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        device = torch.device(args.device)
    except (ValueError, RuntimeError) as err:
        print(f"bench_vision: error: {err}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    if device.type == "cuda":  # fp32 means fp32 (the check's tolerance; figures comparable to CPU ones)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.in_chans, args.image_size, args.image_size, generator=g).to(device)
    y = torch.randint(0, args.num_classes, (args.batch,), generator=g).to(device)
    key = "samples_per_cpu_s_best" if device.type == "cpu" else "samples_per_s_best"
    kinds = ["train"] + ([] if args.no_inference else ["infer"])
    results, worst = [], 0.0
    for name in args.models:
        if args.check:
            for spec in args.specs:
                if spec != "static":
                    err = check_against_reference(args, name, spec, x, y, device)
                    worst = max(worst, err)
                    print(f"check {name} {spec}: max relative error vs impl=reference {err:.2e}", file=sys.stderr)
        times = {(spec, kind): [] for spec in args.specs for kind in kinds}
        for round_index in range(args.rounds):
            for spec in args.specs:
                for kind, new in measure(args, name, spec, x, y, device, kinds).items():
                    times[spec, kind] += new
                best = {k: min(c if device.type == "cpu" else w for w, c in times[spec, k]) for k in kinds}
                print(f"{name} round {round_index + 1}/{args.rounds} {spec:>16s}: best "
                      + ", ".join(f"{k} {v:.3f} s" for k, v in best.items()), file=sys.stderr, flush=True)
        static_macs = count(name, "static", image_size=args.image_size, in_chans=args.in_chans,
                            num_classes=args.num_classes)["macs"]
        rows = []
        for spec in args.specs:
            conv, kappa, _ = parse_conv(spec)
            macs = count(name, conv, kappa, image_size=args.image_size, in_chans=args.in_chans,
                         num_classes=args.num_classes)["macs"]
            row = {"model": name, "conv": spec, "macs": macs, "macs_vs_static": macs / static_macs}
            for kind in kinds:
                row[kind] = summarize(args.batch, times[spec, kind])
            rows.append(row)
        base = {kind: rows[args.specs.index("static")][kind][key] for kind in kinds}
        dy = next((r for r in rows if r["conv"] == "dyconv"), None)
        for row in rows:
            for kind in kinds:
                row[f"{kind}_vs_static"] = row[kind][key] / base[kind]
                if dy is not None:
                    row[f"{kind}_vs_dyconv"] = row[kind][key] / dy[kind][key]
        results += rows
        print(f"\n{name}, {args.image_size}x{args.image_size}, batch {args.batch}, {device.type}; samples/s by "
              f"{'CPU time' if device.type == 'cpu' else 'wall time'} (best step; median in brackets)")
        header = f"{'conv':>16s} {'train':>16s} {'vs static':>9s}"
        if "infer" in kinds:
            header += f" {'inference':>16s} {'vs static':>9s}"
        print(header + f" {'MACs vs static':>14s}" + (f" {'train vs DY':>11s}" if dy else ""))
        unit = "samples_per_cpu_s" if device.type == "cpu" else "samples_per_s"
        for r in rows:
            line = f"{r['conv']:>16s}"
            for kind in kinds:
                line += f" {r[kind][unit + '_best']:7.2f} ({r[kind][unit + '_median']:6.2f}) {r[kind + '_vs_static']:9.2f}"
            line += f" {r['macs_vs_static']:14.3f}" + (f" {r['train_vs_dyconv']:11.2f}" if dy else "")
            print(line)
    if args.json:
        meta = {k: v for k, v in vars(args).items() if k != "json"}
        meta.update(torch=torch.__version__, machine=platform.machine(), cpus=os.cpu_count(),
                    device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
                    load_average=os.getloadavg() if hasattr(os, "getloadavg") else None, ratio_key=key)
        with open(args.json, "x") as f:
            json.dump({"settings": meta, "results": results, "check_max_relative_error": worst if args.check else None},
                      f, indent=1)
    if args.check and worst > args.check_tolerance:
        print(f"bench_vision: check failed: relative error {worst:.2e} > {args.check_tolerance}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
