"""Expert parallelism when a rank's experts, or a rank itself, get no rows: the graph must stay whole on that rank.

An empty expert group that drops out of the autograd graph skips the backward all-to-alls on that rank only, and its
peer waits forever. On 2 real gloo ranks (ep 2, dropless, compacted neuron layers with 7 of 16 units dynamic, so the
width is not 16-byte aligned and the grouped GEMM falls back to its loop) both ranks must finish and every parameter
get the gradient of a single-process reference holding all experts.
"""

import datetime

import pytest
import torch

from pad_moe.moe.grouped import backend, grouped_linear
from pad_moe.testing.layers import per_expert_named
from pad_moe.testing.ranks import run_ranks

H, F, E, K = 8, 16, 4, 2
DYNAMIC_UNITS = 7  # of F: an unaligned expert width
AVOIDED = (0, 1)  # rank 0's experts at ep 2
SCENARIOS = [("mlp", "avoid_rank0_experts"), ("glu", "avoid_rank0_experts"), ("mlp", "rank0_has_no_tokens"),
             ("glu", "rank0_has_no_tokens")]
GROUP_TIMEOUT_S = 30  # the work takes well under a second: a blocked collective fails the test instead of hanging it
TOL = dict(rtol=1e-5, atol=1e-6)


def build_layer(expert_type: str, scenario: str, ep_size: int, ep_rank: int):
    from pad_moe import PadMoE

    extra = {"activation": "silu", "bias": False} if expert_type == "glu" else {}
    layer = PadMoE(H, F, num_experts=E, k=K, ep_size=ep_size, ep_rank=ep_rank, dispatch="dropless",
                   granularity="neuron", second_expert_sampling=False, seed=3, expert_type=expert_type, **extra)
    units = torch.zeros(F, dtype=torch.bool)
    units[torch.randperm(F, generator=torch.Generator().manual_seed(1))[:DYNAMIC_UNITS]] = True
    layer.set_masks({"units": units})
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # the same router at every ep_size (DeepSpeed draws it from the global RNG)
        layer.gate_weight.copy_(0.3 * torch.randn(E, H, generator=g))
        if scenario == "avoid_rank0_experts":  # feature 0 is always 1 (see inputs): experts 0 and 1 never win
            layer.gate_weight[list(AVOIDED), 0] = -30.0
            layer.gate_weight[[e for e in range(E) if e not in AVOIDED], 0] = 30.0
        layer.phi.fill_(0.2)
    return layer.compact_()


def inputs(scenario: str, rank: int) -> torch.Tensor:
    tokens = 0 if scenario == "rank0_has_no_tokens" and rank == 0 else 6
    x = torch.randn(tokens, H, generator=torch.Generator().manual_seed(10 + rank))
    x[:, 0] = 1.0
    return x


def loss_of(layer, x: torch.Tensor):
    out, aux, counts = layer(x)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return (out * target).sum() + 0.1 * aux, counts


def ep2_worker(rank, world):
    import torch.distributed as dist

    new_group = dist.new_group  # DeepSpeed's expert groups take torch's 30-minute default otherwise
    dist.new_group = lambda *a, **kw: new_group(*a, **{"timeout": datetime.timedelta(seconds=GROUP_TIMEOUT_S), **kw})
    results = {}
    for expert_type, scenario in SCENARIOS:
        layer = build_layer(expert_type, scenario, ep_size=world, ep_rank=rank)
        layer.moe.set_deepspeed_parallelism()
        loss, counts = loss_of(layer, inputs(scenario, rank))
        loss.backward()
        named_grads = per_expert_named({n: p.grad for n, p in layer.named_parameters()},
                                       rank * layer.num_local_experts)
        grads = {n: None if g is None else g.numpy().copy() for n, g in named_grads.items()}
        results[(expert_type, scenario)] = {"grads": grads, "counts": counts.tolist()}
    return results


def reference_grads(expert_type: str, scenario: str, world: int) -> dict:
    """One process with all experts: the gradient of the sum of every rank's loss. An expert's gradient on its rank
    is that (its rows come from every rank); a replicated parameter's is the sum over the ranks (DeepSpeed's
    data-parallel reduction: φ and, before compaction, W_s also reach the loss through the experts of each rank)."""
    layer = build_layer(expert_type, scenario, ep_size=1, ep_rank=0)
    names, params = zip(*layer.named_parameters())
    loss = sum(loss_of(layer, inputs(scenario, rank))[0] for rank in range(world))
    return per_expert_named(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


def is_expert(name: str) -> bool:
    return ".deepspeed_experts." in name


@pytest.fixture(scope="module")
def ep2_results():
    return run_ranks(ep2_worker, 2, timeout=4 * GROUP_TIMEOUT_S)


@pytest.mark.parametrize("expert_type,scenario", SCENARIOS)
def test_both_ranks_finish_and_every_parameter_gets_the_reference_gradient(ep2_results, expert_type, scenario):
    want = reference_grads(expert_type, scenario, len(ep2_results))
    runs = [result[(expert_type, scenario)] for result in ep2_results]
    if scenario == "avoid_rank0_experts":
        assert all(sum(r["counts"][e] for e in AVOIDED) == 0 < sum(r["counts"]) for r in runs), runs
    for rank, r in enumerate(runs):
        assert all(grad is not None for grad in r["grads"].values()), (rank, r["grads"].keys())
    experts = {n: g for r in runs for n, g in r["grads"].items() if is_expert(n)}  # global names: one rank each
    assert experts.keys() == {n for n in want if is_expert(n)}
    for name, grad in experts.items():
        torch.testing.assert_close(torch.from_numpy(grad), want[name], **TOL, msg=name)
    for name in (n for n in want if not is_expert(n)):
        reduced = sum(torch.from_numpy(r["grads"][name]) for r in runs)
        torch.testing.assert_close(reduced, want[name], **TOL, msg=name)
    if scenario == "avoid_rank0_experts":  # rank 0's experts saw no row anywhere: zero gradients, not missing ones
        zero = [g for n, g in runs[0]["grads"].items() if is_expert(n)]
        assert zero and all(not g.any() for g in zero)


@pytest.mark.parametrize("out_features,in_features", [(8, 8), (7, 8), (8, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_with_zero_rows_stays_in_the_graph(out_features, in_features, with_bias, dtype):
    """Zero rows in every expert, whatever backend the widths and dtype pick with rows: the (0, out) result requires
    grad and x, w and the bias get (empty or zero) gradients, so a backward through it reaches everything before it."""
    with_rows = torch.randn(2, in_features, dtype=dtype)
    aligned = (dtype, out_features, in_features) == (torch.float32, 8, 8)
    assert backend(with_rows, torch.randn(3, out_features, in_features, dtype=dtype)) == (
        "grouped_mm" if aligned and hasattr(torch, "_grouped_mm") else "loop")
    w = torch.randn(3, out_features, in_features, dtype=dtype, requires_grad=True)
    bias = torch.randn(3, out_features, dtype=dtype, requires_grad=True) if with_bias else None
    x = torch.randn(0, in_features, dtype=dtype, requires_grad=True)
    y = grouped_linear(x, w, torch.zeros(3, dtype=torch.int64), bias=bias)
    assert y.shape == (0, out_features) and y.requires_grad
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert w.grad is not None and w.grad.shape == w.shape and not w.grad.any()
    if with_bias:
        assert bias.grad is not None and bias.grad.shape == bias.shape and not bias.grad.any()
