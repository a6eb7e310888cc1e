"""Upcycled models route dropless unless moe.drop_tokens=true asks for capacity dispatch, so through the config
path an upcycled model computes its dense original at init; models built from scratch keep capacity dispatch."""

import pytest
import torch
from test_hf_sizes import SST2, make_tiny_bert

from pad_moe.config import load_config, save_config
from pad_moe.presets import MODEL_PRESETS

HF_PRESETS = sorted(name for name, p in MODEL_PRESETS.items() if p["model"].get("arch") == "hf")


def test_there_are_hf_presets():
    assert {"bert-base", "roberta-base", "albert-base", "electra-base", "minilm", "minilm-2l"} <= set(HF_PRESETS)


@pytest.mark.parametrize("preset", HF_PRESETS)
def test_every_hf_preset_resolves_dropless(preset, tmp_path):
    cfg = load_config(None, [f"model.preset={preset}"])
    assert cfg.moe.drop_tokens is False
    save_config(cfg, str(tmp_path / "config.yaml"))  # the run's config.yaml holds the resolved value
    assert "drop_tokens: false" in (tmp_path / "config.yaml").read_text()


def test_models_built_from_scratch_keep_capacity_dispatch_and_an_explicit_choice_wins():
    assert load_config(None, []).moe.drop_tokens is True  # toy
    assert load_config(None, ["model.preset=switch-debug"]).moe.drop_tokens is True
    assert load_config(None, ["model.preset=bert-base", "moe.drop_tokens=true"]).moe.drop_tokens is True
    assert load_config(None, ["moe.drop_tokens=false"]).moe.drop_tokens is False


def test_upcycle_from_config_of_an_unresolved_moe_config_is_dropless():
    from transformers import BertConfig, BertForSequenceClassification

    from pad_moe.config import MoEConfig
    from pad_moe.models import upcycle_from_config, upcycle_info

    model = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                     num_attention_heads=2, intermediate_size=32))
    upcycle_from_config(model, MoEConfig(mode="moe", num_experts=4))
    info = upcycle_info(model)
    assert info.block_kwargs["drop_tokens"] is False and info.moe_config["drop_tokens"] is False


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    # weights 10x BERT's init scale: the FFN moves the logits by O(1), so a dropped route is plain to see
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), num_hidden_layers=2, initializer_range=0.2)


def _init_logits(tiny_bert, *overrides, train: bool = False):
    """(upcycled job's logits, dense model's logits) at init on the 6 training sentences cut to 8 tokens (no padding:
    every routed token is a real one)."""
    from transformers import AutoModelForSequenceClassification

    from pad_moe.train.job import build_job

    cfg = load_config(None, ["model.arch=hf", f"model.path={tiny_bert}", *SST2, "data.max_length=8", *overrides])
    job = build_job(cfg, 0)
    batch = job.collate([job.train_set[i] for i in range(len(job.train_set))])
    assert batch["attention_mask"].all()
    dense = AutoModelForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    torch.manual_seed(0)  # the second expert's Gumbel sampling (training mode)
    with torch.no_grad():
        logits, _ = job.forward(job.model.train(train), batch)
        want = dense(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return logits, want


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", ["moe", "pad"])
def test_an_upcycled_model_built_from_the_config_is_its_dense_original_at_init(tiny_bert, mode, train):
    logits, want = _init_logits(tiny_bert, f"moe.mode={mode}", train=train)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["moe", "pad"])
def test_capacity_dispatch_stays_an_explicit_choice_that_drops_tokens(tiny_bert, mode):
    """moe.drop_tokens=true is honoured. With 4 experts and min_capacity 0 (what an hf run without a preset got from
    the debug preset before) routes over capacity are dropped and the upcycled model is not the dense one."""
    logits, want = _init_logits(tiny_bert, f"moe.mode={mode}", "moe.drop_tokens=true", "moe.num_experts=4",
                                "moe.min_capacity=0")
    assert (logits - want).abs().max() > 1e-2
