"""Gated (GLU) experts in one process: upcycling a gated MLP is exact for any mask, all-ones masks equal plain MoE,
masked entries of all three matrices get exactly zero gradient, gated neuron compaction equals the element layer,
IMP runs on gated layers through the mask protocol, and moe.expert_type is validated."""

import pytest
import torch
from torch import nn

from pad_moe import DenseFFNBlock, MoEFFN, PadMoE, build_ffn_block, ffn_block_from_gated
from pad_moe.moe.ffn import get_activation
from pad_moe.partition import dynamic_count, iterative_mode_partition
from pad_moe.testing.layers import perturb_experts_, random_masks

H, F, E = 12, 24, 4
ROUTING = dict(num_experts=E, k=2, min_capacity=0, drop_tokens=False, second_expert_sampling=False)
GLU_WEIGHTS = ("gate_proj", "up_proj", "down_proj")


def gated_mlp(bias=False, seed=0):
    """A Llama-style gated MLP: three nn.Linear."""
    torch.manual_seed(seed)
    return nn.Linear(H, F, bias=bias), nn.Linear(H, F, bias=bias), nn.Linear(F, H, bias=bias)


def dense_gated(x, gate, up, down, activation):
    return down(get_activation(activation)(gate(x)) * up(x))


def x_input(seed=3):
    return torch.randn(3, 7, H, generator=torch.Generator().manual_seed(seed))


def row_structured(units, bias):
    """The element masks that a neuron mask ``units`` (F,) stands for, on a gated layer."""
    masks = {"gate_proj.weight": units[:, None].expand(F, H).clone(), "up_proj.weight": units[:, None].expand(F, H).clone(),
             "down_proj.weight": units[None, :].expand(H, F).clone()}
    if bias:
        masks.update({"gate_proj.bias": units.clone(), "up_proj.bias": units.clone(),
                      "down_proj.bias": torch.zeros(H, dtype=torch.bool)})
    return masks


# -- upcycling is exact -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("granularity,sharing", [("element", "layer"), ("element", "expert"), ("neuron", "layer")])
def test_upcycled_gated_pad_layer_equals_the_dense_gated_mlp_for_random_masks(activation, bias, granularity, sharing):
    gate, up, down = gated_mlp(bias)
    x = x_input()
    want = dense_gated(x, gate, up, down, activation)
    layer = PadMoE.from_gated(gate, up, down, **ROUTING, activation=activation, granularity=granularity,
                              mask_sharing=sharing)
    assert layer.expert_type == "glu" and set(layer.static.linear_names) == set(GLU_WEIGHTS)
    for seed in range(3):
        layer.set_masks(random_masks(layer, p=0.3 + 0.2 * seed, seed=seed))
        torch.testing.assert_close(layer(x)[0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_upcycled_gated_moe_and_dense_blocks_equal_the_dense_gated_mlp(bias):
    gate, up, down = gated_mlp(bias)
    x = x_input()
    want = dense_gated(x, gate, up, down, "gelu")
    torch.testing.assert_close(MoEFFN.from_gated(gate, up, down, **ROUTING, activation="gelu")(x)[0], want,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(DenseFFNBlock.from_gated(gate, up, down, activation="gelu")(x)[0], want,
                               rtol=1e-5, atol=1e-5)
    for mode in ("static", "moe", "pad"):
        block = ffn_block_from_gated(mode, gate, up, down, activation="gelu", **ROUTING)
        torch.testing.assert_close(block(x)[0], want, rtol=1e-5, atol=1e-5)
    assert type(build_ffn_block("static", H, F, expert_type="glu", activation="silu").ffn).__name__ == "GatedFFN"


@pytest.mark.parametrize("cls", [MoEFFN, PadMoE])
def test_upcycled_gated_top1_scales_the_dense_output_by_the_router_probability(cls):
    # as for mlp experts: DeepSpeed's top-1 multiplies the expert output by the router probability
    gate, up, down = gated_mlp()
    layer = cls.from_gated(gate, up, down, **{**ROUTING, "k": 1}, activation="silu")
    if cls is PadMoE:
        layer.set_masks(random_masks(layer))
    x = x_input()
    probs = torch.softmax(x.reshape(-1, H) @ layer.gate_weight.t(), -1).max(-1).values.reshape(3, 7, 1)
    torch.testing.assert_close(layer(x)[0], probs * dense_gated(x, gate, up, down, "silu"), rtol=1e-5, atol=1e-5)


def test_all_ones_mask_equals_plain_moe_with_the_same_gated_experts():
    pad = PadMoE(H, F, **ROUTING, expert_type="glu", activation="silu", seed=5)
    plain = MoEFFN(H, F, **ROUTING, expert_type="glu", activation="silu", seed=9)
    with torch.no_grad():
        plain.gate_weight.copy_(pad.gate_weight)
        for a, b in zip(plain.local_experts, pad.local_experts):
            for pa, pb in zip(a.parameters(), b.parameters()):
                pa.copy_(pb)
    assert all(m.all() for m in pad.masks().values())
    x = x_input()
    out_pad, aux_pad, counts_pad = pad(x)
    out_plain, aux_plain, counts_plain = plain(x)
    torch.testing.assert_close(out_pad, out_plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(aux_pad, aux_plain)
    assert torch.equal(counts_pad, counts_plain)


# -- gradients ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sharing", ["layer", "expert"])
@pytest.mark.parametrize("bias", [False, True])
def test_masked_gated_entries_get_exactly_zero_gradient_and_phi_gets_one(sharing, bias):
    layer = PadMoE.from_gated(*gated_mlp(bias), **ROUTING, activation="gelu_tanh", mask_sharing=sharing)
    perturb_experts_(layer)
    layer.set_masks(random_masks(layer))
    out, aux, _ = layer(x_input())
    (out.pow(2).sum() + aux).backward()
    masks = layer.masks()
    names = {n for n, _ in layer.static.named_parameters()}
    assert {f"{w}.weight" for w in GLU_WEIGHTS} <= names and (f"{GLU_WEIGHTS[0]}.bias" in names) == bias
    for i, gid in enumerate(layer.global_expert_ids):
        for name, grad in layer.experts.expert_grads(i).items():
            m = masks[name] if sharing == "layer" else masks[f"e{gid}.{name}"]
            assert torch.all(grad[~m] == 0), name
            assert grad[m].abs().sum() > 0, name
    for name, p in layer.static.named_parameters():
        covered = torch.stack([masks[name] if sharing == "layer" else masks[f"e{g}.{name}"]
                               for g in layer.global_expert_ids]).all(0)
        assert torch.all(p.grad[covered] == 0), name
        assert p.grad[~covered].abs().sum() > 0, name
    assert layer.phi.grad is not None and float(layer.phi.grad.abs().sum()) > 0


def test_neuron_masks_cover_a_row_of_gate_and_up_and_a_column_of_down():
    layer = PadMoE(H, F, **ROUTING, expert_type="glu", activation="silu", bias=True, granularity="neuron")
    assert {k: tuple(v.shape) for k, v in layer.masks().items()} == {"units": (F,)}
    units = torch.rand(F, generator=torch.Generator().manual_seed(0)) < 0.5
    layer.set_masks({"units": units})
    expanded = {k: v.expand(layer._weight_shapes[k]) for k, v in layer.weight_masks().items()}
    want = row_structured(units, bias=True)
    assert set(expanded) == set(want) and all(torch.equal(expanded[k], want[k]) for k in want)


# -- compaction ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [False, True])
def test_compacted_gated_neuron_layer_equals_element_layer_with_row_structured_mask(bias):
    kwargs = dict(**ROUTING, seed=4, activation="silu")
    neuron = PadMoE.from_gated(*gated_mlp(bias), granularity="neuron", **kwargs)
    perturb_experts_(neuron)
    with torch.no_grad():
        neuron.phi.fill_(0.3)
    units = torch.rand(F, generator=torch.Generator().manual_seed(7)) < 0.5
    neuron.set_masks({"units": units})
    element = PadMoE(H, F, granularity="element", expert_type="glu", bias=bias, **kwargs)
    element.load_state_dict({k: v for k, v in neuron.state_dict().items() if "mask" not in k}, strict=False)
    element.set_masks(row_structured(units, bias))
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
        for w in ("gate_proj", "up_proj"):
            close(ce[f"{w}.weight"], ee[f"{w}.weight"][dyn])
            if bias:
                close(ce[f"{w}.bias"], ee[f"{w}.bias"][dyn])
        close(ce["down_proj.weight"], ee["down_proj.weight"][:, dyn])
        assert "down_proj.bias" not in ce
        if bias:
            assert torch.all(ee["down_proj.bias"] == 0)
    for w in ("gate_proj", "up_proj"):
        close(getattr(neuron.static, w).weight.grad, getattr(element.static, w).weight.grad[sta])
    close(neuron.static.down_proj.weight.grad, element.static.down_proj.weight.grad[:, sta])
    if bias:
        close(neuron.static.down_proj.bias.grad, element.static.down_proj.bias.grad)
    close(neuron.phi.grad, element.phi.grad)
    close(neuron.gate_weight.grad, element.gate_weight.grad)
    assert neuron.static.up_proj.out_features == len(sta) and neuron.local_experts[0].up_proj.out_features == len(dyn)


def test_compacted_gated_layer_matches_with_dropped_tokens_and_top1():
    layer = PadMoE.from_gated(*gated_mlp(), activation="gelu_tanh", num_experts=E, k=1, min_capacity=0,
                              capacity_factor=0.5, use_rts=False, granularity="neuron", drop_tokens=True)
    perturb_experts_(layer)
    layer.set_masks({"units": torch.rand(F, generator=torch.Generator().manual_seed(3)) < 0.4})
    x = x_input()
    before = layer(x)[0]
    assert (before.abs().sum(-1) == 0).any()  # some tokens were dropped
    layer.compact_()
    torch.testing.assert_close(layer(x)[0], before, rtol=1e-5, atol=1e-5)


# -- IMP through the mask protocol ----------------------------------------------------------------------------------


class TinyGatedPadNet(nn.Module):
    def __init__(self, granularity, bias, layers=2):
        super().__init__()
        self.layers = nn.ModuleList([
            PadMoE(H, F, **ROUTING, use_rts=False, expert_type="glu", activation="silu", bias=bias,
                   granularity=granularity, seed=i) for i in range(layers)])
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for layer in self.layers:
                layer.gate_weight.copy_(torch.randn(layer.gate_weight.shape, generator=g))

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


def mse_loss(model, batch):
    return model(batch).pow(2).mean()


@pytest.mark.parametrize("scorer", ["snip", "magnitude"])
@pytest.mark.parametrize("granularity,bias", [("element", True), ("element", False), ("neuron", True),
                                              ("neuron", False)])
def test_imp_partitions_gated_layers_to_the_exact_dynamic_count(scorer, granularity, bias):
    model = TinyGatedPadNet(granularity, bias)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(16, H, generator=g) for _ in range(3)]
    iterative_mode_partition(model, batches, mse_loss, kappa=0.3, iterations=2, scorer=scorer, scope="layer")
    for layer in model.layers:
        masks = layer.masks()
        total = sum(m.numel() for m in masks.values())
        assert sum(int(m.sum()) for m in masks.values()) == dynamic_count(0.3, total)
        if granularity == "neuron":
            assert total == F
        scores = layer.magnitude_scores()
        assert {k: v.shape for k, v in scores.items()} == {k: v.shape for k, v in masks.items()}
    if granularity == "neuron":
        before = model(batches[0])
        for layer in model.layers:
            layer.compact_()
        torch.testing.assert_close(model(batches[0]), before, rtol=1e-5, atol=1e-6)


def test_gated_magnitude_scores_sum_the_three_matrices_per_unit():
    layer = PadMoE(H, F, **ROUTING, expert_type="glu", activation="silu", bias=True, granularity="neuron")
    perturb_experts_(layer)
    static = dict(layer.static.named_parameters())
    want = torch.zeros(F)
    for expert in layer.local_experts:
        d = {n: (p - static[n]).abs().detach() for n, p in expert.named_parameters()}
        want += (d["gate_proj.weight"].sum(1) + d["gate_proj.bias"] + d["up_proj.weight"].sum(1) + d["up_proj.bias"]
                 + d["down_proj.weight"].sum(0))
    torch.testing.assert_close(layer.magnitude_scores()["units"], want, rtol=1e-5, atol=1e-5)


# -- bad input and config -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(expert_type="gated"), "expert_type='gated'"),
    (dict(expert_type="glu", activation="relu"), "activation='relu' is not a gated activation"),
])
def test_bad_expert_type_and_gated_activation_raise(kwargs, match):
    for cls in (PadMoE, MoEFFN):
        with pytest.raises(ValueError, match=match):
            cls(H, F, num_experts=2, **kwargs)
    with pytest.raises(ValueError, match=match):
        build_ffn_block("static", H, F, **kwargs)


def test_bad_gated_linears_raise():
    gate, up, down = gated_mlp()
    with pytest.raises(ValueError, match="same shape"):
        PadMoE.from_gated(gate, nn.Linear(H, F + 1, bias=False), down, num_experts=2, activation="silu")
    with pytest.raises(ValueError, match="do not chain"):
        PadMoE.from_gated(gate, up, nn.Linear(F + 1, H, bias=False), num_experts=2, activation="silu")
    with pytest.raises(ValueError, match="from_gated"):
        PadMoE.from_dense(gate, down, num_experts=2, expert_type="glu", activation="silu")


def test_config_validates_moe_expert_type():
    from pad_moe.config import MoEConfig, load_config

    assert MoEConfig().expert_type == "mlp"
    assert MoEConfig(expert_type="glu", activation="silu").expert_type == "glu"
    with pytest.raises(ValueError, match="moe.expert_type='gated'"):
        MoEConfig(expert_type="gated")
    with pytest.raises(ValueError, match="moe.activation='relu' is not a gated activation for moe.expert_type=glu"):
        MoEConfig(expert_type="glu", activation="relu")
    cfg = load_config(None, ["moe.expert_type=glu", "moe.activation=silu"])
    assert cfg.moe.expert_type == "glu"
    with pytest.raises(ValueError, match="moe.expert_type=glu builds gated experts for model.arch=toy only"):
        load_config(None, ["moe.expert_type=glu", "moe.activation=silu", "model.arch=switch", "model.preset=switch-debug",
                           "data.task=span_corruption"])


def test_toy_model_builds_gated_experts_from_the_config():
    from pad_moe.config import load_config
    from pad_moe.toy import ToyClassifier

    cfg = load_config(None, ["moe.expert_type=glu", "moe.activation=gelu_tanh"])
    model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels)
    pads = [m for m in model.modules() if isinstance(m, PadMoE)]
    assert pads and all(p.expert_type == "glu" for p in pads)
    ids = torch.randint(cfg.model.vocab_size, (2, 5))
    logits, aux = model(ids)
    assert torch.isfinite(logits).all()
