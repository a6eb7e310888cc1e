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


_HZ = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass
class Sample:
    wall_s: float  # wall-clock seconds of one call
    cpu_s: float  # CPU seconds this process used during it (all its threads)
    foreign_cores: float  # average number of cores other processes kept busy meanwhile (nan off Linux)
    waited_s: float  # seconds spent waiting for the machine to go quiet before the call


def _machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (all but idle and iowait), from /proc/stat; None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    return (sum(fields) - fields[3] - fields[4]) / _HZ


def _foreign_cores(busy0, busy1, own_cpu_s: float, seconds: float) -> float:
    if busy0 is None or busy1 is None or seconds <= 0:
        return float("nan")
    return max(0.0, (busy1 - busy0 - own_cpu_s) / seconds)


def wait_quiet(max_foreign: float, max_wait: float, window: float = 0.3) -> float:
    """Wait (up to ``max_wait`` s) until other processes use fewer than ``max_foreign`` cores; the seconds waited."""
    t_start = time.perf_counter()
    while time.perf_counter() - t_start < max_wait:
        busy0, cpu0, t0 = _machine_busy_s(), time.process_time(), time.perf_counter()
        if busy0 is None:
            break
        time.sleep(window)
        foreign = _foreign_cores(busy0, _machine_busy_s(), time.process_time() - cpu0, time.perf_counter() - t0)
        if foreign < max_foreign:
            break
    return time.perf_counter() - t_start


def measure(fn: Callable[[], None], max_foreign: float, quiet_wait: float, retries: int = 0) -> Sample:
    """One call of ``fn``, after waiting for quiet; re-run up to ``retries`` times while other processes were busy
    during the call, keeping the least disturbed sample."""
    best = None
    for _ in range(retries + 1):
        waited = wait_quiet(max_foreign, quiet_wait) if quiet_wait > 0 else 0.0
        busy0, cpu0, t0 = _machine_busy_s(), time.process_time(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        smp = Sample(wall, cpu, _foreign_cores(busy0, _machine_busy_s(), cpu, wall), waited)
        if best is None or smp.foreign_cores < best.foreign_cores:
            best = smp
        if not smp.foreign_cores >= max_foreign:  # quiet (or unknown off Linux)
            break
    return best


def _ratio_stats(num: list[Sample], den: list[Sample], attr: str, quiet: float | None) -> dict:
    """Median over rounds of num/den (both samples of a ratio shared one round's load); with ``quiet`` only rounds
    where both samples were quiet, when at least two such rounds exist."""
    pairs = list(zip(num, den))
    if quiet is not None:
        q = [(a, b) for a, b in pairs if a.foreign_cores < quiet and b.foreign_cores < quiet]
        pairs = q if len(q) >= 2 else pairs
    ratios = [getattr(a, attr) / getattr(b, attr) for a, b in pairs]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios)}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    shape = Shape(args.tokens, args.hidden, args.ffn, args.experts, args.k)
    variants = build_variants(shape, args.variants, args.seed)
    probe, probe_flops = matmul_probe(args.peak_size)

    samples: dict[str, list[Sample]] = {v.name: [] for v in variants}
    probe_samples: list[Sample] = []
    rounds = args.warmup + args.repeats
    for r in range(rounds):
        # Interleaved: one sample of every variant per round, after the matmul probe. Each round starts at a different
        # variant, so that no variant always runs first.
        probes = [measure(probe, args.max_foreign, args.quiet_wait, args.retries) for _ in range(args.peak_calls)]
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        got = {v.name: measure(v.step, args.max_foreign, args.quiet_wait, args.retries) for v in order}
        if r >= args.warmup:
            for name, smp in got.items():
                samples[name].append(smp)
            probe_samples += probes
        if not args.no_progress:
            print(f"round {r + 1}/{rounds}" + (" (warm-up)" if r < args.warmup else "") + ": " +
                  " ".join(f"{n}={x.wall_s * 1e3:.0f}/{x.cpu_s:.1f}/{x.foreign_cores:.1f}" for n, x in got.items()) +
                  f"  [wall ms/CPU s/foreign cores]; probe {probe_flops / min(p.wall_s for p in probes) / 1e9:.0f}"
                  " GFLOP/s", file=sys.stderr, flush=True)

    # Peak: the best probe call. Per wall second it is the machine's fp32 matmul rate at this thread count; per CPU
    # second it is the rate of one busy thread, which other processes' load disturbs far less than wall time.
    peak_wall = probe_flops / min(p.wall_s for p in probe_samples)
    peak_cpu = probe_flops / min(p.cpu_s for p in probe_samples)
    rows = []
    for v in variants:
        s = samples[v.name]
        quiet_walls = [x.wall_s for x in s if x.foreign_cores < args.max_foreign]
        walls = [x.wall_s for x in s]
        cpus = [x.cpu_s for x in s]
        wall_med = statistics.median(walls)
        row = {
            "variant": v.name,
            "useful_gflop": v.useful_flops / 1e9,
            "samples": len(s),
            "quiet_samples": len(quiet_walls),
            "wall_ms": {"median": wall_med * 1e3, "min": min(walls) * 1e3, "max": max(walls) * 1e3},
            "quiet_wall_ms": ({"median": statistics.median(quiet_walls) * 1e3, "min": min(quiet_walls) * 1e3}
                              if quiet_walls else None),
            "cpu_s": {"median": statistics.median(cpus), "min": min(cpus), "max": max(cpus)},
            "tokens_per_s": shape.tokens / wall_med,
            "tokens_per_s_best": shape.tokens / min(walls),
            "pct_peak_wall_best": 100 * v.useful_flops / min(walls) / peak_wall,
            "pct_peak_wall_median": 100 * v.useful_flops / wall_med / peak_wall,
            "pct_peak_cpu": 100 * v.useful_flops / statistics.median(cpus) / peak_cpu,
        }
        for ref, key in ((MOE_REFERENCE, "vs_moe"), (DENSE_REFERENCE, "vs_dense")):
            if ref in samples:
                row["wall_" + key] = _ratio_stats(s, samples[ref], "wall_s", args.max_foreign)
                row["cpu_" + key] = _ratio_stats(s, samples[ref], "cpu_s", None)
        rows.append(row)
    return {
        "config": {"tokens": shape.tokens, "hidden": shape.hidden, "ffn": shape.ffn, "experts": shape.experts,
                   "k": shape.k, "capacity_factor": 1.0, "min_capacity": 0, "second_expert_sampling": True,
                   "dtype": "float32", "threads": args.threads, "repeats": args.repeats, "warmup": args.warmup,
                   "peak_size": args.peak_size, "seed": args.seed, "max_foreign": args.max_foreign,
                   "quiet_wait": args.quiet_wait, "retries": args.retries, "variants": args.variants, "argv": sys.argv[1:]},
        "machine": {"cpu_count": os.cpu_count(), "cpu": _cpu_name(), "torch": torch.__version__,
                    "python": platform.python_version(), "loadavg_end": os.getloadavg(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "peak_gflops_wall": peak_wall / 1e9,
        "peak_gflops_wall_median": probe_flops / statistics.median(p.wall_s for p in probe_samples) / 1e9,
        "peak_gflops_per_cpu_s": peak_cpu / 1e9,
        "rows": rows,
        "samples": {name: [vars(x) for x in s] for name, s in samples.items()},
        "probe_samples": [vars(x) for x in probe_samples],
        "targets": _targets(rows),
    }


def _targets(rows: list[dict]) -> list[dict]:
    by = {r["variant"]: r for r in rows}
    out = []
    for clock in ("wall", "cpu"):
        if "wall_vs_moe" in by.get("pad-element-0.5", {}):
            v = by["pad-element-0.5"][clock + "_vs_moe"]["median"]
            out.append({"target": f"PAD element time <= 1.10x DeepSpeed MoE ({clock})", "value": v, "met": v <= 1.10})
        if "wall_vs_moe" in by.get("pad-neuron-0.5", {}):
            v = 1 / by["pad-neuron-0.5"][clock + "_vs_moe"]["median"]
            out.append({"target": f"PAD neuron k=0.5 throughput >= 1.3x DeepSpeed MoE ({clock})", "value": v,
                        "met": v >= 1.3})
    for r in rows:
        for key, label in (("pct_peak_wall_best", "best wall"), ("pct_peak_cpu", "per CPU second")):
            out.append({"target": f"{r['variant']} >= 65% of matmul peak ({label})", "value": r[key],
                        "met": r[key] >= 65})
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
    lines = [f"T={c['tokens']} H={c['hidden']} F={c['ffn']} E={c['experts']} k={c['k']} fp32, capacity_factor=1.0, "
             f"min_capacity=0, threads={c['threads']}, {c['repeats']} interleaved rounds "
             f"(+{c['warmup']} warm-up); quiet = other processes < {c['max_foreign']} cores",
             f"matmul peak ({c['peak_size']}^3 torch.mm, best call): {result['peak_gflops_wall']:.1f} GFLOP/s wall "
             f"(median call {result['peak_gflops_wall_median']:.1f}), {result['peak_gflops_per_cpu_s']:.1f} GFLOP per "
             "CPU second",
             "",
             f"{'variant':<19} {'wall ms med':>11} {'min':>6} {'quiet':>5} {'CPU s':>6} {'tok/s best':>10} "
             f"{'wall/MoE':>8} {'CPU/MoE':>7} {'wall/dense':>10} {'CPU/dense':>9} {'%pk wall':>8} {'%pk CPU':>7}"]
    fmt = lambda r, k: f"{r[k]['median']:.3f}" if k in r else "-"  # noqa: E731
    for r in result["rows"]:
        lines.append(
            f"{r['variant']:<19} {r['wall_ms']['median']:>11.0f} {r['wall_ms']['min']:>6.0f} "
            f"{r['quiet_samples']:>2}/{r['samples']:<2} {r['cpu_s']['median']:>6.2f} {r['tokens_per_s_best']:>10.0f} "
            f"{fmt(r, 'wall_vs_moe'):>8} {fmt(r, 'cpu_vs_moe'):>7} {fmt(r, 'wall_vs_dense'):>10} "
            f"{fmt(r, 'cpu_vs_dense'):>9} {r['pct_peak_wall_best']:>7.1f}% {r['pct_peak_cpu']:>6.1f}%")
    lines += ["", "wall/MoE, CPU/MoE, …: median over rounds of the per-round time ratio (rounds where both samples were "
              "quiet, if >= 2); tok/s best and %pk wall: fastest call vs fastest probe call; %pk CPU: median CPU "
              "seconds vs the probe's best FLOP per CPU second.", ""]
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
    p.add_argument("--quiet-wait", type=float, default=10.0,
                   help="before each sample wait up to this many seconds for other processes to go quiet (0: never)")
    p.add_argument("--retries", type=int, default=2,
                   help="re-run a sample up to this many times while other processes disturbed it")
    p.add_argument("--max-foreign", type=float, default=0.1,
                   help="a sample is quiet when other processes used fewer cores than this on average during it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny sizes and 2 rounds (a smoke test, not a figure)")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.ffn, args.experts = 256, 64, 256, 4
        args.repeats, args.warmup, args.peak_size, args.quiet_wait, args.retries = 2, 1, 256, 0.0, 0
    if args.threads < 1:
        p.error(f"--threads={args.threads} must be >= 1")
    return args


def report_main(parse, run_fn, table_fn, argv=None) -> None:
    """The benchmarks' command line: parse, run, print the table, write --json when given."""
    args = parse(argv)
    result = run_fn(args)
    print(table_fn(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


def main(argv=None) -> None:
    report_main(parse_args, run, format_table, argv)


if __name__ == "__main__":
    main()
