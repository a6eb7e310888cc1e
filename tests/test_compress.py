"""``padmoe compress`` end to end on a tiny Mixtral folder built here (random weights, a BPE tokenizer trained on real
VADER sentences): κ = 1 gives the original logits, κ < 1 stores fewer parameters and loads without DeepSpeed, the
baselines store what they claim, healing trains only the PAD parts, two ranks partition as one process does, and bad
input is one line with exit status 2 and nothing written."""

import json
import os

import pytest
import torch

from pad_moe.testing.ranks import run_ranks

E = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import MixtralConfig, MixtralForCausalLM

    from pad_moe.hfmoe.experts import moe_blocks
    from pad_moe.lm.corpus import split_documents, vader_sentences
    from pad_moe.lm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("compress")
    train, held_out = split_documents(vader_sentences())
    tokenizer = train_bpe(train[:3000], 320)
    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, num_local_experts=E,
                                             num_experts_per_tok=2, max_position_embeddings=64, eos_token_id=1,
                                             bos_token_id=None, pad_token_id=0))
    with torch.no_grad():
        for _, block in moe_blocks(model):
            block.experts.gate_up_proj.normal_(0, 0.3)
            block.experts.down_proj.normal_(0, 0.3)
    model.save_pretrained(root / "mixtral")
    tokenizer.save_pretrained(root / "mixtral")
    (root / "calib.txt").write_text("\n".join(train[3000:3400]) + "\n")
    (root / "eval.txt").write_text("\n".join(held_out[:120]) + "\n")
    return root


def run(folders, out, **kwargs):
    from pad_moe.hfmoe.compress import compress

    kwargs = {"calib": str(folders / "calib.txt"), "seq_len": 32, "batch_size": 4, "calib_batches": 3,
              "iterations": 2, **kwargs}
    return compress(str(folders / "mixtral"), out=str(out), **kwargs)


def test_kappa_one_gives_the_original_logits(folders, tmp_path):
    from transformers import AutoModelForCausalLM

    import pad_moe

    summary = run(folders, tmp_path / "k1", kappa=1.0, eval_text=str(folders / "eval.txt"), eval_before=True)
    assert summary["params_stored"] == summary["params_original"] and summary["verified_max_abs_diff"] == 0
    assert summary["eval"] == summary["eval_original"]
    ids = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(1))
    original = AutoModelForCausalLM.from_pretrained(folders / "mixtral").eval()
    loaded = pad_moe.load_deployed(str(tmp_path / "k1"))
    assert torch.equal(loaded(ids).logits, original(ids).logits)


def test_half_kappa_with_healing_stores_the_counted_size_and_trains_only_pad_parts(folders, tmp_path):
    from safetensors.torch import load_file

    from pad_moe.hfmoe.count import count_hf_moe

    summary = run(folders, tmp_path / "k05", kappa=0.5, heal_steps=4, heal_lr=1e-2)
    counted = count_hf_moe(str(folders / "mixtral"), mode="pad", kappa=0.5)["params"]
    # IMP's global scope may spread the dynamic entries unevenly over the layers (same total up to rounding)
    assert abs(summary["params_stored"] - counted) <= 2 * (E - 1)
    n = 3 * 48 * 32  # one expert's weights; per layer PAD at κ=0.5 stores N/2 static + E·N/2 dynamic instead of E·N
    assert abs(summary["params_original"] - summary["params_stored"] - 2 * (E * n - n // 2 - E * n // 2)) <= 2 * E
    assert len(summary["heal_losses"]) == 4 and all(x == x for x in summary["heal_losses"])
    from transformers import AutoModelForCausalLM

    source = AutoModelForCausalLM.from_pretrained(folders / "mixtral").state_dict()
    written = load_file(tmp_path / "k05" / "model.safetensors")
    frozen = [k for k in source if ".experts." not in k]
    assert frozen and all(torch.equal(source[k], written[k]) for k in frozen)  # router, attention, norms, embeddings
    meta = json.loads((tmp_path / "k05" / "pad_deploy.json").read_text())
    assert meta["method"] == "imp" and meta["heal_steps"] == 4 and meta["kappa"] == 0.5


def test_healing_lowers_the_calibration_loss(folders, tmp_path):
    summary = run(folders, tmp_path / "h", kappa=0.3, heal_steps=12, heal_lr=3e-2, calib_batches=1)
    losses = summary["heal_losses"]
    assert losses[-1] < losses[0]  # one batch, 12 steps: the trained PAD parts fit it


def test_baselines_store_what_they_claim(folders, tmp_path):
    import pad_moe
    from pad_moe.hfmoe.count import count_hf_moe

    merge = run(folders, tmp_path / "merge", method="merge")
    assert merge["params_stored"] == count_hf_moe(str(folders / "mixtral"), mode="static")["params"]
    drop = run(folders, tmp_path / "drop", method="drop", kappa=0.7)
    keep = round(1 + 0.7 * (E - 1))
    assert all(len(ids) == keep for ids in drop["kept_experts"].values())
    model = pad_moe.load_deployed(str(tmp_path / "drop"))
    assert model.config.num_local_experts == keep
    assert drop["params_stored"] == sum(p.numel() for p in model.parameters())
    rand = run(folders, tmp_path / "random", method="random", kappa=0.5)
    imp = run(folders, tmp_path / "imp", kappa=0.5)
    from safetensors.torch import load_file

    masks = [{k: v for k, v in load_file(tmp_path / name / "model.safetensors").items() if "mask_" in k}
             for name in ("random", "imp")]
    assert any(not torch.equal(masks[0][k], masks[1][k]) for k in masks[0])
    assert rand["partition"]["method"] == "random" and imp["partition"]["method"] == "imp"


def _ranked(rank, world, folders, out):
    from pathlib import Path

    return run(Path(folders), out, kappa=0.5, batch_size=2)


def test_two_ranks_partition_as_one_process_over_the_global_batch(folders, tmp_path):
    from safetensors.torch import load_file

    from pad_moe.deploy.compact import unpack_bits

    run_ranks(_ranked, 2, str(folders), str(tmp_path / "two"), timeout=300)
    run(folders, tmp_path / "one", kappa=0.5, batch_size=4)  # the same global batches in one process
    two, one = (load_file(tmp_path / n / "model.safetensors") for n in ("two", "one"))
    agree = total = 0
    for key in (k for k in one if "mask_" in k):
        a, b = unpack_bits(one[key], (one[key].numel() * 8,)), unpack_bits(two[key], (two[key].numel() * 8,))
        agree, total = agree + int((a == b).sum()), total + a.numel()
        assert int(a.sum()) == int(b.sum())
    # scores summed over ranks vs one backward over both halves: equal up to float rounding at the threshold
    assert agree / total > 0.995


@pytest.mark.parametrize("argv, message", [
    (["--kappa", "0"], "--kappa 0.0 must be in (0, 1]"),
    (["--kappa", "1.5"], "--kappa 1.5 must be in (0, 1]"),
    (["--method", "merge", "--kappa", "0.5"], "drop --kappa"),
    (["--method", "drop", "--kappa", "0.5", "--granularity", "neuron"], "drop --granularity"),
    (["--kappa", "0.5", "--heal-steps", "-1"], "--heal-steps -1"),
])
def test_bad_flags_are_one_line_exit_2_and_nothing_written(folders, tmp_path, capsys, argv, message):
    from pad_moe.hfmoe.compress import compress_main

    out = tmp_path / "out"
    code = compress_main([str(folders / "mixtral"), "--calib", str(folders / "calib.txt"), "--out", str(out), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_bad_inputs_are_refused_before_anything_is_written(folders, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pad_moe.hfmoe.compress import compress_main

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "dense")
    (tmp_path / "alien").mkdir()
    (tmp_path / "alien" / "config.json").write_text(json.dumps({"model_type": "no_such_family"}))
    (tmp_path / "empty.txt").write_text("\n\n")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    calib = str(folders / "calib.txt")
    capsys.readouterr()  # the set-up's progress bars
    cases = [
        ([str(tmp_path / "dense"), "--kappa", "0.5", "--calib", calib], "not an MoE family"),
        ([str(tmp_path / "alien"), "--kappa", "0.5", "--calib", calib], "cannot be read"),
        ([str(tmp_path / "nowhere"), "--kappa", "0.5", "--calib", calib], "no config.json"),
        ([str(folders / "mixtral"), "--kappa", "0.5", "--calib", str(tmp_path / "empty.txt")], "is empty"),
        ([str(folders / "mixtral"), "--kappa", "0.5", "--calib", str(tmp_path / "none.txt")], "does not exist"),
    ]
    for argv, message in cases:
        out = tmp_path / "out"
        assert compress_main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    assert compress_main([str(folders / "mixtral"), "--kappa", "0.5", "--calib", calib, "--out", str(existing)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert os.listdir(existing) == ["keep.txt"] and (existing / "keep.txt").read_text() == "mine"
