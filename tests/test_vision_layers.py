"""DY-Conv, CondConv and PAD-DyConv layers: the three kernel paths agree, PAD's equivalences, exact zero gradients,
the mask protocol (IMP works on PAD convs through it), temperature."""

import pytest
import torch
from torch import nn

from pad_moe.pad.protocol import PadModule, pad_modules
from pad_moe.vision.layers import CondConv2d, DynamicConv2d, KernelAttention, PadDynamicConv2d, set_temperature

ATOL = 1e-5
GEOMETRIES = [  # (kernel, stride, padding, groups)
    (3, 1, 1, 1),
    (3, 2, 1, 1),
    (3, 1, 1, 6),  # depthwise
    (3, 1, 1, 2),
    (1, 2, 0, 1),
    (1, 1, 0, 1),
]


def _layer(cls, k, s, p, g, impl, seed=0, dtype=torch.float32, density=0.4):
    torch.manual_seed(seed)
    extra = {} if cls is CondConv2d else {"temperature": 2.0}
    layer = cls(6, 12 if g != 6 else 6, k, stride=s, padding=p, groups=g, impl=impl, **extra).to(dtype)
    if cls is PadDynamicConv2d:  # density 0.4: the dense GEMM kernel build; 0.1: the sparse merge (see layers.py)
        mask = torch.rand(layer.kernel_shape, generator=torch.Generator().manual_seed(7)) < density
        layer.set_masks({"weight": mask})
        with torch.no_grad():
            layer.phi.fill_(0.3)  # λs ≠ λd
    return layer


def _run(layer, x, relaxed=None):
    if relaxed is not None:
        layer.set_relaxed_masks({"weight": relaxed})
    x = x.clone().requires_grad_(True)
    y = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    if relaxed is not None:
        grads["mask"] = relaxed.grad.clone()
        layer.set_relaxed_masks(None)
    return y.detach(), x.grad, grads


def _paths(k, g):
    return ["grouped", "mix"] + (["bmm"] if k == 1 and g == 1 else [])


@pytest.mark.parametrize("cls,density", [(DynamicConv2d, None), (CondConv2d, None), (PadDynamicConv2d, 0.4),
                                         (PadDynamicConv2d, 0.1)])
@pytest.mark.parametrize("k,s,p,g", GEOMETRIES)
def test_kernel_paths_agree_forward_and_backward(cls, density, k, s, p, g):
    x = torch.randn(3, 6, 7, 7, generator=torch.Generator().manual_seed(1))
    results = {impl: _run(_layer(cls, k, s, p, g, impl, density=density), x) for impl in _paths(k, g)}
    (ref_y, ref_gx, ref_g), *others = results.values()
    for y, gx, grads in others:
        torch.testing.assert_close(y, ref_y, atol=ATOL, rtol=ATOL)
        torch.testing.assert_close(gx, ref_gx, atol=ATOL, rtol=ATOL)
        for name in ref_g:
            torch.testing.assert_close(grads[name], ref_g[name], atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("k,s,p,g", [(3, 1, 1, 1), (3, 1, 1, 6), (1, 2, 0, 1)])
def test_pad_paths_agree_with_a_relaxed_mask_including_its_gradient(k, s, p, g):
    x = torch.randn(3, 6, 7, 7, generator=torch.Generator().manual_seed(2))
    shape = _layer(PadDynamicConv2d, k, s, p, g, "grouped").kernel_shape
    relaxed = torch.rand(shape, generator=torch.Generator().manual_seed(3))
    results = [_run(_layer(PadDynamicConv2d, k, s, p, g, impl), x, relaxed.clone().requires_grad_(True))
               for impl in _paths(k, g)]
    for y, _, grads in results[1:]:
        torch.testing.assert_close(y, results[0][0], atol=ATOL, rtol=ATOL)
        for name in grads:
            torch.testing.assert_close(grads[name], results[0][2][name], atol=ATOL, rtol=ATOL)
    assert results[0][2]["mask"].abs().sum() > 0


def test_relaxed_mask_gradient_is_the_paper_formula():
    """∂L/∂M = Σ_b ∂L/∂Θ_b ⊙ (λd·W_dyn,b − λs·W_s) (paper Eq. 6), checked through the per-sample kernels."""
    layer = _layer(PadDynamicConv2d, 3, 1, 1, 1, "grouped", dtype=torch.float64)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
    relaxed = torch.rand(layer.kernel_shape, dtype=torch.float64, requires_grad=True)
    layer.set_relaxed_masks({"weight": relaxed})
    coef = layer.routing(x)
    theta = layer.per_sample_kernels(coef)
    theta.retain_grad()
    from pad_moe.vision.kernels import conv_grouped

    conv_grouped(x, theta, layer.geometry).square().sum().backward()
    lam_s, lam_d = layer.scale_factors()
    w_dyn = torch.einsum("bk,k...->b...", coef, layer.weight)
    expected = (theta.grad * (lam_d * w_dyn - lam_s * layer.static_weight)).sum(0)
    torch.testing.assert_close(relaxed.grad, expected.detach())


@pytest.mark.parametrize("impl", ["grouped", "mix"])
def test_pad_all_dynamic_with_unit_scales_equals_dynamic_conv(impl):
    dy = DynamicConv2d(6, 8, 3, padding=1, temperature=3.0, impl=impl)
    pad = PadDynamicConv2d(6, 8, 3, padding=1, temperature=3.0, impl=impl, scale_mode="both")
    missing = pad.load_state_dict(dy.state_dict(), strict=False).missing_keys
    assert set(missing) == {"static_weight", "phi", "mask_weight"}
    assert pad.dynamic_ratio() == 1.0
    x = torch.randn(4, 6, 9, 9)
    torch.testing.assert_close(pad(x), dy(x), atol=ATOL, rtol=ATOL)


@pytest.mark.parametrize("impl", ["grouped", "mix", "bmm"])
def test_pad_all_static_equals_a_static_conv_and_kernels_get_zero_gradient(impl):
    k = 1 if impl == "bmm" else 3
    pad = PadDynamicConv2d(6, 8, k, stride=2, padding=k // 2, impl=impl)
    pad.set_masks({"weight": torch.zeros(pad.kernel_shape, dtype=torch.bool)})
    static = nn.Conv2d(6, 8, k, stride=2, padding=k // 2, bias=False)
    with torch.no_grad():
        static.weight.copy_(pad.static_weight)
    x = torch.randn(3, 6, 9, 9)
    y = pad(x)
    torch.testing.assert_close(y, static(x), atol=ATOL, rtol=ATOL)
    y.sum().backward()
    assert torch.count_nonzero(pad.weight.grad) == 0
    for p in pad.attention.parameters():  # mix: the static part rides on Σπ = 1, so zero up to rounding
        assert p.grad is None or p.grad.abs().max() < 1e-6


@pytest.mark.parametrize("density", [0.1, 0.4])
@pytest.mark.parametrize("impl", ["grouped", "mix"])
def test_pad_masked_entries_get_exactly_zero_gradient(impl, density):
    layer = _layer(PadDynamicConv2d, 3, 1, 1, 1, impl, density=density)
    mask = layer.mask_weight.clone()
    layer(torch.randn(2, 6, 6, 6)).square().sum().backward()
    assert torch.count_nonzero(layer.static_weight.grad[mask]) == 0  # dynamic entries: W_s unused
    assert torch.count_nonzero(layer.weight.grad[:, ~mask]) == 0  # static entries: kernels unused
    assert torch.count_nonzero(layer.static_weight.grad[~mask]) > 0
    assert torch.count_nonzero(layer.weight.grad[:, mask]) > 0
    assert layer.phi.grad is not None and layer.phi.grad.abs() > 0


def test_pad_conv_implements_the_mask_protocol():
    layer = _layer(PadDynamicConv2d, 3, 1, 1, 1, "grouped")
    assert isinstance(layer, PadModule)
    assert set(layer.masks()) == {"weight"} and layer.expert_parallel_masks() == set()
    assert 0 < layer.dynamic_ratio() < 1
    lam_s, lam_d = layer.scale_factors()
    expected = (lam_d * layer.weight - lam_s * layer.static_weight).abs().sum(0)
    torch.testing.assert_close(layer.magnitude_scores()["weight"], expected.detach())
    with pytest.raises(ValueError, match="shape"):
        layer.set_masks({"weight": torch.ones(2, 2, dtype=torch.bool)})
    layer.drop_static()
    assert layer.scale_factors()[0] == 0.0


def test_loading_masks_through_state_dict_refreshes_the_dynamic_index():
    a = _layer(PadDynamicConv2d, 3, 1, 1, 1, "grouped", seed=0)
    b = _layer(PadDynamicConv2d, 3, 1, 1, 1, "grouped", seed=1)
    x = torch.randn(2, 6, 5, 5)
    b(x)  # caches b's index
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x))


def test_iterative_mode_partition_runs_on_pad_convs_through_the_protocol():
    from pad_moe.partition import iterative_mode_partition
    from pad_moe.vision.models import create_model

    model = create_model("resnet_debug", "pad", num_classes=4, in_chans=1, image_size=8)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(2)]
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])  # noqa: E731
    report = iterative_mode_partition(model, batches, loss_fn, kappa=0.3, iterations=2)
    total = sum(m.mask_weight.numel() for _, m in pad_modules(model))
    dynamic = sum(int(m.mask_weight.sum()) for _, m in pad_modules(model))
    assert dynamic == report.dynamic_per_round[-1] == int(0.3 * total + 0.5)
    model(batches[0][0]).sum().backward()  # trains after partition


def test_temperature_sharpens_the_attention_and_set_temperature_reaches_every_layer():
    att = KernelAttention(8, 4, reduction=4, temperature=30.0)
    x = torch.randn(5, 8, 3, 3)
    soft = att(x)
    att.temperature = 0.1
    sharp = att(x)
    torch.testing.assert_close(soft.sum(-1), torch.ones(5))
    assert sharp.max(-1).values.min() > soft.max(-1).values.max()
    model = nn.Sequential(DynamicConv2d(4, 4, 3, padding=1), PadDynamicConv2d(4, 4, 1), nn.Conv2d(4, 4, 1))
    assert set_temperature(model, 7.0) == 2
    assert all(m.temperature == 7.0 for m in model.modules() if isinstance(m, KernelAttention))


def test_auto_picks_bmm_for_1x1_mix_for_small_dense_outputs_on_cpu_and_grouped_otherwise():
    from pad_moe.vision.kernels import ConvGeometry, output_positions, pick_impl

    dense = ConvGeometry((1, 1), (1, 1), (1, 1), 1)
    depthwise = ConvGeometry((1, 1), (1, 1), (1, 1), 8)
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert pick_impl("auto", (1, 1), ConvGeometry((2, 2), (0, 0), (1, 1), 1), cpu) == "bmm"
    assert pick_impl("auto", (3, 3), dense, cpu, positions=16) == "mix"
    assert pick_impl("auto", (3, 3), dense, cpu, positions=64) == "grouped"
    assert pick_impl("auto", (3, 3), dense, cpu, linear_in_coefficients=False, positions=16) == "grouped"
    assert pick_impl("auto", (3, 3), depthwise, cpu, positions=16) == "grouped"
    assert pick_impl("auto", (3, 3), dense, gpu, positions=16) == "grouped"
    assert pick_impl("mix", (3, 3), dense, cpu) == "mix"
    assert output_positions(7, 7, (3, 3), ConvGeometry((2, 2), (1, 1), (1, 1), 1)) == 16


def test_bad_layer_arguments_are_rejected():
    with pytest.raises(ValueError, match="impl='bmm' needs a 1x1 kernel"):
        DynamicConv2d(4, 4, 3, padding=1, impl="bmm")
    with pytest.raises(ValueError, match="impl='fast' is unknown"):
        DynamicConv2d(4, 4, 3, impl="fast")
    with pytest.raises(ValueError, match="divisible by groups"):
        CondConv2d(6, 4, 3, groups=4)
    with pytest.raises(ValueError, match="granularity"):
        from pad_moe.pad.granularity import get_granularity

        get_granularity("filter")
