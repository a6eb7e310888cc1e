"""The grouped expert store (pad_moe.moe.store) against DeepSpeed's per-expert ``Experts``: same function, same
gradients, same checkpoint layout (old state dicts load unchanged), and old training checkpoints refused for resume."""

import json
import os

import pytest
import torch
from deepspeed.moe.layer import MoE

from pad_moe import MoEFFN, PadMoE
from pad_moe.moe.ffn import make_ffn
from pad_moe.moe.store import STORE_VERSION, GroupedExperts

H, F, E = 12, 20, 4
TOL = dict(rtol=1e-5, atol=1e-6)


def deepspeed_reference(expert_type: str, bias: bool, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    act = "silu" if expert_type == "glu" else "gelu"
    expert = make_ffn(expert_type, H, F, act, bias)
    moe = MoE(H, expert, num_experts=E, k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
              drop_tokens=True, use_rts=False, top2_2nd_expert_sampling=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return moe


@pytest.mark.parametrize("expert_type,bias", [("mlp", True), ("mlp", False), ("glu", False), ("glu", True)])
def test_store_loads_deepspeeds_per_expert_state_and_computes_its_function_and_gradients(expert_type, bias):
    ref = deepspeed_reference(expert_type, bias).eval()
    act = "silu" if expert_type == "glu" else "gelu"
    ours = MoEFFN(H, F, num_experts=E, k=2, capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0,
                  drop_tokens=True, use_rts=False, second_expert_sampling=False, expert_type=expert_type,
                  activation=act, bias=bias, dispatch="capacity").eval()
    state = ref.state_dict()
    assert set(ours.moe.state_dict()) == set(state)  # DeepSpeed's key layout, expert by expert
    ours.moe.load_state_dict(state, strict=True)
    x = torch.randn(2, 9, H, generator=torch.Generator().manual_seed(3))
    out_ref, aux_ref, _ = ref(x)
    out, aux, _ = ours(x)
    torch.testing.assert_close(out, out_ref, **TOL)
    (out_ref.square().sum() + aux_ref).backward()
    (out.square().sum() + aux).backward()
    store = ours.experts
    for i, expert in enumerate(ref.deepspeed_moe.experts.deepspeed_experts):
        for name, p in expert.named_parameters():
            torch.testing.assert_close(store.expert_grads(i)[name], p.grad, **TOL)
    torch.testing.assert_close(ours.gate_weight.grad, ref.deepspeed_moe.gate.wg.weight.grad, **TOL)
    # and back: the store's state dict loads into DeepSpeed's layer
    ref.load_state_dict(ours.moe.state_dict(), strict=True)


def test_plain_moe_computes_on_its_parameters_without_a_copy_and_they_carry_expert_tagging():
    layer = MoEFFN(H, F, num_experts=E, k=2, dispatch="dropless")
    weights = layer.expert_weights()
    params = dict(layer.experts.named_parameters(recurse=False))
    assert all(any(w is p for p in params.values()) for w in weights.values())
    assert all(p.allreduce is False and p.group_name == layer.expert_group_name for p in params.values())
    assert params["fc1_weight"].shape == (E, F, H) and params["fc2_weight"].shape == (E, H, F)


def test_state_dict_with_a_missing_or_misshapen_expert_is_refused():
    layer = MoEFFN(H, F, num_experts=E, k=2)
    state = layer.state_dict()
    key = next(k for k in state if k.endswith("deepspeed_experts.3.fc2.weight"))
    missing = {k: v for k, v in state.items() if k != key}
    with pytest.raises(RuntimeError, match="deepspeed_experts.3.fc2.weight"):
        layer.load_state_dict(missing)
    bad = dict(state)
    bad[key] = torch.zeros(H, F + 1)
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(bad)
    extra = dict(state)
    extra[key.replace(".3.", ".4.")] = state[key]
    with pytest.raises(RuntimeError, match="Unexpected"):
        layer.load_state_dict(extra)


def test_per_expert_masks_keep_their_keys_and_load_back():
    layer = PadMoE(H, F, num_experts=E, k=2, mask_sharing="expert")
    g = torch.Generator().manual_seed(0)
    layer.set_masks({n: torch.rand(m.shape, generator=g) < 0.5 for n, m in layer.masks().items()})
    state = layer.state_dict()
    assert any(".deepspeed_experts.2.mask_fc1_weight" in k for k in state)
    other = PadMoE(H, F, num_experts=E, k=2, mask_sharing="expert", seed=7)
    other.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(other.masks().values(), layer.masks().values()))
    x = torch.randn(5, H)
    torch.testing.assert_close(other.eval()(x)[0], layer.eval()(x)[0], rtol=0, atol=0)


def test_narrowed_store_records_where_each_parameter_came_from():
    store = GroupedExperts("glu", 3, H, F, "silu", bias=True)
    for i in range(3):
        store.reset_expert_(i, torch.Generator().manual_seed(i))
    units = torch.tensor([1, 4, 7])
    narrow = store.narrowed(units)
    assert narrow.down_proj_bias is None and narrow.gate_proj_bias.shape == (3, 3)
    assert torch.equal(narrow.up_proj_weight, store.up_proj_weight[:, units])
    assert torch.equal(narrow.down_proj_weight, store.down_proj_weight[:, :, units])
    assert narrow.up_proj_weight._compacted_from[0] == 1 and narrow.down_proj_weight._compacted_from[0] == 2
    assert narrow.slots is store.slots


def test_resume_refuses_a_checkpoint_of_the_per_expert_store_and_names_the_converter(tmp_path):
    from pad_moe.errors import UsageError
    from pad_moe.manifest import write_manifest
    from pad_moe.train.checkpoints import find_resume_point

    root = tmp_path / "checkpoints"
    tag = root / "step4"
    tag.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "layer_0_expert_0_mp_rank_00_model_states.pt"):
        torch.save({}, tag / name)
    write_manifest(str(tag), step=4, world_size=1)  # as pad_moe wrote it before the store: no expert_store
    (root / "latest").write_text("step4")
    with pytest.raises(UsageError, match=r"expert store version 1 .*padmoe reshard") as err:
        find_resume_point(str(root), 1)
    assert "\n" not in str(err.value)
    manifest = json.loads((tag / "pad_moe_manifest.json").read_text())
    manifest["expert_store"] = STORE_VERSION
    (tag / "pad_moe_manifest.json").write_text(json.dumps(manifest))
    assert find_resume_point(str(root), 1).step == 4
    assert os.path.isfile(tag / "layer_0_expert_0_mp_rank_00_model_states.pt")  # nothing removed
