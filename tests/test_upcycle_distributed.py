"""An upcycled encoder on 2 real gloo ranks with expert parallelism (ep_size=2): still the dense function, and a saved
ep_size=1 folder loads as two expert shards that together compute what the single-process model computes."""

from __future__ import annotations

import torch

from pad_moe.testing.ranks import run_ranks


def _rank_outputs(rank: int, world: int, folder: str) -> dict:
    from test_upcycle import outputs, random_masks_, tiny_inputs, tiny_model

    from pad_moe.distributed import attach_expert_groups
    from pad_moe.models import aux_loss, expert_counts, load_upcycled, upcycle

    inputs = tiny_inputs(seed=1 + rank)  # each rank routes its own batch through the all-to-all
    model = tiny_model("bert")
    ref = outputs(model, inputs)
    upcycle(model, mode="pad", num_experts=4, ep_size=2, ep_rank=rank)
    random_masks_(model, 3)
    attach_expert_groups(model)
    dense_err = max(float((a - b).abs().max()) for a, b in zip(outputs(model, inputs), ref, strict=True))
    model(**inputs)
    aux, counts = float(aux_loss(model).detach()), {k: v.tolist() for k, v in expert_counts(model).items()}
    shard = load_upcycled(folder, ep_size=2, ep_rank=rank)
    attach_expert_groups(shard)
    loaded = [t.numpy() for t in outputs(shard, inputs)]  # numpy, not tensors, through the result queue
    return {"dense_err": dense_err, "aux": aux, "counts": counts, "loaded": loaded}


def test_upcycled_expert_parallel_model_matches_dense_and_single_process(tmp_path):
    from test_upcycle import outputs, random_masks_, tiny_inputs, tiny_model
    from test_upcycle_io import perturb_

    from pad_moe.models import save_upcycled, upcycle

    full = upcycle(tiny_model("bert"), mode="pad", num_experts=4, second_expert_sampling=False)
    random_masks_(full, 6)
    perturb_(full, 4)  # experts differ now: a wrong shard or routing would show
    folder = save_upcycled(full, tmp_path / "m")
    results = run_ranks(_rank_outputs, 2, folder, timeout=240)
    for rank, res in enumerate(results):
        assert res["dense_err"] < 1e-5, rank
        assert res["aux"] > 0 and all(sum(c) == 2 * 30 for c in res["counts"].values()), rank  # k=2, 3x10 tokens
        want = outputs(full, tiny_inputs(seed=1 + rank))
        for got, ref in zip(res["loaded"], want, strict=True):
            torch.testing.assert_close(torch.from_numpy(got), ref, atol=1e-5, rtol=0)
