"""Parameter and multiply-add counts: PAD-Net Table 2 to the printed digit (``convention='paper'``), and pad_moe's own
convention checked against real built models."""

import json
import math

import pytest

from pad_moe.vision.accounting import count, count_main, count_model
from pad_moe.vision.layers import PadDynamicConv2d
from pad_moe.vision.models import create_model

# (model, conv, kappa, printed params, printed MACs) of PAD-Net Table 2 (ImageNet); params in M, MACs in G.
TABLE_2 = [
    ("resnet50", "static", None, "23.5", "3.86"),
    ("resnet50", "dyconv", None, "100.9", "3.97"),
    ("resnet50", "condconv", None, "129.9", "3.98"),
    ("resnet50", "pad", 0.1, "33.8", "3.90"),
    ("resnet18", "pad", 0.1, "15.1", "1.83"),
    ("resnet18", "static", None, None, "1.81"),
    ("resnet10", "pad", 0.1, "6.9", "0.90"),
    ("resnet10", "static", None, None, "0.89"),
    ("resnet10", "dyconv", None, None, "0.91"),
]


def _digits(value: float, printed: str) -> str:
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return f"{value:.{decimals}f}"


@pytest.mark.parametrize("name,conv,kappa,params,macs", TABLE_2)
def test_paper_convention_reproduces_table_2_to_the_printed_digit(name, conv, kappa, params, macs):
    result = count(name, conv, kappa, "paper")
    if params is not None:
        assert _digits(result["params"] / 1e6, params) == params
    assert _digits(result["macs"] / 1e9, macs) == macs


def test_paper_convention_resnet18_dyconv_is_the_rederived_count():
    """The table prints Chen et al.'s 42.7M; counting every tensor of the same layers gives 45.47M (and the printed
    1.86G MACs)."""
    result = count("resnet18", "dyconv", None, "paper")
    assert f"{result['params'] / 1e6:.2f}" == "45.47" and f"{result['macs'] / 1e9:.3f}" == "1.861"


def test_paper_pad_share_of_dynamic_parameters():
    """|W|·(1 + (K−1)ρ) at ρ = 0.1: the dynamic share Kρ / (1 + (K−1)ρ) is about 30 %."""
    assert 4 * 0.1 / (1 + 3 * 0.1) == pytest.approx(0.3077, abs=1e-4)
    dy, pad = count("resnet50", "dyconv", None, "paper"), count("resnet50", "pad", 0.1, "paper")
    assert pad["params"] / dy["params"] == pytest.approx(0.335, abs=0.002)  # "33.9 % of the parameters"


def test_our_convention_counts_the_model_as_built():
    static = count("resnet50", "static")
    assert static["params"] == 25_557_032  # torchvision's ResNet-50
    assert f"{static['macs'] / 1e9:.2f}" == "4.09"  # v1.5 layout
    v1 = count("resnet50", "static", v1_layout=True)
    assert f"{v1['macs'] / 1e9:.3f}" == "3.858"
    dy = count("resnet_debug", "dyconv", image_size=16, in_chans=1, num_classes=10)
    built = create_model("resnet_debug", "dyconv", image_size=16, in_chans=1, num_classes=10)
    assert dy["params"] == dy["params_training"] == sum(p.numel() for p in built.parameters())


def test_our_pad_count_uses_real_masks_and_matches_the_analytic_kappa_count():
    kwargs = dict(image_size=16, in_chans=1, num_classes=10)
    model = create_model("resnet_debug", "pad", kappa=0.25, **kwargs)
    real = count_model(model, (1, 16, 16))
    assert real == {k: v for k, v in count("resnet_debug", "pad", 0.25, **kwargs).items()
                    if k in ("params", "params_training", "macs")}
    convs = [m for m in model.modules() if isinstance(m, PadDynamicConv2d)]
    n = sum(math.prod(m.kernel_shape) for m in convs)
    d = sum(int(m.mask_weight.sum()) for m in convs)
    assert real["params_training"] == sum(p.numel() for p in model.parameters())
    assert real["params_training"] - real["params"] == (n - d) * 4 + d  # K=4 kernels + W_s -> compact
    full = count("resnet_debug", "pad", None, **kwargs)
    assert full["params"] == count("resnet_debug", "dyconv", **kwargs)["params"] + len(convs)  # + φ per conv


def test_count_cli_prints_json_and_rejects_bad_input(capsys):
    assert count_main(["resnet50", "--conv", "pad", "--kappa", "0.1", "--convention", "paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "resnet50" and f"{out['params'] / 1e6:.1f}" == "33.8"
    assert count_main(["resnet18", "--conv", "dyconv", "--image-size", "32", "--num-classes", "10"]) == 0
    assert "resnet18 dyconv (ours)" in capsys.readouterr().out
    for argv, message in ((["resnet34"], "model 'resnet34' is unknown"),
                          (["resnet50", "--conv", "pad", "--kappa", "1.5"], "kappa=1.5 must be in (0, 1]"),
                          (["resnet50", "--conv", "dyconv", "--kappa", "0.5"], "applies to conv='pad' only"),
                          (["resnet50", "--conv", "moe"], "conv='moe' is unknown"),
                          (["resnet50", "--convention", "table"], "convention='table' is unknown")):
        assert count_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1



def test_padmoe_count_routes_vision_names_and_vision_configs(capsys):
    """``padmoe count`` (the deploy CLI) hands vision names and vision run configs to the vision accounting."""
    from pad_moe.cli import main

    assert main(["count", "resnet50", "--conv", "pad", "--kappa", "0.1", "--convention", "paper", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert f"{out['params'] / 1e6:.1f}M {out['macs'] / 1e9:.2f}G" == "33.8M 3.90G"
    assert main(["count", "configs/vision_fmnist_resnet10.yaml", "--json"]) == 0
    pad = json.loads(capsys.readouterr().out)
    expected = count("resnet10", "pad", 0.1, image_size=28, in_chans=1, num_classes=10)  # partition.kappa = 0.1
    assert (pad["params"], pad["macs"], pad["kappa"]) == (expected["params"], expected["macs"], 0.1)
    assert main(["count", "configs/vision_fmnist_resnet10.yaml", "vision.conv=static", "--json"]) == 0
    static = json.loads(capsys.readouterr().out)
    assert static["params"] == count("resnet10", "static", image_size=28, in_chans=1, num_classes=10)["params"]
    assert main(["count", "resnet50", "--conv", "bogus"]) == 2
    assert "conv='bogus' is unknown" in capsys.readouterr().err


def test_live_count_of_a_pad_dyconv_model_equals_the_vision_count():
    """The trainer's summary (pad_moe.accounting.count_live) and padmoe count agree on a partitioned PAD ResNet."""
    from pad_moe.accounting import count_live

    model = create_model("resnet_debug", "pad", kappa=0.3, num_classes=10, in_chans=1, image_size=28)
    live, counted = count_live(model), count_model(model, (1, 28, 28), 0.3)
    assert (live["params_compact"], live["params_training"]) == (counted["params"], counted["params_training"])
    assert live["params_compact"] < live["params_training"]
