"""Dropless dispatch (pad_moe.moe.dropless): the same function as DeepSpeed's capacity dispatch when nothing drops,
for plain and PAD experts (mlp and glu, element and neuron, layer and expert masks, top-1/2/3), exact upcycling, exact
zero gradients where masked, grouped GEMM ≡ loop, and the config plumbing."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from pad_moe.config import load_config
from pad_moe.moe.dropless import route
from pad_moe.moe.grouped import backend, grouped_linear
from pad_moe.moe.layer import MoEFFN, PadMoE
from pad_moe.testing.layers import perturb_experts_, random_masks

H, F, E = 8, 16, 4
CASES = [
    (MoEFFN, dict(k=2)), (MoEFFN, dict(k=1)), (MoEFFN, dict(k=3)),
    (PadMoE, dict(k=2)), (PadMoE, dict(k=1, mask_sharing="expert")), (PadMoE, dict(k=2, granularity="neuron")),
    (PadMoE, dict(k=2, expert_type="glu", activation="silu", bias=False)),
    (PadMoE, dict(k=2, expert_type="glu", activation="gelu_tanh", mask_sharing="expert")),
    (MoEFFN, dict(k=2, expert_type="glu", activation="silu")),
]


def capacity_and_dropless(cls, **kwargs):
    """Two layers with the same weights and masks: DeepSpeed's dispatch without drops, and the dropless one."""
    torch.manual_seed(0)
    ref = cls(H, F, num_experts=E, drop_tokens=False, min_capacity=0, second_expert_sampling=False, seed=3,
              **kwargs)
    if isinstance(ref, PadMoE):
        ref.set_masks(random_masks(ref))
    perturb_experts_(ref)
    dropless = copy.deepcopy(ref)
    dropless.dispatch = "dropless"
    return ref, dropless


def grads(layer) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cls,kwargs", CASES, ids=lambda v: getattr(v, "__name__", None) or str(v))
def test_dropless_equals_capacity_dispatch_without_drops(cls, kwargs):
    ref, dropless = capacity_and_dropless(cls, **kwargs)
    x = torch.randn(3, 7, H)
    out_ref, aux_ref, counts_ref = ref(x)
    out, aux, counts = dropless(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-6, atol=0)
    assert torch.equal(counts.long(), counts_ref.long())
    (out_ref.square().sum() + aux_ref).backward()
    (out.square().sum() + aux).backward()
    g_ref, g = grads(ref), grads(dropless)
    assert set(g) == set(g_ref)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-5, msg=name)


def test_eval_routing_is_deterministic_and_matches_capacity_eval():
    """In eval mode both pick the second expert by argmax (no Gumbel sampling) and agree."""
    torch.manual_seed(0)
    ref = PadMoE(H, F, num_experts=E, k=2, drop_tokens=False, min_capacity=0, seed=3)  # sampling on in training
    ref.set_masks(random_masks(ref))
    perturb_experts_(ref)
    dropless = copy.deepcopy(ref)
    dropless.dispatch = "dropless"
    ref.eval(), dropless.eval()
    x = torch.randn(2, 9, H)
    with torch.no_grad():
        torch.testing.assert_close(dropless(x)[0], ref(x)[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(dropless(x)[0], dropless(x)[0], rtol=0, atol=0)


def test_training_samples_the_second_expert_with_gumbel_noise():
    logits = torch.tensor([[2.0, 1.0, 0.9, -3.0]]).repeat(4000, 1)
    torch.manual_seed(0)
    second = route(logits, 2, sample_second=True).experts[:, 1]
    share = torch.bincount(second, minlength=4).float() / len(second)
    p = torch.softmax(logits[0], 0)[1:]  # Gumbel-max over the other experts draws them by their softmax share
    torch.testing.assert_close(share[1:], p / p.sum(), atol=0.03, rtol=0)
    assert share[0] == 0
    assert torch.equal(route(logits, 2).experts[:, 1], torch.ones(4000, dtype=torch.long))


@pytest.mark.parametrize("expert_type", ["mlp", "glu"])
@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_upcycled_dropless_pad_equals_the_dense_ffn_for_random_masks(expert_type, granularity):
    torch.manual_seed(1)
    x = torch.randn(4, 6, H)
    if expert_type == "mlp":
        fc1, fc2 = nn.Linear(H, F), nn.Linear(F, H)
        dense = fc2(nn.functional.gelu(fc1(x)))
        layer = PadMoE.from_dense(fc1, fc2, num_experts=E, k=2, drop_tokens=False, dispatch="dropless",
                                  granularity=granularity)
    else:
        g, u, d = nn.Linear(H, F, bias=False), nn.Linear(H, F, bias=False), nn.Linear(F, H, bias=False)
        dense = d(nn.functional.silu(g(x)) * u(x))
        layer = PadMoE.from_gated(g, u, d, activation="silu", num_experts=E, k=2, drop_tokens=False,
                                  dispatch="dropless", granularity=granularity)
    layer.set_masks(random_masks(layer, seed=4))
    torch.testing.assert_close(layer(x)[0], dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("expert_type", ["mlp", "glu"])
def test_masked_entries_get_exactly_zero_gradient(expert_type):
    kwargs = {"activation": "silu"} if expert_type == "glu" else {}
    layer = PadMoE(H, F, num_experts=E, k=2, drop_tokens=False, dispatch="dropless", expert_type=expert_type,
                   **kwargs)
    layer.set_masks(random_masks(layer))
    perturb_experts_(layer)
    out, aux, _ = layer(torch.randn(3, 5, H))
    (out.sum() + aux).backward()
    masks = layer.weight_masks()
    for i in range(layer.num_local_experts):
        for name, grad in layer.experts.expert_grads(i).items():
            mask = masks[name].expand_as(grad)
            assert torch.all(grad[~mask] == 0), name
            assert torch.any(grad[mask] != 0), name
    static = dict(layer.static.named_parameters())
    for name, p in static.items():
        assert torch.all(p.grad[masks[name].expand_as(p)] == 0), name
    assert layer.phi.grad is not None and layer.phi.grad.abs().sum() > 0


def test_compacted_dropless_layer_equals_the_uncompacted_one():
    torch.manual_seed(2)
    layer = PadMoE(H, F, num_experts=E, k=2, drop_tokens=False, dispatch="dropless", granularity="neuron",
                   second_expert_sampling=False)
    layer.set_masks(random_masks(layer, seed=7))
    perturb_experts_(layer)
    x = torch.randn(3, 5, H)
    full = layer(x)[0]
    layer.compact_()
    torch.testing.assert_close(layer(x)[0], full, rtol=1e-5, atol=1e-6)


def test_grouped_gemm_equals_the_loop_with_empty_experts_and_its_gradients():
    torch.manual_seed(3)
    w = torch.randn(4, 12, 8, requires_grad=True)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 8, requires_grad=True)
    bias = torch.randn(4, 12, requires_grad=True)
    assert backend(x, w) == "grouped_mm" and backend(x.double(), w.double()) == "loop"
    assert backend(x[:, :7], w[:, :, :7]) == "loop"  # rows not 16-byte aligned
    y = grouped_linear(x, w, counts, bias=bias)
    ref = torch.cat([x[a:b] @ w[e].t() + bias[e] for e, (a, b) in enumerate([(0, 3), (3, 3), (3, 8), (8, 10)])])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, bias), g)
    want = torch.autograd.grad(ref, (x, w, bias), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    yd = grouped_linear(x.double(), w.double(), counts)  # the loop
    torch.testing.assert_close(yd.float(), ref - torch.repeat_interleave(bias, counts, 0), rtol=1e-5, atol=1e-5)


def test_used_token_and_gate_noise_are_refused_with_dropless():
    layer = MoEFFN(H, F, num_experts=E, k=1, drop_tokens=False, dispatch="dropless")
    with pytest.raises(ValueError, match="used_token is not supported with dispatch='dropless'"):
        layer(torch.randn(4, H), torch.ones(4))
    with pytest.raises(ValueError, match="noisy_gate_policy='RSample'"):
        MoEFFN(H, F, num_experts=E, k=1, drop_tokens=False, dispatch="dropless", noisy_gate_policy="RSample")
    with pytest.raises(ValueError, match="drop_tokens=True drops routes"):
        MoEFFN(H, F, num_experts=E, k=1, drop_tokens=True, dispatch="dropless")
    with pytest.raises(ValueError, match="dispatch='padded' is unknown"):
        MoEFFN(H, F, num_experts=E, dispatch="padded")


def test_config_resolves_dispatch_and_refuses_contradictions():
    hf = load_config("configs/minilm_vader.yaml", [])
    assert (hf.moe.dispatch, hf.moe.drop_tokens) == ("dropless", False)
    assert load_config("configs/minilm_vader.yaml", ["moe.drop_tokens=true"]).moe.dispatch == "capacity"
    capacity = load_config("configs/minilm_vader.yaml", ["moe.dispatch=capacity"]).moe
    assert (capacity.dispatch, capacity.drop_tokens) == ("capacity", False)  # DeepSpeed's padded dropless
    toy = load_config("configs/debug.yaml", [])
    assert (toy.moe.dispatch, toy.moe.drop_tokens) == ("capacity", True)
    assert load_config("configs/debug.yaml", ["moe.dispatch=dropless"]).moe.dispatch == "dropless"
    with pytest.raises(ValueError, match="moe.dispatch=dropless computes every route"):
        load_config("configs/debug.yaml", ["moe.dispatch=dropless", "moe.drop_tokens=true"])
    with pytest.raises(ValueError, match="moe.noisy_gate_policy=Jitter is DeepSpeed's capacity gate"):
        load_config("configs/minilm_vader.yaml", ["moe.dispatch=dropless", "moe.noisy_gate_policy=Jitter"])
    with pytest.raises(ValueError, match="moe.dispatch"):
        load_config("configs/debug.yaml", ["moe.dispatch=fast"])


def test_dynamics_and_expert_loads_see_dropless_routing_as_they_see_capacity_routing():
    """Fig. 6 metrics and the trainer's expert-load scalars read the routing; they must not depend on the dispatch."""
    from pad_moe.analysis import dynamic_properties
    from pad_moe.train.loop import expert_loads

    ref, dropless = capacity_and_dropless(PadMoE, k=2)
    ref.eval(), dropless.eval()
    x = torch.randn(4, 6, H)
    props = [dynamic_properties(m, lambda m=m: m(x)) for m in (ref, dropless)]
    assert props[0].keys() == props[1].keys() == {""}
    for key in ("parameter_variance", "output_variance"):
        assert props[1][""][key] == pytest.approx(props[0][""][key], rel=1e-5)
    with torch.no_grad():
        ref(x), dropless(x)
    (a,), (b,) = expert_loads(ref), expert_loads(dropless)
    assert torch.equal(a, b) and a.sum() == 2 * 24


def test_top_k_above_two_needs_dropless_and_deploys():
    cfg = load_config("configs/minilm_vader.yaml", ["moe.k=3"])
    assert (cfg.moe.k, cfg.moe.dispatch) == (3, "dropless")
    with pytest.raises(ValueError, match="moe.k=3 > 2 needs moe.dispatch=dropless"):
        load_config("configs/minilm_vader.yaml", ["moe.k=3", "moe.dispatch=capacity"])
    with pytest.raises(ValueError, match="moe.k=3 > 2 needs moe.dispatch=dropless"):
        load_config("configs/debug.yaml", ["moe.k=3"])  # from scratch: capacity dispatch with drops
    assert load_config("configs/debug.yaml", ["moe.k=3", "moe.dispatch=dropless"]).moe.k == 3
    with pytest.raises(ValueError, match=r"moe.k=9 must be in \[1, moe.num_experts=8\]"):
        load_config("configs/minilm_vader.yaml", ["moe.k=9"])
