"""IMP in one process: exact selection, exact ratio, determinism, persistence, bad input, and a planted problem."""

import threading

import pytest
import torch
from torch import nn

from pad_moe.config import PartitionConfig
from pad_moe.moe.layer import PadMoE
from pad_moe.partition import (
    distributed_kth_largest,
    dynamic_count,
    float_from_keys,
    float_order_keys,
    iterative_mode_partition,
    kappa_schedule,
    load_partition,
    partition_from_config,
    random_partition,
    save_partition,
)
from pad_moe.partition.selection import kth_largest_keys, select_top

H, F, E = 8, 16, 4


class TinyPadNet(nn.Module):
    """Residual stack of PAD-MoE layers; experts, static weights and gates are fixed by ``seed`` for any ep_size.

    ``sharing`` is one mask sharing for all layers or one per layer.
    """

    def __init__(self, *, seed=0, layers=2, ffn=F, sharing="layer", ep_size=1, ep_rank=0, granularity="element",
                 scale_mode="both"):
        super().__init__()
        self.layers = nn.ModuleList([
            PadMoE(H, ffn, num_experts=E, k=2, ep_size=ep_size, ep_rank=ep_rank, min_capacity=0, drop_tokens=False,
                   use_rts=False, second_expert_sampling=False, granularity=granularity, scale_mode=scale_mode,
                   mask_sharing=sharing if isinstance(sharing, str) else sharing[i], seed=seed * 10 + i)
            for i in range(layers)])
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in self.layers:
                layer.gate_weight.copy_(torch.randn(layer.gate_weight.shape, generator=g))

    def forward(self, x):  # x (tokens, H)
        for layer in self.layers:
            x = x + layer(x)[0]
        return x


TARGET = torch.randn(H, generator=torch.Generator().manual_seed(3))


def mse_loss(model, batch):
    return ((model(batch) - TARGET) ** 2).mean()


def make_batches(n=4, tokens=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(tokens, H, generator=g) for _ in range(n)]


def all_masks(model):
    return {f"{i}::{k}": v.clone() for i, layer in enumerate(model.layers) for k, v in layer.masks().items()}


def num_dynamic(model):
    return sum(int(v.sum()) for v in all_masks(model).values())


def num_entries(model):
    return sum(v.numel() for v in all_masks(model).values())


# -- exact selection --------------------------------------------------------------------------------------------


def tricky_values(n, seed):
    """Heavy ties, both zeros, infinities, subnormals and ordinary values."""
    g = torch.Generator().manual_seed(seed)
    pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.5, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38])
    x = pool[torch.randint(len(pool), (n,), generator=g)]
    normal = torch.rand(n, generator=g) < 0.3
    return torch.where(normal, torch.randn(n, generator=g), x)


def test_float_keys_preserve_order_and_merge_signed_zeros():
    x = tricky_values(2000, 0)
    keys = float_order_keys(x)
    order = torch.argsort(x, stable=True)
    assert torch.all(keys[order][1:] >= keys[order][:-1])
    assert float_order_keys(torch.tensor([-0.0]))[0] == float_order_keys(torch.tensor([0.0]))[0]
    back = float_from_keys(keys)
    assert torch.equal(back, x)  # -0.0 == 0.0 compares equal
    with pytest.raises(ValueError, match="NaN"):
        float_order_keys(torch.tensor([1.0, float("nan")]))


@pytest.mark.parametrize("seed", [0, 1])
def test_kth_largest_equals_kthvalue(seed):
    x = tricky_values(3001, seed)
    n = x.numel()
    for k in [1, 2, 17, 500, 1500, n - 1, n]:
        expected = torch.kthvalue(x, n - k + 1).values
        assert distributed_kth_largest(x, k) == expected, k


@pytest.mark.parametrize("digit_bits", [1, 5, 11])
def test_kth_largest_with_narrow_digits_and_groups(digit_bits):
    x = tricky_values(999, 3)
    groups = torch.arange(999) % 3
    k = torch.tensor([1, 150, 333])
    sel = kth_largest_keys(float_order_keys(x), k, key_bits=32, groups=groups, digit_bits=digit_bits)
    for g in range(3):
        part = x[groups == g]
        assert float_from_keys(sel.key)[g] == torch.kthvalue(part, part.numel() - int(k[g]) + 1).values


def test_kth_largest_over_simulated_shards():
    """Three shards (one empty) selected together through a count reducer that sums the shards' counts."""
    x = tricky_values(2500, 2)
    shards = [x[:1200], x[1200:1200], x[1200:]]
    barrier = threading.Barrier(len(shards))
    slots = [None] * len(shards)

    def reducer_for(i):
        def reduce(counts):
            slots[i] = counts
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total
        return reduce

    def select(i, k, out):
        out[i] = distributed_kth_largest(shards[i], k, reducer_for(i))

    for k in [1, 3, 700, 1250, 2499, 2500]:
        out = [None] * len(shards)
        threads = [threading.Thread(target=select, args=(i, k, out)) for i in range(len(shards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = torch.kthvalue(x, x.numel() - k + 1).values
        assert all(v == expected for v in out), (k, out, expected)


def test_select_top_breaks_ties_by_global_index():
    scores = torch.tensor([1.0, 0.0, -0.0, 0.0, 2.0, 0.0])
    index_keys = torch.tensor([50, 40, 30, 20, 10, 0])
    chosen = select_top(scores, torch.tensor([4]), index_keys)
    assert chosen.tolist() == [True, False, False, True, True, True]  # 2.0, 1.0, then the zeros of index 0 and 20
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    chosen = select_top(scores, torch.tensor([1, 2]), index_keys, groups=groups, counted=torch.ones(6, dtype=bool))
    assert chosen.tolist() == [True, False, False, False, True, True]


# -- the partition ----------------------------------------------------------------------------------------------


def test_schedules_end_at_kappa():
    assert kappa_schedule(0.5, 1) == [0.5]
    exp = kappa_schedule(0.3, 3, "exponential")
    assert exp[-1] == 0.3 and exp[0] == pytest.approx(0.3 ** (1 / 3))
    lin = kappa_schedule(0.3, 4, "linear")
    assert lin[-1] == 0.3 and lin[0] == pytest.approx(1 - 0.7 / 4)


@pytest.mark.parametrize("kappa", [0.3, 0.37, 1.0])
@pytest.mark.parametrize("sharing", ["layer", "expert"])
def test_exact_ratio_global_scope(kappa, sharing):
    model = TinyPadNet(sharing=sharing)
    report = iterative_mode_partition(model, make_batches(), mse_loss, kappa=kappa, iterations=3)
    n = num_entries(model)
    assert num_dynamic(model) == dynamic_count(kappa, n) == report.dynamic_per_round[-1]
    assert report.total_entries == n and len(report.churn_per_round) == 3
    assert report.kappa_per_round[-1] == kappa


def test_neuron_granularity_partition_then_compact():
    model = TinyPadNet(granularity="neuron")
    iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.25, iterations=2, scope="layer")
    for layer in model.layers:
        assert int(layer.masks()["units"].sum()) == dynamic_count(0.25, F)
    before = model(make_batches(1)[0])
    for layer in model.layers:
        layer.compact_()
    torch.testing.assert_close(model(make_batches(1)[0]), before, rtol=1e-5, atol=1e-6)


def test_exact_ratio_layer_scope_with_ties():
    """Magnitude scores of a mostly upcycled layer tie at zero across the threshold: the count is still exact."""
    model = TinyPadNet(layers=2)
    layer0 = model.layers[0]
    with torch.no_grad():
        for expert in layer0.local_experts:  # weight scores exactly 0, only biases differ (24 of 280 entries)
            expert.fc1.weight.copy_(layer0.static.fc1.weight)
            expert.fc2.weight.copy_(layer0.static.fc2.weight)
    iterative_mode_partition(model, None, None, kappa=0.4, iterations=2, scorer="magnitude", scope="layer")
    for layer in model.layers:
        n = sum(m.numel() for m in layer.masks().values())
        assert sum(int(m.sum()) for m in layer.masks().values()) == dynamic_count(0.4, n)


def test_same_seed_same_masks_and_random_baseline():
    a, b = TinyPadNet(seed=4), TinyPadNet(seed=4)
    iterative_mode_partition(a, make_batches(), mse_loss, kappa=0.5, iterations=2)
    iterative_mode_partition(b, make_batches(), mse_loss, kappa=0.5, iterations=2)
    assert all(torch.equal(x, y) for x, y in zip(all_masks(a).values(), all_masks(b).values(), strict=True))
    r1, r2, r3 = TinyPadNet(), TinyPadNet(), TinyPadNet()
    random_partition(r1, kappa=0.5, seed=7)
    random_partition(r2, kappa=0.5, seed=7)
    random_partition(r3, kappa=0.5, seed=8)
    assert all(torch.equal(x, y) for x, y in zip(all_masks(r1).values(), all_masks(r2).values(), strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(all_masks(r1).values(), all_masks(r3).values(), strict=True))
    assert num_dynamic(r1) == dynamic_count(0.5, num_entries(r1))


def test_restores_requires_grad_mode_and_touches_no_grad():
    model = TinyPadNet()
    model.train()
    model.layers[1].eval()
    model.layers[0].static.fc1.weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.5, iterations=2)
    assert [p.requires_grad for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert all(p.grad is None for p in model.parameters())
    assert all(layer._relaxed is None for layer in model.layers)


def test_from_config_methods():
    model = TinyPadNet()
    cfg = PartitionConfig(method="moe_p", kappa=0.5, iterations=2, num_batches=2)
    report = partition_from_config(model, iter(make_batches(6)), mse_loss, cfg)
    assert report.method == "moe_p" and report.num_batches == 2
    assert all(layer.scale_factors()[0] == 0.0 for layer in model.layers)
    model = TinyPadNet()
    report = partition_from_config(model, None, None, PartitionConfig(method="random", kappa=0.25, seed=3))
    assert report.method == "random" and num_dynamic(model) == dynamic_count(0.25, num_entries(model))


def test_save_load_round_trip(tmp_path):
    model = TinyPadNet(sharing="expert")
    report = iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.3, iterations=2)
    save_partition(str(tmp_path), model, report)
    fresh = TinyPadNet(sharing="expert")
    record = load_partition(str(tmp_path), fresh)
    assert all(torch.equal(x, y) for x, y in zip(all_masks(model).values(), all_masks(fresh).values(), strict=True))
    assert record["kappa"] == 0.3 and record["churn_per_round"] == report.churn_per_round
    assert record["layer_ratios"] == report.layer_ratios
    with pytest.raises(ValueError, match="shape"):
        load_partition(str(tmp_path), TinyPadNet(sharing="expert", ffn=2 * F))
    with pytest.raises(ValueError, match="no mask 'layers.2::"):
        load_partition(str(tmp_path), TinyPadNet(sharing="expert", layers=3))
    with pytest.raises(ValueError, match="belongs to no PAD module"):
        load_partition(str(tmp_path), TinyPadNet(sharing="expert", layers=1))
    with pytest.raises(ValueError, match="no saved partition"):
        load_partition(str(tmp_path / "missing"), fresh)


class NoPad(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(H, H)


@pytest.mark.parametrize("kwargs,match", [
    (dict(kappa=0.0), "kappa=0.0"), (dict(kappa=1.5), "kappa=1.5"), (dict(iterations=0), "iterations=0"),
    (dict(scorer="grasp"), "scorer='grasp'"), (dict(scope="block"), "scope='block'"),
    (dict(schedule="cosine"), "schedule='cosine'"), (dict(batches=[]), "batches is empty"),
    (dict(batches=iter(())), "batches is empty"),
])
def test_bad_arguments(kwargs, match):
    args = dict(batches=make_batches(1), kappa=0.5, iterations=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        iterative_mode_partition(TinyPadNet(), args.pop("batches"), mse_loss, **args)


def test_bad_models_and_losses():
    with pytest.raises(ValueError, match="no PAD modules"):
        iterative_mode_partition(NoPad(), make_batches(1), mse_loss, kappa=0.5)
    with pytest.raises(ValueError, match="method='magic'"):
        partition_from_config(TinyPadNet(), make_batches(1), mse_loss, _unchecked_config(method="magic"))
    only_first = lambda m, b: ((m.layers[0](b)[0] - TARGET) ** 2).mean()  # noqa: E731
    with pytest.raises(ValueError, match=r"no gradient to the masks of PAD module\(s\) \['layers.1'\]"):
        iterative_mode_partition(TinyPadNet(), make_batches(1), only_first, kappa=0.5)
    upcycled = TinyPadNet()
    for layer in upcycled.layers:
        layer.load_experts_from_dense(layer.static.fc1, layer.static.fc2)
    with pytest.raises(ValueError, match=r"all-zero scores for PAD module\(s\) \['layers.0', 'layers.1'\]"):
        iterative_mode_partition(upcycled, make_batches(1), mse_loss, kappa=0.5)
    with pytest.raises(ValueError, match="scalar loss"):
        iterative_mode_partition(TinyPadNet(), make_batches(1), lambda m, b: m(b), kappa=0.5)


def _unchecked_config(**fields):
    cfg = PartitionConfig()
    for k, v in fields.items():
        object.__setattr__(cfg, k, v)
    return cfg
