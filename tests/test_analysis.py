"""Dynamic-property metrics against a brute-force per-token computation."""

import pytest
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


def _layer(ep_size: int, ep_rank: int, dispatch: str = "capacity"):
    torch.manual_seed(0)  # the gate; experts are seeded by global expert id, identical for every ep_size
    layer = PadMoE(6, 10, num_experts=4, k=2, ep_size=ep_size, ep_rank=ep_rank, min_capacity=0, drop_tokens=False,
                   second_expert_sampling=False, seed=3, dispatch=dispatch)
    g = torch.Generator().manual_seed(1)
    layer.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in layer.masks().items()})
    return layer


def _tokens(rank: int):
    return torch.randn(2, 7, 6, generator=torch.Generator().manual_seed(10 + rank))


def dynamics_worker(rank, world, dispatch):
    from pad_moe import distributed as D

    layer = _layer(2, rank, dispatch)
    D.attach_expert_groups(layer)
    return dynamic_properties(layer, lambda: layer(_tokens(rank)), reduce_sum=D.all_reduce_,
                              gather_experts=D.gather_expert_rows)[""]


@pytest.mark.parametrize("dispatch", ["capacity", "dropless"])
def test_two_expert_parallel_ranks_give_the_single_process_dynamic_properties(dispatch):
    """ep_size=2 on 2 gloo ranks, each with half of the tokens: moments all-reduced, expert weights all-gathered;
    equal (1e-6 relative: float32 outputs) to one process holding all experts and seeing both halves (two forwards
    accumulate)."""
    from pad_moe.testing.ranks import run_ranks

    layer = _layer(1, 0)
    want = dynamic_properties(layer, lambda: [layer(_tokens(r)) for r in range(2)])[""]
    got = run_ranks(dynamics_worker, 2, dispatch)
    assert want["parameter_variance"] > 0
    for r in got:
        for key, value in want.items():
            assert abs(r[key] - value) <= 1e-6 * abs(value), (key, r[key], value)
