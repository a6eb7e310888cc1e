"""A pretrained model's sizes come from its own config.json: unset ones are filled from it, contradicting ones (from
a preset or set explicitly) are refused naming both values; model.num_layers may select the first N layers."""

import pytest
import torch
from test_train_launch import ROOT, padmoe

from pad_moe.config import load_config, save_config, to_dict

FIXTURES = f"{ROOT}/tests/fixtures/data"
SST2 = [f"data.data_files={{train: {FIXTURES}/sst2_train.tsv, validation: {FIXTURES}/sst2_dev.tsv}}",
        "data.task=sst2", "data.max_length=16"]
# sizes unlike the debug preset's (H=32, F=64, 2 layers, 2 heads, vocab 64, 16 positions)
TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=40)


def make_tiny_bert(path, **sizes):
    """A BERT sequence classifier (2 labels, no dropout) with the MiniLM tokenizer, saved at ``path``."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pad_moe.models import minilm_dir

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    config = BertConfig(vocab_size=len(tokenizer), num_labels=2, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, **{**TINY, **sizes})
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def hf(tiny_bert, *overrides):
    return load_config(None, ["model.arch=hf", f"model.path={tiny_bert}", *SST2, *overrides])


def refused(fn, *parts):
    with pytest.raises(ValueError) as err:
        fn()
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in parts), message
    return message


def test_without_a_preset_the_sizes_are_the_checkpoints_and_moe_takes_its_own_defaults(tiny_bert, tmp_path):
    cfg = hf(tiny_bert)
    m = cfg.model
    assert (m.hidden_size, m.ffn_size, m.num_layers, m.num_heads, m.vocab_size, m.max_seq_len) == (
        48, 96, 3, 4, 30522, 40)
    assert m.preset is None
    assert (cfg.moe.num_experts, cfg.moe.k, cfg.moe.min_capacity) == (8, 2, 4)  # MoEConfig's, not debug's 4 experts
    save_config(cfg, str(tmp_path / "config.yaml"))  # saved resolved; loading it again gives the same tree
    assert to_dict(load_config(str(tmp_path / "config.yaml"))) == to_dict(cfg)


def test_num_layers_selects_the_first_layers_but_not_more_than_the_checkpoint_has(tiny_bert):
    assert hf(tiny_bert, "model.num_layers=2").model.num_layers == 2
    refused(lambda: hf(tiny_bert, "model.num_layers=5"), "model.num_layers=5", "num_hidden_layers=3")


@pytest.mark.parametrize("override,ours,theirs", [
    ("model.hidden_size=32", "model.hidden_size=32", "hidden_size=48"),
    ("model.ffn_size=64", "model.ffn_size=64", "intermediate_size=96"),
    ("model.num_heads=2", "model.num_heads=2", "num_attention_heads=4"),
    ("model.vocab_size=64", "model.vocab_size=64", "vocab_size=30522"),
    ("model.max_seq_len=512", "model.max_seq_len=512", "max_position_embeddings=40"),
])
def test_an_explicit_size_that_contradicts_the_checkpoint_is_refused_naming_both(tiny_bert, override, ours, theirs):
    refused(lambda: hf(tiny_bert, override), ours, theirs, "config.json")


def test_a_preset_that_contradicts_the_checkpoint_is_refused(tiny_bert):
    refused(lambda: hf(tiny_bert, "model.preset=bert-base"), "model.hidden_size=768 (model.preset=bert-base)",
            "hidden_size=48")
    refused(lambda: hf(tiny_bert, "model.preset=debug"), "model.preset=debug is a model.arch=toy preset",
            "model.arch=hf")
    cfg = hf(tiny_bert, "model.preset=minilm-2l")  # a recipe (2 layers, mean pooling, 8 experts) for any encoder
    assert (cfg.model.hidden_size, cfg.model.num_layers, cfg.model.pooling, cfg.moe.num_experts) == (48, 2, "mean", 8)


def test_an_hf_model_needs_its_directory():
    refused(lambda: load_config(None, ["model.arch=hf", *SST2]), "model.arch=hf needs model.path")
    refused(lambda: load_config(None, ["model.arch=hf", "model.path=/nonexistent/model", *SST2]),
            "/nonexistent/model", "no config.json")


def test_a_published_preset_without_a_checkpoint_counts_but_does_not_train():
    from pad_moe.train.job import build_job

    cfg = load_config(None, ["model.preset=bert-base", *SST2])  # counting / planning from the published sizes
    assert (cfg.model.hidden_size, cfg.model.num_layers) == (768, 12)
    refused(lambda: build_job(cfg, 0), "model.arch=hf needs model.path")


def test_the_minilm_presets_take_minilm_s_sizes():
    cfg = load_config(None, ["model.preset=minilm-2l"])
    m = cfg.model
    assert (m.hidden_size, m.ffn_size, m.num_layers, m.num_heads, m.max_seq_len) == (384, 1536, 2, 12, 512)
    assert load_config(None, ["model.preset=minilm"]).model.num_layers == 6


def test_the_job_builds_the_checkpoint_s_layers_with_the_moe_defaults(tiny_bert):
    from pad_moe.models import upcycle_info
    from pad_moe.train.job import build_job

    job = build_job(hf(tiny_bert, "moe.mode=moe"), 0)
    assert len(job.model.bert.encoder.layer) == 3
    info = upcycle_info(job.model)
    assert (info.num_experts, info.k, info.block_kwargs["drop_tokens"]) == (8, 2, False)
    two = build_job(hf(tiny_bert, "moe.mode=static", "model.num_layers=2"), 0)
    assert len(two.model.bert.encoder.layer) == 2


def test_cli_refuses_a_contradicting_size_before_writing_anything(tiny_bert, tmp_path):
    proc = padmoe(["train", "configs/minilm_vader.yaml", f"output_dir={tmp_path}", "moe.ep_size=1",
                   f"model.path={tiny_bert}", "model.hidden_size=384"])
    assert proc.returncode == 2
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("padmoe: error:")]
    assert line and "model.hidden_size=384" in line[0] and "hidden_size=48" in line[0], proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("task", ["synthetic", "span_corruption"])
def test_an_hf_job_refuses_the_toy_and_switch_tasks(tiny_bert, task):
    from pad_moe.train.job import build_job

    cfg = load_config(None, ["model.arch=hf", f"model.path={tiny_bert}", f"data.task={task}"])
    refused(lambda: build_job(cfg, 0), f"data.task={task} is not a task for model.arch=hf")
