"""``padmoe count``: the paper's Table 1/3 parameter counts to the printed digit (``--convention paper``), our own
convention, counts of a run config against the live model, JSON output and bad input."""

import functools
import json

import pytest
import torch

from pad_moe.accounting import count_live
from pad_moe.deploy.count import count, count_main, resolve

TABLE = {  # static, MoE, PAD κ = 0.7 / 0.5 / 0.3 / 0.1 (Table 1 / 3, #Param.)
    "bert-base": ("108.9M", "506.3M", {0.7: "387.3M", 0.5: "308.0M", 0.3: "228.6M", 0.1: "149.3M"}),
    "roberta-base": ("124.1M", "521.5M", {0.7: "402.5M", 0.5: "323.1M", 0.3: "243.8M", 0.1: "164.5M"}),
    "albert-base": ("11.1M", "44.2M", {0.5: "30.0M"}),
    "electra-base": ("108.9M", "506.3M", {0.5: "308.0M"}),
}


@functools.lru_cache(maxsize=None)
def arch(name):
    return resolve(name)


@pytest.mark.parametrize("name", sorted(TABLE))
def test_table_1_and_3_to_the_printed_digit(name):
    static, moe, pad = TABLE[name]
    a = arch(name)
    assert count(a, mode="static", convention="paper")["params_M"] == static
    assert count(a, mode="moe", convention="paper")["params_M"] == moe
    for kappa, want in pad.items():
        assert count(a, mode="pad", kappa=kappa, convention="paper")["params_M"] == want, kappa


def test_exact_figures_of_the_convention():
    a = arch("bert-base")
    assert a.total == 108_891_648 and sum(s.params for s in a.sites) == 12 * 4_722_432
    assert count(a, mode="pad", kappa=0.5, convention="paper")["params"] == 307_971_072
    assert count(a, mode="moe", convention="paper")["params"] == 506_313_216
    ours = count(a, mode="pad", kappa=0.5)
    assert ours["params"] == 307_971_072 - 737_280 + 12 * 768 * 8  # DeepSpeed: one 768x8 router per FFN
    assert ours["params_training"] == 52_222_464 + 9 * 56_669_184 + 12 * 768 * 8 + 12  # + φ per layer
    assert count(arch("albert-base"), mode="pad", kappa=0.5, convention="paper", pad_static="masked")[
        "params_M"] == "27.7M"  # the masked static count for ALBERT: the table prints the whole-static one


def test_run_config_counts_match_the_live_model():
    from pad_moe.config import load_config
    from pad_moe.toy import ToyClassifier

    cfg = load_config("configs/debug.yaml", ["moe.ep_size=1"])
    model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels, seed=0)
    pads = [m for m in model.modules() if hasattr(m, "set_masks")]
    g = torch.Generator().manual_seed(0)
    for m in pads:  # exactly κ = 0.5 of every mask tensor dynamic
        m.set_masks({k: (torch.randperm(v.numel(), generator=g) < v.numel() // 2).reshape(v.shape)
                     for k, v in m.masks().items()})
    live = count_live(model)
    got = count(resolve("configs/debug.yaml"))
    assert got["params_training"] == live["params_training"] == sum(p.numel() for p in model.parameters())
    assert got["params"] == live["params_compact"] - len(pads)  # φ folded into the stored values
    assert count(resolve("debug"), mode="static")["params"] == got["non_ffn_params"] + got["ffn_params"]


@pytest.mark.parametrize("granularity", ["element", "neuron"])
def test_gated_run_config_counts_match_the_live_model(granularity):
    from pad_moe.config import load_config
    from pad_moe.deploy.count import config_arch
    from pad_moe.toy import ToyClassifier

    cfg = load_config("configs/debug.yaml", ["moe.ep_size=1", "moe.expert_type=glu", "moe.activation=silu",
                                             f"moe.granularity={granularity}"])
    model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels, seed=0)
    pads = [m for m in model.modules() if hasattr(m, "set_masks")]
    g = torch.Generator().manual_seed(0)
    for m in pads:  # exactly κ = 0.5 of every mask tensor dynamic
        m.set_masks({k: (torch.randperm(v.numel(), generator=g) < v.numel() // 2).reshape(v.shape)
                     for k, v in m.masks().items()})
    live = count_live(model)
    a = config_arch(cfg, "debug-glu")
    H, U = cfg.model.hidden_size, cfg.model.ffn_size
    assert all(s.matrices == 3 and s.params == 3 * H * U + 2 * U + H for s in a.sites)  # gate, up, down + biases
    got = count(a, kappa=0.5)
    assert got["params_training"] == live["params_training"] == sum(p.numel() for p in model.parameters())
    assert got["params"] == live["params_compact"] - len(pads)  # φ folded into the stored values


def test_json_output_and_bad_input(capsys):
    assert count_main(["bert-base", "--mode", "pad", "--kappa", "0.5", "--convention", "paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params_M"] == "308.0M" and out["params"] < out["params_training"] and out["bytes"] > 4 * out["params"]
    assert count_main(["debug", "--granularity", "neuron"]) == 0
    assert "compact" in capsys.readouterr().out
    assert count_main(["toy-bert-ffn", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "toy-bert-ffn"  # a preset is named as given
    for argv in (["no-such-model"], ["bert-base", "--kappa", "0"], ["bert-base", "--experts", "2", "--k", "3"]):
        assert count_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("padmoe count: error:") and len(err.strip().splitlines()) == 1
