"""PAD-MoE on DeepSpeed AutoEP (pad_moe.moe.autoep): a tiny random HF Mixtral swapped by AutoEP for PAD layers.

Against HF references built in the test: all masks one ≡ the original logits; random masks ≡ the HF model whose experts
hold W_eff = where(M, W_k, W_s); exact-zero gradients where masked; on 2 gloo ranks (expert parallel 2) ZeRO-3 ≡ ZeRO-2 ≡
a single-process reference over the global batch, step by step."""

import pytest
import torch

from pad_moe.testing.ranks import run_ranks

H, F, E, V = 32, 48, 4, 64


def _mixtral(seed: int = 0):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=E, num_experts_per_tok=2, max_position_embeddings=64,
                        router_aux_loss_coef=0.0, attn_implementation="eager")
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # experts that differ a lot, so a wrong mix or a wrong expert shows
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj.normal_(0, 0.3)
            layer.mlp.experts.down_proj.normal_(0, 0.3)
    return model


def _ds_config(stage: int, ep: int, micro: int = 2):
    return {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
            "zero_optimization": {"stage": stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.0, "torch_adam": True}},
            "expert_parallel": {"enabled": True, "autoep_size": ep, "preset_model": "mixtral",
                                "load_balance_coeff": None}}


def _initialize(model, stage, ep, micro=2, options=None, universal=False, masked=False):
    """The engine over ``model`` with AutoEP PAD layers; ``masked``: the same random masks (seed 4) on every run."""
    import deepspeed

    from pad_moe.moe.autoep import pad_autoep_layers, pad_autoep_modules

    config = _ds_config(stage, ep, micro)
    if universal:
        config["checkpoint"] = {"load_universal": True}
    with pad_autoep_layers(options):
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    if masked:
        g = torch.Generator().manual_seed(4)
        for _, layer in pad_autoep_modules(engine.module):
            layer.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in layer.masks().items()})
    return engine


def _with_effective_experts(model, layers):
    """The HF model whose experts are the PAD layers' W_eff (λ = 1: φ = 0)."""
    with torch.no_grad():
        for hf, pad in zip(model.model.layers, layers):
            w1, w2, w3 = pad.effective_expert_weights(pad.experts.w1, pad.experts.w2, pad.experts.w3)
            hf.mlp.experts.gate_up_proj.copy_(torch.cat([w1, w3], dim=1))
            hf.mlp.experts.down_proj.copy_(w2)
    return model


def _single_rank_equivalences(rank, world):
    import deepspeed

    from pad_moe.moe.autoep import PadAutoEPLayer, pad_autoep_modules, transformers_output_recorder_shim

    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    reference = _mixtral().eval()
    expected = reference(ids).logits

    # DeepSpeed's own AutoEP (no PAD) runs under transformers 5.24 with the shim, and equals HF.
    model = _mixtral()
    with transformers_output_recorder_shim():
        plain, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=_ds_config(2, 1))
    plain_err = (plain.module.eval()(ids).logits - expected).abs().max().item()

    engine = _initialize(_mixtral(), stage=2, ep=1)
    module = engine.module.eval()
    layers = [m for _, m in pad_autoep_modules(module)]
    ones_err = (module(ids).logits - expected).abs().max().item()
    static_mean_err = max((layer.static_w1 - layer.experts.w1.mean(0)).abs().max().item() for layer in layers)

    g = torch.Generator().manual_seed(9)
    for layer in layers:
        layer.set_masks({k: torch.rand(v.shape, generator=g) < 0.5 for k, v in layer.masks().items()})
        with torch.no_grad():
            layer.static_w2.add_(torch.randn(layer.static_w2.shape, generator=g))
    mixed = module(ids).logits
    mixed_err = (mixed - _with_effective_experts(_mixtral().eval(), layers)(ids).logits).abs().max().item()

    module.train()
    module(ids, labels=ids).loss.backward()
    layer = layers[0]
    masks = layer.weight_masks()
    leaks = {"dynamic": max(layer.experts.w1.grad[:, ~masks["gate_proj.weight"]].abs().max().item(),
                            layer.experts.w2.grad[:, ~masks["down_proj.weight"]].abs().max().item()),
             "static": layer.static_w3.grad[masks["up_proj.weight"]].abs().max().item()}
    live = layer.experts.w1.grad[:, masks["gate_proj.weight"]].abs().max().item()
    return {"plain": plain_err, "ones": ones_err, "static_mean": static_mean_err, "mixed": mixed_err,
            "leaks": leaks, "live": live, "is_pad": all(isinstance(m, PadAutoEPLayer) for m in layers),
            "n_layers": len(layers), "phi_grad": layer.phi.grad is not None}


def test_autoep_pad_layers_match_hf_references():
    r = run_ranks(_single_rank_equivalences, 1)[0]
    assert r["is_pad"] and r["n_layers"] == 2
    assert r["plain"] < 1e-5, r  # DeepSpeed AutoEP ≡ HF (grouped GEMM vs per-expert loop: fp32 reassociation)
    assert r["ones"] < 1e-5, r  # all dynamic, λ = 1: the original model
    assert r["static_mean"] < 1e-6, r
    assert r["mixed"] < 1e-5, r
    assert r["leaks"] == {"dynamic": 0.0, "static": 0.0}, r  # exact zeros where an entry belongs to the other side
    assert r["live"] > 0 and r["phi_grad"], r


def _losses(engine, rank, world, steps=3, micro=2):
    """Per step: the loss of this rank's micro batch; rank r takes rows [r·micro, (r+1)·micro) of the global batch
    (the same batch every step, so the loss must fall)."""
    out = []
    ids = torch.randint(0, V, (world * micro, 9), generator=torch.Generator().manual_seed(50))
    ids = ids[rank * micro:(rank + 1) * micro]
    for _ in range(steps):
        loss = engine(ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        out.append(loss.item())
    return out


def _train_two_stages(rank, world):
    from pad_moe.moe.autoep import pad_autoep_modules

    results = {}
    for stage in (2, 3):
        engine = _initialize(_mixtral(), stage=stage, ep=world, masked=True)
        results[stage] = _losses(engine, rank, world)
        first = pad_autoep_modules(engine.module)[0][1]
        results[f"local_experts_{stage}"] = first.num_local_experts
        results[f"partitioned_{stage}"] = all(hasattr(p, "ds_id") for p in (first.experts.w1, first.static_w1))
    return results


def _reference(rank, world, ranks):
    """One process, ep 1, the global batch: the mean of the ranks' losses, if the ranks' gradients average right."""

    engine = _initialize(_mixtral(), stage=0, ep=1, micro=2 * ranks, masked=True)
    return _losses(engine, 0, 1, micro=2 * ranks)


def test_autoep_pad_zero3_matches_zero2_and_one_process_on_two_ranks():
    per_rank = run_ranks(_train_two_stages, 2)
    reference = run_ranks(_reference, 1, 2)[0]
    assert [r["local_experts_3"] for r in per_rank] == [E // 2, E // 2]
    assert [(r["partitioned_2"], r["partitioned_3"]) for r in per_rank] == [(False, True)] * 2  # ZeRO-3 really ran
    for stage in (2, 3):
        mean = [(a + b) / 2 for a, b in zip(per_rank[0][stage], per_rank[1][stage])]
        assert mean == pytest.approx(reference, rel=2e-5, abs=1e-6), (stage, mean, reference)
    for rank in per_rank:
        assert rank[3] == pytest.approx(rank[2], rel=2e-5, abs=1e-6)
    assert reference[-1] < reference[0]  # it trains


def _imp(rank, world, scorer):
    from pad_moe.moe.autoep import pad_autoep_modules
    from pad_moe.partition.imp import iterative_mode_partition

    engine = _initialize(_mixtral(), stage=2, ep=world, micro=4 // world)
    ids = torch.randint(0, V, (4, 9), generator=torch.Generator().manual_seed(21))
    batches = [ids[rank * 4 // world:(rank + 1) * 4 // world]]
    report = iterative_mode_partition(engine, batches, lambda model, b: model(b, labels=b).loss, kappa=0.3,
                                      iterations=2, scorer=scorer)
    masks = {f"{n}.{k}": v.tolist() for n, m in pad_autoep_modules(engine.module) for k, v in m.masks().items()}
    return report.dynamic_per_round, masks  # lists: tensors through the result queue outlive their process


@pytest.mark.slow  # ~30 s each: three spawns
@pytest.mark.parametrize("scorer", ["snip", "magnitude"])
def test_imp_on_autoep_pad_layers_two_ranks_match_one_process(scorer):
    """IMP partitions AutoEP PAD layers like any PAD module; ep 2 over 2 ranks ≡ one process over the global batch."""
    def as_tensors(result):
        return result[0], {k: torch.tensor(v) for k, v in result[1].items()}

    two = [as_tensors(r) for r in run_ranks(_imp, 2, scorer)]
    one = as_tensors(run_ranks(_imp, 1, scorer)[0])
    assert two[0][0] == two[1][0] == one[0]
    total = sum(m.numel() for m in one[1].values())
    assert one[0][-1] == round(0.3 * total)
    for name, mask in one[1].items():
        assert torch.equal(two[0][1][name], two[1][1][name]), name  # replicas agree
        agree = (two[0][1][name] == mask).float().mean().item()
        assert agree > 0.995, (name, agree)  # fp32 sums in another order may swap entries tied at the threshold


def _family(name):
    import transformers as T

    small = dict(vocab_size=V, hidden_size=H, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 num_experts_per_tok=2, max_position_embeddings=64, router_aux_loss_coef=0.0)
    if name == "qwen2_moe":  # with a shared expert (dense, gated by its own sigmoid gate)
        return T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(intermediate_size=F, moe_intermediate_size=24, num_experts=E,
                                                      shared_expert_intermediate_size=40, **small))
    if name == "qwen3_moe":
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(intermediate_size=F, moe_intermediate_size=24, num_experts=E,
                                                      head_dim=8, **small))
    if name == "olmoe":
        return T.OlmoeForCausalLM(T.OlmoeConfig(intermediate_size=24, num_experts=E, **small))
    raise AssertionError(name)


def _families_at_all_ones(rank, world, names):
    import deepspeed

    from pad_moe.moe.autoep import autoep_section, pad_autoep_layers, pad_autoep_modules

    out = {}
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(3))
    for name in names:
        torch.manual_seed(0)
        model = _family(name).eval()
        expected = model(ids).logits
        config = _ds_config(2, 1)
        config["expert_parallel"] = autoep_section(model, 1)
        with pad_autoep_layers():
            engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        layers = pad_autoep_modules(engine.module)
        out[name] = (len(layers), (engine.module.eval()(ids).logits - expected).abs().max().item(),
                     layers[0][1].shared_experts is not None)
    return out


def test_hf_moe_families_import_exactly_at_all_ones():
    """Qwen2-MoE (shared expert kept dense), Qwen3-MoE and OLMoE through AutoEP into PAD layers: the original logits."""
    found = run_ranks(_families_at_all_ones, 1, ["qwen2_moe", "qwen3_moe", "olmoe"])[0]
    for name, (layers, err, shared) in found.items():
        assert layers == 2 and err < 1e-5, (name, layers, err)
        assert shared == (name == "qwen2_moe"), name


def test_autoep_section_refuses_families_it_cannot_convert():
    from transformers import BertConfig, BertModel

    from pad_moe.moe.autoep import autoep_section

    with pytest.raises(ValueError, match="model_type='bert' is not an HF MoE family"):
        autoep_section(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                            intermediate_size=48)), 1)
    assert autoep_section(_mixtral(), 2)["preset_model"] == "mixtral"


def test_output_recorder_shim_answers_both_apis_and_restores():
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.utils import output_capturing

    from pad_moe.moe.autoep import transformers_output_recorder_shim

    registry = output_capturing._CAN_RECORD_REGISTRY
    original = type(registry)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=E))
    before = registry.get(model)
    with transformers_output_recorder_shim():
        assert registry.get(model) == before  # transformers' own call
        key = str(model.__class__)
        assert registry.get("no such class", "default") == "default"  # DeepSpeed's call
        registry["pad-moe-test-key"] = {"x": 1}
        assert registry.get("pad-moe-test-key", None) == {"x": 1}
        registry.pop("pad-moe-test-key")
        assert registry.get(key, {}) == dict.get(registry, key, {})
    assert type(registry) is original


def test_bad_options_are_refused():
    from pad_moe.moe.autoep import PadAutoEPOptions

    with pytest.raises(ValueError, match="static_init='median'"):
        PadAutoEPOptions(static_init="median")
    with pytest.raises(ValueError, match="scale_mode='half'"):
        PadAutoEPOptions(scale_mode="half")


def _masked_engine(stage, ep, micro, universal=False):
    return _initialize(_mixtral(), stage, ep, micro, universal=universal, masked=True)


def _save_then_continue(rank, world, ckpt):
    from pad_moe.checkpoint_io import load_same_layout
    from pad_moe.distributed import use_weights_only_checkpoints

    engine = _masked_engine(2, world, 2)
    use_weights_only_checkpoints(engine)
    before = _losses(engine, rank, world, steps=2)
    engine.save_checkpoint(ckpt, tag="step2")
    after = _losses(engine, rank, world, steps=2)
    again = _masked_engine(2, world, 2)  # same layout: the plain load resumes exactly
    load_same_layout(again, ckpt, "step2")
    return before + after, _losses(again, rank, world, steps=2)


def _resume_universal(rank, world, universal, tag, ep, micro):
    from pad_moe.checkpoint_io import load_universal
    from pad_moe.distributed import use_weights_only_checkpoints
    from pad_moe.moe.autoep import pad_autoep_modules

    engine = _masked_engine(2, ep, micro, universal=True)
    for _, layer in pad_autoep_modules(engine.module):  # the checkpoint must bring the masks back
        layer.set_masks({k: torch.ones_like(v) for k, v in layer.masks().items()})
    use_weights_only_checkpoints(engine)
    load_universal(engine, universal, tag)
    ratios = [layer.dynamic_ratio() for _, layer in pad_autoep_modules(engine.module)]
    return _losses(engine, rank, world, steps=2, micro=micro), ratios


@pytest.mark.slow
def test_autoep_pad_checkpoint_at_ep2_resumes_at_other_ep_through_universal_checkpoint(tmp_path):
    """Written at ep 2 on 2 ranks, converted by DeepSpeed's ds_to_universal (weights-only loads), resumed at ep 1 on one
    process, at ep 1 on 2 ranks and at ep 4 on 4 ranks, over the same global batch: the continued losses are the
    uninterrupted run's (masks, static weights and Adam state kept)."""
    from pad_moe.checkpoint_io import to_universal

    ckpt, universal = str(tmp_path / "ckpt"), str(tmp_path / "universal")
    ranks = run_ranks(_save_then_continue, 2, ckpt)
    uninterrupted = [r[0] for r in ranks]
    for rank, reference in zip(ranks, uninterrupted):
        assert rank[1] == pytest.approx(reference[2:], rel=1e-6, abs=1e-7)
    to_universal(ckpt, "step2", universal)
    expected = [(a + b) / 2 for a, b in zip(uninterrupted[0][2:], uninterrupted[1][2:])]
    for world, ep in ((1, 1), (2, 1), (4, 4)):
        ranks = run_ranks(_resume_universal, world, universal, "step2", ep, 4 // world)
        resumed = [sum(r[0][i] for r in ranks) / world for i in range(2)]
        assert all(0.4 < r < 0.6 for rank in ranks for r in rank[1]), (world, ep, ranks)
        assert resumed == pytest.approx(expected, rel=2e-5, abs=1e-6), (world, ep, resumed, expected)


def test_plain_load_at_another_expert_layout_is_refused():
    from pad_moe.checkpoint_io import check_same_expert_layout
    from pad_moe.errors import UsageError

    state = {"ds_autoep_layers": [{"ep_size": 2}, {"ep_size": 2}], "dp_world_size": 2}
    check_same_expert_layout(state, 2, 2, "ckpt")  # same layout: fine
    check_same_expert_layout({"dp_world_size": 1}, 4, 4, "ckpt")  # not an AutoEP checkpoint: not ours to judge
    for ep, dp in ((1, 1), (1, 2), (4, 4)):
        with pytest.raises(UsageError, match=f"expert-parallel size 2 on 2 data-parallel ranks, this run has {ep} on "
                                             f"{dp}; convert it with pad_moe.checkpoint_io.to_universal"):
            check_same_expert_layout(state, ep, dp, "ckpt")


def test_universal_conversion_refuses_bad_paths(tmp_path):
    from pad_moe.checkpoint_io import to_universal
    from pad_moe.errors import UsageError

    with pytest.raises(UsageError, match="does not exist"):
        to_universal(str(tmp_path), "global_step9", str(tmp_path / "u"))
    (tmp_path / "step1").mkdir()
    (tmp_path / "u").mkdir()
    with pytest.raises(UsageError, match="already exists"):
        to_universal(str(tmp_path), "step1", str(tmp_path / "u"))
