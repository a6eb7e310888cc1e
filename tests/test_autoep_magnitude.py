"""IMP's magnitude scorer on AutoEP PAD layers under ZeRO-3: the scores read the full weights (gathered), not the
rank's empty partition, so the masks equal those found under ZeRO-2 (2 gloo ranks, expert parallel 2). And the
``expert_parallel`` section refuses an ep_size that cannot split the experts."""

import pytest
import torch
from test_autoep import V, _initialize, _mixtral

from pad_moe.testing.ranks import run_ranks


def _magnitude_masks(rank, world):
    from deepspeed.runtime.zero import GatheredParameters

    from pad_moe.moe.autoep import pad_autoep_modules
    from pad_moe.partition.imp import iterative_mode_partition

    out = {}
    ids = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(21))
    batches = [ids[rank * 4 // world:(rank + 1) * 4 // world]]
    for stage in (2, 3):
        engine = _initialize(_mixtral(), stage=stage, ep=world, micro=4 // world)
        layers = pad_autoep_modules(engine.module)  # W_s: the experts' mean, so magnitudes differ
        with GatheredParameters([layer.phi for _, layer in layers], modifier_rank=0), torch.no_grad():
            for _, layer in layers:  # λs ≠ λd: the scores must read φ too
                layer.phi.fill_(0.4)
        report = iterative_mode_partition(engine, batches, lambda model, b: model(b, labels=b).loss, kappa=0.3,
                                          iterations=2, scorer="magnitude")
        partitioned = all(hasattr(layer.experts.w1, "ds_id") for _, layer in layers)
        masks = {f"{n}.{k}": v.tolist() for n, m in layers for k, v in m.masks().items()}
        out[stage] = (report.dynamic_per_round, masks, partitioned)
    return out


def test_magnitude_scorer_under_zero3_gathers_the_weights_and_matches_zero2():
    for rank in run_ranks(_magnitude_masks, 2):
        assert rank[3][2] and not rank[2][2]  # stage 3 did partition the expert weights
        assert rank[3][0] == rank[2][0]
        assert rank[3][1] == rank[2][1]


@pytest.mark.parametrize("ep_size", [3, 1.5, 2.0, 0, -2, 8, True, "2", None])
def test_autoep_section_refuses_an_ep_size_that_does_not_split_the_experts(ep_size):
    from pad_moe.moe.autoep import autoep_section

    with pytest.raises(ValueError, match=rf"^ep_size={ep_size!r} must be a whole number >= 1 dividing the model's 4 "
                                         "experts; choose one of 1, 2, 4$"):
        autoep_section(_mixtral(), ep_size)


def test_autoep_section_takes_every_divisor_of_the_expert_count():
    from pad_moe.moe.autoep import autoep_section

    assert [autoep_section(_mixtral(), ep)["autoep_size"] for ep in (1, 2, 4)] == [1, 2, 4]
