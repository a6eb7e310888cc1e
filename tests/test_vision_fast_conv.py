"""The CPU fast paths of the dynamic convs (``impl='chunked'`` and ``'tiled'``, pad_moe.vision.persample) against the
reference paths: forward and every gradient (input, kernels, attention / router, PAD's static kernel, φ, a relaxed
mask) agree to 1e-5 relative in fp32 for every layer kind and every geometry the models use, with the batch cut into
chunks and the kernels into row tiles; masked gradients stay exactly zero; whole models on ``auto`` match
``impl='reference'``; the selection rule; the workspace is reused and never escapes."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pad_moe.vision.persample as persample
from pad_moe.vision.kernels import ConvGeometry, pick_impl, select_impl
from pad_moe.vision.layers import CondConv2d, DynamicConv2d, PadDynamicConv2d
from pad_moe.vision.models import create_model
from pad_moe.vision.persample import PerSampleSpec, conv_per_sample

RTOL = 1e-5
FAST = ["chunked", "tiled"]
GEOMETRIES = {  # name: (in, out, kernel, stride, padding, groups, dilation)
    "3x3": (8, 16, 3, 1, 1, 1, 1),  # ResNet
    "3x3 stride 2": (8, 16, 3, 2, 1, 1, 1),  # ResNet, first conv of a stage
    "1x1": (8, 16, 1, 1, 0, 1, 1),  # MobileNetV2 expand / project, ResNet-50
    "1x1 stride 2": (8, 16, 1, 2, 0, 1, 1),  # ResNet shortcut
    "depthwise 3x3": (8, 8, 3, 1, 1, 8, 1),  # MobileNetV2
    "depthwise 3x3 stride 2": (8, 8, 3, 2, 1, 8, 1),  # MobileNetV2, first block of a stage
    "groups 2": (8, 16, 3, 1, 1, 2, 1),
    "dilation 2": (8, 16, 3, 1, 2, 1, 2),
}
KINDS = ["dyconv", "condconv", "pad κ=0.5", "pad κ=0.1", "pad relaxed"]


def _layer(kind, geometry, impl, scale_mode="both"):
    cin, cout, k, s, p, g, d = GEOMETRIES[geometry]
    torch.manual_seed(0)
    common = dict(stride=s, padding=p, dilation=d, groups=g, impl=impl)
    if kind == "condconv":
        return CondConv2d(cin, cout, k, **common)
    if kind == "dyconv":
        return DynamicConv2d(cin, cout, k, temperature=2.0, **common)
    layer = PadDynamicConv2d(cin, cout, k, temperature=2.0, scale_mode=scale_mode, **common)
    density = 0.1 if "0.1" in kind else 0.5
    layer.set_masks({"weight": torch.rand(layer.kernel_shape, generator=torch.Generator().manual_seed(7)) < density})
    if layer.phi is not None:
        with torch.no_grad():
            layer.phi.fill_(0.3)  # λs ≠ λd
    return layer


def _run(layer, kind):
    """Output and the gradients of a fixed non-symmetric loss w.r.t. x, every parameter and a relaxed mask."""
    relaxed = None
    if kind == "pad relaxed":
        relaxed = torch.rand(layer.kernel_shape, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
        layer.set_relaxed_masks({"weight": relaxed})
    x = torch.randn(5, layer.in_channels, 7, 7, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    out = {"y": y.detach(), "x": x.grad}
    out.update({name: p.grad for name, p in layer.named_parameters()})
    if relaxed is not None:
        out["mask"] = relaxed.grad
        layer.set_relaxed_masks(None)
    return out


def _assert_match(got: dict, ref: dict, floor: float = 0.0, scalar_floor: float = 0.0):
    """Every tensor within RTOL of the reference, relative to its largest entry (or to ``floor``, for tensors that are
    rounding noise around zero). A one-entry gradient (φ) is one sum over a whole kernel whose terms cancel, so its
    rounding scales with the terms, not with the sum: it is compared relative to ``scalar_floor``."""
    assert got.keys() == ref.keys()
    for name, value in ref.items():
        assert got[name] is not None, name
        scale = max(float(value.abs().max()), scalar_floor if value.numel() == 1 else floor)
        torch.testing.assert_close(got[name], value, rtol=RTOL, atol=RTOL * scale, msg=name)


@pytest.fixture(params=["whole", "tiled"])
def tiling(request, monkeypatch):
    """'tiled': a workspace of ~2 samples × 4 output rows, so chunks and row tiles (and ragged last ones) are met."""
    if request.param == "tiled":
        monkeypatch.setattr(persample, "TILE_BYTES", 2 * 4 * 8 * 9 * 4)
        monkeypatch.setattr(persample, "MIN_TILE_ROWS", 4)
    return request.param


@pytest.mark.parametrize("impl", FAST)
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("kind", KINDS)
def test_fast_paths_match_the_reference_forward_and_every_gradient(kind, geometry, impl, tiling):
    ref = _run(_layer(kind, geometry, "grouped"), kind)
    _assert_match(_run(_layer(kind, geometry, impl), kind), ref)


@pytest.mark.parametrize("kind", ["pad κ=0.5", "pad κ=0.1", "pad relaxed"])
@pytest.mark.parametrize("impl", FAST)
def test_pad_unfolded_static_term_matches_the_reference(kind, impl, tiling, monkeypatch):
    """fold_static=False (W_s as a (K+1)-th term, masks per tile; what an all-static layer takes) ≡ the reference."""
    ref = _run(_layer(kind, "3x3 stride 2", "grouped"), kind)
    monkeypatch.setattr(PadDynamicConv2d, "fold_static", False)
    _assert_match(_run(_layer(kind, "3x3 stride 2", impl), kind), ref)


@pytest.mark.parametrize("scale_mode", ["none", "static", "dynamic", "unconstrained"])
@pytest.mark.parametrize("impl", FAST)
def test_fast_paths_match_the_reference_for_every_pad_scale_mode(scale_mode, impl, tiling):
    ref = _run(_layer("pad κ=0.5", "3x3", "grouped", scale_mode), "pad κ=0.5")
    _assert_match(_run(_layer("pad κ=0.5", "3x3", impl, scale_mode), "pad κ=0.5"), ref)


@pytest.mark.parametrize("density", [0.1, 0.5])
@pytest.mark.parametrize("geometry", ["3x3", "1x1 stride 2", "depthwise 3x3"])
@pytest.mark.parametrize("impl", FAST)
def test_fast_paths_keep_masked_gradients_exactly_zero(impl, geometry, density, tiling):
    layer = _layer(f"pad κ={density}", geometry, impl)
    mask = layer.mask_weight.clone()
    _run(layer, "pad")
    assert torch.count_nonzero(layer.static_weight.grad[mask]) == 0  # dynamic entries: W_s unused
    assert torch.count_nonzero(layer.weight.grad[:, ~mask]) == 0  # static entries: the K kernels unused
    assert torch.count_nonzero(layer.static_weight.grad[~mask]) > 0
    assert torch.count_nonzero(layer.weight.grad[:, mask]) > 0


@pytest.mark.parametrize("impl", FAST)
def test_all_static_pad_is_a_static_conv_with_exactly_zero_dynamic_gradients(impl):
    layer = PadDynamicConv2d(6, 8, 3, stride=2, padding=1, impl=impl)
    layer.set_masks({"weight": torch.zeros(layer.kernel_shape, dtype=torch.bool)})
    static = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        static.weight.copy_(layer.static_weight)
    x = torch.randn(3, 6, 9, 9)
    y = layer(x)
    torch.testing.assert_close(y, static(x), rtol=RTOL, atol=RTOL)
    y.square().sum().backward()
    assert torch.count_nonzero(layer.weight.grad) == 0
    for p in layer.attention.parameters():  # M = 0 multiplies the attention out exactly (unlike impl='mix')
        assert p.grad is None or torch.count_nonzero(p.grad) == 0


@pytest.mark.parametrize("impl", FAST)
def test_new_masks_reach_the_fast_path_through_set_masks_and_load_state_dict(impl):
    a, b = _layer("pad κ=0.5", "3x3", impl), _layer("pad κ=0.1", "3x3", impl)
    x = torch.randn(2, 8, 5, 5)
    b(x)  # caches b's 0/1 mask pair
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))
    b.set_masks({"weight": ~a.mask_weight})
    reference = _layer("pad κ=0.5", "3x3", "grouped")
    reference.load_state_dict(b.state_dict())
    torch.testing.assert_close(b(x), reference(x), rtol=RTOL, atol=RTOL)


MODELS = [("resnet_debug", {}), ("mobilenetv2_050", {"width_mult": 0.25})]


@pytest.mark.parametrize("conv,kappa", [("dyconv", None), ("condconv", None), ("pad", 0.3)])
@pytest.mark.parametrize("name,extra", MODELS)
def test_whole_models_on_auto_match_the_reference_rule(name, extra, conv, kappa):
    """auto on CPU picks the fast paths layer by layer; the loss and every gradient equal impl='reference'.

    BatchNorm in eval mode: batch statistics over 4 samples of a 1×1 map would amplify rounding differences between
    any two float orders far beyond 1e-5 (the layers themselves are compared above)."""
    g = torch.Generator().manual_seed(0)
    x, labels = torch.randn(4, 3, 16, 16, generator=g), torch.randint(0, 5, (4,), generator=g)
    results = []
    for impl in ("reference", "auto"):
        torch.manual_seed(0)
        model = create_model(name, conv, kappa=kappa, num_classes=5, in_chans=3, image_size=16, impl=impl,
                             temperature=2.0, **extra).eval()
        logits = model(x)
        F.cross_entropy(logits, labels).backward()
        with torch.no_grad():
            inference = model(x)
        results.append({"logits": logits.detach(), "inference": inference,
                        **{n: p.grad for n, p in model.named_parameters()}})
    largest = max(float(v.abs().max()) for v in results[0].values())
    # deep attention gradients can be ~1e-17: noise. φ of a deep layer sums ~1e3 cancelling terms to ~3e-5 (seen: 7e-5
    # relative apart between two float orders), so it is held to RTOL of the model's largest gradient; a wrong φ gradient
    # (sign, factor, a missing term) is off by about its own size, 10-100x that bound
    _assert_match(results[1], results[0], floor=1e-6 * largest, scalar_floor=largest)


def test_auto_uses_the_fast_paths_in_the_models_on_cpu():
    seen = {}

    def record(name):
        return lambda module, inputs: seen.__setitem__(name, module.resolved_impl(inputs[0]))
    resnet = create_model("resnet18", "dyconv", image_size=32, width_mult=0.125)
    mbv2 = create_model("mobilenetv2_050", "pad", image_size=32, width_mult=0.25)
    for prefix, model in (("resnet", resnet), ("mbv2", mbv2)):
        for name, m in model.named_modules():
            if isinstance(m, DynamicConv2d):
                m.register_forward_pre_hook(record(f"{prefix}.{name}"))
        model(torch.randn(1, 3, 32, 32))
    assert seen["resnet.layer1.0.conv1"] == seen["resnet.layer2.0.conv2"] == "chunked"  # 32×32, 16×16 outputs
    assert seen["resnet.layer3.0.conv2"] == seen["resnet.layer4.0.conv2"] == "tiled"  # 8×8, 4×4
    assert seen["resnet.layer2.0.downsample.0"] == seen["mbv2.features.1.block.0"] == "tiled"  # 1×1
    assert seen["mbv2.features.1.block.3"] == "grouped"  # depthwise


def test_the_selection_rule():
    cpu, gpu, meta = torch.device("cpu"), torch.device("cuda"), torch.device("meta")
    dense = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    pointwise = ConvGeometry((2, 2), (0, 0), (1, 1), 1)
    depthwise = ConvGeometry((1, 1), (1, 1), (1, 1), 32)
    k3, k1, dw = (64, 64, 3, 3), (64, 64, 1, 1), (32, 1, 3, 3)
    assert select_impl("auto", k3, dense, cpu, positions=1024) == "chunked"
    assert select_impl("auto", k3, dense, cpu, positions=255) == "tiled"
    assert select_impl("auto", k1, pointwise, cpu, positions=1024) == "tiled"
    assert select_impl("auto", dw, depthwise, cpu, positions=16) == "grouped"
    assert select_impl("auto", (64, 32, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 2), cpu, positions=16) == "chunked"
    for device in (gpu, meta):  # the reference rule: cuDNN's grouped convolution, bmm for 1×1
        assert select_impl("auto", k3, dense, device, positions=16) == "grouped"
        assert select_impl("auto", k1, pointwise, device, positions=16) == "bmm"
    assert select_impl("reference", k3, dense, cpu, positions=16) == pick_impl("auto", (3, 3), dense, cpu,
                                                                               positions=16) == "mix"
    assert select_impl("reference", k1, pointwise, cpu, positions=64) == "bmm"
    assert select_impl("tiled", k3, dense, gpu, positions=16) == "tiled"  # an explicit request is obeyed
    with pytest.raises(ValueError, match="impl='bmm' needs a 1x1 kernel"):
        select_impl("bmm", k3, dense, cpu)
    with pytest.raises(ValueError, match="impl='fast' is unknown"):
        DynamicConv2d(4, 4, 3, impl="fast")


def test_tiles_are_balanced_and_bounded(monkeypatch):
    monkeypatch.setattr(persample, "TILE_BYTES", 8 * 2**20)
    spec = PerSampleSpec((512, 512, 3, 3), (1, 1), (1, 1), (1, 1), 1, "gemm")
    chunk, rows = spec.tiles(64, 4)
    assert chunk * rows * 512 * 9 * 4 <= persample.TILE_BYTES and rows >= persample.MIN_TILE_ROWS
    assert -(-64 // chunk) * chunk - 64 < chunk and -(-512 // rows) * rows - 512 < rows  # no near-empty last piece
    assert PerSampleSpec((64, 64, 3, 3), (1, 1), (1, 1), (1, 1), 1, "gemm").tiles(4, 4) == (4, 64)  # fits whole
    chunk, rows = PerSampleSpec((512, 512, 3, 3), (1, 1), (1, 1), (1, 1), 1, "grouped").tiles(64, 4)
    assert rows == 512 and chunk == 1  # the grouped engine never splits a kernel


@pytest.mark.parametrize("impl", FAST)
def test_the_workspace_is_reused_and_never_escapes(impl):
    layer = _layer("pad κ=0.5", "3x3", impl)
    x = torch.randn(5, 8, 7, 7, requires_grad=True)
    layer(x).sum().backward()
    buffers = {k: (v.data_ptr(), v.numel()) for k, v in persample._local.buffers.items()}
    x.grad = None
    layer.zero_grad()
    y = layer(x)
    y.sum().backward()
    assert {k: (v.data_ptr(), v.numel()) for k, v in persample._local.buffers.items()} == buffers  # no regrowth
    spans = [(p, p + n * 4) for p, n in buffers.values()]
    for t in [y, x.grad, *(p.grad for p in layer.parameters())]:
        start = t.data_ptr()
        assert all(not (lo <= start < hi) for lo, hi in spans)
    persample.release_workspace()
    assert persample._local.buffers == {}


@pytest.mark.parametrize("kind", ["pad κ=0.5", "pad κ=0.1"])
@pytest.mark.parametrize("impl", FAST + ["grouped"])
def test_training_after_inference_mode_works(impl, kind):
    """Tensors made under inference_mode (workspace buffers, the mask-derived caches) cannot be written or saved for
    a backward outside it: training after an inference_mode forward must rebuild them."""
    layer = _layer(kind, "3x3", impl)
    x = torch.randn(2, 8, 5, 5)
    with torch.inference_mode():
        expected = layer(x)
    y = layer(x.requires_grad_(True))
    y.sum().backward()
    torch.testing.assert_close(y.detach(), expected)
    with torch.inference_mode():
        torch.testing.assert_close(layer(x), expected)


def test_the_fast_path_is_once_differentiable_and_checks_its_shapes():
    layer = _layer("dyconv", "3x3", "tiled")
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gx.sum().backward()
    spec = PerSampleSpec((16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, "gemm")
    with pytest.raises(ValueError, match="do not match"):
        conv_per_sample(x, torch.rand(2, 3), torch.randn(4, 16 * 8 * 9), None, None, None, spec)
    with pytest.raises(ValueError, match="engine='bogus' is unknown"):
        conv_per_sample(x, torch.rand(2, 4), torch.randn(4, 16 * 8 * 9), None, None, None,
                        PerSampleSpec((16, 8, 3, 3), (1, 1), (1, 1), (1, 1), 1, "bogus"))
