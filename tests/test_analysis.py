"""Dynamic-property metrics against a brute-force per-token computation."""

import torch

from pad_moe import PadMoE
from pad_moe.analysis import dynamic_properties, effective_expert_weights


def test_parameter_variance_equals_brute_force_per_token_weights():
    torch.manual_seed(0)
    layer = PadMoE(6, 10, num_experts=4, k=2, min_capacity=0, drop_tokens=False, second_expert_sampling=False)
    layer.set_masks({k: torch.rand(v.shape) < 0.5 for k, v in layer.masks().items()})
    x = torch.randn(2, 9, 6)
    props = dynamic_properties(layer, lambda: layer(x))[""]
    # brute force: each token's weights = Σ_k g_k W_k_eff, variance across the 18 tokens, mean over entries
    logits = x.reshape(-1, 6) @ layer.gate_weight.t()
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1)
    G = torch.zeros(18, 4).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    W = effective_expert_weights(layer).detach()
    per_token = G @ W  # (18, P)
    want = per_token.var(0, unbiased=False).mean()
    assert abs(props["parameter_variance"] - float(want)) < 1e-6 * max(1.0, float(want))
    out = layer(x)[0].detach().reshape(-1, 6)
    assert abs(props["output_variance"] - float(out.var(0, unbiased=False).mean())) < 1e-6


def test_identical_experts_have_zero_parameter_variance():
    fc1, fc2 = torch.nn.Linear(6, 10), torch.nn.Linear(10, 6)
    layer = PadMoE.from_dense(fc1, fc2, num_experts=4, k=2, min_capacity=0, drop_tokens=False)
    props = dynamic_properties(layer, lambda: layer(torch.randn(3, 5, 6)))[""]
    assert abs(props["parameter_variance"]) < 1e-9 and props["output_variance"] > 0


def test_live_counts_follow_the_paper_formula_for_shared_masks():
    from pad_moe.accounting import count_live

    H, F, E = 8, 16, 4
    layer = PadMoE(H, F, num_experts=E, k=2)
    ffn = H * F + F + F * H + H
    gate = H * E
    assert count_live(layer)["params_training"] == ffn * (E + 1) + gate + 1  # + φ
    masks = {k: torch.zeros(v.shape, dtype=torch.bool) for k, v in layer.masks().items()}
    masks["fc1.weight"][: F // 2] = True  # κ·|W1| entries dynamic
    layer.set_masks(masks)
    dyn = (F // 2) * H
    want = (ffn - dyn) + E * dyn + gate + 1
    assert count_live(layer)["params_compact"] == want
    # expert-parallel share: the same layer seen from a rank holding half of the experts counts the same globally
    half = PadMoE(H, F, num_experts=E, k=2, ep_size=2)  # DeepSpeed tags expert parameters allreduce=False
    half.set_masks(masks)
    assert count_live(half, ep_size=2)["params_compact"] == want
    layer.drop_static()
    assert count_live(layer)["params_compact"] == E * dyn + gate + 1
