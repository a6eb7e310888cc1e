"""fwd+bwd throughput of one MoE block under router skew: DeepSpeed's capacity dispatch (with drops, and dropless =
padded to the busiest expert) against pad_moe's dropless grouped-GEMM dispatch, for plain MoE and PAD experts, mlp and
gated (glu) experts (issue 12). Not a test: figures go to BENCHMARKS.md with the command.

    python tools/bench_dropless.py                       # T=4096 H=768 F=3072 (glu F=2048) E=8 top-2, skews 1/2/3
    python tools/bench_dropless.py --quick               # seconds, a smoke test
    python tools/bench_dropless.py --json out.json

``ds-*`` plain-MoE variants are DeepSpeed's own ``MoE`` with its per-expert ``Experts`` (one nn.Module FFN per expert,
looped): the reference. ``ds-*-pad-*`` variants run PAD experts (pad_moe's grouped store) under DeepSpeed's capacity
dispatch. ``--memory`` adds each variant's peak resident memory over one fwd+bwd, measured in a fresh process per
variant (Linux VmHWM, reset before the step): ratios against DeepSpeed's capacity layer.

Every variant of a skew shares the input, the gate weights (hence the routes: second-expert sampling off) and is timed
interleaved with the others (tools/bench_ffn.py's quiet-machine sampling), so ratios come from one run. The skew
(max / mean routes per expert) is set by raising expert 0's logit through a constant input feature.

Useful FLOPs (fwd+bwd = 3 x fwd; m = 2 matrices for mlp, 3 for glu): 3 · 2 · routes · m · H · F for the routes that are
computed (capacity dispatch: k·T minus the dropped ones; dropless: k·T); PAD neuron κ: 3 · 2 · m · H · (k·T·κF +
T·(1−κ)F). Padding, gate, sorting and mixing are overhead the percentages expose.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys

import torch

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ffn import _cpu_name, _step_fn, measure, report_main  # noqa: E402

from pad_moe import MoEFFN, PadMoE  # noqa: E402
from pad_moe.moe.dropless import route  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MLP_VARIANTS = ("ds-capacity-1.0", "ds-capacity-1.25", "ds-dropless-moe", "dropless-moe",
                "ds-dropless-pad-element-0.5", "dropless-pad-element-0.5", "dropless-pad-neuron-0.5")
GLU_VARIANTS = tuple(f"glu-{v}" for v in ("ds-capacity-1.0", "ds-dropless-moe", "dropless-moe",
                                          "ds-dropless-pad-element-0.5", "dropless-pad-element-0.5",
                                          "dropless-pad-neuron-0.5"))


def skewed_inputs(args, target: float, gen: torch.Generator):
    """x (T, H) with a constant feature 0 and gate weights whose expert-0 boost gives max/mean load ≈ target."""
    T, H, E = args.tokens, args.hidden, args.experts
    x = torch.randn(T, H, generator=gen)
    x[:, 0] = 1.0
    wg = torch.randn(E, H, generator=gen) * 0.02

    def skew(boost: float) -> float:
        w = wg.clone()
        w[0, 0] += boost
        counts = route(x @ w.t(), args.k).exp_counts.float()
        return float(counts.max() / counts.mean())

    lo, hi = 0.0, 10.0
    if target > skew(lo) + 0.02:
        for _ in range(30):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if skew(mid) < target else (lo, mid)
        wg[0, 0] += hi
    counts = route(x @ wg.t(), args.k).exp_counts
    return x.to(args.device, DTYPES[args.dtype]).requires_grad_(True), wg, counts


def build(name: str, args, wg: torch.Tensor, counts: torch.Tensor, gen: torch.Generator):
    """(module, useful FLOPs, dropped fraction) of a variant."""
    glu = name.startswith("glu-")
    base = name.removeprefix("glu-")
    H, T, k, E = args.hidden, args.tokens, args.k, args.experts
    F = args.glu_ffn if glu else args.ffn
    kind = {"expert_type": "glu", "activation": "silu", "bias": False} if glu else {}
    common = dict(num_experts=E, k=k, min_capacity=0, second_expert_sampling=False, **kind)
    if base.startswith("ds-capacity-"):
        cf = float(base.rsplit("-", 1)[1])
        capacity = math.ceil(k * T / E * cf)
        dropped = int((counts - capacity).clamp(min=0).sum())
        kwargs = dict(common, drop_tokens=True, capacity_factor=cf)
    else:
        dropped, kwargs = 0, dict(common, drop_tokens=False,
                                  dispatch="capacity" if base.startswith("ds-") else "dropless")
    is_pad = "-pad-" in base
    torch.manual_seed(args.seed)
    if base.startswith("ds-") and not is_pad:
        module = DeepSpeedMoE(H, F, kwargs)
    else:
        module = (PadMoE(H, F, granularity="neuron" if "neuron" in base else "element", **kwargs) if is_pad
                  else MoEFFN(H, F, **kwargs))
    with torch.no_grad():
        module.gate_weight.copy_(wg)
    matrices = 3 if glu else 2
    routes = k * T - dropped
    flops = 3.0 * 2.0 * routes * matrices * H * F
    if is_pad:
        kappa = float(base.rsplit("-", 1)[1])
        if "neuron" in base:
            units = torch.zeros(F, dtype=torch.bool)
            n_dyn = round(kappa * F)
            units[torch.randperm(F, generator=gen)[:n_dyn]] = True
            module.set_masks({"units": units})
            module.compact_()
            flops = 3.0 * 2.0 * matrices * H * (k * T * n_dyn + T * (F - n_dyn))
        else:
            module.set_masks({n: torch.rand(m.shape, generator=gen) < kappa for n, m in module.masks().items()})
    module.to(args.device, DTYPES[args.dtype]).train()  # masks stay bool
    return module, flops, dropped / (k * T)


class DeepSpeedMoE(torch.nn.Module):
    """DeepSpeed's ``MoE`` as it ships: per-expert ``Experts`` (a ModuleList of FFNs, looped), its gate and dispatch."""

    def __init__(self, H: int, F: int, kwargs: dict):
        super().__init__()
        from deepspeed.moe.layer import MoE

        from pad_moe.moe.ffn import make_ffn

        expert_type = kwargs.get("expert_type", "mlp")
        expert = make_ffn(expert_type, H, F, kwargs.get("activation", "gelu"), kwargs.get("bias", True))
        self.moe = MoE(H, expert, num_experts=kwargs["num_experts"], k=kwargs["k"],
                       capacity_factor=kwargs.get("capacity_factor", 1.0), min_capacity=kwargs["min_capacity"],
                       drop_tokens=kwargs["drop_tokens"], top2_2nd_expert_sampling=False)

    @property
    def gate_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def forward(self, x):
        return self.moe(x)


def synced(step, device: str):
    """The step, waited for on a GPU (kernels run asynchronously)."""
    if not device.startswith("cuda"):
        return step

    def run():
        step()
        torch.cuda.synchronize()

    return run


def matmul_probe(args):
    """A square torch.mm in the benchmark's dtype on its device, the peak reference: (step, FLOPs)."""
    n = args.peak_size
    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randn(n, n, generator=gen).to(args.device, DTYPES[args.dtype]) for _ in range(2))
    out = torch.empty(n, n, device=args.device, dtype=DTYPES[args.dtype])
    return synced(lambda: torch.mm(a, b, out=out), args.device), 2.0 * n ** 3


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    probe, probe_flops = matmul_probe(args)
    names = list(MLP_VARIANTS) + (list(GLU_VARIANTS) if args.gated else [])
    result = {"config": {k: v for k, v in vars(args).items() if k not in ("json",)}, "machine": {
        "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__}, "skews": []}
    probes = []
    for target in args.skews:
        gen = torch.Generator().manual_seed(args.seed)
        x, wg, counts = skewed_inputs(args, target, gen)
        grad_out = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, DTYPES[args.dtype])
        built = {n: build(n, args, wg, counts, gen) for n in names}
        steps = {n: synced(_step_fn(m, x, grad_out, True), args.device) for n, (m, _, _) in built.items()}
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.warmup + args.repeats):
            probes += [measure(probe, args.max_foreign, args.quiet_wait, args.retries) for _ in range(2)]
            order = names[r % len(names):] + names[:r % len(names)]
            for n in order:
                s = measure(steps[n], args.max_foreign, args.quiet_wait, args.retries)
                if r >= args.warmup:
                    times[n].append(s.wall_s)
            print(f"skew {target}: round {r + 1}/{args.warmup + args.repeats}", file=sys.stderr, flush=True)
        loads = counts.float() / counts.float().mean()
        result["skews"].append({"target": target, "max_over_mean": float(loads.max()),
                                "loads": [round(float(v), 3) for v in loads],
                                "rows": {n: {"best_ms": 1e3 * min(times[n]), "median_ms": 1e3 * statistics.median(times[n]),
                                             "useful_gflop": built[n][1] / 1e9, "dropped": built[n][2]}
                                         for n in names}})
        del built, steps, x, grad_out
        gc.collect()  # one skew's 13 layers at a time: the 24 GiB machine holds no more
    result["peak_gflops"] = probe_flops / min(p.wall_s for p in probes) / 1e9
    for sk in result["skews"]:
        for row in sk["rows"].values():
            row["pct_peak"] = 100 * row["useful_gflop"] / (row["best_ms"] / 1e3) / result["peak_gflops"]
    if args.memory:
        result["memory"] = memory(args, names)
    result["targets"] = targets(result)
    return result


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def memory_one(args) -> dict:
    """In this (fresh) process: one variant's peak resident memory over one fwd+bwd above what it held before."""
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    x, wg, counts = skewed_inputs(args, args.memory_skew, gen)
    grad_out = torch.randn(args.tokens, args.hidden, generator=gen).to(args.device, DTYPES[args.dtype])
    module, _, _ = build(args.memory_one, args, wg, counts, gen)
    step = _step_fn(module, x, grad_out, True)
    step()  # first call: lazily built state
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    peak = _status_kib("VmHWM")
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    return {"step_peak_mib": (peak - before) / 1024, "weights_mib": weights / 2**20}


def memory(args, names: list[str]) -> dict:
    """Peak memory of every variant at every skew, each in a fresh process (large allocations mmapped, so freed
    memory leaves the RSS at once)."""
    import json
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS=str(args.threads))
    sizing = ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--ffn", str(args.ffn), "--glu-ffn",
              str(args.glu_ffn), "--experts", str(args.experts), "--k", str(args.k), "--threads", str(args.threads),
              "--dtype", args.dtype, "--device", args.device, "--seed", str(args.seed)]
    out = {}
    for target in args.skews:
        for n in names:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), *sizing, "--memory-one", n,
                                   "--memory-skew", str(target)], env=env, capture_output=True, text=True, check=True)
            out.setdefault(str(target), {})[n] = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"memory: skew {target} {n}: {out[str(target)][n]['step_peak_mib']:.0f} MiB", file=sys.stderr)
    return out


def targets(result: dict) -> list[dict]:
    out = []
    by_skew = {round(s["target"]): s for s in result["skews"]}

    def t(sk, a, b):  # time ratio a / b at one skew (best calls)
        return sk["rows"][a]["best_ms"] / sk["rows"][b]["best_ms"]

    for prefix in ("", "glu-"):
        if prefix and not any(n.startswith("glu-") for n in result["skews"][0]["rows"]):
            continue
        if 2 in by_skew:
            v = t(by_skew[2], f"{prefix}ds-dropless-pad-element-0.5", f"{prefix}dropless-pad-element-0.5")
            out.append({"target": f"{prefix}dropless PAD >= 1.5x the throughput of PAD on DeepSpeed's dropless "
                                  "dispatch at max/mean ~2", "value": v, "met": v >= 1.5})
        if 1 in by_skew:
            v = t(by_skew[1], f"{prefix}dropless-moe", f"{prefix}ds-capacity-1.0")
            out.append({"target": f"{prefix}dropless MoE time <= 1.0x DeepSpeed capacity dispatch (cf 1.0), "
                                  "balanced", "value": v, "met": v <= 1.0})
        for s, sk in sorted(by_skew.items()):
            v = t(sk, f"{prefix}dropless-moe", f"{prefix}dropless-pad-neuron-0.5")
            out.append({"target": f"{prefix}PAD neuron 0.5 >= 1.3x dropless MoE throughput, skew {s}", "value": v,
                        "met": v >= 1.3})
    for skew, rows in result.get("memory", {}).items():
        for prefix in ("", "glu-"):
            ref = rows.get(f"{prefix}ds-capacity-1.0")
            if ref is None:
                continue
            for n, row in rows.items():
                if n.startswith(prefix) and not n.removeprefix(prefix).startswith("ds-") and (prefix or "glu-" not in n):
                    v = row["step_peak_mib"] / ref["step_peak_mib"]
                    out.append({"target": f"{n} fwd+bwd peak memory <= DeepSpeed's capacity layer, skew {skew}",
                                "value": v, "met": v <= 1.0})
    for sk in result["skews"]:
        for n, row in sk["rows"].items():
            out.append({"target": f"{n} >= 80% of matmul peak, skew {sk['target']:g}", "value": row["pct_peak"],
                        "met": row["pct_peak"] >= 80})
    return out


def format_table(result: dict) -> str:
    c = result["config"]
    lines = [f"T={c['tokens']} H={c['hidden']} F={c['ffn']} (glu F={c['glu_ffn']}) E={c['experts']} k={c['k']} "
             f"{c['dtype']} on {c['device']}, "
             f"threads={c['threads']}, {c['repeats']} rounds (+{c['warmup']} warm-up), best call; matmul peak "
             f"{result['peak_gflops']:.1f} GFLOP/s ({c['peak_size']}^3 torch.mm, best call)", ""]
    for sk in result["skews"]:
        lines.append(f"skew max/mean = {sk['max_over_mean']:.2f} (target {sk['target']:g}); loads "
                     + " ".join(f"{v:.2f}" for v in sk["loads"]))
        lines.append(f"  {'variant':<34} {'best ms':>8} {'median':>8} {'dropped':>8} {'useful GF':>9} {'%peak':>6}")
        for n, r in sk["rows"].items():
            lines.append(f"  {n:<34} {r['best_ms']:>8.0f} {r['median_ms']:>8.0f} {100 * r['dropped']:>7.1f}% "
                         f"{r['useful_gflop']:>9.1f} {r['pct_peak']:>5.1f}%")
        lines.append("")
    for skew, rows in result.get("memory", {}).items():
        lines.append(f"fwd+bwd peak memory above the resident state, skew {skew} (MiB; weights in brackets)")
        for n, r in rows.items():
            lines.append(f"  {n:<34} {r['step_peak_mib']:>8.0f}   [{r['weights_mib']:.0f}]")
        lines.append("")
    for t in result["targets"]:
        lines.append(f"[{'met ' if t['met'] else 'MISS'}] {t['target']}: {t['value']:.3f}")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3072)
    p.add_argument("--glu-ffn", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--skews", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--no-gated", dest="gated", action="store_false", help="skip the glu variants")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--peak-size", type=int, default=2048)
    p.add_argument("--quiet-wait", type=float, default=10.0)
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--max-foreign", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--memory", action="store_true", help="also measure each variant's fwd+bwd peak memory")
    p.add_argument("--memory-one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--memory-skew", type=float, default=1.0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.hidden, args.ffn, args.glu_ffn, args.experts = 256, 64, 256, 128, 4
        args.repeats, args.warmup, args.peak_size, args.quiet_wait, args.retries = 1, 1, 256, 0.0, 0
    if args.k < 1 or args.k > args.experts or args.threads < 1:
        p.error(f"--k={args.k} must be in [1, --experts={args.experts}] and --threads={args.threads} >= 1")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.memory_one:
        import json

        print(json.dumps(memory_one(args)))
        return
    report_main(lambda _argv: args, run, format_table, argv)


if __name__ == "__main__":
    main()
