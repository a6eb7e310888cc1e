"""``padmoe plan``: will a Switch PAD-MoE run fit, per rank, on a cluster, and how much does it move per step.

    padmoe plan switch-base-128 --kappa 0.5 --nodes 4 --gpus-per-node 8 --ep 32 --zero 2 --dtype bf16 \\
        --micro-batch 8 --seq 512 --target-seq 114 --gpu-mem 80GiB

Memory model: ``pad_moe.plan.memory``. Communication per optimizer step and rank: the expert all-to-all (dispatch and
combine in the forward, their gradients in the backward: 4 exchanges of the E·C·H capacity buffer per sparse layer
per micro step, (ep−1)/ep of it leaving the rank; C = ceil(tokens/E · capacity_factor)) and the gradient reduction
(ring all-reduce or reduce-scatter + all-gather: 2·(N−1)/N of the gradient bytes, N the group's data-parallel degree).
Bad input and a plan that does not fit exit with status 2 and one line on stderr naming the value and the fix.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from typing import Optional

from pad_moe.errors import UsageError, finite_float
from pad_moe.plan.memory import DTYPE_BYTES, StepShape, activation_bytes, capacity, logits_transient
from pad_moe.switch.count import count_arch
from pad_moe.switch.presets import SwitchArch, get_arch, switch_names

GIB = 1024 ** 3
MODES = ("pad", "moe", "static")
OPTIMIZERS = ("fused", "torch")


class PlanError(UsageError):
    """Bad planner input or a plan that does not fit: one line naming the value and the fix."""


def parse_bytes(text: str, flag: str = "--gpu-mem") -> int:
    """'80GiB', '80GB', '141G', '24000MiB', '1e9' -> bytes (G/GiB are 2**30, GB is 10**9)."""
    m = re.fullmatch(r"\s*((?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e[0-9]+)?)\s*([KMGT]?)(i?)(B?)\s*", str(text),
                     re.IGNORECASE)
    if not m:
        raise PlanError(f"{flag}={text!r} is not a size; write e.g. 80GiB, 80GB or 85899345920")
    value, unit, binary, b = m.groups()
    power = " KMGT".index(unit.upper()) if unit else 0
    base = 1000 if (b and not binary) else 1024
    size = float(value) * base ** power
    if not math.isfinite(size) or size >= 2 ** 80:
        raise PlanError(f"{flag}={text!r} is too large; write e.g. 80GiB")
    return int(size)


@dataclass
class PlanRequest:
    preset: str
    kappa: float = 0.5
    nodes: int = 1
    gpus_per_node: int = 8
    ep: int = 8
    zero: int = 1
    dtype: str = "bf16"
    micro_batch: int = 8
    seq: int = 512
    target_seq: Optional[int] = None
    """Decoder tokens per sequence (default: seq; T5 span corruption of 512 inputs has 114 targets)."""
    gpu_mem: Optional[int] = 80 * GIB
    mode: str = "pad"
    grad_accum: int = 1
    capacity_factor: float = 1.25
    min_capacity: int = 4
    dropout: bool = True
    compact: bool = False
    """Neuron-granularity PAD compacted before training: experts keep κ·F hidden units, the static FFN the rest."""
    compact_after_warmup: bool = False
    """Upcycling: fully dynamic PAD during the warm-up, compacted in place after its partition (two phases)."""
    reduce_bucket: int = 50_000_000
    """DeepSpeed reduce_bucket_size (elements): ZeRO-2's gradient bucket."""
    optimizer: str = "fused"
    """fused: DeepSpeed/apex fused AdamW on GPU, no temporaries; torch: torch.optim.AdamW (one temporary per tensor)."""
    overhead: int = 0
    """Fixed per-rank bytes outside the model (CUDA context, NCCL buffers, allocator slack): not modelled, add yours."""
    dropout_mask_bytes: Optional[int] = None
    """Bytes per dropout-mask element (default 1 as on GPUs; CPU dropout keeps the activation-sized noise)."""
    experts: Optional[int] = None
    """Override the preset's expert count."""
    arch: Optional[SwitchArch] = None
    """Plan this architecture instead of the preset's (the preset name is then only a label)."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    def validate(self, arch: SwitchArch) -> None:
        for name in ("nodes", "gpus_per_node", "ep", "micro_batch", "seq", "grad_accum"):
            if getattr(self, name) < 1:
                raise PlanError(f"--{name.replace('_', '-')}={getattr(self, name)} must be >= 1")
        if self.target_seq is not None and self.target_seq < 1:
            raise PlanError(f"--target-seq={self.target_seq} must be >= 1")
        if self.mode not in MODES:
            raise PlanError(f"--mode={self.mode!r} is unknown; use one of {', '.join(MODES)}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"--dtype={self.dtype!r} is unknown; use one of {', '.join(DTYPE_BYTES)}")
        if not 0 < self.kappa <= 1:
            raise PlanError(f"--kappa={self.kappa} must be in (0, 1]")
        if self.zero not in (0, 1, 2):
            raise PlanError(f"--zero={self.zero}: DeepSpeed MoE trains under ZeRO 0, 1 or 2 (stage 3 refuses it); "
                            "use --zero 2 to shard gradients and optimizer states")
        if self.ep > self.world:
            raise PlanError(f"--ep={self.ep} is larger than the world of {self.world} ranks (--nodes {self.nodes} x "
                            f"--gpus-per-node {self.gpus_per_node}); use an --ep that divides {self.world}")
        if self.world % self.ep:
            raise PlanError(f"--ep={self.ep} does not divide the world of {self.world} ranks; use a divisor of "
                            f"{self.world}")
        if arch.num_experts % self.ep:
            raise PlanError(f"--ep={self.ep} does not divide the {arch.num_experts} experts of {self.preset}; use a "
                            f"divisor of {arch.num_experts}")
        if self.compact and self.mode != "pad":
            raise PlanError(f"--compact applies to --mode pad, not --mode {self.mode}")
        if self.compact_after_warmup and (self.mode != "pad" or self.compact):
            raise PlanError("--compact-after-warmup applies to --mode pad without --compact (the warm-up phase "
                            "trains at full size, the compacted phase follows κ)")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"--optimizer={self.optimizer!r} is unknown; use one of {', '.join(OPTIMIZERS)}")
        if not 0 < self.capacity_factor < math.inf:
            raise PlanError(f"--capacity-factor={self.capacity_factor} must be a finite number > 0")
        if self.reduce_bucket < 1:
            raise PlanError(f"--reduce-bucket={self.reduce_bucket} must be >= 1 (elements)")
        if self.gpu_mem is not None and self.gpu_mem < 1:
            raise PlanError(f"--gpu-mem={self.gpu_mem} must be > 0 bytes (or 'none' to skip the fit check)")
        if self.min_capacity < 0:
            raise PlanError(f"--min-capacity={self.min_capacity} must be >= 0")


def _round_units(kappa: float, f: int) -> int:
    return max(1, min(f, int(math.floor(kappa * f + 0.5))))


def plan(req: PlanRequest) -> dict:
    """The per-rank plan of ``req`` as a dict of byte counts (raises PlanError on bad input). With
    ``compact_after_warmup`` the figures are the warm-up phase's (the peak) and ``after_compaction`` holds the
    compacted phase's."""
    if req.compact_after_warmup:
        req.validate(req.arch or _arch_or_error(req.preset))
        warm = _plan(replace(req, compact_after_warmup=False))
        after = _plan(replace(req, compact=True, compact_after_warmup=False))
        warm["request"]["compact_after_warmup"] = True
        warm["after_compaction"] = {"params": after["params"], "bytes_per_rank": after["bytes_per_rank"],
                                    "fits": after["fits"]}
        return warm
    return _plan(req)


def _arch_or_error(preset: str):
    try:
        return get_arch(preset)
    except ValueError:
        raise PlanError(f"preset {preset!r} does not exist; use one of {', '.join(switch_names())}") from None


def _plan(req: PlanRequest) -> dict:
    try:
        arch = req.arch or get_arch(req.preset)
    except ValueError:
        raise PlanError(f"preset {req.preset!r} does not exist; use one of {', '.join(switch_names())}") from None
    if req.experts is not None:
        if req.experts < 1:
            raise PlanError(f"--experts={req.experts} must be >= 1")
        arch = arch.with_(num_experts=req.experts)
    req.validate(arch)
    w = DTYPE_BYTES[req.dtype]
    world, ep, E = req.world, req.ep, arch.num_experts
    n_ne, n_e = world, world // ep  # data-parallel degrees of non-expert and expert parameters
    counts = count_arch(arch, req.mode, req.kappa)
    n_sparse, ffn = counts["sparse_layers"], counts["ffn_params"]

    # -- parameters this rank holds ---------------------------------------------------------------------------------
    act_arch = arch
    if req.compact:  # experts shrink to κF units; the static FFN (non-expert) keeps the other (1-κ)F
        fe = _round_units(req.kappa, arch.d_ff)
        expert_ffn, static_ffn = 2 * arch.d_model * fe, 2 * arch.d_model * (arch.d_ff - fe)
        act_arch = arch.with_(d_ff=fe)
    else:
        expert_ffn, static_ffn = ffn, (ffn if req.mode == "pad" else 0)
    p_expert = 0 if req.mode == "static" else n_sparse * (E // ep) * expert_ffn
    if req.mode == "static":
        p_non_expert = counts["params_training"]
    else:
        p_non_expert = counts["params_training"] - counts["expert"] - (n_sparse * ffn if req.mode == "pad" else 0) \
            + n_sparse * static_ffn
    masks = n_sparse * ffn if req.mode == "pad" and not req.compact else 0  # bool, one per FFN weight entry

    # -- model states (bytes) ---------------------------------------------------------------------------------------
    local = p_non_expert + p_expert
    part = p_non_expert / n_ne + p_expert / n_e  # this rank's ZeRO partition (each group over its own DP degree)
    weights = w * local
    mixed = w < 4
    if req.zero == 0:
        grads = w * local
        grad_fp32 = 4 * local if mixed else 0  # BF16_Optimizer's fp32 gradient buffer (persistent)
        opt = 12 * part if mixed else 8 * local  # bf16: fp32 master + m + v, partitioned; fp32: m + v
    else:  # ZeRO-2 (contiguous_gradients) keeps a persistent buffer for its gradient partition
        grads = w * local if req.zero == 1 else w * part
        grad_fp32 = 4 * part if mixed else 0  # the fp32 gradient of this rank's partition, at the step
        opt = 12 * part
    bucket = w * min(req.reduce_bucket, local) if req.zero == 2 else 0  # ZeRO-2's reduce bucket, in the backward
    # torch's single-tensor AdamW holds two temporaries the size of the tensor it updates (sqrt(v), then / bias
    # correction): DeepSpeed's flat partition under ZeRO / bf16, else the largest weight (embedding or FFN matrix)
    updated = part if (req.zero or mixed) else max(arch.vocab_size * arch.d_model, expert_ffn // 2)
    step_temp = 0 if req.optimizer == "fused" else 2 * 4 * updated

    # -- activations and the backward sweep -------------------------------------------------------------------------
    target = req.target_seq or req.seq
    st = StepShape(req.micro_batch, req.seq, target, act_bytes=w, param_bytes=w, dropout=req.dropout,
                   dropout_mask_bytes=1 if req.dropout_mask_bytes is None else req.dropout_mask_bytes,
                   capacity_factor=req.capacity_factor, min_capacity=req.min_capacity, ep=ep)
    acts = activation_bytes(act_arch, req.mode, st)
    if req.compact:  # static units run once per token (λs·fc1 out, relu out, fc2 out); experts hold λd·W_k only
        tokens = req.micro_batch * (req.seq * len(arch.sparse_layers("encoder"))
                                    + target * len(arch.sparse_layers("decoder")))
        acts.add("static_hidden", tokens * (2 * (arch.d_ff - act_arch.d_ff) + arch.d_model) * w)
        acts.parts["pad_effective_weights"] = n_sparse * (E // ep) * expert_ffn * w
    logits = logits_transient(arch, st)
    # backward sweep from the LM head down: a layer's gradients exist while its activations are still held. ZeRO 0/1
    # keep every gradient until the step; ZeRO-2 moves each one into its persistent partition buffer through the bucket.
    remaining, produced, bwd = acts.total, 0.0, 0.0
    for _, a, ne, ex in reversed(acts.per_layer):
        layer_grads = w * (ne + ex)
        bwd = max(bwd, remaining + produced + layer_grads)
        remaining -= a
        produced += layer_grads if req.zero < 2 else 0
    persistent = weights + opt + masks + (grad_fp32 if req.zero == 0 else 0) + (grads if req.zero == 2 else 0)
    backward_peak = persistent + max(bwd, acts.total + logits) + bucket
    step_peak = persistent + (grads if req.zero < 2 else 0) + (grad_fp32 if req.zero else 0) + step_temp
    peak = max(backward_peak, step_peak) + req.overhead

    # -- communication per optimizer step ---------------------------------------------------------------------------
    tokens_e, tokens_d = req.micro_batch * req.seq, req.micro_batch * target
    a2a = 0
    if req.mode != "static" and ep > 1:
        for stack, tokens in (("encoder", tokens_e), ("decoder", tokens_d)):
            slots = E * capacity(tokens, arch, st)
            a2a += len(arch.sparse_layers(stack)) * 4 * slots * arch.d_model * w * (ep - 1) / ep
    a2a *= req.grad_accum
    reduce_ne = 2 * (n_ne - 1) / n_ne * w * p_non_expert
    reduce_e = 2 * (n_e - 1) / n_e * w * p_expert

    out = {
        "request": {**{k: v for k, v in asdict(req).items() if k != "arch"}, "world": world, "target_seq": target},
        "params": {"non_expert_per_rank": int(p_non_expert), "expert_per_rank": int(p_expert),
                   "training_total": counts["params_training"] if not req.compact else None,
                   "compact_total": counts["params"], "experts_per_rank_per_layer": E // ep,
                   "data_parallel_non_expert": n_ne, "data_parallel_expert": n_e},
        "bytes_per_rank": {"weights": int(weights), "gradients": int(grads),
                           "gradients_fp32": int(grad_fp32), "reduce_bucket": int(bucket),
                           "optimizer_states": int(opt), "masks": int(masks),
                           "activations": int(acts.total), "logits_transient": int(logits),
                           "optimizer_step_temporaries": int(step_temp), "overhead": int(req.overhead),
                           "persistent": int(persistent), "backward_peak": int(backward_peak + req.overhead),
                           "step_peak": int(step_peak + req.overhead), "peak": int(peak)},
        "activations": {k: int(v) for k, v in sorted(acts.parts.items(), key=lambda kv: -kv[1])},
        "communication_per_step": {"all_to_all_bytes_sent": int(a2a),
                                   "grad_reduce_non_expert_bytes": int(reduce_ne),
                                   "grad_reduce_expert_bytes": int(reduce_e)},
        "fits": None if req.gpu_mem is None else bool(peak <= req.gpu_mem),
    }
    return out


def advice(result: dict) -> str:
    """What to change when a plan does not fit."""
    r, b = result["request"], result["bytes_per_rank"]
    tips = []
    if r["zero"] < 2:
        tips.append("--zero 2")
    if r["ep"] < r["world"]:
        tips.append("a larger --ep (fewer experts per rank)")
    if b["activations"] > 0.25 * b["peak"]:
        tips.append("a smaller --micro-batch or --seq")
    tips.append("more --nodes")
    return ", ".join(tips)


def _gib(n: float) -> str:
    return f"{n / GIB:8.2f} GiB"


def format_plan(res: dict) -> str:
    r, p, b, c = res["request"], res["params"], res["bytes_per_rank"], res["communication_per_step"]
    lines = [f"{r['preset']} mode={r['mode']} kappa={r['kappa']} world={r['world']} ({r['nodes']}x"
             f"{r['gpus_per_node']}) ep={r['ep']} zero={r['zero']} {r['dtype']} micro-batch={r['micro_batch']} "
             f"seq={r['seq']}/{r['target_seq']}",
             f"  parameters per rank: non-expert {p['non_expert_per_rank'] / 1e6:.1f}M (DP {p['data_parallel_non_expert']}),"
             f" expert {p['expert_per_rank'] / 1e6:.1f}M ({p['experts_per_rank_per_layer']} experts/layer, DP "
             f"{p['data_parallel_expert']}); compact model {p['compact_total'] / 1e9:.3f}B"]
    for key in ("weights", "gradients", "gradients_fp32", "reduce_bucket", "optimizer_states", "masks", "activations",
                "logits_transient", "optimizer_step_temporaries", "overhead", "backward_peak", "step_peak", "peak"):
        lines.append(f"  {key:28s}{_gib(b[key])}")
    lines.append(f"  all-to-all sent per step     {_gib(c['all_to_all_bytes_sent'])}")
    lines.append(f"  gradient reduce per step     {_gib(c['grad_reduce_non_expert_bytes'] + c['grad_reduce_expert_bytes'])}")
    if res["fits"] is not None:
        lines.append(f"  fits in {r['gpu_mem'] / GIB:.1f} GiB: {'yes' if res['fits'] else 'NO'}")
    if "after_compaction" in res:
        a, pa = res["after_compaction"]["bytes_per_rank"], res["after_compaction"]["params"]
        lines.append(f"  after the warm-up partition, compacted in place (expert {pa['expert_per_rank'] / 1e6:.1f}M, "
                     f"non-expert {pa['non_expert_per_rank'] / 1e6:.1f}M per rank):")
        for key in ("weights", "optimizer_states", "activations", "persistent", "peak"):
            lines.append(f"    {key:26s}{_gib(a[key])}")
    return "\n".join(lines)


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe plan`` subparser."""
    p = sub.add_parser("plan", help="per-rank memory and communication of a Switch PAD-MoE run on a cluster",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset", help=f"a Switch preset: {', '.join(switch_names())}")
    p.add_argument("--kappa", type=finite_float, default=0.5,
                   help="dynamic ratio κ (compact size; --compact: training size)")
    p.add_argument("--mode", default="pad", help="pad | moe | static")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: min(world, experts))")
    p.add_argument("--zero", type=int, default=1, help="ZeRO stage 0, 1 or 2")
    p.add_argument("--dtype", default="bf16", help="bf16 | fp16 | fp32")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512, help="encoder tokens per sequence")
    p.add_argument("--target-seq", type=int, default=None, help="decoder tokens per sequence (default: --seq)")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--capacity-factor", type=finite_float, default=1.25)
    p.add_argument("--min-capacity", type=int, default=4)
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--compact", action="store_true", help="neuron-granularity PAD compacted before training")
    p.add_argument("--compact-after-warmup", action="store_true",
                   help="upcycling: full size during the warm-up, compacted in place after its partition")
    p.add_argument("--experts", type=int, default=None, help="override the preset's number of experts")
    p.add_argument("--gpu-mem", default="80GiB", help="memory per GPU, e.g. 80GiB; 'none' skips the fit check")
    p.add_argument("--overhead", default="0", help="fixed bytes per rank to add (CUDA context, NCCL), e.g. 2GiB")
    p.add_argument("--reduce-bucket", type=finite_float, default=5e7, help="ZeRO reduce_bucket_size (elements)")
    p.add_argument("--optimizer", default="fused", help="fused | torch")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(handler=_plan_command)
    return p


def _plan_command(args) -> int:
    """Prints the plan; exit 0 when it fits, 2 (one line on stderr) when it does not (bad input raises PlanError)."""
    ep = args.ep
    if ep is None:
        try:
            ep = math.gcd(args.nodes * args.gpus_per_node, get_arch(args.preset).num_experts)
        except ValueError:
            ep = 1
    req = PlanRequest(preset=args.preset, kappa=args.kappa, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      ep=ep, zero=args.zero, dtype=args.dtype, micro_batch=args.micro_batch, seq=args.seq,
                      target_seq=args.target_seq, mode=args.mode, grad_accum=args.grad_accum,
                      capacity_factor=args.capacity_factor, min_capacity=args.min_capacity,
                      dropout=not args.no_dropout, compact=args.compact,
                      compact_after_warmup=args.compact_after_warmup,
                      experts=args.experts, optimizer=args.optimizer, reduce_bucket=int(args.reduce_bucket),
                      gpu_mem=None if str(args.gpu_mem).lower() == "none" else parse_bytes(args.gpu_mem),
                      overhead=parse_bytes(args.overhead, "--overhead"))
    result = plan(req)
    print(json.dumps(result, indent=1) if args.json else format_plan(result))
    if result["fits"] is False:
        b = result["bytes_per_rank"]
        print(f"padmoe plan: error: the plan needs {b['peak'] / GIB:.1f} GiB per rank but --gpu-mem is "
              f"{req.gpu_mem / GIB:.1f} GiB; try {advice(result)}", file=sys.stderr)
        return 2
    return 0


def plan_main(argv: Optional[list[str]] = None) -> int:
    """``padmoe plan ...``: prints the plan; exit 0 when it fits, 2 (one line on stderr) on bad input or no fit."""
    from pad_moe.commands import run_command

    return run_command(register, argv)


if __name__ == "__main__":
    sys.exit(plan_main())
