"""``VisionConfig``: the ``vision`` section of a run config (model, conv type, data, temperature schedule)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pad_moe.checks import at_least as _at_least
from pad_moe.checks import require as _require
from pad_moe.pad.mixing import SCALE_MODES
from pad_moe.vision.data import DATASETS
from pad_moe.vision.kernels import IMPLS
from pad_moe.vision.models import CONV_TYPES, MODELS


@dataclass
class VisionConfig:
    """An image-classification run: which network, which convolutions, which data."""

    model: str = "resnet10"
    """A name from ``pad_moe.vision.MODELS`` (resnet10/18/50, mobilenetv2_050/075/100, resnet_debug)."""
    conv: str = "pad"
    """static | condconv | dyconv | pad: the type of every conv except the stem."""
    num_kernels: Optional[int] = None
    """K kernels (dyconv, pad; default 4) or experts (condconv; default 8)."""
    reduction: int = 4
    """Attention reduction r: FC1 maps C_in -> C_in // r (Chen et al.: 4)."""
    temperature_start: float = 30.0
    """Softmax temperature τ at step 0."""
    temperature_end: float = 1.0
    """τ after the annealing (and for the rest of training)."""
    temperature_epochs: float = 10.0
    """Epochs over which τ falls linearly, updated every optimizer step (0: τ = temperature_end throughout)."""
    width_mult: float = 1.0
    """Channel multiplier on top of the model's own (MobileNetV2 ×0.5 is already in its name)."""
    in_chans: int = 1
    """Input channels; must match the data (Fashion-MNIST 1, CIFAR-10 3)."""
    image_size: int = 28
    """Input side in pixels; data is resized to it at load time (< 112: CIFAR-style stem)."""
    num_classes: int = 10
    """Classes; must cover the data's labels."""
    dataset: str = "fashion_mnist"
    """fashion_mnist (the Debian package, the offline default) | cifar10 | imagefolder | synthetic."""
    dataset_path: Optional[str] = None
    """Data location (default for fashion_mnist: /usr/share/datasets/fashion-mnist)."""
    train_limit: int = 0
    """Use only the first N training images (0: all; synthetic: N images, default 1024)."""
    eval_limit: int = 0
    """Use only the first N test images (0: all; synthetic: N images, default 256)."""
    augment: bool = True
    """Random crop with zero padding and horizontal flip on training images."""
    crop_padding: int = 2
    """Padding of the random crop, pixels."""
    hflip: bool = True
    """Random horizontal flip (when augment)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    downsample_dynamic: bool = True
    """ResNet shortcut 1×1 convs take the dynamic type (paper: yes)."""
    last_conv_dynamic: bool = True
    """MobileNetV2's final 1×1 conv takes the dynamic type (paper: yes)."""
    v1_layout: bool = False
    """ResNet-50: stride on the first 1×1 of the bottleneck (He et al. v1) instead of the 3×3 (v1.5)."""
    impl: str = "auto"
    """Per-sample kernel path: auto (CPU fast paths, the reference rule elsewhere) | reference | grouped | mix | bmm |
    chunked | tiled (see pad_moe.vision.kernels)."""
    scale_mode: str = "both"
    """PAD scale factors λs, λd: none | static | dynamic | both | unconstrained."""
    init_kappa: Optional[float] = None
    """PAD: a seeded random initial partition at this ratio (None: all dynamic until IMP partitions)."""

    def __post_init__(self):
        o = "vision"
        _require(self.model in MODELS, f"{o}.model={self.model!r} is unknown; choose one of {', '.join(sorted(MODELS))}")
        _require(self.conv in CONV_TYPES, f"{o}.conv={self.conv!r} is unknown; choose one of {', '.join(CONV_TYPES)}")
        _require(self.dataset in DATASETS, f"{o}.dataset={self.dataset!r} is unknown; choose one of "
                                           f"{', '.join(DATASETS)}")
        _require(self.impl in IMPLS, f"{o}.impl={self.impl!r} is unknown; choose one of {', '.join(IMPLS)}")
        _require(self.scale_mode in SCALE_MODES, f"{o}.scale_mode={self.scale_mode!r} is unknown; choose one of "
                                                 f"{', '.join(SCALE_MODES)}")
        if self.num_kernels is not None:
            _at_least(o, "num_kernels", self.num_kernels, 1)
        for name in ("reduction", "in_chans"):
            _at_least(o, name, getattr(self, name), 1)
        _at_least(o, "num_classes", self.num_classes, 2)
        _require(self.image_size >= 8, f"{o}.image_size={self.image_size} must be >= 8 (ResNets downsample 8x)")
        _require(self.temperature_start > 0 and self.temperature_end > 0,
                 f"{o}.temperature_start={self.temperature_start} and {o}.temperature_end={self.temperature_end} "
                 "must be > 0")
        _at_least(o, "temperature_epochs", self.temperature_epochs, 0)
        _require(self.width_mult > 0, f"{o}.width_mult={self.width_mult} must be > 0")
        for name in ("train_limit", "eval_limit", "crop_padding"):
            _at_least(o, name, getattr(self, name), 0)
        _require(0 <= self.label_smoothing < 1, f"{o}.label_smoothing={self.label_smoothing} must be in [0, 1)")
        if self.init_kappa is not None:
            _require(self.conv == "pad", f"{o}.init_kappa={self.init_kappa} needs {o}.conv=pad, got {self.conv}")
            _require(0 < self.init_kappa <= 1, f"{o}.init_kappa={self.init_kappa} must be in (0, 1]")
        _require(self.dataset != "fashion_mnist" or self.in_chans == 1,
                 f"{o}.in_chans={self.in_chans} but fashion_mnist images have 1 channel; set {o}.in_chans=1")
        _require(self.dataset != "cifar10" or self.in_chans == 3,
                 f"{o}.in_chans={self.in_chans} but cifar10 images have 3 channels; set {o}.in_chans=3")
        _require(self.dataset not in ("fashion_mnist", "cifar10") or self.num_classes >= 10,
                 f"{o}.num_classes={self.num_classes} but {self.dataset} has 10 classes")

    @property
    def weight_decay(self) -> float:
        """The paper's SGD weight decay: 1e-4 for ResNets, 4e-5 for MobileNetV2."""
        return 4e-5 if self.model.startswith("mobilenetv2") else 1e-4

    def model_kwargs(self) -> dict:
        """Keyword arguments of ``create_model`` (besides name and conv)."""
        return dict(kappa=self.init_kappa, num_classes=self.num_classes, in_chans=self.in_chans,
                    image_size=self.image_size, num_kernels=self.num_kernels, reduction=self.reduction,
                    temperature=self.temperature_start, width_mult=self.width_mult, impl=self.impl,
                    scale_mode=self.scale_mode, downsample_dynamic=self.downsample_dynamic,
                    last_conv_dynamic=self.last_conv_dynamic, v1_layout=self.v1_layout)
