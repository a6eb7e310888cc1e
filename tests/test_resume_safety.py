"""Resume is exact from any step, a crash at any stage of a save loses nothing, and checkpoints load weights-only.

2 real ranks through the ``deepspeed`` launcher (ep_size 2, ZeRO-2), a PAD run that trains fully dynamic for 4 steps,
partitions, and checkpoints every 3 steps: the reference run is compared with runs that were cut short.
"""

import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from pad_moe.testing.ranks import free_port
from pad_moe.testing.runs import cut_back_to
from pad_moe.train import checkpoints as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2",
       "PYTHONUNBUFFERED": "1"}
STEPS, EVERY, WARMUP = 9, 3, 4


def common(out, name):
    return ["configs/debug.yaml", f"output_dir={out}", f"name={name}", f"train.steps={STEPS}",
            f"train.checkpoint_every={EVERY}", f"partition.warmup_steps={WARMUP}", "train.keep_checkpoints=0",
            "train.log_every=3", "train.eval_every=100"]


def launch(args, env=None):
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "pad_moe.cli", "train", *args]
    return subprocess.run(cmd, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=600)


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def summary(run_dir):
    with open(os.path.join(run_dir, "summary.json")) as f:
        return json.load(f)


def masks(run_dir):
    out = {}
    for r in (0, 1):
        out.update(load_file(os.path.join(run_dir, "partition", f"masks-rank{r}.safetensors")))
    return out


def assert_same_run(run_dir, ref_dir):
    got, want = summary(run_dir), summary(ref_dir)
    assert len(got["losses"]) == STEPS  # the history from step 1 survives the resume
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-6, abs=1e-7)
    assert got["eval"] == want["eval"]
    for key in ("kappa", "dynamic_per_round", "layer_ratios"):
        assert got["partition"][key] == want["partition"][key]
    assert {k: v for k, v in got.items() if "param" in k} == {k: v for k, v in want.items() if "param" in k}
    a, b = masks(run_dir), masks(ref_dir)
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    ok(launch(common(out, "ref")))
    return out, out / "ref"


def test_resume_from_before_the_warmup_partition_partitions_and_is_exact(reference):
    out, ref = reference
    run = out / "pre"
    shutil.copytree(ref, run)
    cut_back_to(run, 3)  # step 3 < warmup 4: its masks are all ones; RUN_DIR/partition is from the later partition
    proc = ok(launch([*common(out, "pre"), "--resume"]))
    assert summary(run)["start_step"] == 3
    assert summary(run)["partition"]["dynamic_per_round"][-1] < summary(run)["partition"]["total_entries"]
    assert_same_run(run, ref)
    assert "Traceback" not in proc.stderr


@pytest.mark.slow  # the finished-run and after-partition resumes are also covered on one rank (test_resume_variants)
def test_resume_after_the_partition_is_exact_and_a_finished_run_is_left_alone(reference):
    out, ref = reference
    run = out / "post"
    shutil.copytree(ref, run)
    cut_back_to(run, 6)
    ok(launch([*common(out, "post"), "--resume"]))
    assert_same_run(run, ref)
    before = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(run) for p in fs}
    again = ok(launch([*common(out, "post"), "--resume"]))
    assert "already finished at step 9" in again.stderr
    after = {p: os.path.getmtime(os.path.join(dp, p)) for dp, _, fs in os.walk(run) for p in fs}
    assert after == before and len(summary(run)["losses"]) == STEPS


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['PAD_MOE_TEST_MARKER']}",))


def test_a_planted_pickle_that_would_run_code_is_refused(reference, tmp_path):
    out, ref = reference
    run = out / "tampered"
    shutil.copytree(ref, run)
    cut_back_to(run, 6)
    marker = tmp_path / "code_ran"
    os.environ["PAD_MOE_TEST_MARKER"] = str(marker)
    tag_dir = run / "checkpoints" / "step6"
    with open(tag_dir / "mp_rank_00_model_states.pt", "wb") as f:
        pickle.dump({"module": _RunsCode()}, f)
    C.write_manifest(str(tag_dir), 6, 2)  # the attacker rewrites the manifest too
    proc = launch([*common(out, "tampered"), "--resume"])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "cannot be loaded safely" in proc.stderr and "mp_rank_00_model_states.pt" in proc.stderr
    assert not marker.exists()


# A crash at each stage of the save at step 6 (stage x rank; manifest and latest are rank 0's): the resume either falls
# back to step 3 or uses step 6, and in both cases ends exactly where the uninterrupted run did.
CELLS = [("engine", 1, "step3"), pytest.param("manifest", 0, "step6", marks=pytest.mark.slow),
         pytest.param("engine", 0, "step3", marks=pytest.mark.slow),
         pytest.param("rng", 0, "step3", marks=pytest.mark.slow),
         pytest.param("rng", 1, "step3", marks=pytest.mark.slow),
         pytest.param("latest", 0, "step6", marks=pytest.mark.slow)]


@pytest.mark.parametrize("stage,rank,resumed_from", CELLS)
def test_a_rank_killed_during_a_save_resumes_exactly(reference, stage, rank, resumed_from):
    out, ref = reference
    name = f"kill-{stage}-{rank}"
    crashed = launch(common(out, name), env={C.FAULT_ENV: f"{stage}:{rank}:6"})
    assert crashed.returncode != 0
    ckpt = out / name / "checkpoints"
    assert (ckpt / "latest").read_text() == ("step6" if stage == "latest" else "step3")
    proc = ok(launch([*common(out, name), "--resume"]))
    assert summary(out / name)["start_step"] == int(resumed_from[4:])
    if resumed_from == "step3":
        assert "skipping step6" in proc.stderr and "resuming from step3" in proc.stderr
    assert_same_run(out / name, ref)


def test_a_world_size_change_on_resume_is_one_line_pointing_to_reshard(reference):
    out, ref = reference
    run = out / "world"
    shutil.copytree(ref, run)
    cut_back_to(run, 6)
    before = sorted(os.listdir(run / "checkpoints"))
    proc = subprocess.run([sys.executable, "-m", "pad_moe", "train", *common(out, "world"), "--resume"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("padmoe")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert "written by 2 ranks, this launch has 1" in errors[0] and "padmoe reshard" in errors[0]
    assert sorted(os.listdir(run / "checkpoints")) == before
