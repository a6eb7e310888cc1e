"""Eval/inference is deterministic: DeepSpeed's gate samples (Gumbel second expert, random token selection, RSample)
only in training mode, eval routing equals the deploy router's (also for top-1 token drops), a partitioned toy model
in eval mode equals its exported compact model, and IMP's masks do not depend on the global RNG state."""

import pytest
import torch
from test_partition import all_masks, make_batches, mse_loss
from torch import nn

from pad_moe.config import load_config
from pad_moe.deploy.compact import compact_block
from pad_moe.deploy.export import compact_model, load_deployed, save_deployed
from pad_moe.moe.layer import MoEFFN, PadMoE, build_ffn_block
from pad_moe.partition import iterative_mode_partition

H, F, E = 8, 16, 4
ATOL = 1e-5  # deploy vs training form: the same routing, fp32 sums in a different order

# (name, block kwargs): every source of gate randomness DeepSpeed has for k <= 2
ROUTINGS = {
    "top2-sampling": dict(k=2, second_expert_sampling=True),  # Gumbel noise picks the 2nd expert
    "top2-sampling-drops": dict(k=2, second_expert_sampling=True, capacity_factor=0.5, eval_capacity_factor=0.5),
    "top1-rts-drops": dict(k=1, use_rts=True, capacity_factor=0.5, eval_capacity_factor=0.5),  # random survivors
    "top1-no-rts-drops": dict(k=1, use_rts=False, capacity_factor=0.5, eval_capacity_factor=0.5),
    "top1-rsample": dict(k=1, noisy_gate_policy="RSample", use_rts=True, drop_tokens=False),
}


def block(cls, seed=0, **kwargs):
    layer = cls(H, F, num_experts=E, min_capacity=0, seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        layer.gate_weight.copy_(torch.randn(layer.gate_weight.shape, generator=g))
        if isinstance(layer, PadMoE):
            layer.phi.fill_(0.3)
            mask_gen = torch.Generator().manual_seed(seed)
            layer.set_masks({n: torch.rand(m.shape, generator=mask_gen) < 0.4 for n, m in layer.masks().items()})
    return layer


def tokens(n=64, seed=0):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def run_with_seed(layer, x, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        out, l_aux, _ = layer(x)
    return out, l_aux


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("cls", [MoEFFN, PadMoE], ids=["moe", "pad"])
def test_eval_is_bit_identical_whatever_the_global_rng(cls, routing):
    layer = block(cls, **ROUTINGS[routing]).eval()
    gate = layer.moe.deepspeed_moe.gate
    flags = (gate.use_rts, gate.top2_2nd_expert_sampling, gate.noisy_gate_policy)
    x = tokens()
    first = run_with_seed(layer, x, 1)
    for seed in (2, 3):
        again = run_with_seed(layer, x, seed)
        assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    assert (gate.use_rts, gate.top2_2nd_expert_sampling, gate.noisy_gate_policy) == flags  # configuration kept


@pytest.mark.parametrize("routing", ["top2-sampling", "top1-rts-drops", "top1-rsample"])
@pytest.mark.parametrize("cls", [MoEFFN, PadMoE], ids=["moe", "pad"])
def test_training_mode_still_samples(cls, routing):
    layer = block(cls, **ROUTINGS[routing]).train()
    x = tokens()
    a, b = run_with_seed(layer, x, 1), run_with_seed(layer, x, 2)
    assert not torch.equal(a[0], b[0])  # another RNG state, another route
    assert torch.equal(run_with_seed(layer, x, 1)[0], a[0])  # the same RNG state, the same route


def test_switching_back_to_training_samples_again():
    layer = block(PadMoE, k=2).eval()
    x = tokens()
    run_with_seed(layer, x, 0)
    layer.train()
    assert not torch.equal(run_with_seed(layer, x, 1)[0], run_with_seed(layer, x, 2)[0])


def test_switch_sparse_ffn_is_deterministic_in_eval_only():
    """The Switch backbone's sparse FFN (top-1, random token selection, token drops: its block_kwargs defaults)."""
    from pad_moe.switch.model import SwitchSparseFFN, block_kwargs
    from pad_moe.switch.presets import SwitchArch

    arch = SwitchArch(d_model=H, d_ff=F, d_kv=4, num_heads=2, num_layers=1, num_decoder_layers=1, num_experts=E,
                      sparse_step=1)
    kwargs = block_kwargs(arch, capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=0)
    assert kwargs["k"] == 1 and kwargs["use_rts"] and kwargs["drop_tokens"]
    ffn = SwitchSparseFFN(build_ffn_block("pad", H, F, **kwargs), "encoder")
    with torch.no_grad():
        ffn.gate.wg.weight.copy_(torch.randn(E, H, generator=torch.Generator().manual_seed(0)))
    x = tokens().reshape(4, 16, H)

    def run(seed):
        torch.manual_seed(seed)
        with torch.no_grad():
            return ffn(x)

    ffn.eval()
    assert torch.equal(run(1), run(2))
    ffn.train()
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
@pytest.mark.parametrize("cls", [MoEFFN, PadMoE], ids=["moe", "pad"])
def test_eval_routing_equals_the_deploy_router(cls, routing):
    """The compact block routes deterministically (2nd expert by logit, top-1 drops keep tokens in order): the
    training form in eval mode must compute the same function, token drops included."""
    layer = block(cls, seed=2, **ROUTINGS[routing]).eval()
    x = tokens(seed=1)
    torch.manual_seed(5)
    with torch.no_grad():
        want = layer(x)[0]
        got = compact_block(layer)(x)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


def test_partitioned_toy_model_in_eval_equals_the_exported_model(tmp_path):
    """Top-2 routing with second_expert_sampling left at its default (True), partitioned by IMP."""
    from pad_moe.toy import ToyClassifier

    cfg = load_config("configs/debug.yaml", ["moe.ep_size=1"])
    assert cfg.moe.k == 2 and cfg.moe.second_expert_sampling
    model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels, seed=cfg.train.seed)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, cfg.model.vocab_size, (4, cfg.model.max_seq_len), generator=g) for _ in range(2)]
    labels = torch.tensor([0, 1, 0, 1])
    loss_fn = lambda m, b: nn.functional.cross_entropy(m(b)[0], labels)  # noqa: E731
    iterative_mode_partition(model, batches, loss_fn, kappa=0.4, iterations=2)
    model.eval()
    x = torch.randint(0, cfg.model.vocab_size, (8, cfg.model.max_seq_len), generator=g)
    torch.manual_seed(1)
    with torch.no_grad():
        want = model(x)[0]
        torch.manual_seed(2)
        assert torch.equal(model(x)[0], want)
    deployed, specs = compact_model(model)
    save_deployed(deployed, str(tmp_path), cfg=cfg, specs=specs)
    with torch.no_grad():
        got = load_deployed(str(tmp_path))(x)[0]
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


# -- IMP ------------------------------------------------------------------------------------------------------------


class SampledPadNet(nn.Module):
    """Two PAD-MoE layers with DeepSpeed's default top-2 routing (Gumbel 2nd expert, token drops) and dropout."""

    def __init__(self, seed=0, dropout=0.0):
        super().__init__()
        self.layers = nn.ModuleList([block(PadMoE, seed=seed * 10 + i, k=2, capacity_factor=0.75,
                                           eval_capacity_factor=0.75) for i in range(2)])
        for layer in self.layers:
            layer.set_masks({n: torch.ones_like(m) for n, m in layer.masks().items()})
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        for layer in self.layers:
            x = x + self.drop(layer(x)[0])
        return x


@pytest.mark.parametrize("train_mode,dropout", [(False, 0.0), (True, 0.2)])
def test_imp_masks_do_not_depend_on_the_global_rng(train_mode, dropout):
    runs = []
    for global_seed in (11, 12):
        model = SampledPadNet(seed=4, dropout=dropout)
        torch.manual_seed(global_seed)
        before = torch.get_rng_state()
        iterative_mode_partition(model, make_batches(), mse_loss, kappa=0.3, iterations=3, seed=7,
                                 train_mode=train_mode)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's RNG is left as it was
        runs.append(all_masks(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
