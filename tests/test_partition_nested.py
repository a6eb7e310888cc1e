"""Nested IMP (paper §4.2, the default): a round ranks only the entries still dynamic, so M_t ⊆ M_{t-1} with exactly
dynamic_count(κ_t, N) entries per selection group; nested=False re-scores every entry each round (the earlier
behaviour). Also the eligible-entry selection underneath, and the partition record."""

import json

import pytest
import torch
from test_partition import TinyPadNet, all_masks, make_batches, mse_loss, tricky_values

from pad_moe.config import PartitionConfig
from pad_moe.partition import (
    dynamic_count,
    iterative_mode_partition,
    kappa_schedule,
    load_partition,
    partition_from_config,
    save_partition,
)
from pad_moe.partition.persist import RECORD_FILE
from pad_moe.partition.selection import select_top

KAPPA, T = 0.3, 4


def flat(model):
    return torch.cat([m.reshape(-1) for m in all_masks(model).values()])


def per_layer(model):
    return [sum(int(m.sum()) for m in layer.masks().values()) for layer in model.layers]


def layer_sizes(model):
    return [sum(m.numel() for m in layer.masks().values()) for layer in model.layers]


def tied(model):
    """Experts equal to the static weight except their biases: magnitude scores tie at zero across thresholds."""
    for layer in model.layers:
        with torch.no_grad():
            for expert in layer.local_experts:
                expert.fc1.weight.copy_(layer.static.fc1.weight)
                expert.fc2.weight.copy_(layer.static.fc2.weight)
    return model


def run_rounds(model, **kwargs):
    """The masks after every round (flat, in a fixed order) and the report."""
    rounds = []
    args = dict(kappa=KAPPA, iterations=T)
    args.update(kwargs)
    batches = make_batches() if args.get("scorer", "snip") == "snip" else None
    report = iterative_mode_partition(model, batches, mse_loss if batches else None,
                                      on_round=lambda t, r: rounds.append((t, flat(model), per_layer(model))), **args)
    assert [t for t, _, _ in rounds] == list(range(1, args["iterations"] + 1))
    return rounds, report


CASES = [("layer", "global", "snip", False), ("expert", "global", "snip", False), ("layer", "layer", "snip", False),
         (("layer", "expert"), "layer", "snip", False), ("layer", "layer", "magnitude", True),
         ("layer", "global", "magnitude", True)]


@pytest.mark.parametrize("sharing,scope,scorer,ties", CASES, ids=[f"{c[1]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_nested_rounds_shrink_inside_each_other_with_exact_counts(sharing, scope, scorer, ties):
    model = TinyPadNet(seed=2, sharing=sharing)
    model = tied(model) if ties else model
    n, sizes = flat(model).numel(), layer_sizes(model)
    rounds, report = run_rounds(model, scope=scope, scorer=scorer)
    assert report.nested is True
    previous = torch.ones(n, dtype=torch.bool)
    for (t, masks, layers), kappa_t in zip(rounds, kappa_schedule(KAPPA, T), strict=True):
        assert not bool((masks & ~previous).any()), f"round {t} made a static entry dynamic again"
        if scope == "global":
            assert int(masks.sum()) == dynamic_count(kappa_t, n)
        else:
            assert layers == [dynamic_count(kappa_t, s) for s in sizes]
        assert report.churn_per_round[t - 1] == int((previous & ~masks).sum()) / n  # only dynamic -> static
        assert report.dynamic_per_round[t - 1] == int(masks.sum())
        previous = masks
    again, _ = run_rounds(TinyPadNet(seed=2, sharing=sharing) if not ties else tied(TinyPadNet(seed=2, sharing=sharing)),
                          scope=scope, scorer=scorer)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(rounds, again, strict=True))  # ties broken the same way


def test_non_nested_rescores_every_entry():
    """nested=False lets an entry made static come back (on this model it does), and counts stay exact."""
    rounds, report = run_rounds(TinyPadNet(seed=2), nested=False)
    assert report.nested is False
    n = rounds[0][1].numel()
    returned = sum(int((later & ~earlier).sum()) for (_, earlier, _), (_, later, _) in zip(rounds, rounds[1:]))
    assert returned > 0
    assert [int(m.sum()) for _, m, _ in rounds] == [dynamic_count(k, n) for k in kappa_schedule(KAPPA, T)]
    nested, _ = run_rounds(TinyPadNet(seed=2))
    assert not torch.equal(nested[-1][1], rounds[-1][1])  # the two rules pick different final masks here


@pytest.mark.parametrize("nested", [True, False])
def test_rounds_equal_chained_one_shot_partitions(nested):
    """T rounds == T one-shot calls over κ_1..κ_T, each scoring the masks the previous one left: a round's masks
    depend on the masks before it only (and nested=False therefore is the re-score-everything rule)."""
    model = TinyPadNet(seed=3)
    iterative_mode_partition(model, make_batches(), mse_loss, kappa=KAPPA, iterations=T, nested=nested)
    chained = TinyPadNet(seed=3)
    for kappa_t in kappa_schedule(KAPPA, T):
        iterative_mode_partition(chained, make_batches(), mse_loss, kappa=kappa_t, iterations=1, nested=nested)
    assert torch.equal(flat(model), flat(chained))


def test_one_round_is_the_same_either_way():
    a, b = TinyPadNet(seed=1), TinyPadNet(seed=1)
    iterative_mode_partition(a, make_batches(), mse_loss, kappa=KAPPA, iterations=1, nested=True)
    iterative_mode_partition(b, make_batches(), mse_loss, kappa=KAPPA, iterations=1, nested=False)
    assert torch.equal(flat(a), flat(b))


def test_nested_refuses_masks_with_too_few_dynamic_entries():
    model = TinyPadNet()
    iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.2, iterations=1)
    with pytest.raises(ValueError, match=r"nested=True only makes entries static, but all PAD modules start\(s\) "
                                         r"with \d+ dynamic entries and round 1 keeps \d+; .*nested=False") as err:
        iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.5, iterations=2)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="layers.0 start"):
        iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.5, iterations=2, scope="layer")
    iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.5, iterations=2, nested=False)
    assert int(flat(model).sum()) == dynamic_count(0.5, flat(model).numel())
    with pytest.raises(ValueError, match="nested='yes' must be True or False"):
        iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.5, nested="yes")


# -- selection among eligible entries ---------------------------------------------------------------------------


def brute_force_top(scores, k, eligible, groups, index_keys):
    """Per group: eligible entries sorted by (score desc, index key asc), the first k."""
    out = torch.zeros_like(eligible)
    for g in range(len(k)):
        members = [i for i in range(len(scores)) if groups[i] == g and eligible[i]]
        members.sort(key=lambda i: (-float(scores[i]) if scores[i] == scores[i] else 0, int(index_keys[i])))
        for i in members[: int(k[g])]:
            out[i] = True
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_top_marks_only_eligible_entries_exactly(seed):
    """Heavy ties, ±0, ±inf, -inf among the eligible entries too, against a brute-force sort."""
    n = 600
    scores = tricky_values(n, seed)
    g = torch.Generator().manual_seed(seed)
    eligible = torch.rand(n, generator=g) < 0.6
    groups = torch.randint(0, 3, (n,), generator=g)
    index_keys = torch.randperm(n, generator=g).to(torch.int64) * 7 + 3
    sizes = torch.bincount(groups[eligible], minlength=3)
    for k in ([1, 1, 1], [int(s) // 2 for s in sizes], sizes.tolist(), [0, int(sizes[1]), 5]):
        k = torch.tensor(k)
        got = select_top(scores, k, index_keys, groups=groups, eligible=eligible)
        assert torch.equal(got, brute_force_top(scores, k, eligible, groups, index_keys)), k
        assert not bool((got & ~eligible).any())
    one_group = select_top(scores, torch.tensor([int(eligible.sum())]), index_keys, eligible=eligible)
    assert torch.equal(one_group, eligible)  # every eligible entry, -inf ones included
    with pytest.raises(ValueError, match=r"group 1 asks for k=\d+ entries but holds only \d+ eligible ones"):
        select_top(scores, sizes + torch.tensor([0, 1, 0]), index_keys, groups=groups, eligible=eligible)


# -- the record -------------------------------------------------------------------------------------------------


def test_record_holds_nested_and_old_records_still_load(tmp_path):
    model = TinyPadNet(sharing="expert")
    report = iterative_mode_partition(model, make_batches(), mse_loss, kappa=KAPPA, iterations=2)
    record = json.loads(json.dumps(report.to_dict()))  # JSON-serialisable
    assert record["nested"] is True and len(record["churn_per_round"]) == 2
    save_partition(str(tmp_path), model, report)
    path = tmp_path / RECORD_FILE
    saved = json.loads(path.read_text())
    del saved["nested"]  # a record written before the field existed
    path.write_text(json.dumps(saved))
    fresh = TinyPadNet(sharing="expert")
    loaded = load_partition(str(tmp_path), fresh)
    assert "nested" not in loaded and loaded["kappa"] == KAPPA
    assert torch.equal(flat(fresh), flat(model))


def test_config_switches_nesting():
    assert PartitionConfig().nested is True
    for nested in (True, False):
        model = TinyPadNet(seed=2)
        report = partition_from_config(model, make_batches(), mse_loss,
                                       PartitionConfig(kappa=KAPPA, iterations=T, nested=nested))
        assert report.nested is nested
        direct = TinyPadNet(seed=2)
        iterative_mode_partition(direct, make_batches(), mse_loss, kappa=KAPPA, iterations=T, nested=nested)
        assert torch.equal(flat(model), flat(direct))
