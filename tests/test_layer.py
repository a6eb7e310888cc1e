"""PadMoE in one process: equivalences with plain DeepSpeed MoE and the dense FFN, gradients, compaction, bad input."""

import pytest
import torch
from torch import nn

from pad_moe import MoEFFN, PadMoE, build_ffn_block, ffn_block_from_dense
from pad_moe.testing.layers import perturb_experts_, random_masks

H, F, E = 12, 24, 4
ROUTING = dict(num_experts=E, k=2, min_capacity=0, drop_tokens=False, second_expert_sampling=False)


def dense_pair(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(H, F), nn.Linear(F, H)


def x_input(seed=3):
    return torch.randn(3, 7, H, generator=torch.Generator().manual_seed(seed))


def test_all_ones_mask_equals_plain_deepspeed_moe_with_the_same_experts():
    pad = PadMoE(H, F, **ROUTING, seed=5)
    plain = MoEFFN(H, F, **ROUTING, seed=9)
    with torch.no_grad():
        plain.gate_weight.copy_(pad.gate_weight)
        for a, b in zip(plain.local_experts, pad.local_experts):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.copy_(pb)
    assert all(m.all() for m in pad.masks().values())  # masks start all dynamic
    x = x_input()
    out_pad, aux_pad, counts_pad = pad(x)
    out_plain, aux_plain, counts_plain = plain(x)
    torch.testing.assert_close(out_pad, out_plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(aux_pad, aux_plain)
    assert torch.equal(counts_pad, counts_plain)


@pytest.mark.parametrize("granularity,sharing", [("element", "layer"), ("element", "expert"), ("neuron", "layer")])
@pytest.mark.parametrize("k", [2])
def test_upcycled_layer_equals_dense_ffn_for_random_masks(granularity, sharing, k):
    fc1, fc2 = dense_pair()
    x = x_input()
    want = fc2(torch.nn.functional.gelu(fc1(x)))
    layer = PadMoE.from_dense(fc1, fc2, **{**ROUTING, "k": k}, granularity=granularity, mask_sharing=sharing)
    for seed in range(3):
        layer.set_masks(random_masks(layer, p=0.3 + 0.2 * seed, seed=seed))
        torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-5)


def test_upcycled_top1_scales_the_dense_output_by_the_router_probability():
    # DeepSpeed's top-1 (Switch) multiplies the expert output by the router probability, so an upcycled top-1 layer
    # equals the dense FFN times that probability (not the dense FFN itself).
    fc1, fc2 = dense_pair()
    layer = PadMoE.from_dense(fc1, fc2, **{**ROUTING, "k": 1})
    x = x_input()
    probs = torch.softmax(x.reshape(-1, H) @ layer.gate_weight.t(), -1).max(-1).values.reshape(3, 7, 1)
    torch.testing.assert_close(layer(x)[0], probs * fc2(torch.nn.functional.gelu(fc1(x))), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sharing", ["layer", "expert"])
def test_masked_entries_get_exactly_zero_gradient_and_phi_gets_one(sharing):
    fc1, fc2 = dense_pair()
    layer = PadMoE.from_dense(fc1, fc2, **ROUTING, mask_sharing=sharing)
    perturb_experts_(layer)
    layer.set_masks(random_masks(layer))
    out, aux, _ = layer(x_input())
    (out.pow(2).sum() + aux).backward()
    masks = layer.masks()
    static = dict(layer.static.named_parameters())
    for i, gid in enumerate(layer.global_expert_ids):
        for name, grad in layer.experts.expert_grads(i).items():
            m = masks[name] if sharing == "layer" else masks[f"e{gid}.{name}"]
            assert torch.all(grad[~m] == 0), name
    for name, p in static.items():
        covered = torch.stack([masks[name] if sharing == "layer" else masks[f"e{g}.{name}"]
                               for g in layer.global_expert_ids]).all(0)
        assert torch.all(p.grad[covered] == 0), name  # dynamic for every expert -> static weight unused
        assert p.grad[~covered].abs().sum() > 0, name
    assert layer.phi.grad is not None and float(layer.phi.grad.abs().sum()) > 0
    assert layer.gate_weight.grad is not None


def test_neuron_compacted_layer_equals_element_layer_with_row_structured_mask():
    fc1, fc2 = dense_pair()
    kwargs = dict(**ROUTING, seed=4)
    neuron = PadMoE.from_dense(fc1, fc2, granularity="neuron", **kwargs)
    perturb_experts_(neuron)
    with torch.no_grad():
        neuron.phi.fill_(0.3)
    units = torch.rand(F, generator=torch.Generator().manual_seed(7)) < 0.5
    neuron.set_masks({"units": units})
    element = PadMoE(H, F, granularity="element", **kwargs)
    element.load_state_dict({k: v for k, v in neuron.state_dict().items() if "mask" not in k}, strict=False)
    element.set_masks({"fc1.weight": units[:, None].expand(F, H).clone(), "fc1.bias": units.clone(),
                       "fc2.weight": units[None, :].expand(H, F).clone(), "fc2.bias": torch.zeros(H, dtype=bool)})
    x = x_input()
    neuron.compact_()
    out_c, aux_c, _ = neuron(x)
    out_e, aux_e, _ = element(x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    (out_c.pow(2).sum() + aux_c).backward()
    (out_e.pow(2).sum() + aux_e).backward()
    dyn, sta = units.nonzero().squeeze(1), (~units).nonzero().squeeze(1)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)  # noqa: E731
    for i in range(neuron.num_local_experts):
        ce, ee = neuron.experts.expert_grads(i), element.experts.expert_grads(i)
        close(ce["fc1.weight"], ee["fc1.weight"][dyn])
        close(ce["fc1.bias"], ee["fc1.bias"][dyn])
        close(ce["fc2.weight"], ee["fc2.weight"][:, dyn])
        assert "fc2.bias" not in ce and torch.all(ee["fc2.bias"] == 0)
    close(neuron.static.fc1.weight.grad, element.static.fc1.weight.grad[sta])
    close(neuron.static.fc2.weight.grad, element.static.fc2.weight.grad[:, sta])
    close(neuron.static.fc2.bias.grad, element.static.fc2.bias.grad)
    close(neuron.phi.grad, element.phi.grad)
    close(neuron.gate_weight.grad, element.gate_weight.grad)
    # the compacted layer keeps (1-κ)·F static and κ·F dynamic units per expert
    assert neuron.static.fc1.out_features == len(sta) and neuron.local_experts[0].fc1.out_features == len(dyn)


def test_compacted_layer_matches_with_dropped_tokens_and_top1():
    fc1, fc2 = dense_pair()
    layer = PadMoE.from_dense(fc1, fc2, num_experts=E, k=1, min_capacity=0, capacity_factor=0.5, use_rts=False,
                              granularity="neuron", drop_tokens=True)  # upcycling drops nothing unless told
    perturb_experts_(layer)
    layer.set_masks({"units": torch.rand(F, generator=torch.Generator().manual_seed(3)) < 0.4})
    x = x_input()
    before = layer(x)[0]
    assert (before.abs().sum(-1) == 0).any()  # some tokens were dropped
    layer.compact_()
    torch.testing.assert_close(layer(x)[0], before, rtol=1e-5, atol=1e-5)


def test_experts_are_initialised_per_global_id_independently_of_ep_size():
    full = PadMoE(H, F, num_experts=4, ep_size=1, seed=3)
    half = PadMoE(H, F, num_experts=4, ep_size=2, ep_rank=1, seed=3)
    assert half.global_expert_ids == [2, 3]
    for a, b in zip(full.local_experts[2:], half.local_experts):
        assert torch.equal(a.fc1.weight, b.fc1.weight)
    assert not torch.equal(full.local_experts[0].fc1.weight, full.local_experts[1].fc1.weight)
    assert torch.equal(full.static.fc1.weight, half.static.fc1.weight)


def test_modes_select_dense_moe_and_pad_blocks():
    fc1, fc2 = dense_pair()
    x = x_input()
    want = fc2(torch.nn.functional.gelu(fc1(x)))
    for mode in ("static", "moe", "pad"):
        block = ffn_block_from_dense(mode, fc1, fc2, **ROUTING)
        out, aux, _ = block(x)
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert aux.ndim == 0
    assert type(build_ffn_block("moe", H, F, **ROUTING, granularity="neuron")).__name__ == "MoEFFN"


def test_masks_are_bool_buffers_in_the_state_dict_and_survive_bf16():
    layer = PadMoE(H, F, **ROUTING)
    layer.set_masks(random_masks(layer))
    before = {k: v.clone() for k, v in layer.masks().items()}
    layer.to(torch.bfloat16)
    assert all(v.dtype == torch.bool for v in layer.masks().values())
    assert all(torch.equal(before[k], v) for k, v in layer.masks().items())
    assert any(k.startswith("mask_") for k in layer.state_dict())
    assert not any("expert" in k for k in layer.state_dict() if not k.startswith("moe."))
    out = layer(x_input().to(torch.bfloat16))[0]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_experts=6, ep_size=4), "num_experts=6 is not divisible by ep_size=4"),
    (dict(num_experts=4, k=5), "k=5"),
    (dict(activation="tanhh"), "activation='tanhh'"),
    (dict(granularity="blocky"), "granularity='blocky'"),
    (dict(scale_mode="both-ish"), "scale_mode='both-ish'"),
    (dict(mask_sharing="rank"), "mask_sharing='rank'"),
])
def test_bad_arguments_raise_value_errors_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PadMoE(H, F, **{"num_experts": 4, **kwargs})
    with pytest.raises(ValueError, match="mode='dense'"):
        build_ffn_block("dense", H, F)


def test_bad_dense_pair_and_bad_masks_raise():
    with pytest.raises(ValueError, match="do not chain"):
        PadMoE.from_dense(nn.Linear(H, F), nn.Linear(F + 1, H), num_experts=2)
    layer = PadMoE(H, F, num_experts=2)
    with pytest.raises(ValueError, match="fc1.weight.*shape"):
        layer.set_masks({**layer.masks(), "fc1.weight": torch.ones(F, H + 1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="expected exactly"):
        layer.set_masks({"fc1.weight": torch.ones(F, H, dtype=torch.bool)})
    with pytest.raises(ValueError, match="compact_ needs granularity='neuron'"):
        layer.compact_()


@pytest.mark.parametrize("cls", [PadMoE, MoEFFN])
def test_from_dense_and_from_gated_with_default_arguments_compute_the_dense_ffn(cls):
    """The upcycling one-liner is exact by default: dropless, nothing dropped, whatever the router (training mode)."""
    fc1, fc2 = dense_pair()
    x = x_input()
    layer = cls.from_dense(fc1, fc2, num_experts=E)
    assert layer.dispatch == "dropless"
    torch.testing.assert_close(layer(x)[0], fc2(torch.nn.functional.gelu(fc1(x))), rtol=0, atol=1e-6)
    torch.manual_seed(1)
    gate, up, down = nn.Linear(H, F, bias=False), nn.Linear(H, F, bias=False), nn.Linear(F, H, bias=False)
    gated = cls.from_gated(gate, up, down, activation="silu", num_experts=E)
    assert gated.dispatch == "dropless"
    torch.testing.assert_close(gated(x)[0], down(torch.nn.functional.silu(gate(x)) * up(x)), rtol=0, atol=1e-6)


def test_drop_tokens_follows_the_dispatch_unless_set():
    fc1, fc2 = dense_pair()
    assert PadMoE(H, F, num_experts=E, dispatch="dropless").dispatch == "dropless"  # no drop_tokens needed
    assert PadMoE(H, F, num_experts=E).moe.deepspeed_moe.gate.drop_tokens  # capacity: drops over capacity
    assert not PadMoE(H, F, num_experts=E, drop_tokens=False).moe.deepspeed_moe.gate.drop_tokens  # padded
    dropping = PadMoE.from_dense(fc1, fc2, num_experts=E, drop_tokens=True)  # asked to drop: capacity dispatch
    assert dropping.dispatch == "capacity" and dropping.moe.deepspeed_moe.gate.drop_tokens
    padded = PadMoE.from_dense(fc1, fc2, num_experts=E, dispatch="capacity")  # upcycled: still nothing dropped
    assert not padded.moe.deepspeed_moe.gate.drop_tokens
    assert PadMoE.from_dense(fc1, fc2, num_experts=E, noisy_gate_policy="Jitter").dispatch == "capacity"
    for build in (lambda: PadMoE(H, F, num_experts=E, dispatch="dropless", drop_tokens=True),
                  lambda: PadMoE.from_dense(fc1, fc2, num_experts=E, dispatch="dropless", drop_tokens=True)):
        with pytest.raises(ValueError, match="^drop_tokens=True drops routes over capacity, dispatch='dropless'"):
            build()
