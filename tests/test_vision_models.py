"""Every registered vision model with every conv type: builds, forward without NaN, every trainable parameter gets a
gradient (PAD: exactly zero where the mask says so); registry switches and bad input; the temperature schedule."""

import pytest
import torch
from torch import nn

from pad_moe.vision.layers import CondConv2d, DynamicConv2d, KernelAttention, PadDynamicConv2d
from pad_moe.vision.models import CONV_TYPES, create_model, list_models
from pad_moe.vision.temperature import TemperatureSchedule


def _tiny(name):
    return {} if name == "resnet_debug" else {"width_mult": 0.125}


@pytest.mark.parametrize("conv", CONV_TYPES)
@pytest.mark.parametrize("name", list_models())
def test_every_model_and_conv_type_builds_runs_and_trains(name, conv):
    torch.manual_seed(0)
    kappa = 0.5 if conv == "pad" else None
    model = create_model(name, conv, kappa=kappa, num_classes=5, in_chans=1, image_size=16, **_tiny(name))
    y = model(torch.randn(2, 1, 16, 16))
    assert y.shape == (2, 5) and torch.isfinite(y).all()
    y.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    stem = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert stem.in_channels == 1  # the stem stays static
    dynamic = [m for m in model.modules() if isinstance(m, (DynamicConv2d, CondConv2d))]
    assert (len(dynamic) > 0) == (conv != "static")
    for m in dynamic:
        if isinstance(m, PadDynamicConv2d):
            mask = m.mask_weight
            assert torch.count_nonzero(m.static_weight.grad[mask]) == 0
            assert torch.count_nonzero(m.weight.grad[:, ~mask]) == 0


def test_only_the_stem_stays_static_and_switches_keep_shortcut_and_last_conv_static():
    resnet = create_model("resnet18", "dyconv", image_size=32, width_mult=0.125)
    static = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert static == ["stem.0"]
    resnet = create_model("resnet18", "dyconv", image_size=32, width_mult=0.125, downsample_dynamic=False)
    static = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert static == ["stem.0", "layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]
    mbv2 = create_model("mobilenetv2_050", "pad", image_size=32, last_conv_dynamic=False)
    assert isinstance(mbv2.last_conv[0], nn.Conv2d) and isinstance(mbv2.features[3].block[3], PadDynamicConv2d)


def test_input_sizes_from_28x28_grayscale_to_224x224_rgb():
    small = create_model("resnet_debug", "pad", in_chans=1, image_size=28, num_classes=10)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert small.stem[0].kernel_size == (3, 3)  # CIFAR-style stem below 112 pixels
    with torch.device("meta"):
        big = create_model("resnet50", "dyconv", in_chans=3, image_size=224)
    assert big(torch.empty(1, 3, 224, 224, device="meta")).shape == (1, 1000)
    assert big.stem[0].kernel_size == (7, 7)
    mbv2 = create_model("mobilenetv2_100", "condconv", in_chans=3, image_size=32, num_classes=10, width_mult=0.25)
    assert mbv2(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_v1_layout_puts_the_stride_on_the_first_1x1():
    with torch.device("meta"):
        v15 = create_model("resnet50", "static")
        v1 = create_model("resnet50", "static", v1_layout=True)
    assert v15.layer2[0].conv1.stride == (1, 1) and v15.layer2[0].conv2.stride == (2, 2)
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)


def test_kappa_draws_an_exact_seeded_random_partition_and_none_leaves_all_dynamic():
    a = create_model("resnet_debug", "pad", kappa=0.3, seed=1)
    b = create_model("resnet_debug", "pad", kappa=0.3, seed=1)
    c = create_model("resnet_debug", "pad", kappa=0.3, seed=2)
    for ma, mb in zip(a.modules(), b.modules()):
        if isinstance(ma, PadDynamicConv2d):
            n = ma.mask_weight.numel()
            assert int(ma.mask_weight.sum()) == int(0.3 * n + 0.5)
            assert torch.equal(ma.mask_weight, mb.mask_weight)
    masks = lambda m: torch.cat([x.mask_weight.reshape(-1) for x in m.modules()  # noqa: E731
                                 if isinstance(x, PadDynamicConv2d)])
    assert not torch.equal(masks(a), masks(c))
    assert masks(create_model("resnet_debug", "pad")).all()


@pytest.mark.parametrize("kwargs,match", [
    ({"name": "resnet34"}, "model 'resnet34' is unknown"),
    ({"conv": "dynamic"}, "conv='dynamic' is unknown"),
    ({"conv": "pad", "kappa": 0.0}, r"kappa=0.0 must be in \(0, 1\]"),
    ({"conv": "pad", "kappa": 1.5}, r"kappa=1.5 must be in \(0, 1\]"),
    ({"conv": "dyconv", "kappa": 0.5}, "applies to conv='pad' only"),
    ({"in_chans": 0}, "in_chans=0 must be >= 1"),
    ({"impl": "fast"}, "impl='fast' is unknown"),
])
def test_bad_model_arguments_raise_one_clear_error(kwargs, match):
    args = {"name": "resnet_debug", "conv": "static", **kwargs}
    with pytest.raises(ValueError, match=match):
        create_model(args.pop("name"), args.pop("conv"), **args)


def test_channel_mismatch_between_input_and_model_fails():
    model = create_model("resnet_debug", "static", in_chans=3)
    with pytest.raises(RuntimeError):
        model(torch.randn(1, 1, 16, 16))


def test_temperature_anneals_linearly_per_step_then_holds():
    sched = TemperatureSchedule(30.0, 1.0, 10)
    assert sched.value(0, 100) == 30.0
    assert sched.value(500, 100) == pytest.approx(15.5)
    assert sched.value(999, 100) == pytest.approx(1.0 + 29.0 / 1000)
    assert sched.value(1000, 100) == 1.0 and sched.value(10**6, 100) == 1.0
    assert TemperatureSchedule(30, 1, 0).value(0, 10) == 1.0
    model = create_model("resnet_debug", "dyconv")
    assert sched.apply(model, 250, 100) == pytest.approx(22.75)
    taus = [m.temperature for m in model.modules() if isinstance(m, KernelAttention)]
    assert len(taus) == 11 and all(t == pytest.approx(22.75) for t in taus)
    resumed = TemperatureSchedule(30.0, 1.0, 10)
    resumed.load_state_dict(sched.state_dict())
    assert resumed.last_step == 250
    with pytest.raises(ValueError, match="differs"):
        TemperatureSchedule(31.0, 1.0, 15).load_state_dict(sched.state_dict())
    with pytest.raises(ValueError, match="steps_per_epoch=0"):
        sched.value(1, 0)
