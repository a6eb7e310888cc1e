"""Staged pre-training (issue 24, item 5): ``padmoe upcycle`` (dense Llama -> native Mixtral, same function), a static
causal-LM run's HF folder, and ``train.data_offset_steps`` (the second stage's data continue the first's)."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pad_moe.cli import main
from pad_moe.testing.ranks import run_ranks


def _llama(folder, seed=0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, **extra)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # RMSNorm weights away from 1, so a norm read differently would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


def test_upcycled_mixtral_computes_the_dense_function_and_its_router_follows_the_seed(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    dense = _llama(tmp_path / "dense").eval()
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), "--experts", "4", "--k", "2",
                 "--seed", "3"]) == 0
    assert "logits equal the dense model's" in capsys.readouterr().out
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert moe.config.model_type == "mixtral" and moe.config.num_local_experts == 4
    ids = torch.randint(0, 96, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = dense(input_ids=ids).logits, moe(input_ids=ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    experts = moe.model.layers[1].mlp.experts
    gate_up = torch.cat([dense.model.layers[1].mlp.gate_proj.weight, dense.model.layers[1].mlp.up_proj.weight])
    for e in range(4):  # every expert is the layer's MLP
        assert torch.equal(experts.gate_up_proj[e], gate_up)
        assert torch.equal(experts.down_proj[e], dense.model.layers[1].mlp.down_proj.weight)
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "again"), "--experts", "4",
                 "--seed", "3"]) == 0
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "other"), "--experts", "4",
                 "--seed", "4"]) == 0
    router = lambda d: AutoModelForCausalLM.from_pretrained(tmp_path / d).model.layers[0].mlp.gate.weight  # noqa: E731
    assert torch.equal(router("again"), router("moe")) and not torch.equal(router("other"), router("moe"))


@pytest.mark.parametrize("args, extra, message", [
    (["--experts", "1"], {}, "--experts 1: an MoE needs at least 2 experts"),
    (["--experts", "4", "--k", "5"], {}, "--k 5 must be between 1 and --experts 4"),
    ([], {"attention_bias": True}, "attention_bias=True: Mixtral has no such biases"),
    ([], {"hidden_act": "gelu"}, "hidden_act='gelu': Mixtral experts are SwiGLU"),
])
def test_bad_upcycle_inputs_are_one_line_and_write_nothing(tmp_path, capsys, args, extra, message):
    _llama(tmp_path / "dense", **extra)
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "moe"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert sorted(os.listdir(tmp_path)) == ["dense"]  # no output, no staging folder


def test_upcycle_refuses_an_existing_output_and_other_families(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    _llama(tmp_path / "dense")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["upcycle", str(tmp_path / "dense"), "--out", str(tmp_path / "taken")]) == 2
    assert "exists; pass a new folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=48)).save_pretrained(tmp_path / "bert")
    assert main(["upcycle", str(tmp_path / "bert"), "--out", str(tmp_path / "moe")]) == 2
    assert "model_type='bert': padmoe upcycle makes Mixtral MoEs from llama / mistral" in capsys.readouterr().err
    assert not (tmp_path / "moe").exists()


def _stage(rank, world, out, overrides):
    from pad_moe.config import load_config
    from pad_moe.train import loop

    starts = []
    original = loop.MicroBatches.iterate

    def spy(self, start):
        starts.append(start)
        return original(self, start)

    loop.MicroBatches.iterate = spy
    cfg = load_config("configs/lm_debug.yaml", [f"output_dir={out}", "train.ds_config=configs/ds_zero2.json",
                                                "train.checkpoint_every=0", "data.max_eval=16", *overrides])
    return loop.train(cfg), starts


def test_a_static_llama_run_writes_its_hf_folder_and_a_data_offset_moves_the_stream(tmp_path):
    """The dense first stage of an upcycling run: its HF folder gives the perplexity the run reported; the second
    stage's data start where the first stopped (train.data_offset_steps x grad_accum global micro-batches)."""
    from transformers import AutoModelForCausalLM

    from pad_moe.config import load_config
    from pad_moe.hfmoe.compress import perplexity
    from pad_moe.lm.job import build_causal_lm_job

    overrides = ["name=dense", "moe.mode=static", "model.preset=null", "model.arch=causal_lm", "model.family=llama", "model.hidden_size=32",
                 "model.ffn_size=64", "model.num_layers=2", "model.num_heads=4", "model.vocab_size=320",
                 "model.max_seq_len=64", "train.steps=3", "train.grad_accum=2", "train.data_offset_steps=5"]
    summary, starts = run_ranks(_stage, 1, str(tmp_path), overrides, timeout=300)[0]
    assert starts == [10]  # 5 steps x 2 micro-batches
    folder = tmp_path / "dense" / "hf_model"
    assert summary["exported"] == str(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.config.model_type == "llama"
    cfg = load_config("configs/lm_debug.yaml", [f"output_dir={tmp_path}", "data.max_eval=16", *overrides])
    held_out = build_causal_lm_job(cfg, 0).eval_sets["heldout"]
    assert perplexity(model, held_out)["perplexity"] == pytest.approx(summary["eval"]["heldout"]["perplexity"],
                                                                      rel=1e-5)
    assert json.loads((folder / "config.json").read_text())["intermediate_size"] == 64


def test_a_negative_data_offset_is_refused():
    from pad_moe.config import load_config

    with pytest.raises(ValueError, match="data_offset_steps"):
        load_config("configs/lm_debug.yaml", ["train.data_offset_steps=-1"])
