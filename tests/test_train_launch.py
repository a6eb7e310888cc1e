"""End to end through the real ``deepspeed`` launcher: 2 CPU ranks, ep_size 2, ZeRO-2, IMP, checkpoints, exact
resume, TensorBoard, and bad input (exit status 2, run directory untouched)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest

from pad_moe.testing.ranks import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "3",
       "PYTHONUNBUFFERED": "1"}


def launch(args, ranks=2, check=True):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "pad_moe.cli",
           "train", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def padmoe(args):
    return subprocess.run([sys.executable, "-m", "pad_moe", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    common = ["configs/debug.yaml", f"output_dir={out}", "name=e2e", "train.steps=12", "train.checkpoint_every=6",
              "train.log_every=3"]
    launch(common)
    run_dir = out / "e2e"
    with open(run_dir / "summary.json") as f:
        full = json.load(f)
    return {"out": out, "dir": run_dir, "common": common, "full": full}


def test_two_rank_training_decreases_the_loss_and_writes_a_checkpoint(run):
    losses = run["full"]["losses"]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    assert run["full"]["world_size"] == 2
    assert os.path.isfile(run["dir"] / "checkpoints" / "step12" / "mp_rank_00_model_states.pt")
    assert glob.glob(str(run["dir"] / "checkpoints" / "step12" / "layer_*_expert_*_mp_rank_00_model_states.pt"))
    dynamics = run["full"]["dynamics"]  # paper Fig. 6 at the end: trained experts differ -> variance across tokens
    assert dynamics["dynamics/parameter_variance/0"] > 0 and dynamics["dynamics/output_variance/0"] > 0
    record = run["full"]["partition"]
    assert record is not None and os.path.isfile(run["dir"] / "partition" / "record.json")


def test_tensorboard_has_losses_lambdas_ratios_and_expert_load(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(str(run["dir"] / "tensorboard" / "**" / "events.out.tfevents.*"), recursive=True)
    assert files
    tags = set()
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    for want in ("train/loss", "train/aux_loss", "train/lr", "pad/lambda_d/0", "pad/dynamic_ratio/1",
                 "expert_load/layer0/e0", "perf/tokens_per_s", "eval/eval/accuracy",
                 "dynamics/parameter_variance/0", "dynamics/output_variance/1"):
        assert want in tags, (want, sorted(tags)[:20])


def test_plot_run_renders_the_dashboards(run, tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "plot_run.py"), str(run["dir"]), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    for name in ("losses.png", "expert_load.png", "pad.png", "dynamics.png"):
        assert (tmp_path / name).stat().st_size > 10_000


def test_resume_reproduces_the_uninterrupted_losses(run):
    ckpt = run["dir"] / "checkpoints"
    shutil.rmtree(ckpt / "step12")
    (ckpt / "latest").write_text("step6")
    launch([*run["common"], "--resume"])
    with open(run["dir"] / "summary.json") as f:
        resumed = json.load(f)
    assert resumed["start_step"] == 6
    assert resumed["losses"] == pytest.approx(run["full"]["losses"], rel=1e-5, abs=1e-6)  # history from step 1


def test_bad_input_exits_2_with_one_line_and_leaves_the_run_alone(run):
    config = run["dir"] / "config.yaml"
    before = config.read_text(), os.path.getmtime(config)
    again = padmoe(["train", *run["common"]])  # the run exists: refuse, do not overwrite
    assert again.returncode == 2 and "already holds a run" in again.stderr
    other = padmoe(["train", *run["common"], "partition.kappa=0.3", "--resume"])
    assert other.returncode == 2 and "partition.kappa" in other.stderr
    bad = padmoe(["train", "configs/debug.yaml", f"output_dir={run['out']}", "name=x", "moe.ep_size=3"])
    assert bad.returncode == 2 and "moe.ep_size=3" in bad.stderr
    assert len([ln for ln in bad.stderr.splitlines() if ln.startswith("padmoe: error")]) == 1
    assert (config.read_text(), os.path.getmtime(config)) == before
    assert not os.path.exists(run["out"] / "x")
