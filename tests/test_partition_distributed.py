"""IMP on 2 real gloo ranks (one spawn runs every scenario), compared with one process holding all data and experts.

CASES run nested IMP (the default); RESCORE_CASES the same selection with nested=False (every round re-scores all).

Each rank scores half of every global batch; with ep_size=2 each rank holds 2 of the 4 experts. The single-process
reference is the same model at ep_size=1 (same seeds, so the same weights) given the whole batches. Masks must be
identical; per-expert masks are merged from the ranks that hold them.
"""

import pytest
import torch
from test_partition import TinyPadNet, make_batches, mse_loss, tricky_values

from pad_moe.partition import (
    distributed_kth_largest,
    iterative_mode_partition,
    load_partition,
    save_partition,
    verify_replicas,
)
from pad_moe.testing.ranks import run_ranks

WORLD = 2
# (mask sharing, ep_size, scope, scorer)
CASES = [("layer", 1, "global", "snip"), ("expert", 1, "global", "snip"), ("layer", 2, "global", "snip"),
         ("expert", 2, "global", "snip"), ("expert", 2, "layer", "snip"), ("layer", 2, "global", "magnitude"),
         ("mixed", 2, "global", "snip"), ("mixed", 2, "layer", "snip"), ("expert", 2, "global", "random")]
RESCORE_CASES = [("mixed", 2, "layer", "snip"), ("expert", 2, "global", "snip")]
MIXED = ("layer", "expert")  # layer 0 replicated masks (counted once), layer 1 per-expert masks
IMP = dict(kappa=0.3, iterations=3)


def keyed_masks(model):
    """Masks as numpy arrays: tensors sent back from a rank would travel as shared memory that dies with the rank."""
    return {f"{i}::{k}": v.numpy().copy() for i, layer in enumerate(model.layers) for k, v in layer.masks().items()}


def build(sharing, ep_size, rank, attach_groups=True):
    model = TinyPadNet(seed=5, sharing=MIXED if sharing == "mixed" else sharing, ep_size=ep_size,
                       ep_rank=rank % ep_size)
    if ep_size > 1 and attach_groups:
        for layer in model.layers:
            layer.moe.set_deepspeed_parallelism()
    return model


def shard(batches, rank):
    return [b[rank * b.shape[0] // WORLD:(rank + 1) * b.shape[0] // WORLD] for b in batches]


def _worker(rank, world, batches, save_dir):
    from pad_moe.partition import collectives as C

    out = {"kth": [], "cases": {}, "rescore": {}, "errors": {}}
    values = tricky_values(1001, 7)  # every rank builds the whole vector, then keeps its (uneven) part
    mine = values[:600] if rank == 0 else values[600:]
    for k in (1, 250, 500, 1000, 1001):
        out["kth"].append((float(distributed_kth_largest(mine, k, C.world_reducer())),
                           float(torch.kthvalue(values, values.numel() - k + 1).values)))
    for sharing, ep, scope, scorer in CASES:
        model = build(sharing, ep, rank)
        iterative_mode_partition(model, shard(batches, rank), mse_loss, scope=scope, scorer=scorer, **IMP)
        out["cases"][(sharing, ep, scope, scorer)] = keyed_masks(model)
        if (sharing, ep, scope, scorer) == ("expert", 2, "global", "snip"):
            save_partition(save_dir, model, {"method": "imp", "kappa": IMP["kappa"]})
    for sharing, ep, scope, scorer in RESCORE_CASES:
        model = build(sharing, ep, rank)
        iterative_mode_partition(model, shard(batches, rank), mse_loss, scope=scope, scorer=scorer, nested=False, **IMP)
        out["rescore"][(sharing, ep, scope, scorer)] = keyed_masks(model)
    out["engine"] = _engine_case(rank, batches)
    uneven = shard(batches, rank)[:rank + 1]
    out["errors"]["batches"] = _error(iterative_mode_partition, build("layer", 1, rank), uneven, mse_loss, **IMP)
    for sharing in ("layer", "expert"):
        model = build(sharing, 1, rank)
        iterative_mode_partition(model, shard(batches, rank), mse_loss, **IMP)
        if rank == 1:  # corrupt one replica of the second layer's first mask
            name, mask = next(iter(model.layers[1].masks().items()))
            flipped = mask.clone()
            flipped.view(-1)[0] = ~flipped.view(-1)[0]
            model.layers[1].set_masks({**model.layers[1].masks(), name: flipped})
        out["errors"][sharing] = _error(verify_replicas, model)
    return out


def _engine_case(rank, batches):
    """The same partition through a DeepSpeed engine (ep_size=2, per-expert masks)."""
    import deepspeed

    model = build("expert", 2, rank, attach_groups=False)
    config = {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 16, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    report = iterative_mode_partition(engine, shard(batches, rank), mse_loss, **IMP)
    return keyed_masks(model), report.to_dict()


def _error(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except (ValueError, RuntimeError) as err:
        return f"{type(err).__name__}: {err}"
    return None


@pytest.fixture(scope="module")
def save_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("partition"))


@pytest.fixture(scope="module")
def ranks(save_dir):
    return run_ranks(_worker, WORLD, make_batches(4, tokens=16), save_dir)


def reference(sharing, scope, scorer, nested=True):
    model = build(sharing, 1, 0)
    iterative_mode_partition(model, make_batches(4, tokens=16), mse_loss, scope=scope, scorer=scorer, nested=nested,
                             **IMP)
    return {k: torch.from_numpy(v) for k, v in keyed_masks(model).items()}


def merged(per_rank):
    out = {}
    for masks in per_rank:
        for key, mask in masks.items():
            mask = torch.from_numpy(mask)
            assert key not in out or torch.equal(out[key], mask), f"replicas of {key} differ"
            out[key] = mask
    return out


def test_selection_over_two_ranks_equals_kthvalue(ranks):
    for result in ranks:
        for got, expected in result["kth"]:
            assert got == expected


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_two_ranks_match_one_process(ranks, case):
    sharing, ep, scope, scorer = case
    got = merged([r["cases"][case] for r in ranks])
    expected = reference(sharing, scope, scorer)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("case", RESCORE_CASES, ids=["-".join(map(str, c)) for c in RESCORE_CASES])
def test_two_ranks_match_one_process_without_nesting(ranks, case):
    sharing, ep, scope, scorer = case
    got = merged([r["rescore"][case] for r in ranks])
    expected = reference(sharing, scope, scorer, nested=False)
    assert got.keys() == expected.keys()
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert any(not torch.equal(got[k], merged([r["cases"][case] for r in ranks])[k]) for k in got)  # not nested


def test_masks_saved_by_two_ranks_load_into_one(ranks, save_dir):
    """Per-expert masks saved at ep_size=2 (each rank its experts) load into an ep_size=1 model."""
    model = build("expert", 1, 0)
    record = load_partition(save_dir, model)
    assert record["saved_world_size"] == 2 and record["kappa"] == IMP["kappa"]
    expected = merged([r["cases"][("expert", 2, "global", "snip")] for r in ranks])
    for key, mask in keyed_masks(model).items():
        assert torch.equal(torch.from_numpy(mask), expected[key]), key


def test_engine_matches_one_process(ranks):
    got = merged([r["engine"][0] for r in ranks])
    expected = reference("expert", "global", "snip")
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    report = ranks[0]["engine"][1]
    assert report["world_size"] == 2 and report["dynamic_per_round"][-1] == sum(int(m.sum()) for m in got.values())
    assert set(report["layer_ratios"]) == {"layers.0", "layers.1"}


def test_errors_are_raised_on_every_rank(ranks):
    for result in ranks:
        assert "different numbers of batches" in result["errors"]["batches"]
        for sharing in ("layer", "expert"):
            assert result["errors"][sharing].startswith("RuntimeError"), result["errors"][sharing]
            assert "['layers.1']" in result["errors"][sharing]
