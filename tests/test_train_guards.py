"""Starts that cannot do what their options say stop with one line (exit 2) before anything is on disk; a run that
diverges stops with one line instead of training on NaN and exiting 0. One rank, the console path."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2"}
BASE = ["train", "configs/debug.yaml", "moe.ep_size=1", "train.log_every=100", "train.eval_every=100"]


def main(argv):
    proc = subprocess.run([sys.executable, "-m", "pad_moe", *argv], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    main.err = proc.stderr
    return proc.returncode


def run(tmp_path, *extra):
    code = main([*BASE, f"output_dir={tmp_path}", *extra])
    return code, main.err.strip().splitlines()


def error_line(lines):
    errors = [ln for ln in lines if ln.startswith("padmoe")]
    assert len(errors) == 1 and not any("Traceback" in ln for ln in lines), lines
    return errors[0]


@pytest.mark.parametrize("steps,warmup", [(4, 4), (4, 9)])
def test_a_pad_run_whose_warmup_outlasts_it_is_refused(tmp_path, steps, warmup):
    code, err = run(tmp_path, "name=w", f"train.steps={steps}", f"partition.warmup_steps={warmup}")
    assert code == 2 and f"partition.warmup_steps={warmup}" in error_line(err) and "plain MoE" in error_line(err)
    assert not any(tmp_path.iterdir())


def test_the_same_warmup_is_fine_for_an_moe_run(tmp_path):
    code, _ = run(tmp_path, "name=m", "moe.mode=moe", "train.steps=2", "partition.warmup_steps=4")
    assert code == 0 and (tmp_path / "m" / "summary.json").is_file()


def test_a_bad_deepspeed_key_is_one_line_before_the_run_dir_exists(tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "bogus_key": 1}}))
    out = tmp_path / "runs"
    code = main([*BASE, f"output_dir={out}", "name=d", f"train.ds_config={ds}"])
    line = error_line(main.err.strip().splitlines())
    assert code == 2 and "bogus_key" in line and str(ds) in line
    assert not out.exists()


def test_a_diverging_run_stops_with_one_line(tmp_path):
    code, err = run(tmp_path, "name=div", "train.steps=6", "train.lr=1e30")
    line = error_line(err)
    assert code == 2 and "nan" in line and "train.lr" in line
    assert not (tmp_path / "div" / "summary.json").exists()  # no summary that looks like a result


def test_resume_before_any_checkpoint_is_one_line(tmp_path):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    code0, _ = run(tmp_path, "name=r0", "train.steps=2")
    assert code0 == 0
    os.rename(tmp_path / "r0" / "config.yaml", run_dir / "config.yaml")
    code, err = run(tmp_path, "name=r", "train.steps=2", "--resume")
    assert code == 2 and "no complete checkpoint" in error_line(err)
    assert sorted(os.listdir(run_dir)) == ["config.yaml"]
