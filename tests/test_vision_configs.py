"""Every shipped configs/vision_*.yaml validates: its ``vision`` section builds a VisionConfig, and the whole file
loads as a run config once the trainer knows the ``vision`` section."""

import dataclasses
import glob
import os

import pytest
import yaml

from pad_moe.config import RunConfig, load_config
from pad_moe.vision.config import VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "vision_*.yaml")))


def test_there_are_vision_configs():
    assert len(CONFIGS) >= 3


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_vision_config_file_validates(path):
    with open(path) as f:
        data = yaml.safe_load(f)
    vision = VisionConfig(**data["vision"])
    assert data["model"]["arch"] == "vision"
    assert vision.conv in ("static", "condconv", "dyconv", "pad")
    assert float(data["train"]["weight_decay"]) == vision.weight_decay  # the paper's value for this model family
    assert (data["train"]["optimizer"], data["train"]["momentum"], data["train"]["schedule"]) == ("sgd", 0.9, "cosine")
    if "vision" in {f.name for f in dataclasses.fields(RunConfig)}:  # wired by the trainer
        cfg = load_config(path)
        assert cfg.vision == vision
