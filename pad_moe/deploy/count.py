"""``padmoe count``: parameters and bytes of a model, training form and compact (deploy) form, from its configuration
alone. The architecture is built on the meta device (shapes only, nothing downloaded); its FFN blocks are found, and
the chosen mode (static / moe / pad) is applied to every ``every``-th of them by formula.

Per converted FFN with N parameters (fc1 + fc2, or gate + up + down for a gated FFN; biases included), H inputs, U
hidden units, E experts, κ dynamic:

    static     training = compact = N
    moe        training = compact = E·N + router
    pad        training = N + E·N + router + φ        compact = (N − D) + E·D + router,   D = dynamic entries
               element masks: D = round(κ·N); neuron masks: D = round(κ·U)·(2H + 1) (fc2's bias stays static),
               gated: D = round(κ·U)·(3H + 2) (a gate row, an up row, a down column; down's bias stays static)

With moe.compact (neuron masks) the run trains the narrow form: training = compact + φ.
Convention ``ours`` (default): DeepSpeed's router, one gate (E×H) per FFN; λ folded into the stored values (φ is not
stored); MoE-P (partition.method=moe_p) drops the static part. Convention ``paper`` reproduces Table 1/3: routers of the
paper's code, one per FFN *linear* with a gate and a noise matrix (2·in·E each), and PAD = non-FFN + (1 − κ + Eκ)·FFN
(ALBERT's printed row counts the static FFN whole: (1 + Eκ)·FFN). Bytes: parameters × dtype size, plus the masks
(compact: packed bits; training: one bool byte per entry). Presets count the bare encoder (no pooler, no head), as the
paper does; a run config counts the run's whole model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Optional

import torch
from torch import nn

from pad_moe.deploy.hf_presets import HF_PRESETS, PAPER_QUIRKS, build_encoder
from pad_moe.errors import UsageError, finite_float

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclasses.dataclass
class FFNSite:
    hidden: int
    units: int
    params: int
    bias: bool
    matrices: int = 2
    """2: fc1, fc2 (mlp); 3: gate, up, down (glu)."""

    @property
    def unit_params(self) -> int:
        """Parameters one hidden unit owns: a row or column per matrix, and a bias entry per input projection."""
        return self.matrices * self.hidden + (self.matrices - 1 if self.bias else 0)


@dataclasses.dataclass
class Arch:
    """What counting needs: the dense model's parameters and its FFN blocks (each distinct module once)."""

    name: str
    total: int
    sites: list[FFNSite]
    defaults: dict


def _site(*linears: nn.Linear) -> FFNSite:
    """The site of an FFN given its nn.Linear layers, input projections first (fc1, fc2 or gate, up, down)."""
    params = sum(p.numel() for linear in linears for p in linear.parameters())
    first = linears[0]
    return FFNSite(hidden=first.in_features, units=first.out_features, params=params, bias=first.bias is not None,
                   matrices=len(linears))


def _unique_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields a shared parameter once


def resolve(name_or_config: str, overrides: tuple[str, ...] = ()) -> Arch:
    """An HF preset name, a pad_moe model preset name (``debug``...) or a run config YAML."""
    from pad_moe.config import load_config
    from pad_moe.presets import MODEL_PRESETS

    if name_or_config in HF_PRESETS:
        from pad_moe.models.upcycle import find_ffn_sites

        model = build_encoder(name_or_config)
        sites = [_site(*s.linears) for s in find_ffn_sites(model)]
        return Arch(name_or_config, _unique_params(model), sites,
                    {"mode": "pad", "num_experts": 8, "k": 2, "kappa": 0.5, "granularity": "element", "every": 1,
                     "scale_mode": "both", "static_dropped": False, "compacted": False})
    if os.path.isfile(name_or_config):
        cfg = load_config(name_or_config, list(overrides))
        return config_arch(cfg, cfg.name)
    if name_or_config in MODEL_PRESETS:  # a preset is reported under its own name, not the default config's
        return config_arch(load_config(None, [f"model.preset={name_or_config}", *overrides]), name_or_config)
    raise UsageError(f"{name_or_config!r} is neither a config file nor a preset; presets: "
                     f"{', '.join(sorted(set(HF_PRESETS) | set(MODEL_PRESETS)))}")


def config_arch(cfg, name: str) -> Arch:
    """The Arch of a resolved run config, reported under ``name``."""
    model, sites = _config_model(cfg)
    pad = cfg.moe.mode == "pad"
    kappa = cfg.partition.kappa if pad and cfg.partition.enabled else 1.0
    return Arch(name, _unique_params(model), sites,
                {"mode": cfg.moe.mode, "num_experts": cfg.moe.num_experts, "k": cfg.moe.k, "kappa": kappa,
                 "granularity": cfg.moe.granularity, "every": cfg.moe.every, "scale_mode": cfg.moe.scale_mode,
                 "static_dropped": pad and cfg.partition.enabled and cfg.partition.method == "moe_p",
                 "compacted": pad and cfg.moe.compact})


def _config_model(cfg) -> tuple[nn.Module, list[FFNSite]]:
    dense = dataclasses.replace(cfg.moe, mode="static", ep_size=1)
    if cfg.model.arch == "toy":
        from pad_moe.moe.layer import DenseFFNBlock
        from pad_moe.toy import ToyClassifier

        with torch.device("meta"):
            model = ToyClassifier(cfg.model, dense, cfg.data.num_labels, seed=0)
        return model, [_site(*(getattr(m.ffn, n) for n in m.ffn.linear_names))
                       for m in model.modules() if isinstance(m, DenseFFNBlock)]
    if cfg.model.arch == "hf":
        from transformers import AutoConfig, AutoModelForSequenceClassification

        from pad_moe.models.upcycle import find_ffn_sites

        path = cfg.model.path
        if path == "minilm":
            from pad_moe.models.minilm import minilm_dir

            path = minilm_dir()
        if not path or not os.path.exists(path):
            raise UsageError(f"model.path={cfg.model.path!r} is not a local model folder; counting reads its "
                             "config.json (nothing is downloaded)")
        hf = AutoConfig.from_pretrained(path, num_labels=cfg.data.num_labels)
        if getattr(hf, "num_hidden_layers", 0) > cfg.model.num_layers:
            hf.num_hidden_layers = cfg.model.num_layers
        with torch.device("meta"):
            model = AutoModelForSequenceClassification.from_config(hf)
        return model, [_site(*s.linears) for s in find_ffn_sites(model)]
    raise UsageError(f"model.arch={cfg.model.arch!r} cannot be counted; allowed: toy, hf")


def count(arch: Arch, *, mode: Optional[str] = None, kappa: Optional[float] = None, experts: Optional[int] = None,
          k: Optional[int] = None, granularity: Optional[str] = None, convention: str = "ours",
          dtype: str = "fp32", pad_static: Optional[str] = None) -> dict:
    """Training-form and compact-form counts of ``arch`` (defaults from the preset / config)."""
    d = arch.defaults
    mode = mode or d["mode"]
    E = experts if experts is not None else d["num_experts"]
    k = k if k is not None else d["k"]
    kappa = kappa if kappa is not None else (d["kappa"] if mode == "pad" else 1.0)
    granularity = granularity or d["granularity"]
    if mode not in ("static", "moe", "pad"):
        raise UsageError(f"--mode {mode!r} is unknown; allowed: static, moe, pad")
    if convention not in ("ours", "paper"):
        raise UsageError(f"--convention {convention!r} is unknown; allowed: ours, paper")
    if not 0 < kappa <= 1:
        raise UsageError(f"--kappa {kappa} must be in (0, 1]")
    if E < 1 or not 1 <= k <= E:
        raise UsageError(f"--experts {E} / --k {k}: need experts >= 1 and 1 <= k <= experts")
    if granularity not in ("element", "neuron"):
        raise UsageError(f"--granularity {granularity!r} is unknown; allowed: element, neuron")
    if pad_static is None:
        pad_static = PAPER_QUIRKS.get(arch.name, {}).get("pad_static", "masked") if convention == "paper" else "masked"
    chosen = [s for i, s in enumerate(arch.sites) if i % d["every"] == d["every"] - 1]
    ffn_all = sum(s.params for s in arch.sites)
    phi = {"none": 0, "unconstrained": 2}.get(d["scale_mode"], 1)
    training = compact = float(arch.total)
    active = float(arch.total)
    mask_train = mask_compact = 0
    for s in chosen:
        N = s.params
        router = 2 * (s.hidden + s.units) * E if convention == "paper" else s.hidden * E
        if mode == "static":
            continue
        if mode == "moe":
            training += (E - 1) * N + router
            compact += (E - 1) * N + router
            active += (k - 1) * N + router
            continue
        if convention == "paper":
            dyn = kappa * N
            static_kept = N if pad_static == "whole" else N - dyn
        else:
            if granularity == "neuron":
                dyn = round(kappa * s.units) * s.unit_params
            else:
                dyn = round(kappa * N)
            static_kept = 0 if d["static_dropped"] else N - dyn
        entries = s.units if granularity == "neuron" and convention != "paper" else N
        if d["compacted"] and granularity == "neuron":  # moe.compact: the run trains the narrow form itself
            training += static_kept - N + E * dyn + router + phi
        else:
            training += E * N + router + phi
        compact += static_kept - N + E * dyn + router
        active += static_kept - N + k * dyn + router
        mask_train += entries
        mask_compact += -(-entries // 8)
    size = DTYPE_BYTES[dtype]
    params, params_training = int(round(compact)), int(round(training))
    return {"name": arch.name, "mode": mode, "convention": convention, "granularity": granularity,
            "kappa": kappa if mode == "pad" else None, "experts": E if mode != "static" else None, "k": k,
            "params": params, "params_training": params_training, "params_active": int(round(active)),
            "params_M": f"{params / 1e6:.1f}M", "params_training_M": f"{params_training / 1e6:.1f}M",
            "bytes": params * size + mask_compact, "bytes_training": params_training * size + mask_train,
            "dtype": dtype, "ffn_blocks": len(chosen), "ffn_params": ffn_all, "non_ffn_params": arch.total - ffn_all}


def _is_vision(target: str) -> bool:
    from pad_moe.vision.models import MODELS

    return target in MODELS and not os.path.isfile(target)


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe count`` subparser: text presets, run configs and Switch presets, and vision model names."""
    p = sub.add_parser("count", help="parameters and bytes of a preset, a run config or a vision model",
                       description=__doc__, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", help=f"a preset ({', '.join(sorted(HF_PRESETS))}, debug, switch-base-8, ...), a run "
                                  "config YAML or a vision model (resnet50, ...)")
    p.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of a run config")
    p.add_argument("--mode", choices=("static", "moe", "pad"), default=None)
    p.add_argument("--kappa", type=finite_float, default=None,
                   help="dynamic fraction κ (default: config / 0.5; vision: all dynamic)")
    p.add_argument("--experts", type=int, default=None)
    p.add_argument("--k", type=int, default=None, help="experts per token (only changes params_active)")
    p.add_argument("--granularity", choices=("element", "neuron"), default=None)
    p.add_argument("--convention", choices=("ours", "paper"), default="ours")
    p.add_argument("--pad-static", choices=("masked", "whole"), default=None,
                   help="paper convention: count the static FFN masked (1−κ) or whole (default: as the table prints)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=None, help="bytes per parameter (default fp32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    v = p.add_argument_group("vision models (padmoe count resnet50 --conv pad --kappa 0.1)")
    v.add_argument("--conv", default=None, help="static | condconv | dyconv | pad (default static)")
    v.add_argument("--image-size", type=int, default=None, help="default 224")
    v.add_argument("--in-chans", type=int, default=None, help="default 3")
    v.add_argument("--num-classes", type=int, default=None, help="default 1000")
    p.set_defaults(handler=_count_command)
    return p


_TEXT_FLAGS = (("--mode", "mode"), ("--experts", "experts"), ("--k", "k"), ("--granularity", "granularity"),
               ("--pad-static", "pad_static"), ("--dtype", "dtype"))
_VISION_FLAGS = (("--conv", "conv"), ("--image-size", "image_size"), ("--in-chans", "in_chans"),
                 ("--num-classes", "num_classes"))


def _given(args, flags) -> list[str]:
    return [flag for flag, dest in flags if getattr(args, dest) is not None]


def _count_command(args) -> int:
    """Handler of ``padmoe count``: a flag that does not apply to the target is an error, not ignored."""
    from pad_moe.switch.presets import switch_names

    if _is_vision(args.target):
        return _count_vision(args)
    if _given(args, _VISION_FLAGS):
        raise UsageError(f"{_given(args, _VISION_FLAGS)[0]} applies to vision models, not {args.target!r}")
    dtype = args.dtype or "fp32"
    from pad_moe.hfmoe.count import is_hf_moe_target

    if is_hf_moe_target(args.target):
        return _count_hf_moe(args, dtype)
    arch = None
    if os.path.isfile(args.target):  # a run config: load it once, count a vision model or build its Arch
        from pad_moe.config import load_config

        cfg = load_config(args.target, list(args.overrides))
        if cfg.model.arch == "vision":
            from pad_moe.vision.accounting import count_vision_config, format_count

            flags = _given(args, _TEXT_FLAGS) + (["--kappa"] if args.kappa is not None else []) + \
                (["--convention"] if args.convention != "ours" else [])
            if flags:
                raise UsageError(f"{flags[0]} does not apply to the vision run config {args.target}; override its "
                                 "values instead (e.g. vision.conv=static partition.kappa=0.3)")
            vision = count_vision_config(cfg)
            print(json.dumps(vision) if args.json else format_count(vision))
            return 0
        arch = config_arch(cfg, cfg.name)
    if arch is None and args.target in switch_names():
        unused = [f for f, dest in (("--k", "k"), ("--granularity", "granularity"), ("--pad-static", "pad_static"))
                  if getattr(args, dest) is not None] + (["--convention"] if args.convention != "ours" else [])
        if unused or args.overrides:
            what = unused[0] if unused else f"override {args.overrides[0]!r}"
            raise UsageError(f"{what} does not apply to the Switch preset {args.target}; it takes --mode, --kappa, "
                             "--experts and --dtype")
        from pad_moe.switch.count import count_switch

        result = count_switch(args.target, args.mode or "moe", 0.5 if args.kappa is None else args.kappa,
                              args.experts, dtype=dtype)
    else:
        result = count(arch or resolve(args.target, tuple(args.overrides)), mode=args.mode, kappa=args.kappa,
                       experts=args.experts, k=args.k, granularity=args.granularity,
                       convention=args.convention, dtype=dtype, pad_static=args.pad_static)
    if args.json:
        print(json.dumps(result))
        return 0
    r = result
    what = r["mode"] + (f" κ={r['kappa']:g} {r['granularity']}" if r["mode"] == "pad" else "")
    what += f" experts={r['experts']} k={r['k']}" if r["mode"] != "static" else ""
    print(f"{r['name']}: {what}, convention {r['convention']}")
    print(f"  compact   {r['params']:>15,d} params  {r['params_M']:>8s}  {r['bytes'] / 2**20:10.1f} MiB {r['dtype']}")
    print(f"  training  {r['params_training']:>15,d} params  {r['params_training_M']:>8s}  "
          f"{r['bytes_training'] / 2**20:10.1f} MiB {r['dtype']}")
    print(f"  active    {r['params_active']:>15,d} params per token (k={r['k']})")
    return 0


def _count_hf_moe(args, dtype: str) -> int:
    """``padmoe count MODEL_DIR`` for an HF MoE folder (pad_moe.hfmoe.count)."""
    from pad_moe.hfmoe.count import count_hf_moe

    unused = [f for f, dest in (("--experts", "experts"), ("--pad-static", "pad_static")) if getattr(args, dest)
              is not None] + (["--convention"] if args.convention != "ours" else [])
    if unused or args.overrides:
        what = unused[0] if unused else f"override {args.overrides[0]!r}"
        raise UsageError(f"{what} does not apply to the HF MoE folder {args.target}; it takes --mode, --kappa, --k, "
                         "--granularity and --dtype")
    r = count_hf_moe(args.target, mode=args.mode, kappa=args.kappa, k=args.k, granularity=args.granularity,
                     dtype_bytes=DTYPE_BYTES[dtype])  # an export folder: what it stores (no mode, κ, granularity)
    if args.json:
        print(json.dumps({**r, "dtype": dtype}))
        return 0
    what = r["mode"] + (f" κ={r['kappa']:g} {r['granularity']}" if r["mode"] == "pad" else "")
    what += f", export (method {r['method']})" if r.get("export") else ""
    print(f"{r['name']} ({r['family']}, {r['moe_layers']} MoE layers of {r['experts']} experts): {what}")
    print(f"  stored    {r['params']:>15,d} params  {r['bytes'] / 2**20:10.1f} MiB {dtype}")
    print(f"  {'source' if r.get('export') else 'as is':8s}  {r['params_training']:>15,d} params")
    print(f"  active    {r['params_active']:>15,d} params per token (k={r['k']})")
    return 0


def _count_vision(args) -> int:
    from pad_moe.vision.accounting import count as count_vision
    from pad_moe.vision.accounting import format_count

    flags = _given(args, _TEXT_FLAGS)
    if flags or args.overrides:
        what = flags[0] if flags else f"override {args.overrides[0]!r}"
        raise UsageError(f"{what} does not apply to the vision model {args.target}; it takes --conv, --kappa, "
                         "--convention, --image-size, --in-chans and --num-classes")
    geometry = {"image_size": 224 if args.image_size is None else args.image_size,
                "in_chans": 3 if args.in_chans is None else args.in_chans,
                "num_classes": 1000 if args.num_classes is None else args.num_classes}
    for name, value in geometry.items():
        if value < 1:
            raise UsageError(f"--{name.replace('_', '-')} {value} must be >= 1")
    result = count_vision(args.target, args.conv or "static", args.kappa, args.convention, **geometry)
    print(json.dumps(result) if args.json else format_count(result))
    return 0


def count_main(argv: Optional[list[str]] = None) -> int:
    """``padmoe count NAME_OR_CONFIG [--mode static|moe|pad] [--kappa K] [--experts E] [--k K] [--granularity G]
    [--convention ours|paper] [--dtype fp32] [--json] [key=value ...]``; vision model names: ``padmoe count resnet50
    --conv pad --kappa 0.1``. Returns the exit status (bad input: one line on stderr, 2)."""
    from pad_moe.commands import run_command

    return run_command(register, argv)
