"""fwd+bwd throughput of one FFN block: dense FFN, DeepSpeed MoE, PAD-MoE element and neuron-compacted (issue 2).

One process, fp32, CPU or whatever ``torch`` runs on by default; all variants and a square-matmul peak probe are timed
in the same run, interleaved round by round (A B C … A B C …), so that ratios are taken between samples that shared
the machine's load. Figures and the commands that produced them live in BENCHMARKS.md.

    python tools/bench_ffn.py                      # BERT-base FFN: H=768, F=3072, 8 experts, top-2, 4096 tokens
    python tools/bench_ffn.py --quick              # seconds, for a smoke test
    python tools/bench_ffn.py --json out.json      # also write every sample and the summary

Useful FLOPs (fwd+bwd = 3× fwd: backward computes both the input and the weight gradient of every matmul):
    ffn(n, u)          = 3 · 2 · n · 2 · H · u      an FFN with u hidden units applied to n token-routes
    dense              = ffn(T, F)
    moe, pad-element   = ffn(k·T, F)                (the static part is mixed into the weights, no extra matmul)
    pad-neuron κ       = ffn(k·T, κF) + ffn(T, (1−κ)F)
Gate, dispatch, combine and mixing FLOPs are not counted: they are the overhead the percentages expose.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")

from pad_moe import MoEFFN, PadMoE  # noqa: E402
from pad_moe.moe.ffn import FFN  # noqa: E402

MOE_REFERENCE = "deepspeed-moe"
DENSE_REFERENCE = "dense"


@dataclass
class Shape:
    tokens: int
    hidden: int
    ffn: int
    experts: int
    k: int

    def ffn_flops(self, routes: int, units: int) -> float:
        """Useful fwd+bwd FLOPs of an FFN with ``units`` hidden units applied to ``routes`` token-routes."""
        return 3.0 * 2.0 * routes * 2.0 * self.hidden * units


@dataclass
class Variant:
    name: str
    step: Callable[[], None]
    useful_flops: float


def _moe_kwargs(shape: Shape) -> dict:
    # min_capacity=0 and capacity_factor=1.0: every expert gets exactly k·T/E slots, so the experts run k·T
    # token-routes (dropped routes become zero-padded slots); second-expert sampling stays at its default (on).
    return dict(num_experts=shape.experts, k=shape.k, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0)


def _random_element_masks(layer: PadMoE, kappa: float, gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {name: torch.rand(m.shape, generator=gen) < kappa for name, m in layer.masks().items()}


def _random_units(ffn: int, kappa: float, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    n_dyn = round(kappa * ffn)
    units = torch.zeros(ffn, dtype=torch.bool)
    units[torch.randperm(ffn, generator=gen)[:n_dyn]] = True
    return units, n_dyn


def _step_fn(module: torch.nn.Module, x: torch.Tensor, grad_out: torch.Tensor, moe_contract: bool):
    params = [p for p in module.parameters() if p.requires_grad]
    one = torch.ones(())

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        if moe_contract:
            out, l_aux, _ = module(x)
            torch.autograd.backward([out, l_aux], [grad_out, one])
        else:
            module(x).backward(grad_out)

    return step


def build_variants(shape: Shape, names: list[str], seed: int) -> list[Variant]:
    T, H, F, k = shape.tokens, shape.hidden, shape.ffn, shape.k
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen).requires_grad_(True)  # (tokens, hidden)
    grad_out = torch.randn(T, H, generator=gen)
    variants = []
    for name in names:
        torch.manual_seed(seed)
        if name == DENSE_REFERENCE:
            module, flops, contract = FFN(H, F), shape.ffn_flops(T, F), False
        elif name == MOE_REFERENCE:
            module, flops, contract = MoEFFN(H, F, **_moe_kwargs(shape)), shape.ffn_flops(k * T, F), True
        elif name.startswith("pad-element-"):
            kappa = float(name.rsplit("-", 1)[1])
            module = PadMoE(H, F, granularity="element", **_moe_kwargs(shape))
            module.set_masks(_random_element_masks(module, kappa, gen))
            flops, contract = shape.ffn_flops(k * T, F), True
        elif name.startswith("pad-neuron-"):
            kappa = float(name.rsplit("-", 1)[1])
            module = PadMoE(H, F, granularity="neuron", **_moe_kwargs(shape))
            units, n_dyn = _random_units(F, kappa, gen)
            module.set_masks({"units": units})
            module.compact_()
            flops, contract = shape.ffn_flops(k * T, n_dyn) + shape.ffn_flops(T, F - n_dyn), True
        else:
            raise ValueError(f"variant={name!r} is unknown; allowed: {DENSE_REFERENCE}, {MOE_REFERENCE}, "
                             "pad-element-<κ>, pad-neuron-<κ>")
        module.train()
        variants.append(Variant(name, _step_fn(module, x, grad_out, contract), flops))
    return variants


def matmul_probe(n: int) -> tuple[Callable[[], None], float]:
    """A square fp32 torch.mm, the peak reference: (step, FLOPs)."""
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n ** 3


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    shape = Shape(args.tokens, args.hidden, args.ffn, args.experts, args.k)
    variants = build_variants(shape, args.variants, args.seed)
    probe, probe_flops = matmul_probe(args.peak_size)

    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    peak_samples: list[float] = []
    rounds = args.warmup + args.repeats
    for r in range(rounds):
        # Interleaved: one sample of every variant per round, the matmul probe before and after the variants.
        # Each round starts at a different variant so none always runs right after the probe.
        probe_times = [_timed(probe) for _ in range(args.peak_calls)]
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        round_times = {v.name: _timed(v.step) for v in order}
        probe_times += [_timed(probe) for _ in range(args.peak_calls)]
        if r >= args.warmup:
            for name, t in round_times.items():
                samples[name].append(t)
            peak_samples += probe_times
        if not args.no_progress:
            print(f"round {r + 1}/{rounds}" + (" (warm-up)" if r < args.warmup else "") + ": " +
                  " ".join(f"{n}={t * 1e3:.0f}ms" for n, t in round_times.items()), file=sys.stderr, flush=True)

    peak = probe_flops / min(peak_samples)
    rows = []
    for v in variants:
        ts = samples[v.name]
        med = statistics.median(ts)
        row = {
            "variant": v.name,
            "ms_median": med * 1e3,
            "ms_min": min(ts) * 1e3,
            "ms_max": max(ts) * 1e3,
            "tokens_per_s": shape.tokens / med,
            "useful_gflop": v.useful_flops / 1e9,
            "pct_peak_median": 100 * v.useful_flops / med / peak,
            "pct_peak_best": 100 * v.useful_flops / min(ts) / peak,
        }
        # Ratios per round, then the median: both samples of a ratio shared the same round's load.
        for ref, key in ((MOE_REFERENCE, "time_vs_moe"), (DENSE_REFERENCE, "time_vs_dense")):
            if ref in samples:
                row[key] = statistics.median(t / t_ref for t, t_ref in zip(ts, samples[ref]))
        rows.append(row)
    return {
        "config": {"tokens": shape.tokens, "hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.experts,
                   "k": shape.k, "capacity_factor": 1.0, "min_capacity": 0, "second_expert_sampling": True,
                   "dtype": "float32", "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                   "peak_size": args.peak_size, "seed": args.seed},
        "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu_name(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_end": os.getloadavg()},
        "peak_gflops": peak / 1e9,
        "peak_gflops_median": probe_flops / statistics.median(peak_samples) / 1e9,
        "rows": rows,
        "samples_s": samples,
        "peak_samples_s": peak_samples,
        "targets": _targets(rows),
    }


def _targets(rows: list[dict]) -> list[dict]:
    by = {r["variant"]: r for r in rows}
    out = []
    if "pad-element-0.5" in by and "time_vs_moe" in by["pad-element-0.5"]:
        v = by["pad-element-0.5"]["time_vs_moe"]
        out.append({"target": "PAD element time <= 1.10x DeepSpeed MoE", "value": v, "met": v <= 1.10})
    if "pad-neuron-0.5" in by and "time_vs_moe" in by["pad-neuron-0.5"]:
        v = 1 / by["pad-neuron-0.5"]["time_vs_moe"]
        out.append({"target": "PAD neuron k=0.5 throughput >= 1.3x DeepSpeed MoE", "value": v, "met": v >= 1.3})
    for r in rows:
        out.append({"target": f"{r['variant']} >= 65% of matmul peak (median time)", "value": r["pct_peak_median"],
                    "met": r["pct_peak_median"] >= 65})
    return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"T={c['tokens']} H={c['hidden']} F={c['ffn']} E={c['experts']} k={c['k']} fp32, "
             f"capacity_factor=1.0 min_capacity=0, threads={c['threads']}, {c['repeats']} rounds",
             f"matmul peak ({c['peak_size']}^3 torch.mm): best {result['peak_gflops']:.1f} GFLOP/s, "
             f"median {result['peak_gflops_median']:.1f} GFLOP/s",
             "",
             f"{'variant':<17} {'ms (median)':>11} {'min..max':>13} {'tokens/s':>9} {'time/MoE':>8} "
             f"{'thru/MoE':>8} {'time/dense':>10} {'%peak med':>9} {'%peak best':>10}"]
    for r in result["rows"]:
        tm = r.get("time_vs_moe")
        td = r.get("time_vs_dense")
        lines.append(
            f"{r['variant']:<17} {r['ms_median']:>11.0f} {r['ms_min']:>6.0f}..{r['ms_max']:<6.0f} "
            f"{r['tokens_per_s']:>9.0f} {(f'{tm:.3f}' if tm else '-'):>8} {(f'{1 / tm:.3f}' if tm else '-'):>8} "
            f"{(f'{td:.3f}' if td else '-'):>10} {r['pct_peak_median']:>8.1f}% {r['pct_peak_best']:>9.1f}%")
    lines.append("")
    for t in result["targets"]:
        lines.append(f"[{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.3f}")
    return "\n".join(lines)


DEFAULT_VARIANTS = [DENSE_REFERENCE, MOE_REFERENCE, "pad-element-0.5", "pad-neuron-0.5", "pad-neuron-0.3"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2, choices=(1, 2))
    p.add_argument("--repeats", type=int, default=9, help="timed rounds (each times every variant once)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--peak-size", type=int, default=2048, help="n of the n×n×n matmul peak probe")
    p.add_argument("--peak-calls", type=int, default=2, help="probe calls before and after each round")
    p.add_argument("--variants", type=lambda s: s.split(","), default=DEFAULT_VARIANTS,
                   help="comma list of dense, deepspeed-moe, pad-element-<κ>, pad-neuron-<κ>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (a smoke test, not a figure)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.ffn, args.experts = 256, 64, 256, 4
        args.repeats, args.warmup, args.peak_size = 2, 1, 256
    if args.threads < 1:
        p.error(f"--threads={args.threads} must be >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
