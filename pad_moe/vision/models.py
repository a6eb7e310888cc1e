"""ResNet-10/18/50 and MobileNetV2 with static, CondConv, DY-Conv or PAD-DyConv convolutions, and their registry.

Every conv except the stem takes the chosen type (switches: ``downsample_dynamic`` for ResNet shortcut convs,
``last_conv_dynamic`` for MobileNetV2's final 1×1). Inputs from 28×28 grayscale to 224×224 RGB: below 112 pixels the
stem is CIFAR-style (ResNet: 3×3 stride 1, no max-pool; MobileNetV2: stride 1 and a stride-1 second stage).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from pad_moe.pad.mixing import SCALE_MODES
from pad_moe.vision.kernels import IMPLS
from pad_moe.vision.layers import CondConv2d, DynamicConv2d, KernelMixtureConv2d, PadDynamicConv2d

CONV_TYPES = ("static", "condconv", "dyconv", "pad")
DEFAULT_KERNELS = {"condconv": 8, "dyconv": 4, "pad": 4, "static": 1}
STEMS = ("auto", "imagenet", "cifar")


@dataclass(frozen=True)
class ConvFactory:
    """Builds every non-stem conv of a model: static nn.Conv2d or one of the dynamic layers."""

    conv: str = "static"
    num_kernels: int = 4
    reduction: int = 4
    temperature: float = 30.0
    impl: str = "auto"
    scale_mode: str = "both"

    def __call__(self, cin: int, cout: int, kernel: int, stride: int = 1, padding: int = 0, groups: int = 1,
                 dynamic: bool = True) -> nn.Module:
        if self.conv == "static" or not dynamic:
            return nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False)
        common = dict(stride=stride, padding=padding, groups=groups, impl=self.impl)
        if self.conv == "condconv":
            return CondConv2d(cin, cout, kernel, num_experts=self.num_kernels, **common)
        dyn = dict(num_kernels=self.num_kernels, reduction=self.reduction, temperature=self.temperature, **common)
        if self.conv == "dyconv":
            return DynamicConv2d(cin, cout, kernel, **dyn)
        return PadDynamicConv2d(cin, cout, kernel, scale_mode=self.scale_mode, **dyn)


def _bn_relu(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


# -- ResNet -----------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, make: ConvFactory, cin: int, width: int, stride: int, downsample_dynamic: bool, v1: bool):
        super().__init__()
        self.conv1 = make(cin, width, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make(width, width, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(make, cin, width, stride, downsample_dynamic)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1×1 -> 3×3 -> 1×1 (×4). v1 layout: the stride sits on the first 1×1 (He et al.); v1.5: on the 3×3."""

    expansion = 4

    def __init__(self, make: ConvFactory, cin: int, width: int, stride: int, downsample_dynamic: bool, v1: bool):
        super().__init__()
        self.conv1 = make(cin, width, 1, stride if v1 else 1, 0)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = make(width, width, 3, 1 if v1 else stride, 1)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = make(width, width * 4, 1, 1, 0)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(make, cin, width * 4, stride, downsample_dynamic)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def _shortcut(make: ConvFactory, cin: int, cout: int, stride: int, dynamic: bool) -> nn.Module | None:
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(make(cin, cout, 1, stride, 0, dynamic=dynamic), nn.BatchNorm2d(cout))


class ResNet(nn.Module):
    """forward(images (B, in_chans, H, W)) -> logits (B, num_classes)."""

    def __init__(self, block, depths: tuple[int, ...], make: ConvFactory, *, num_classes: int, in_chans: int,
                 width: int = 64, small_input: bool = False, v1_layout: bool = False, downsample_dynamic: bool = True):
        super().__init__()
        if small_input:
            stem = [nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), *_bn_relu(width)]
        else:
            stem = [nn.Conv2d(in_chans, width, 7, 2, 3, bias=False), *_bn_relu(width), nn.MaxPool2d(3, 2, 1)]
        self.stem = nn.Sequential(*stem)
        cin, stages = width, []
        for i, depth in enumerate(depths):
            w = width * 2**i
            blocks = []
            for j in range(depth):
                blocks.append(block(make, cin, w, 2 if (i > 0 and j == 0) else 1, downsample_dynamic, v1_layout))
                cin = w * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        self.num_features = cin

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


# -- MobileNetV2 ------------------------------------------------------------------------------------------------------
def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor``, never more than 10 % below ``value`` (MobileNet convention)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class InvertedResidual(nn.Module):
    def __init__(self, make: ConvFactory, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers += [make(cin, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True)]
        layers += [make(hidden, hidden, 3, stride, 1, groups=hidden), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   make(hidden, cout, 1), nn.BatchNorm2d(cout)]
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


# (expansion t, channels c, repeats n, stride s) of Sandler et al.
MBV2_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))


class MobileNetV2(nn.Module):
    """forward(images (B, in_chans, H, W)) -> logits (B, num_classes)."""

    def __init__(self, make: ConvFactory, *, num_classes: int, in_chans: int, width_mult: float = 1.0,
                 small_input: bool = False, last_conv_dynamic: bool = True, dropout: float = 0.2):
        super().__init__()
        cin = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        self.stem = nn.Sequential(nn.Conv2d(in_chans, cin, 3, 1 if small_input else 2, 1, bias=False),
                                  nn.BatchNorm2d(cin), nn.ReLU6(inplace=True))
        blocks = []
        for index, (t, c, n, s) in enumerate(MBV2_SETTINGS):
            cout = make_divisible(c * width_mult)
            if small_input and index == 1:
                s = 1
            for j in range(n):
                blocks.append(InvertedResidual(make, cin, cout, s if j == 0 else 1, t))
                cin = cout
        self.features = nn.Sequential(*blocks)
        self.last_conv = nn.Sequential(make(cin, last, 1, dynamic=last_conv_dynamic), nn.BatchNorm2d(last),
                                       nn.ReLU6(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(last, num_classes)
        self.num_features = last

    def forward(self, x):
        x = self.last_conv(self.features(self.stem(x)))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


# -- registry ---------------------------------------------------------------------------------------------------------
def _resnet(block, depths, width=64):
    def build(make, *, num_classes, in_chans, small_input, width_mult, v1_layout, downsample_dynamic, **_):
        return ResNet(block, depths, make, num_classes=num_classes, in_chans=in_chans,
                      width=max(1, int(round(width * width_mult))), small_input=small_input, v1_layout=v1_layout,
                      downsample_dynamic=downsample_dynamic)
    return build


def _mobilenetv2(multiplier):
    def build(make, *, num_classes, in_chans, small_input, width_mult, last_conv_dynamic, **_):
        return MobileNetV2(make, num_classes=num_classes, in_chans=in_chans, width_mult=multiplier * width_mult,
                           small_input=small_input, last_conv_dynamic=last_conv_dynamic)
    return build


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet10": _resnet(BasicBlock, (1, 1, 1, 1)),
    "resnet18": _resnet(BasicBlock, (2, 2, 2, 2)),
    "resnet50": _resnet(Bottleneck, (3, 4, 6, 3)),
    "mobilenetv2_050": _mobilenetv2(0.5),
    "mobilenetv2_075": _mobilenetv2(0.75),
    "mobilenetv2_100": _mobilenetv2(1.0),
    "resnet_debug": _resnet(BasicBlock, (1, 1, 1, 1), width=8),
}
"""Model names for ``create_model``; ``resnet_debug`` is ResNet-10 with 8 base channels (tests, CI)."""


def list_models() -> list[str]:
    return sorted(MODELS)


def check_conv(conv: str, kappa: float | None) -> None:
    """A known conv type, and κ in (0, 1] only for PAD (ValueError naming the value otherwise)."""
    if conv not in CONV_TYPES:
        raise ValueError(f"conv={conv!r} is unknown; choose one of {', '.join(CONV_TYPES)}")
    if kappa is not None and conv != "pad":
        raise ValueError(f"kappa={kappa} applies to conv='pad' only, got conv={conv!r}")
    if kappa is not None and not 0 < kappa <= 1:
        raise ValueError(f"kappa={kappa} must be in (0, 1]")


def create_model(name: str, conv: str = "static", *, kappa: float | None = None, num_classes: int = 1000,
                 in_chans: int = 3, image_size: int = 224, num_kernels: int | None = None, reduction: int = 4,
                 temperature: float = 30.0, width_mult: float = 1.0, impl: str = "auto", scale_mode: str = "both",
                 downsample_dynamic: bool = True, last_conv_dynamic: bool = True, v1_layout: bool = False,
                 stem: str = "auto", seed: int = 0) -> nn.Module:
    """A registered model with every non-stem conv of type ``conv`` (static | condconv | dyconv | pad).

    kappa (pad only): None leaves every mask entry dynamic (M = 1) until IMP partitions the model; a value in (0, 1]
    draws a seeded random partition with exactly ⌊κ·N + ½⌋ dynamic entries in each conv (the random-partition
    baseline; IMP overwrites it). num_kernels: K for dyconv/pad (default 4), experts for condconv (default 8).
    """
    if name not in MODELS:
        raise ValueError(f"model {name!r} is unknown; choose one of {', '.join(list_models())}")
    check_conv(conv, kappa)
    if stem not in STEMS:
        raise ValueError(f"stem={stem!r} is unknown; choose one of {', '.join(STEMS)}")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r} is unknown; choose one of {', '.join(IMPLS)}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={scale_mode!r} is unknown; choose one of {', '.join(SCALE_MODES)}")
    for label, value in (("num_classes", num_classes), ("in_chans", in_chans), ("image_size", image_size),
                         ("reduction", reduction)):
        if value < 1:
            raise ValueError(f"{label}={value} must be >= 1")
    if num_kernels is not None and num_kernels < 1:
        raise ValueError(f"num_kernels={num_kernels} must be >= 1")
    if width_mult <= 0 or temperature <= 0:
        raise ValueError(f"width_mult={width_mult} and temperature={temperature} must be > 0")
    make = ConvFactory(conv, num_kernels or DEFAULT_KERNELS[conv], reduction, temperature, impl, scale_mode)
    small = image_size < 112 if stem == "auto" else stem == "cifar"
    model = MODELS[name](make, num_classes=num_classes, in_chans=in_chans, small_input=small, width_mult=width_mult,
                         v1_layout=v1_layout, downsample_dynamic=downsample_dynamic,
                         last_conv_dynamic=last_conv_dynamic)
    init_weights(model)
    if conv == "pad" and kappa is not None:
        random_masks(model, kappa, seed)
    return model


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolution kernels, each of the K kernels independently; BatchNorm γ=1, β=0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, KernelMixtureConv2d):
            module.reset_kernels(module.weight, "fan_out")
            if isinstance(module, PadDynamicConv2d):
                module.reset_kernels(module.static_weight, "fan_out")
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def dynamic_entry_count(kappa: float, total: int) -> int:
    """Entries kept dynamic out of ``total`` at ratio κ: ⌊κ·N + ½⌋ (the rounding IMP uses)."""
    return int(math.floor(kappa * total + 0.5))


def random_masks(model: nn.Module, kappa: float, seed: int = 0) -> None:
    """A seeded random partition: exactly ⌊κ·N + ½⌋ dynamic entries in each PAD conv (same on every rank)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, PadDynamicConv2d) and not module.mask_weight.is_meta:  # meta: shape-only (accounting)
            n = math.prod(module.kernel_shape)
            chosen = torch.randperm(n, generator=generator, device="cpu")[:dynamic_entry_count(kappa, n)]
            mask = torch.zeros(n, dtype=torch.bool, device="cpu")
            mask[chosen] = True
            module.set_masks({"weight": mask.reshape(module.kernel_shape)})
