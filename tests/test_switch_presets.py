"""Every Switch preset instantiates on the meta device with the parameter count ``count_switch`` predicts; the
published totals; the compact PAD count agrees with pad_moe.accounting on a live model; registry entries are valid."""

import dataclasses

import pytest
import torch

from pad_moe.switch.count import count_switch, count_table
from pad_moe.switch.model import build_switch
from pad_moe.switch.presets import SWITCH_ARCHS, get_arch, registry_entries, switch_names


def live_training_count(model, ep_size):
    """Parameters over all ranks: this rank's experts (DeepSpeed tags them allreduce=False) times ep_size."""
    return sum(p.numel() * (ep_size if getattr(p, "allreduce", True) is False else 1) for p in model.parameters())


@pytest.mark.parametrize("name", sorted(SWITCH_ARCHS))
def test_every_preset_builds_on_meta_with_the_predicted_count(name):
    arch = SWITCH_ARCHS[name]
    ep = max(1, arch.num_experts // 128)  # a rank's share: switch-c-2048 builds 128 of its 2048 experts per layer
    with torch.device("meta"):
        model = build_switch(arch, "pad", ep_size=ep)
    assert all(p.is_meta for p in model.parameters())
    assert live_training_count(model, ep) == count_switch(name, "pad")["params_training"]
    sparse = model.sparse_ffns()
    assert len(sparse) == count_switch(name, "moe")["sparse_layers"]
    assert len(sparse[0].block.local_experts) == arch.num_experts // ep


@pytest.mark.parametrize("mode", ["static", "moe"])
def test_static_and_moe_modes_build_with_the_predicted_count(mode):
    with torch.device("meta"):
        model = build_switch(get_arch("switch-base-8"), mode)
    assert live_training_count(model, 1) == count_switch("switch-base-8", mode)["params"]


def test_published_totals():
    billions = {n: count_switch(n, "moe")["params"] / 1e9 for n in switch_names()}
    assert round(billions["switch-base-128"], 1) == 7.4  # `padmoe count switch-base-128 --mode moe`
    assert round(billions["switch-base-8"], 2) == 0.62  # HF's switch-base-8: 619M
    assert round(billions["switch-large-128"]) == 26  # paper: 26B
    assert round(billions["switch-c-2048"]) == 1571  # paper: 1571B
    assert billions["switch-xxl"] == billions["switch-xxl-64"] < billions["switch-xxl-128"]
    table = count_table("switch-base-128")
    assert table["static"] < table["pad@0.1"] < table["pad@0.5"] < table["pad@0.7"] < table["moe"]
    base = count_switch("switch-base-128", "pad", 0.5)
    # compact PAD: non-expert + (1 − κ + Eκ)·FFN per sparse layer (+ routers and φ in non-expert)
    assert base["params"] == base["non_expert"] + round((0.5 * 128 - 0.5) * base["ffn_params"]) * 12


def test_gated_presets_count_three_matrices_per_ffn_and_match_the_paper():
    # Switch-XXL is GEGLU (wi_0, wi_1, wo); Switch-C and the Base/Large presets keep two-matrix FFNs
    assert {n: get_arch(n).expert_type for n in SWITCH_ARCHS if get_arch(n).expert_type == "glu"} == {
        "switch-xxl-64": "glu", "switch-xxl-128": "glu"}
    xxl, c = count_switch("switch-xxl-128", "moe"), count_switch("switch-c-2048", "moe")
    assert xxl["ffn_params"] == 3 * 4096 * 10240 and c["ffn_params"] == 2 * 2080 * 6144
    assert xxl["params"] == 394_675_073_024 and abs(xxl["params"] / 395e9 - 1) < 0.005  # paper: 395B
    assert c["params"] == 1_571_375_798_688 and abs(c["params"] / 1571e9 - 1) < 0.005  # paper: 1571B
    assert count_switch("switch-base-128", "moe")["params"] == 7_415_217_408  # unchanged by the FFN type
    assert count_switch("switch-large-128", "moe")["params"] == 26_309_291_008
    pad = count_switch("switch-xxl-128", "pad", 0.5)
    assert pad["params"] == pad["non_expert"] + round((0.5 * 128 - 0.5) * pad["ffn_params"]) * 24


def test_gated_preset_builds_gated_dense_and_sparse_ffns():
    from pad_moe.moe.ffn import GatedFFN

    arch = get_arch("switch-debug").with_(expert_type="glu")
    model = build_switch(arch, "pad", min_capacity=0)
    sparse = model.sparse_ffns()
    assert all(s.block.expert_type == "glu" and s.block.activation == "gelu_tanh" for s in sparse)
    assert sum(isinstance(m, GatedFFN) for m in model.modules()) > 0
    ids = torch.randint(arch.vocab_size, (2, 6))
    logits, aux = model(ids, decoder_input_ids=ids)
    assert torch.isfinite(logits).all() and torch.isfinite(aux)


def test_compact_count_agrees_with_live_accounting():
    from pad_moe.accounting import count_live
    from pad_moe.pad.protocol import pad_modules

    model = build_switch(get_arch("switch-debug"), "pad", min_capacity=0)
    g = torch.Generator().manual_seed(0)
    for _, module in pad_modules(model):  # exactly a quarter of each weight's entries dynamic
        masks = {}
        for k, v in module.masks().items():
            flat = torch.zeros(v.numel(), dtype=torch.bool)
            flat[torch.randperm(v.numel(), generator=g)[:v.numel() // 4]] = True
            masks[k] = flat.reshape(v.shape)
        module.set_masks(masks)
    live = count_live(model)
    want = count_switch("switch-debug", "pad", 0.25)
    assert live["params_compact"] == want["params"] and live["params_training"] == want["params_training"]


def test_registry_entries_fit_the_config_tree():
    from pad_moe.config import ModelConfig, MoEConfig

    fields = {"model": {f.name for f in dataclasses.fields(ModelConfig)},
              "moe": {f.name for f in dataclasses.fields(MoEConfig)}}
    entries = registry_entries()
    assert set(entries) == set(switch_names())
    for name, sections in entries.items():
        for section, values in sections.items():
            assert set(values) <= fields[section], (name, set(values) - fields[section])
        arch = get_arch(name)
        assert sections["model"]["hidden_size"] == arch.d_model and sections["moe"]["every"] == arch.sparse_step


def test_unknown_preset_and_bad_counts_name_the_value():
    with pytest.raises(ValueError, match="'switch-base-7'.*known: switch-base-128"):
        get_arch("switch-base-7")
    with pytest.raises(ValueError, match="kappa=1.5"):
        count_switch("switch-base-8", "pad", 1.5)
    with pytest.raises(ValueError, match="mode='dense'"):
        count_switch("switch-base-8", "dense")
