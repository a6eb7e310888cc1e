"""The causal-LM job (``model.arch=causal_lm``): corpora, held-out split, BPE tokenizer, packing, config refusals, and
real training through pad_moe's trainer on 2 gloo ranks (the loss falls, resume is exact, the final export loads and
computes the reported perplexity)."""

import json
import os

import pytest
import torch

from pad_moe.lm import corpus as C
from pad_moe.testing.ranks import run_ranks


def test_held_out_split_is_fixed_and_disjoint():
    docs = [f"document number {i} about things" for i in range(3000)]
    train, held = C.split_documents(docs)
    assert train + held and not set(train) & set(held) and len(train) + len(held) == len(docs)
    assert 0.01 < len(held) / len(docs) < 0.03
    assert C.split_documents(list(reversed(docs)))[1] == list(reversed(held))  # by text, not by position


def test_packing_cuts_blocks_whose_labels_are_the_next_tokens():
    blocks = C.PackedBlocks([[5, 6, 7], [8, 9], [10, 11, 12, 13]], length=4, eos_id=1)
    stream = [5, 6, 7, 1, 8, 9, 1, 10, 11, 12, 13, 1]
    assert len(blocks) == 2 and blocks[0].tolist() == stream[:5] and blocks[1].tolist() == stream[5:10]
    batch = C.PackedBlocks.collate([blocks[0], blocks[1]])
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert batch["labels"][0].tolist() == stream[1:5]
    with pytest.raises(ValueError, match="fewer than one block"):
        C.PackedBlocks([[1, 2]], length=8, eos_id=1)


def test_bpe_tokenizer_is_deterministic_and_exactly_sized():
    from pad_moe.lm.tokenizer import train_bpe

    texts = C.vader_sentences()[:2000]
    a, b = train_bpe(texts, 400), train_bpe(texts, 400)
    assert len(a) == 400 and a.get_vocab() == b.get_vocab()
    assert (a.pad_token_id, a.eos_token_id, a.unk_token_id) == (0, 1, 2)
    ids = a("a wonderful, sad film", add_special_tokens=False)["input_ids"]
    assert a.decode(ids) == "a wonderful, sad film"
    with_sentinels = train_bpe(texts, 400, num_sentinels=8)
    assert len(with_sentinels) == 400 and with_sentinels.convert_tokens_to_ids("<extra_id_0>") == 399
    with pytest.raises(ValueError, match="too small"):
        train_bpe(texts, 100)


def test_corpora_are_read_and_missing_ones_named(tmp_path, monkeypatch):
    assert len(C.vader_sentences()) == 10605 + 4200 + 5190 + 3708
    (tmp_path / "a.txt").write_text("one line\n\n  two  \n")
    assert C.load_corpus("text", [str(tmp_path / "a.txt")]) == ["one line", "two"]
    with pytest.raises(ValueError, match="needs data.text_files"):
        C.load_corpus("text", [])
    with pytest.raises(ValueError, match="does not exist"):
        C.load_corpus("text", [str(tmp_path / "missing.txt")])
    with pytest.raises(ValueError, match="reads its own corpus"):
        C.load_corpus("vader", [str(tmp_path / "a.txt")])
    with pytest.raises(ValueError, match="apt-get install -y wordnet-base"):
        C.wordnet_glosses(str(tmp_path))
    wn = tmp_path / "wn"
    wn.mkdir()
    for name in C.WORDNET_FILES:
        (wn / name).write_text("  1 licence header | not a gloss\n00001740 00 a 01 able 0 000 | having the means; "
                               '"able to swim"\n')
    assert C.wordnet_glosses(str(wn)) == ['having the means; "able to swim"'] * 4


@pytest.mark.parametrize("overrides, message", [
    (["model.arch=causal_lm", "data.task=vader"], "exactly one of model.path"),
    (["model.preset=lm-debug", "model.path=/tmp"], "exactly one of model.path"),
    (["model.preset=lm-debug", "data.task=sst2"], "trains on a text corpus"),
    (["model.preset=lm-debug", "data.tokenizer=model"], "needs data.tokenizer=bpe"),
    (["model.preset=lm-debug", "data.max_length=128"], "exceeds model.max_seq_len=64"),
    (["model.preset=lm-debug", "moe.mode=static"], "model.family=llama"),
    (["model.preset=lm-debug", "model.family=gpt"], "model.family='gpt'"),
    (["model.preset=minilm-2l", "data.task=vader"], "trains on a text corpus"),
    (["data.tokenizer=bpe"], "data.tokenizer=bpe is for model.arch=causal_lm"),
])
def test_bad_lm_configs_are_one_line(overrides, message):
    from pad_moe.config import load_config

    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["moe.ep_size=2"], "moe.ep_size=2.*AutoEP"),
    (["moe.mode=pad", "moe.compact=true", "moe.granularity=neuron"], "moe.compact=True does not apply"),
    (["moe.mask_sharing=expert"], "moe.mask_sharing=expert does not apply"),
    (["moe.every=2"], "moe.every=2 does not apply"),
    (["moe.dispatch=capacity", "moe.drop_tokens=true"], "moe.(dispatch=capacity|drop_tokens=True) does not apply"),
    (["moe.activation=relu"], "moe.activation=relu does not apply"),
    (["moe.capacity_factor=2.0"], "moe.capacity_factor=2.0 does not apply"),
    (["moe.router_z_loss_coef=0.1"], "moe.router_z_loss_coef=0.1 does not apply"),
])
def test_moe_options_an_hf_moe_does_not_follow_are_refused_at_build(overrides, message):
    from pad_moe.config import load_config
    from pad_moe.lm.job import build_model

    cfg = load_config(None, ["model.preset=lm-debug", *overrides])
    with pytest.raises(ValueError, match=message):
        build_model(cfg, 320, 0)


def test_a_checkpoints_experts_and_top_k_are_not_overridden(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from pad_moe.config import load_config
    from pad_moe.lm.job import build_model

    MixtralForCausalLM(MixtralConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2)).save_pretrained(tmp_path)
    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={tmp_path}", "data.task=vader", "moe.mode=moe"])
    with pytest.raises(ValueError, match=f"moe.num_experts=8, moe.k=2 but {tmp_path} has 4 experts, top 2"):
        build_model(cfg, 320, 0)
    model, is_moe = build_model(load_config(None, ["model.arch=causal_lm", f"model.path={tmp_path}",
                                                   "data.task=vader", "moe.mode=pad", "moe.num_experts=4"]), 320, 0)
    assert is_moe and model.config.model_type == "mixtral"


COMMON = ["train.ds_config=configs/ds_zero2.json", "train.micro_batch_size=8", "train.steps=16", "train.lr=0.003",
          "train.log_every=4", "train.checkpoint_every=8", "data.max_train=256", "data.max_eval=16",
          "train.warmup_ratio=0.0"]


def _train(rank, world, out, name, overrides, resume):
    from pad_moe.config import load_config
    from pad_moe.train.loop import train

    cfg = load_config("configs/lm_debug.yaml", [f"output_dir={out}", f"name={name}", *COMMON, *overrides])
    return train(cfg, resume=resume)


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    summary = run_ranks(_train, 2, str(out), "moe", [], False, timeout=300)[0]
    return out, summary


def test_two_rank_causal_lm_learns_and_exports_a_hugging_face_folder(moe_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, summary = moe_run
    losses = summary["losses"]
    assert summary["world_size"] == 2 and len(losses) == 16
    assert sum(losses[-4:]) / 4 < 0.9 * sum(losses[:4]) / 4
    ppl = summary["eval"]["heldout"]["perplexity"]
    assert 1 < ppl < 320 and summary["main_metric"] == "perplexity"
    folder = out / "moe" / "hf_model"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == "mixtral" and len(AutoTokenizer.from_pretrained(folder)) == 320
    assert summary["exported"] == str(folder)


def test_causal_lm_resume_is_exact(moe_run):
    from pad_moe.testing.runs import cut_back_to

    out, summary = moe_run
    cut_back_to(out / "moe", 8)
    resumed = run_ranks(_train, 2, str(out), "moe", [], True, timeout=300)[0]
    assert resumed["start_step"] == 8
    assert resumed["losses"] == pytest.approx(summary["losses"], rel=1e-6, abs=1e-7)
    assert resumed["eval"]["heldout"]["perplexity"] == pytest.approx(summary["eval"]["heldout"]["perplexity"],
                                                                     rel=1e-6)


def test_pad_from_scratch_partitions_and_its_export_gives_the_reported_perplexity(tmp_path):
    import pad_moe
    from pad_moe.config import load_config
    from pad_moe.hfmoe.compress import perplexity
    from pad_moe.lm.job import build_causal_lm_job

    overrides = ["moe.mode=pad", "partition.kappa=0.5", "partition.iterations=2", "partition.num_batches=2",
                 "train.steps=8", "train.checkpoint_every=0"]
    summary = run_ranks(_train, 2, str(tmp_path), "pad", overrides, False, timeout=300)[0]
    record = summary["partition"]
    assert record["method"] == "imp" and abs(record["dynamic_per_round"][-1] / record["total_entries"] - 0.5) < 1e-3
    assert summary["params_compact"] < summary["params_training"]
    deployed = pad_moe.load_deployed(str(tmp_path / "pad" / "deployed"))
    meta = json.loads((tmp_path / "pad" / "deployed" / "pad_deploy.json").read_text())
    assert meta["params_stored"] == summary["params_compact"]  # φ (one per MoE layer) folded: counted by neither
    cfg = load_config("configs/lm_debug.yaml", [f"output_dir={tmp_path}", *COMMON, *overrides])
    job = build_causal_lm_job(cfg, 0)
    assert perplexity(deployed, job.eval_sets["heldout"])["perplexity"] == pytest.approx(
        summary["eval"]["heldout"]["perplexity"], rel=1e-4)
    assert os.path.isfile(tmp_path / "pad" / "deployed" / "tokenizer.json")


def _train_folder(rank, world, out, folder):
    from pad_moe.config import load_config
    from pad_moe.train.loop import train

    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={folder}", "data.task=vader", "data.max_length=32",
                             "data.max_train=128", "data.max_eval=8", "moe.mode=pad", "moe.num_experts=4",
                             "partition.warmup_steps=3", "partition.iterations=2", "partition.num_batches=2",
                             "train.ds_config=configs/ds_zero2.json", "train.micro_batch_size=8", "train.steps=6",
                             "train.lr=0.003", f"output_dir={out}", "name=dense"])
    return train(cfg)


def test_a_dense_decoder_folder_with_its_own_tokenizer_is_upcycled_and_trained(tmp_path):
    """model.path: a local Llama folder (its tokenizer saved beside it) upcycled to PAD, partitioned after warm-up."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pad_moe.lm.tokenizer import train_bpe

    tokenizer = train_bpe(C.vader_sentences()[:1500], 300)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    summary = run_ranks(_train_folder, 1, str(tmp_path), str(tmp_path / "llama"), timeout=300)[0]
    assert len(summary["losses"]) == 6 and summary["partition"]["warmup_steps"] == 3
    assert summary["params_compact"] < summary["params_training"]
    assert 1 < summary["eval"]["heldout"]["perplexity"] < 300
    assert "exported" not in summary  # an upcycled dense model stays in its checkpoints


def test_an_encoder_folder_is_refused_as_a_causal_lm(tmp_path):
    """A BERT folder loads as BertLMHeadModel, which attends to later tokens: it would train on its own labels."""
    from transformers import BertConfig, BertForMaskedLM

    from pad_moe.config import load_config
    from pad_moe.lm.job import build_model

    BertForMaskedLM(BertConfig(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=4)).save_pretrained(tmp_path)
    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={tmp_path}", "data.task=vader",
                             "data.tokenizer=bpe", "moe.mode=moe"])
    with pytest.raises(ValueError, match="is not causal .*model.arch=hf") as err:
        build_model(cfg, 320, 0)
    assert "\n" not in str(err.value)
    model, _ = build_model(load_config(None, ["model.preset=lm-debug"]), 320, 0)  # a decoder passes
    assert model.config.model_type == "mixtral"
