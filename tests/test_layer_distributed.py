"""PadMoE on 2 real gloo ranks under DeepSpeed engines, compared with a single-expert-group reference."""

import os

import pytest
import torch
from torch import nn

from pad_moe.testing.layers import per_expert_named
from pad_moe.testing.ranks import run_ranks

H, F, E = 8, 16, 4


class Tiny(nn.Module):
    """Dense in-projection, a PAD-MoE layer, dense head: dense, static, expert and gate parameters together."""

    def __init__(self, ep_size: int, ep_rank: int, zero_init_seed: int = 0):
        super().__init__()
        from pad_moe import PadMoE

        torch.manual_seed(zero_init_seed)  # identical dense + gate init on every rank and for every ep_size
        self.inp = nn.Linear(H, H)
        self.pad = PadMoE(H, F, num_experts=E, k=2, ep_size=ep_size, ep_rank=ep_rank, min_capacity=0,
                          drop_tokens=False, second_expert_sampling=False, seed=11)
        self.head = nn.Linear(H, 3)
        g = torch.Generator().manual_seed(5)
        self.pad.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in self.pad.masks().items()})

    def forward(self, x):
        y, aux, _ = self.pad(torch.tanh(self.inp(x)))
        return self.head(y).mean(1), aux


def _ds_config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "train_batch_size": 8,
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-2, "weight_decay": 0.0, "torch_adam": True}}}


def _engine(model, stage):
    import deepspeed

    from pad_moe.distributed import param_groups

    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=_ds_config(stage))
    return engine


TEACHER = torch.randn(H, 3, generator=torch.Generator().manual_seed(77))


def _batch(rank, step):
    """A learnable task: labels from a fixed linear teacher on the mean token; 4 batches per rank, recycled."""
    g = torch.Generator().manual_seed(100 * (step % 4) + rank)
    x = torch.randn(4, 5, H, generator=g)
    return x, (x.mean(1) @ TEACHER).argmax(-1)


def _train(engine, rank, steps):
    outs, losses = [], []
    for step in range(steps):
        x, y = _batch(rank, step)
        logits, aux = engine(x)
        loss = nn.functional.cross_entropy(logits, y) + 0.01 * aux
        engine.backward(loss)
        engine.step()
        outs.append(logits.detach())
        losses.append(float(loss))
    return outs, losses


def ep_and_zero_worker(rank, world, ckpt_dir):
    import torch.distributed as dist

    result = {}
    # ep_size=1 (every rank holds all 4 experts) vs ep_size=2 (2 experts per rank), ZeRO-2, 4 steps.
    ref = _engine(Tiny(1, 0), 2)
    ep2 = _engine(Tiny(2, rank), 2)
    out_ref, _ = _train(ref, rank, 4)
    out_ep2, _ = _train(ep2, rank, 4)
    result["max_out_diff"] = max(float((a - b).abs().max()) for a, b in zip(out_ref, out_ep2))
    ref_p = per_expert_named(ref.module.named_parameters())
    diffs = {}
    # local expert i on this rank is global expert 2*rank + i
    for name, p in per_expert_named(ep2.module.named_parameters(), 2 * rank).items():
        diffs[name] = float((p.detach() - ref_p[name].detach()).abs().max())
    result["max_param_diff"] = max(diffs.values())
    # the static weight, φ and masks stay identical on all ranks
    shared = torch.cat([ep2.module.pad.static.fc1.weight.detach().flatten(), ep2.module.pad.phi.detach().flatten()] +
                       [m.float().flatten() for m in ep2.module.pad.masks().values()])
    gathered = [torch.empty_like(shared) for _ in range(world)]
    dist.all_gather(gathered, shared)
    result["replicas_equal"] = all(torch.equal(gathered[0], t) for t in gathered)
    # ZeRO 0/1/2 with ep_size=2: 20 steps, loss decreases, checkpoint reloads with the same outputs.
    for stage in (0, 1, 2):
        engine = _engine(Tiny(2, rank), stage)
        _, losses = _train(engine, rank, 20)
        result[f"zero{stage}_first"] = sum(losses[:5]) / 5
        result[f"zero{stage}_last"] = sum(losses[-5:]) / 5
        path = os.path.join(ckpt_dir, f"zero{stage}")
        engine.save_checkpoint(path, tag="t")
        engine.eval()
        x, _ = _batch(rank, 99)
        with torch.no_grad():
            before = engine(x)[0]
        fresh = _engine(Tiny(2, rank, zero_init_seed=123), stage)
        fresh.load_checkpoint(path, tag="t")
        fresh.eval()
        with torch.no_grad():
            after = fresh(x)[0]
        result[f"zero{stage}_reload_diff"] = float((before - after).abs().max())
    return result


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_ranks(ep_and_zero_worker, 2, str(tmp_path_factory.mktemp("ckpt")))


def test_ep1_and_ep2_give_the_same_outputs_and_updates_under_zero2(two_rank_results):
    for r in two_rank_results:
        assert r["max_out_diff"] < 1e-5, r["max_out_diff"]
        assert r["max_param_diff"] < 1e-5, r["max_param_diff"]


def test_static_weight_phi_and_masks_stay_identical_on_all_ranks(two_rank_results):
    assert all(r["replicas_equal"] for r in two_rank_results)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_twenty_steps_decrease_the_loss_and_checkpoints_reload(two_rank_results, stage):
    for r in two_rank_results:
        assert r[f"zero{stage}_last"] < 0.8 * r[f"zero{stage}_first"], r
        assert r[f"zero{stage}_reload_diff"] < 1e-6, r
