"""CPU inference latency of one BERT-base-sized FFN block (H=768, F=3072) at batch 32 × 128 tokens:
dense FFN vs full MoE (8 experts, top-2) vs compact PAD (neuron masks) vs compact PAD (element masks), κ = 0.5.

The MoE and PAD variants are pad_moe's deploy blocks (``pad_moe.deploy.compact``), built by ``compact_block`` from a
training-form layer with random masks of exactly κ; DeepSpeed's training-form MoE in eval mode is timed as a reference.
Routing is dropless top-2 and deterministic, so every variant does the same work on every call. Variants are
interleaved round by round (the machine may be shared) and the median of the rounds is reported.

    python tools/bench_inference.py [--rounds 7] [--threads 1] [--layers 1] [--kappa 0.5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from pad_moe.deploy.compact import compact_block  # noqa: E402
from pad_moe.moe.layer import DenseFFNBlock, MoEFFN, PadMoE  # noqa: E402


def exact_masks(layer: PadMoE, kappa: float, seed: int) -> dict:
    """Random masks with exactly round(κ·n) dynamic entries per mask tensor."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in layer.masks().items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=g)[: round(kappa * m.numel())]] = True
        out[name] = flat.reshape(m.shape)
    return out


def build(args) -> dict[str, list[torch.nn.Module]]:
    H, Fs, E = args.hidden, args.ffn, args.experts
    routing = dict(num_experts=E, k=2, min_capacity=0, drop_tokens=False, second_expert_sampling=False)
    variants: dict[str, list[torch.nn.Module]] = {k: [] for k in ("dense", "moe", "pad-neuron", "pad-element",
                                                                  "moe-deepspeed")}
    for layer in range(args.layers):
        torch.manual_seed(layer)
        variants["dense"].append(DenseFFNBlock(H, Fs).eval())
        moe = MoEFFN(H, Fs, **routing, seed=layer).eval()
        variants["moe-deepspeed"].append(moe)
        variants["moe"].append(compact_block(moe))
        for gran in ("neuron", "element"):
            pad = PadMoE(H, Fs, **routing, granularity=gran, seed=layer)
            pad.set_masks(exact_masks(pad, args.kappa, seed=layer))
            variants[f"pad-{gran}"].append(compact_block(pad.eval()))
            del pad
    return variants


def run(blocks, x):
    for b in blocks:
        x = b(x)[0]
    return x


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--layers", type=int, default=1, help="FFN blocks stacked (default: one BERT-base FFN)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--kappa", type=float, default=0.5)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = build(args)
    x = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        ref = run(variants["moe-deepspeed"], x)
        err = float((run(variants["moe"], x) - ref).abs().max())
        for blocks in variants.values():  # warm-up
            run(blocks, x)
        order = list(variants)
        for r in range(args.rounds):
            random.Random(r).shuffle(order)
            for name in order:
                t0 = time.perf_counter()
                run(variants[name], x)
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    stored = {k: sum(b.compact_params() if hasattr(b, "compact_params") else sum(p.numel() for p in b.parameters())
                     for b in blocks) for k, blocks in variants.items()}
    result = {"command": "python tools/bench_inference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "tokens": args.batch * args.seq, "hidden": args.hidden, "ffn": args.ffn, "experts": args.experts,
              "k": 2, "kappa": args.kappa, "layers": args.layers, "threads": args.threads, "rounds": args.rounds,
              "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
              "median_s": med, "min_s": {k: min(v) for k, v in times.items()}, "stored_params": stored,
              "moe_vs_deepspeed_max_abs_diff": err}
    print(f"{args.batch}x{args.seq} tokens, H={args.hidden}, F={args.ffn}, {args.experts} experts top-2, "
          f"kappa={args.kappa}, {args.layers} FFN block(s), {args.threads} thread(s), median of {args.rounds} rounds")
    print("| variant | median ms | min ms | vs dense | vs MoE | stored params |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in ("dense", "moe", "pad-neuron", "pad-element", "moe-deepspeed"):
        print(f"| {name} | {1e3 * med[name]:.1f} | {1e3 * min(times[name]):.1f} | {med[name] / med['dense']:.2f} | "
              f"{med[name] / med['moe']:.2f} | {stored[name]:,d} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
