"""The prepared GPU check is runnable: the script parses, and without a GPU the layer check says so (exit 2)."""

import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_check_script_parses_and_names_its_steps():
    assert subprocess.run(["bash", "-n", "tools/gpu_check.sh"], cwd=REPO).returncode == 0
    text = open(os.path.join(REPO, "tools", "gpu_check.sh")).read()
    for step in ("gpu_layer_check.py", "--num_gpus 1", "bench_dropless.py --device cuda --dtype bf16",
                 "bench_deployed.py --device cuda --dtype bf16"):
        assert step in text


def test_layer_check_refuses_in_one_line_without_a_gpu():
    if torch.cuda.is_available():  # on a GPU machine it runs the checks instead: they must pass
        proc = subprocess.run([sys.executable, "tools/gpu_layer_check.py"], cwd=REPO, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout
        return
    proc = subprocess.run([sys.executable, "tools/gpu_layer_check.py"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
