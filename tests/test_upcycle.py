"""Upcycling Hugging Face encoders: equivalence at init, ALBERT sharing, auxiliary loss, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    ElectraConfig,
    RobertaConfig,
)

from pad_moe.config import MoEConfig
from pad_moe.models import (
    UpcycledFFN,
    aux_loss,
    expert_counts,
    find_ffn_sites,
    upcycle,
    upcycle_from_config,
    upcycle_info,
    upcycled_ffns,
)
from pad_moe.moe.layer import DenseFFNBlock, MoEFFN, PadMoE
from pad_moe.pad.protocol import pad_modules

ARCHS = ("bert", "roberta", "albert", "electra")
ATOL = 1e-5


def tiny_model(arch: str, seed: int = 0, **overrides) -> nn.Module:
    """A random-init 2-layer encoder with a classification head (no download), in eval mode."""
    common = {**dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2), **overrides}
    config = {"bert": lambda: BertConfig(**common),
              "roberta": lambda: RobertaConfig(pad_token_id=1, **common),
              "albert": lambda: AlbertConfig(embedding_size=16, **common),  # hidden_act gelu_new
              "electra": lambda: ElectraConfig(embedding_size=16, **common)}[arch]()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(config).eval()


def tiny_inputs(seed: int = 1, batch: int = 3, seq: int = 10) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 6:] = 0  # padding: the MoE routes these tokens too; real tokens must be unaffected
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def outputs(model: nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, last hidden state with padding positions zeroed)."""
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    real = inputs["attention_mask"].unsqueeze(-1).bool()
    return out.logits, out.hidden_states[-1] * real


def random_masks_(model: nn.Module, seed: int = 0, p: float = 0.5) -> None:
    g = torch.Generator().manual_seed(seed)
    for _, module in pad_modules(model):
        module.set_masks({n: torch.rand(m.shape, generator=g) < p for n, m in module.masks().items()})


def assert_same(model_out, ref_out) -> None:
    for got, want in zip(model_out, ref_out, strict=True):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- equivalence at initialisation -----------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ("static", "moe", "pad"))
def test_upcycled_model_equals_original(arch, mode):
    model, inputs = tiny_model(arch), tiny_inputs()
    ref = outputs(model, inputs)
    upcycle(model, mode=mode, num_experts=4, k=2)
    block_type = {"static": DenseFFNBlock, "moe": MoEFFN, "pad": PadMoE}[mode]
    ffns = upcycled_ffns(model)
    assert len(ffns) == (1 if arch == "albert" else 2)
    assert all(type(f.block) is block_type for f in ffns.values())
    assert_same(outputs(model, inputs), ref)
    if mode == "pad":  # any partition: W_s == W_k at init, so every mask gives the dense function
        for seed in (0, 1):
            random_masks_(model, seed)
            assert_same(outputs(model, inputs), ref)


def test_eight_experts_top2_and_train_mode_routing():
    model, inputs = tiny_model("bert"), tiny_inputs(batch=4, seq=16)
    ref = outputs(model, inputs)
    upcycle(model, mode="pad", num_experts=8, k=2)
    random_masks_(model, 3, p=0.3)
    model.train()  # training capacity and Gumbel second-expert sampling: still dropless, still the dense function
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    assert_same(outputs(model, inputs), ref)


def test_every_replaces_every_nth_block_and_keeps_outputs():
    model, inputs = tiny_model("bert", num_hidden_layers=4), tiny_inputs()
    ref = outputs(model, inputs)
    upcycle(model, mode="moe", num_experts=4, every=2)
    assert list(upcycled_ffns(model)) == ["bert.encoder.layer.1.intermediate", "bert.encoder.layer.3.intermediate"]
    assert [f.index for f in upcycled_ffns(model).values()] == [1, 3]
    assert len(find_ffn_sites(model)) == 2  # layers 0 and 2 keep their dense FFN
    assert_same(outputs(model, inputs), ref)


def test_upcycle_from_config_records_the_config():
    model, inputs = tiny_model("roberta"), tiny_inputs()
    ref = outputs(model, inputs)
    cfg = MoEConfig(mode="pad", num_experts=4, drop_tokens=False, scale_mode="unconstrained")
    upcycle_from_config(model, cfg)
    info = upcycle_info(model)
    assert (info.mode, info.num_experts, info.k, info.activation) == ("pad", 4, 2, "gelu")
    assert info.moe_config["scale_mode"] == "unconstrained" and info.moe_config["aux_loss_coef"] == cfg.aux_loss_coef
    assert all(m.scale_mode == "unconstrained" for _, m in pad_modules(model))
    assert_same(outputs(model, inputs), ref)


def test_upcycle_keeps_dtype_and_is_deterministic():
    a, b = tiny_model("electra"), tiny_model("electra")
    torch.manual_seed(123)  # the global RNG must not matter: routers are seeded from (seed, block number)
    upcycle(a, mode="pad", num_experts=4)
    torch.manual_seed(456)
    upcycle(b, mode="pad", num_experts=4)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    masks = [v for k, v in sa.items() if ".mask_" in k]
    assert masks and all(m.dtype == torch.bool for m in masks)
    half = upcycle(tiny_model("bert").to(torch.bfloat16), mode="pad", num_experts=4)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert {b.dtype for n, b in half.named_buffers() if ".mask_" in n} == {torch.bool}
    assert half(**tiny_inputs()).logits.dtype == torch.bfloat16


# -- ALBERT: one shared layer ----------------------------------------------------------------------------------------
def test_albert_shared_layer_is_replaced_once_and_stays_shared():
    model, inputs = tiny_model("albert", num_hidden_layers=3), tiny_inputs()
    ref = outputs(model, inputs)
    upcycle(model, mode="pad", num_experts=4, every=1)
    pads = {id(m) for _, m in pad_modules(model)}
    assert len(pads) == 1
    (name, ffn), = upcycled_ffns(model).items()
    assert name == "albert.encoder.albert_layer_groups.0.albert_layers.0.ffn"
    random_masks_(model, 5)
    assert_same(outputs(model, inputs), ref)
    # the shared block ran once per depth: three auxiliary losses and three sets of counts in this forward
    assert len(ffn.aux_history) == 3 and len(ffn.count_history) == 3
    tokens = inputs["input_ids"].numel()
    assert int(expert_counts(model)[name].sum()) == 3 * 2 * tokens


# -- auxiliary loss, expert counts, gradients ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ("bert", "albert"))
def test_aux_loss_is_collected_from_all_blocks_and_reset_per_forward(arch):
    model, inputs = tiny_model(arch), tiny_inputs()
    upcycle(model, mode="moe", num_experts=4)
    assert float(aux_loss(model)) == 0.0  # no forward yet
    model(**inputs)
    first = aux_loss(model).detach()
    per_block = [aux for f in upcycled_ffns(model).values() for aux in f.aux_history]
    assert len(per_block) == 2 and torch.isfinite(first) and float(first) > 0
    torch.testing.assert_close(first, torch.stack(per_block).sum().detach())
    model(**inputs)  # a new forward replaces, never accumulates
    torch.testing.assert_close(aux_loss(model).detach(), first)
    counts = expert_counts(model)
    assert all(c.shape == (4,) and int(c.sum()) == 2 * inputs["input_ids"].numel() * (2 if arch == "albert" else 1)
               for c in counts.values())


def test_static_mode_has_zero_aux_and_no_counts():
    model = tiny_model("bert")
    upcycle(model, mode="static")
    model(**tiny_inputs())
    assert float(aux_loss(model)) == 0.0 and expert_counts(model) == {}


def test_gradients_reach_experts_static_weights_phi_and_router_of_every_block():
    model, inputs = tiny_model("bert"), tiny_inputs(batch=4, seq=12)
    upcycle(model, mode="pad", num_experts=4)
    random_masks_(model, 7)
    model.train()
    out = model(**inputs, labels=torch.tensor([0, 1, 1, 0]), output_hidden_states=True)
    probe = torch.randn(out.hidden_states[-1].shape, generator=torch.Generator().manual_seed(0))
    # the task loss reads only [CLS]; a probe on every token lets every routed expert of the last layer get a gradient
    (out.loss + (probe * out.hidden_states[-1]).mean() + 0.01 * aux_loss(model)).backward()
    counts = expert_counts(model)
    for name, ffn in upcycled_ffns(model).items():
        block = ffn.block
        masks = block.weight_masks()
        assert block.phi.grad is not None and float(block.phi.grad.abs()) > 0, name
        assert block.gate_weight.grad.abs().sum() > 0, name  # the router learns through the auxiliary loss
        w_s = block.static.fc1.weight
        assert w_s.grad[~masks["fc1.weight"]].abs().sum() > 0, name
        assert torch.all(w_s.grad[masks["fc1.weight"]] == 0), name  # dynamic entries take nothing from W_s
        for e in range(block.num_local_experts):
            g = block.experts.expert_grads(e)["fc1.weight"]
            if int(counts[name][e]) > 0:
                assert g is not None and g[masks["fc1.weight"]].abs().sum() > 0, (name, e)
            assert g is None or torch.all(g[~masks["fc1.weight"]] == 0), (name, e)
        assert int((counts[name] > 0).sum()) >= 2, name


# -- bad input -------------------------------------------------------------------------------------------------------
def one_line_error(fn, match: str) -> str:
    with pytest.raises(ValueError, match=match) as info:
        fn()
    assert "\n" not in str(info.value)
    return str(info.value)


def test_models_without_a_recognisable_ffn_are_refused():
    one_line_error(lambda: upcycle(nn.Linear(4, 4)), "no recognisable FFN")
    torch_layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16)  # linear1/linear2: no known kind
    one_line_error(lambda: upcycle(torch_layer), "TransformerEncoderLayer has no recognisable FFN")
    one_line_error(lambda: upcycle("bert"), "nn.Module")


def test_bad_arguments_are_refused():
    one_line_error(lambda: upcycle(tiny_model("bert", hidden_act="quick_gelu")), "quick_gelu.*not supported")
    one_line_error(lambda: upcycle(tiny_model("bert"), mode="dense"), "mode='dense' is unknown")
    one_line_error(lambda: upcycle(tiny_model("bert"), activation="relu"), "activation.*config.hidden_act")
    one_line_error(lambda: upcycle(tiny_model("bert"), every=3), "every=3 replaces none of the 2")
    one_line_error(lambda: upcycle(tiny_model("bert"), every=0), "every=0")
    untouched = tiny_model("bert")
    one_line_error(lambda: upcycle(untouched, num_experts=4, ep_size=3), "not divisible")
    assert not upcycled_ffns(untouched) and len(find_ffn_sites(untouched)) == 2  # a refused upcycle changes nothing
    model = upcycle(tiny_model("bert"), mode="moe", num_experts=4)
    one_line_error(lambda: upcycle(model), "already upcycled")
    one_line_error(lambda: upcycle_info(tiny_model("bert")), "not upcycled")


def test_a_lying_activation_is_detected():
    model = tiny_model("bert")
    model.config.hidden_act = "relu"  # the layers still compute gelu
    one_line_error(lambda: upcycle(model), "does not compute 'relu'")


def test_wrapper_is_a_plain_module_in_the_hf_tree():
    model = upcycle(tiny_model("bert"), mode="moe", num_experts=4)
    layer = model.bert.encoder.layer[0]
    assert isinstance(layer.intermediate, UpcycledFFN) and isinstance(layer.output.dense, nn.Identity)
    assert not any("intermediate.dense" in k or ("output.dense" in k and "attention" not in k)
                   for k in model.state_dict())


def test_upcycle_from_config_seeds_the_router_from_the_run_seed():
    """The routers were seeded 0 for every run seed (seed spread left out router-initialisation variance)."""
    def routers(seed):
        model = tiny_model("bert")
        upcycle_from_config(model, MoEConfig(mode="moe", num_experts=4), seed=seed)
        return [f.block.gate_weight.detach().clone() for f in upcycled_ffns(model).values()]

    a, b, c = routers(0), routers(0), routers(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not any(torch.equal(x, z) for x, z in zip(a, c, strict=True))
