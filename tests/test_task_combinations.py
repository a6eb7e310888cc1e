"""A data.task the model cannot train is refused in one line; a GLUE task with no hub and no local files names
data.data_files (offline it fails at once, before anything is written)."""

import os
import time

import pytest
from test_train_launch import ENV, ROOT

from pad_moe.config import load_config


def refused(overrides, *parts):
    with pytest.raises(ValueError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert "\n" not in message and all(p in message for p in parts), message


@pytest.mark.parametrize("task", ["sst2", "mnli", "vader-movies", "span_corruption"])
def test_the_toy_model_trains_only_the_synthetic_task(task):
    refused([f"data.task={task}"], "model.arch=toy trains only data.task=synthetic", f"data.task={task}",
            "model.arch=hf")
    refused(["model.preset=debug-neuron", f"data.task={task}"], "model.arch=toy trains only data.task=synthetic")


def test_a_vision_run_refuses_a_data_task():
    refused(["model.arch=vision", "data.task=sst2"], "model.arch=vision reads vision.dataset", "data.task=sst2")


def test_a_glue_task_offline_without_files_names_data_files_and_writes_nothing(tmp_path):
    import subprocess
    import sys

    env = {**ENV, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "runs"
    args = ["train", "configs/minilm_vader.yaml", f"output_dir={out}", "moe.ep_size=1", "data.task=sst2"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pad_moe", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = [ln for ln in proc.stderr.splitlines() if ln.startswith("padmoe: error:")]
    assert line and "GLUE task sst2" in line[0] and "data.data_files={train: PATH, validation: PATH}" in line[0]
    assert not os.path.exists(out)
    assert time.monotonic() - start < 120  # no hub retries (they take ~25 s per try)
