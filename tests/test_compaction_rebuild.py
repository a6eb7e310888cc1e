"""In-place compaction after the warm-up partition (moe.compact with partition.warmup_steps > 0): the engine is rebuilt
around the narrower layers and carries the kept entries' optimizer state, so the run trains exactly as the uncompacted
PAD run with the same masks does, at the compacted size; resumes before and after the rebuild are exact.
One rank through the console path; 2 gloo ranks (expert parallel 2, ZeRO-2) under the deepspeed launcher."""

import os
import shutil
import subprocess
import sys

import pytest

from pad_moe.testing.runs import cut_back_to, launch_train
from pad_moe.testing.runs import read_summary as summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "2"}
WARM = ("model.preset=debug-neuron", "partition.warmup_steps=2", "train.steps=6", "train.log_every=100",
        "train.eval_every=100")


def train(out, name, *extra, ranks=1):
    return launch_train(["configs/debug.yaml", f"output_dir={out}", f"name={name}", *WARM,
                         *(["moe.ep_size=1"] if ranks == 1 else []), *extra], ranks)


def test_compacting_after_warmup_trains_as_the_uncompacted_run_and_resumes_exactly(tmp_path):
    train(tmp_path, "full", "moe.compact=false")
    train(tmp_path, "compact", "train.checkpoint_every=1", "train.keep_checkpoints=0")
    full, compact = summary(tmp_path / "full"), summary(tmp_path / "compact")
    # the same function after the rebuild: Adam's moments of the kept entries, its step and the schedule carried over
    assert compact["losses"] == pytest.approx(full["losses"], rel=2e-5, abs=1e-6)
    split = next(iter(full["eval"]))
    assert compact["eval"][split]["accuracy"] == pytest.approx(full["eval"][split]["accuracy"], abs=1e-9)
    assert compact["params_training"] == compact["params_compact"] < full["params_training"]
    assert compact["params_compact"] == full["params_compact"]  # the same stored model
    _resume_from(tmp_path, compact, 4)  # past the rebuild: the resume compacts to the saved partition first


def _resume_from(tmp_path, compact, cut):
    run = tmp_path / f"cut{cut}"
    shutil.copytree(tmp_path / "compact", run)
    cut_back_to(run, cut)
    train(tmp_path, f"cut{cut}", "train.checkpoint_every=1", "train.keep_checkpoints=0", "--resume")
    assert summary(run)["losses"] == pytest.approx(compact["losses"], rel=1e-6, abs=1e-7), cut
    assert summary(run)["params_training"] == compact["params_training"]


@pytest.mark.slow
def test_a_resume_at_the_warmup_step_partitions_compacts_and_rebuilds_as_the_uninterrupted_run(tmp_path):
    train(tmp_path, "compact", "train.checkpoint_every=1", "train.keep_checkpoints=0")
    _resume_from(tmp_path, summary(tmp_path / "compact"), 2)  # the partition has not run yet at step 2


@pytest.mark.slow
def test_compacting_after_warmup_on_two_expert_parallel_ranks(tmp_path):
    train(tmp_path, "full", "moe.compact=false", ranks=2)
    train(tmp_path, "compact", ranks=2)
    full, compact = summary(tmp_path / "full"), summary(tmp_path / "compact")
    assert compact["losses"] == pytest.approx(full["losses"], rel=2e-5, abs=1e-6)
    assert compact["params_training"] < full["params_training"]


def test_rebuild_needs_a_readable_optimizer(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pad_moe", "train", "configs/debug.yaml", f"output_dir={tmp_path}",
                           "name=bad", *WARM, "moe.ep_size=1", "train.ds_config=configs/ds_zero0.json",
                           "train.dtype=bf16"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "needs ZeRO 1 or 2 (or ZeRO 0 in fp32); this run has ZeRO 0 with train.dtype=bf16" in proc.stderr
    assert not (tmp_path / "bad").exists()


DROPLESS = ("moe.dispatch=dropless", "moe.drop_tokens=false", "moe.second_expert_sampling=false",
            "moe.aux_loss_coef=0")  # no aux loss: its per-rank token statistics differ between layouts


@pytest.mark.slow
def test_dropless_run_resharded_from_ep2_resumes_as_the_uninterrupted_run(tmp_path):
    """A dropless PAD run checkpointed at ep 2 on 2 ranks, resharded (padmoe reshard) to ep 1 on one process and to
    ep 4 on 4 ranks, continues with the uninterrupted run's losses (same global batches: micro-batch scaled)."""
    from pad_moe.deploy.reshard import reshard_main

    common = ["configs/debug.yaml", f"output_dir={tmp_path}", "train.steps=8", "train.checkpoint_every=4",
              "train.keep_checkpoints=0", "train.log_every=100", "train.eval_every=100", *DROPLESS]

    launch = launch_train
    launch([*common, "name=ref"], 2)
    reference = summary(tmp_path / "ref")["losses"]
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "ref", cut)
    cut_back_to(cut, 4)
    for ep, world in ((1, 1), (4, 4)):
        out = tmp_path / f"ep{ep}"
        assert reshard_main([str(cut), "--ep", str(ep), "--world", str(world), "--out", str(out)]) == 0
        launch([str(out / "config.yaml"), "train.steps=8", "--resume"], world)
        got = summary(out)
        assert (got["start_step"], got["world_size"]) == (4, world)
        assert got["losses"][4:] == pytest.approx(reference[4:], rel=2e-5, abs=1e-6), (ep, got["losses"], reference)
