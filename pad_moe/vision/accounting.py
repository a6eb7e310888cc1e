"""Parameters and multiply-adds (MACs) of the vision models, per sample, for every conv type.

Two conventions:

- ``ours`` (default): pad_moe's models as built (on the meta device: nothing is allocated). ``params_training`` counts
  every stored tensor (PAD: W_s and all K kernels, φ); ``params`` the deployable model, where a PAD conv keeps each
  static entry once and each dynamic entry K times. MACs: every conv and linear, plus per dynamic conv the attention's
  global average pool (C·H·W), its FCs, and the kernel aggregation (DY-Conv K·|W|, CondConv E·|W|, PAD K·D + |W|, D the
  dynamic entries, |W| the merge of static and dynamic parts). BatchNorm, activations and pooling are not counted.
- ``paper``: PAD-Net Table 2 (see docs/vision.md for the derivation). ImageNet geometry (224×224 RGB, 1000 classes,
  ResNet v1 layout with the stride on the first 1×1); DY-Conv: every non-stem conv, K=4, attention r=4; PAD: the same
  convs, attention r=16, |W|·(1 + (K−1)·κ) with κ the global dynamic ratio; CondConv: 8 experts on the last stage's
  convs (shortcut excluded) and the classifier, sigmoid routing C·E + E; static ResNets exclude the classifier.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

import torch
from torch import nn

from pad_moe.vision.layers import CondConv2d, DynamicConv2d, KernelMixtureConv2d, PadDynamicConv2d
from pad_moe.vision.models import CONV_TYPES, check_conv, create_model, dynamic_entry_count

CONVENTIONS = ("ours", "paper")


@dataclass
class ConvRecord:
    """One convolution (or top-level linear) as met in a forward pass of one sample."""

    name: str
    kind: str  # static | dyconv | condconv | pad | linear
    in_channels: int
    input_numel: int  # C_in · H · W: what a global average pool of the input costs
    weight_numel: int  # |W|: entries of one kernel (linear: of the weight matrix)
    macs: int  # the convolution itself with one kernel: |W| · H' · W'
    routing_params: int = 0
    routing_macs: int = 0
    num_kernels: int = 1
    dynamic_entries: int | None = None  # PAD: entries with M = 1 (None: masks on the meta device)


_KIND = {PadDynamicConv2d: "pad", DynamicConv2d: "dyconv", CondConv2d: "condconv"}


def _routing(module: KernelMixtureConv2d) -> tuple[int, int]:
    """(parameters, MACs) of a dynamic conv's routing network (its linears)."""
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    params = sum(p.numel() for m in linears for p in m.parameters())
    return params, sum(m.in_features * m.out_features for m in linears)


def trace_convs(model: nn.Module, input_shape: tuple[int, int, int]) -> list[ConvRecord]:
    """Every conv and top-level linear of ``model`` in forward order, from one forward of a (1, C, H, W) input.

    Runs on whatever device the model lives on (the meta device costs nothing); linears inside dynamic convs belong to
    their routing and are not listed.
    """
    records: list[ConvRecord] = []
    inside_dynamic = {id(m) for module in model.modules() if isinstance(module, KernelMixtureConv2d)
                      for m in module.modules() if m is not module}

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            c_in, x_numel = x.shape[1], math.prod(x.shape[1:])
            out_hw = math.prod(output.shape[2:]) if output.dim() == 4 else 1
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                n = module.weight.numel()
                kind = "linear" if isinstance(module, nn.Linear) else "static"
                records.append(ConvRecord(name, kind, c_in, x_numel, n, n * out_hw))
                return
            n = math.prod(module.kernel_shape)
            kind = _KIND[type(module)]
            dynamic = None
            if kind == "pad" and not module.mask_weight.is_meta:
                dynamic = int(module.mask_weight.sum())
            rp, rm = _routing(module)
            records.append(ConvRecord(name, kind, c_in, x_numel, n, n * out_hw, rp, rm, module.num_kernels, dynamic))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear, KernelMixtureConv2d)) and id(m) not in inside_dynamic]
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        with torch.no_grad():
            model(torch.zeros((1, *input_shape), device=param.device, dtype=param.dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return records


def count_model(model: nn.Module, input_shape: tuple[int, int, int], kappa: float | None = None) -> dict:
    """pad_moe's convention for a built model: real masks, or ⌊κ·N + ½⌋ per conv when they live on the meta device
    (all dynamic when kappa is None)."""
    records = trace_convs(model, input_shape)
    params_training = sum(p.numel() for p in model.parameters())
    params, macs = params_training, 0
    for r in records:
        macs += r.macs
        if r.kind in ("static", "linear"):
            continue
        macs += r.input_numel + r.routing_macs  # attention / router: average pool + FCs
        n, k = r.weight_numel, r.num_kernels
        if r.kind == "pad":
            d = r.dynamic_entries
            if d is None:
                d = n if kappa is None else dynamic_entry_count(kappa, n)
            params -= d + k * (n - d)  # stored W_s + K kernels -> static entries once, dynamic ones K times
            macs += k * d + n  # aggregate the dynamic entries, merge with the static part
        else:
            macs += k * n
    return {"params": params, "params_training": params_training, "macs": macs}


PAPER_KERNELS, PAPER_EXPERTS = 4, 8
PAPER_REDUCTION = {"dyconv": 4, "pad": 16}


def _paper_count(name: str, conv: str, kappa: float | None) -> dict:
    """PAD-Net Table 2's convention, from the static model's geometry (derivation in docs/vision.md)."""
    with torch.device("meta"):
        model = create_model(name, "static", image_size=224, in_chans=3, num_classes=1000, v1_layout=True)
    records = trace_convs(model, (3, 224, 224))
    static_params = sum(p.numel() for p in model.parameters())
    static_macs = sum(r.macs for r in records)
    is_resnet = name.startswith("resnet")
    if conv == "static":
        classifier = model.fc.weight.numel() + model.fc.bias.numel()
        params = static_params - (classifier if is_resnet else 0)
        return {"params": params, "params_training": params, "macs": static_macs}
    if conv == "condconv":
        if not is_resnet:
            raise ValueError(f"convention='paper' has no CondConv rule for {name} (no layer choice reproduces the "
                             "table's MobileNetV2 CondConv rows); use convention='ours'")
        E = PAPER_EXPERTS
        chosen = [r for r in records if r.kind == "linear"
                  or (r.name.startswith("layer4.") and "downsample" not in r.name)]
        w = sum(r.weight_numel for r in chosen)
        routing_macs = sum(r.in_channels * E for r in chosen)
        gap = sum(r.input_numel for r in chosen if r.kind != "linear")  # the classifier's input is pooled already
        params = static_params + (E - 1) * w + routing_macs + E * len(chosen)  # routing: C·E weights + E biases
        return {"params": params, "params_training": params, "macs": static_macs + E * w + gap + routing_macs}
    K, div = PAPER_KERNELS, PAPER_REDUCTION[conv]
    dynamic = [r for r in records if r.kind == "static"][1:]  # every conv but the stem
    hidden = [max(1, r.in_channels // div) for r in dynamic]
    att_params = sum(r.in_channels * h + h * K + K for r, h in zip(dynamic, hidden))
    att_macs = sum(r.in_channels * h + h * K for r, h in zip(dynamic, hidden))
    gap = sum(r.input_numel for r in dynamic)
    w = sum(r.weight_numel for r in dynamic)
    if conv == "dyconv":
        params = static_params + (K - 1) * w + att_params
        return {"params": params, "params_training": params, "macs": static_macs + gap + att_macs + K * w}
    rho = 1.0 if kappa is None else kappa
    params = static_params + (K - 1) * rho * w + att_params  # |W|·(1 + (K−1)ρ) for the dynamic convs
    macs = static_macs + gap + att_macs + K * rho * w + w  # aggregate Kρ|W|, merge |W|
    return {"params": round(params), "params_training": static_params + K * w + att_params, "macs": round(macs)}


def count(name: str, conv: str = "static", kappa: float | None = None, convention: str = "ours", *,
          image_size: int = 224, in_chans: int = 3, num_classes: int = 1000, **model_kwargs) -> dict:
    """{params, params_training, macs} of a registered model (per sample; MACs = multiply-adds).

    ours: the model as ``create_model(name, conv, kappa=..., **model_kwargs)`` builds it (on the meta device) at
    image_size / in_chans / num_classes. paper: PAD-Net Table 2's convention (fixed ImageNet geometry; kappa is the
    dynamic ratio of PAD rows, default 1.0); model_kwargs and the geometry arguments are not used.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r} is unknown; choose one of {', '.join(CONVENTIONS)}")
    check_conv(conv, kappa)
    if convention == "paper":
        result = _paper_count(name, conv, kappa)
    else:
        with torch.device("meta"):
            model = create_model(name, conv, kappa=kappa, image_size=image_size, in_chans=in_chans,
                                 num_classes=num_classes, **model_kwargs)
        result = count_model(model, (in_chans, image_size, image_size), kappa)
    return {"model": name, "conv": conv, "kappa": kappa, "convention": convention, **result}


def format_count(result: dict) -> str:
    """One human line, e.g. ``resnet50 pad κ=0.1 (paper): 33.8M params (training 100.9M), 3.90G MACs``."""
    kappa = "" if result["kappa"] is None else f" κ={result['kappa']:g}"
    return (f"{result['model']} {result['conv']}{kappa} ({result['convention']}): {_si(result['params'])} params "
            f"(training {_si(result['params_training'])}), {_si(result['macs'])} MACs")


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.4g}{suffix}"
    return f"{value:g}"


def count_vision_config(cfg) -> dict:
    """Count the model a vision run config trains: ``cfg.vision`` as built, PAD at ``partition.kappa`` (the ratio IMP
    will leave) unless partitioning is off."""
    v = cfg.vision
    kwargs = v.model_kwargs()
    kappa = kwargs.pop("kappa")
    if v.conv == "pad" and cfg.partition.enabled:
        kappa = cfg.partition.kappa
    image_size, in_chans, num_classes = kwargs.pop("image_size"), kwargs.pop("in_chans"), kwargs.pop("num_classes")
    return count(v.model, v.conv, kappa, "ours", image_size=image_size, in_chans=in_chans, num_classes=num_classes,
                 **kwargs)


def count_main(argv: list[str] | None = None) -> int:
    """``padmoe count NAME --conv ... [--kappa ...] [--convention paper] [--json]``; bad input: one line, exit 2."""
    from pad_moe.vision.models import list_models

    p = argparse.ArgumentParser(prog="padmoe count", description="parameters and multiply-adds of a vision model",
                                allow_abbrev=False)
    p.add_argument("name", help=f"one of {', '.join(list_models())}")
    p.add_argument("--conv", default="static", help=f"one of {', '.join(CONV_TYPES)}")
    p.add_argument("--kappa", type=float, default=None, help="dynamic ratio of conv=pad (default: all dynamic)")
    p.add_argument("--convention", default="ours", help="ours (as built) | paper (PAD-Net Table 2)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--in-chans", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    try:
        result = count(args.name, args.conv, args.kappa, args.convention, image_size=args.image_size,
                       in_chans=args.in_chans, num_classes=args.num_classes)
    except ValueError as err:
        print(f"padmoe count: error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(result) if args.json else format_count(result))
    return 0


if __name__ == "__main__":
    sys.exit(count_main())
