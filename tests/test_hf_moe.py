"""HF MoE checkpoints as PAD experts (pad_moe.hfmoe): tiny random Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE built here.

References: the HF model itself (all masks one ≡ its logits, bitwise), and the HF model whose experts hold W_eff under
random masks; the compact export reloads to the same logits and stores exactly the counted parameters."""

import subprocess
import sys

import pytest
import torch

from pad_moe.hfmoe.experts import PadHFExperts, import_hf_moe, moe_blocks

H, F, E, V = 32, 48, 4, 64


def tiny(family: str, seed: int = 0):
    import transformers as T

    torch.manual_seed(seed)
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, num_experts_per_tok=2)
    if family == "mixtral":
        model = T.MixtralForCausalLM(T.MixtralConfig(intermediate_size=F, num_local_experts=E, **common))
    elif family == "qwen2_moe":
        model = T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(moe_intermediate_size=F, shared_expert_intermediate_size=40,
                                                       num_experts=E, decoder_sparse_step=1, **common))
    elif family == "qwen3_moe":
        model = T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(moe_intermediate_size=F, num_experts=E, head_dim=8,
                                                       decoder_sparse_step=1, **common))
    else:
        model = T.OlmoeForCausalLM(T.OlmoeConfig(intermediate_size=F, num_experts=E, **common))
    with torch.no_grad():  # experts that differ a lot, so a wrong mix or a wrong expert shows
        for _, block in moe_blocks(model):
            block.experts.gate_up_proj.normal_(0, 0.3)
            block.experts.down_proj.normal_(0, 0.3)
    return model.eval()


IDS = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")


def random_masks(model, seed=4, p=0.5):
    g = torch.Generator().manual_seed(seed)
    for _, block in moe_blocks(model):
        block.experts.set_masks({k: torch.rand(v.shape, generator=g) < p for k, v in block.experts.masks().items()})


@pytest.mark.parametrize("family", FAMILIES)
def test_imported_model_at_all_ones_is_the_original_bitwise(family):
    reference = tiny(family)
    expected = reference(IDS).logits
    model = import_hf_moe(tiny(family))
    assert len(moe_blocks(model)) == 2 and all(isinstance(b.experts, PadHFExperts) for _, b in moe_blocks(model))
    assert torch.equal(model(IDS).logits, expected)


@pytest.mark.parametrize("family", ("mixtral", "qwen2_moe"))
def test_random_masks_equal_the_hf_model_holding_w_eff_and_masked_entries_get_no_gradient(family):
    model = import_hf_moe(tiny(family))
    random_masks(model)
    reference = tiny(family)
    with torch.no_grad():
        for (_, pad), (_, hf) in zip(moe_blocks(model), moe_blocks(reference)):
            gate_up, down = pad.experts.effective_weights()
            hf.experts.gate_up_proj.copy_(gate_up)
            hf.experts.down_proj.copy_(down)
            mask = pad.experts.masks()["gate_proj.weight"]  # static entries hold W_s in every expert
            assert torch.equal(gate_up[:, :F][:, ~mask], pad.experts.static_gate_up[:F][~mask].expand(E, -1))
    assert (model(IDS).logits - reference(IDS).logits).abs().max() < 1e-6
    model(IDS).logits.square().mean().backward()
    for _, block in moe_blocks(model):
        experts = block.experts
        masks = experts.masks()
        grad = experts.gate_up_proj.grad
        assert torch.all(grad[:, :F][:, ~masks["gate_proj.weight"]] == 0)
        assert torch.all(experts.down_proj.grad[:, ~masks["down_proj.weight"]] == 0)
        assert grad[:, :F][:, masks["gate_proj.weight"]].abs().sum() > 0
        assert experts.static_down.grad[~masks["down_proj.weight"]].abs().sum() > 0


def test_static_initialisations():
    base = tiny("mixtral")
    gate_up = [b.experts.gate_up_proj.detach().clone() for _, b in moe_blocks(base)]
    freq = {name: torch.tensor([3, 1, 0, 0]) for name, _ in moe_blocks(base)}
    for init, expected in (("mean", lambda w: w.mean(0)), ("first", lambda w: w[0]),
                           ("frequency", lambda w: 0.75 * w[0] + 0.25 * w[1])):
        model = import_hf_moe(tiny("mixtral"), static_init=init, expert_frequency=freq)
        for (_, block), w in zip(moe_blocks(model), gate_up):
            assert torch.allclose(block.experts.static_gate_up, expected(w), atol=1e-6), init
    with pytest.raises(ValueError, match="expert_frequency"):
        import_hf_moe(tiny("mixtral"), static_init="frequency")


def test_bad_models_are_refused_in_one_line():
    import transformers as T

    dense = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=1,
                                             num_attention_heads=4))
    with pytest.raises(ValueError, match="model_type='llama' is not an MoE family.*upcycle"):
        import_hf_moe(dense)
    model = import_hf_moe(tiny("mixtral"))
    with pytest.raises(ValueError, match="already a PAD experts module"):
        import_hf_moe(model)


@pytest.mark.parametrize("granularity", ("element", "neuron"))
def test_compact_export_reloads_to_the_same_logits_and_stores_what_is_counted(tmp_path, granularity):
    from pad_moe.accounting import count_live
    from pad_moe.deploy.export import load_deployed
    from pad_moe.hfmoe.deployed import save_compressed

    model = import_hf_moe(tiny("qwen2_moe"), granularity=granularity)
    random_masks(model, p=0.3)
    with torch.no_grad():
        for _, block in moe_blocks(model):
            block.experts.phi.fill_(0.4)  # λs != λd: the export must fold them in
    expected = model(IDS).logits
    meta = save_compressed(model, None, str(tmp_path), {"family": "qwen2_moe"})
    stored = count_live(model)["params_compact"]
    assert meta["params_stored"] == stored  # λ folded into the stored values: φ is counted by neither
    assert meta["params_stored"] < sum(p.numel() for p in tiny("qwen2_moe").parameters())
    loaded = load_deployed(str(tmp_path), resident="compact")  # the stored values only
    assert sum(p.numel() for p in loaded.parameters()) == meta["params_stored"]
    assert (loaded(IDS).logits - expected).abs().max() < 1e-5
    served = load_deployed(str(tmp_path))  # the default serving form (tests/test_deployed_serving.py)
    assert (served(IDS).logits - expected).abs().max() < 1e-5


def test_export_loads_without_deepspeed(tmp_path):
    from pad_moe.hfmoe.deployed import save_compressed

    model = import_hf_moe(tiny("mixtral"))
    random_masks(model)
    torch.save(IDS, tmp_path / "ids.pt")
    expected = model(IDS).logits
    (tmp_path / "m").mkdir()
    save_compressed(model, None, str(tmp_path / "m"), {"family": "mixtral"})
    torch.save(expected, tmp_path / "expected.pt")
    code = ("import sys, torch; import pad_moe; m = pad_moe.load_deployed(sys.argv[1]); "
            "ids = torch.load(sys.argv[2], weights_only=True); e = torch.load(sys.argv[3], weights_only=True); "
            "d = (m(ids).logits - e).abs().max().item(); assert d < 1e-5, d; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "ids.pt"),
                           str(tmp_path / "expected.pt")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]


def test_counts_from_config_match_the_export(tmp_path):
    from pad_moe.hfmoe.count import count_hf_moe
    from pad_moe.hfmoe.deployed import save_compressed
    from pad_moe.partition import random_partition

    base = tiny("olmoe")
    base.save_pretrained(tmp_path / "src")
    full = sum(p.numel() for p in base.parameters())
    moe = count_hf_moe(str(tmp_path / "src"), mode="moe")
    assert moe["params"] == moe["params_training"] == full and moe["experts"] == E and moe["moe_layers"] == 2
    expert_part = 2 * E * 3 * F * H
    assert moe["params_active"] == full - expert_part + 2 * 2 * 3 * F * H
    static = count_hf_moe(str(tmp_path / "src"), mode="static")
    assert static["params"] == full - expert_part + 2 * 3 * F * H
    pad = count_hf_moe(str(tmp_path / "src"), mode="pad", kappa=0.5)
    model = import_hf_moe(tiny("olmoe"))
    random_partition(model, kappa=0.5, scope="layer")
    (tmp_path / "out").mkdir()
    meta = save_compressed(model, None, str(tmp_path / "out"), {})
    assert meta["params_stored"] == pad["params"]
    with pytest.raises(ValueError, match="--kappa"):
        count_hf_moe(str(tmp_path / "src"), mode="pad")


@pytest.mark.parametrize("name, total, active", [
    ("mixtral-8x7b", 46.7e9, 12.9e9),  # Mistral AI's published figures
    ("olmoe-1b-7b", 6.9e9, 1.3e9),  # OLMoE paper: 6.9B total, 1.3B active
    ("qwen1.5-moe-a2.7b", 14.3e9, 2.7e9),  # Qwen1.5-MoE-A2.7B model card
    ("qwen3-30b-a3b", 30.5e9, 3.3e9),  # Qwen3 model card
])
def test_preset_counts_match_the_published_totals(name, total, active):
    from pad_moe.hfmoe.count import count_hf_moe

    r = count_hf_moe(name, mode="moe")
    assert abs(r["params"] / total - 1) < 0.01 and abs(r["params_active"] / active - 1) < 0.025, r
    pad = count_hf_moe(name, mode="pad", kappa=0.5)
    assert r["params_active"] > pad["params_active"] and pad["params"] < r["params"]


def test_count_command_on_a_preset_prints_one_json_line(capsys):
    from pad_moe.deploy.count import count_main

    assert count_main(["mixtral-8x7b", "--mode", "pad", "--kappa", "0.5", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = __import__("json").loads(out[-1])
    assert r["family"] == "mixtral" and r["kappa"] == 0.5 and 25e9 < r["params"] < 30e9
    assert count_main(["mixtral-8x7b", "--experts", "4"]) == 2
