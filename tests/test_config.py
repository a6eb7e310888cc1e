"""The config tree, presets, overrides, and every shipped file in configs/."""

import glob
import json
import os

import pytest
import yaml

from pad_moe.config import RunConfig, load_config, save_config, to_dict
from pad_moe.distributed import UsageError, build_ds_config
from pad_moe.presets import MODEL_PRESETS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAML_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
JSON_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.json")))


def test_configs_directory_is_not_empty():
    assert YAML_CONFIGS and JSON_CONFIGS


@pytest.mark.parametrize("path", YAML_CONFIGS, ids=os.path.basename)
def test_every_yaml_config_resolves_and_its_ds_config_builds(path):
    cfg = load_config(path)
    ds = build_ds_config(cfg, world=max(2, cfg.moe.ep_size), total_steps=10)
    assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * max(2, cfg.moe.ep_size)


@pytest.mark.parametrize("path", JSON_CONFIGS, ids=os.path.basename)
def test_every_deepspeed_json_is_valid_for_deepspeed_and_carries_no_batch_size(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    with open(path) as f:
        raw = json.load(f)
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} & set(raw)
    cfg = load_config(None, [f"train.ds_config={path}"])
    ds = build_ds_config(cfg, world=1, total_steps=10)
    parsed = DeepSpeedConfig(ds)  # DeepSpeed's own validation (world size 1 without an initialised group)
    assert parsed.zero_optimization_stage == raw["zero_optimization"]["stage"]


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_every_preset_resolves(preset):
    cfg = load_config(None, [f"model.preset={preset}"])
    for key, value in MODEL_PRESETS[preset]["model"].items():  # a pretrained model's preset names few sizes
        assert getattr(cfg.model, key) == value
    assert None not in (cfg.model.hidden_size, cfg.model.ffn_size, cfg.model.num_layers, cfg.model.num_heads,
                        cfg.model.vocab_size, cfg.model.max_seq_len)  # the rest from its config.json


def test_overrides_win_over_presets_and_the_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["model.hidden_size=48", "moe.num_experts=2", "train.betas=[0.9, 0.95]"])
    assert cfg.model.hidden_size == 48 and cfg.moe.num_experts == 2 and cfg.train.betas == (0.9, 0.95)
    path = tmp_path / "config.yaml"
    save_config(cfg, str(path))
    again = load_config(str(path))
    assert to_dict(again) == to_dict(cfg)
    assert isinstance(again, RunConfig)
    assert load_config(None, ["train.lr=3e-3"]).train.lr == 0.003  # YAML 1.1 reads 3e-3 as a string


@pytest.mark.parametrize("override,match", [
    ("moe.ep_size=3", "moe.num_experts=4 is not divisible by moe.ep_size=3"),
    ("moe.k=3", "moe.k=3"),
    ("partition.kappa=1.5", r"partition.kappa=1.5 must be in \(0, 1\]"),
    ("partition.kappa=0", "partition.kappa=0"),
    ("partition.iterations=0", "partition.iterations=0 must be >= 1"),
    ("moe.mode=dense", "moe.mode='dense' is not allowed"),
    ("moe.granularity=block", "moe.granularity='block'"),
    ("model.preset=nope", "model.preset='nope' does not exist"),
    ("moe.nope=1", "unknown config key moe.nope"),
    ("model.hidden_size=31", "not divisible by model.num_heads"),
    ("moe.compact=true", "moe.compact=true needs moe.granularity=neuron"),
    ("train.dtype=fp8", "train.dtype='fp8'"),
    ("justakey", "is not key=value"),
    ("train.lr=fast", "train.lr='fast' is not a number"),
    ("train.steps=2.5", "train.steps=2.5 is not an integer"),
    ("moe.drop_tokens=maybe", "moe.drop_tokens='maybe' is not true/false"),
])
def test_bad_values_raise_one_line_errors_naming_the_value(override, match):
    with pytest.raises(ValueError, match=match) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_bad_files_raise_naming_the_path(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(bad))
    batch = tmp_path / "ds.json"
    batch.write_text(json.dumps({"train_batch_size": 8, "zero_optimization": {"stage": 1}}))
    with pytest.raises(UsageError, match="train_batch_size"):
        build_ds_config(load_config(None, [f"train.ds_config={batch}"]), 1, 10)
    with pytest.raises(UsageError, match="ZeRO stage 3 does not support DeepSpeed.s native MoE layers"):
        build_ds_config(load_config(None, ["train.zero_stage=3"]), 1, 10)


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("name: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError):
        load_config(str(evil))
    assert yaml.safe_load("a: 1") == {"a": 1}
