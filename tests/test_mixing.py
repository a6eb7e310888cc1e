"""The PAD formula and scale factors against a straightforward, independent computation."""

import pytest
import torch

from pad_moe.pad.granularity import get_granularity
from pad_moe.pad.mixing import SCALE_MODES, make_phi, pad_mix, scale_factors_from_phi


def reference_mix(ws, wd, m, mode, phi):
    """Paper Eq. 3-4 written out entry by entry, with λ from the mode's definition."""
    sig = lambda v: 1 / (1 + torch.exp(-v))  # noqa: E731
    lam = {"none": lambda: (1.0, 1.0), "both": lambda: (2 - 2 * sig(phi[0]), 2 * sig(phi[0])),
           "static": lambda: (2 * sig(phi[0]), 1.0), "dynamic": lambda: (1.0, 2 * sig(phi[0])),
           "unconstrained": lambda: (1 + phi[0], 1 + phi[1])}[mode]()
    out = torch.empty_like(wd)
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in wd.shape]):
        i = tuple(idx.tolist())
        out[i] = lam[1] * wd[i] if m[i] else lam[0] * ws[i]
    return out


@pytest.mark.parametrize("mode", SCALE_MODES)
def test_pad_mix_matches_reference_for_every_scale_mode(mode):
    g = torch.Generator().manual_seed(0)
    ws, wd = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    mask = torch.rand(5, 7, generator=g) < 0.4
    phi = make_phi(mode)
    if phi is not None:
        with torch.no_grad():
            phi.copy_(torch.randn(phi.shape, generator=g))
    lam_s, lam_d = scale_factors_from_phi(phi, mode)
    got = pad_mix(ws, wd, mask, lam_s, lam_d)
    want = reference_mix(ws, wd, mask, mode, phi.detach() if phi is not None else None)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The relaxed (real-valued) mask at 0/1 gives the same numbers as the bool mask.
    torch.testing.assert_close(pad_mix(ws, wd, mask.float(), lam_s, lam_d), got, rtol=1e-6, atol=1e-6)


def test_scale_factors_start_at_one_and_sum_to_two():
    phi = make_phi("both")
    lam_s, lam_d = scale_factors_from_phi(phi, "both")
    assert float(lam_s) == 1.0 and float(lam_d) == 1.0
    with torch.no_grad():
        phi.fill_(1.3)
    lam_s, lam_d = scale_factors_from_phi(phi, "both")
    assert abs(float(lam_s + lam_d) - 2.0) < 1e-6 and float(lam_d) > 1.0
    assert make_phi("none") is None
    assert make_phi("unconstrained").shape == (2,)


def test_bool_mask_gives_exact_zero_gradients_on_the_unselected_side():
    ws = torch.randn(4, 6, requires_grad=True)
    wd = torch.randn(3, 4, 6, requires_grad=True)  # leading expert dimension broadcasts
    mask = torch.rand(4, 6) < 0.5
    phi = make_phi("both")
    lam_s, lam_d = scale_factors_from_phi(phi, "both")
    pad_mix(ws, wd, mask, lam_s, lam_d).pow(2).sum().backward()
    assert torch.all(ws.grad[mask] == 0) and torch.all(ws.grad[~mask] != 0)
    assert torch.all(wd.grad[:, ~mask] == 0) and torch.all(wd.grad[:, mask] != 0)
    assert phi.grad is not None and float(phi.grad.abs()) > 0


def test_relaxed_mask_gradient_is_the_mode_switch_estimate():
    # ∂L/∂M = ∂L/∂Θ ⊙ (λd·W_dyn − λs·W_s)  (paper Eq. 6)
    ws, wd = torch.randn(3, 5), torch.randn(3, 5)
    m = torch.ones(3, 5, requires_grad=True)
    theta = pad_mix(ws, wd, m, 0.7, 1.3)
    upstream = torch.randn(3, 5)
    (theta * upstream).sum().backward()
    torch.testing.assert_close(m.grad, upstream * (1.3 * wd - 0.7 * ws))


def test_neuron_granularity_expands_units_to_rows_bias_and_columns():
    shapes = {"fc1.weight": (6, 4), "fc1.bias": (6,), "fc2.weight": (4, 6), "fc2.bias": (4,)}
    gran = get_granularity("neuron")
    assert gran.mask_shapes(shapes) == {"units": (6,)}
    units = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.bool)
    w = gran.expand({"units": units}, shapes)
    assert torch.equal(w["fc1.weight"].expand(6, 4), units[:, None].expand(6, 4))
    assert torch.equal(w["fc2.weight"].expand(4, 6), units[None, :].expand(4, 6))
    assert torch.equal(w["fc1.bias"], units) and not w["fc2.bias"].any()


@pytest.mark.parametrize("bad", [dict(mode="sideways"), dict(granularity="block?")])
def test_unknown_names_raise_naming_the_value(bad):
    with pytest.raises(ValueError, match="sideways|block"):
        if "mode" in bad:
            make_phi(bad["mode"])
        else:
            get_granularity(bad["granularity"])
