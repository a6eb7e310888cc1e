"""Exact resume of the run variants whose masks shape the model or its scale factors (compacted neuron layers, MoE-P's
dropped static part), pruning through the trainer, a raised step count, and a finished run whose summary was lost.
One rank, the console path (``python -m pad_moe train``)."""

import os
import shutil

import pytest

from pad_moe.testing.runs import cut_back_to, launch_train
from pad_moe.testing.runs import read_summary as summary


def train(out, name, *extra):
    return launch_train(["configs/debug.yaml", f"output_dir={out}", f"name={name}", "moe.ep_size=1", "train.steps=6",
                         "train.log_every=100", "train.eval_every=100", *extra], timeout=300)


def same(run_dir, ref_dir):
    got, want = summary(run_dir), summary(ref_dir)
    assert got["losses"] == pytest.approx(want["losses"], rel=1e-6, abs=1e-7)
    assert got["eval"] == want["eval"]
    assert (got["params_training"], got["params_compact"]) == (want["params_training"], want["params_compact"])


def test_a_compacted_run_resumes_exactly_then_grows_and_a_lost_summary_is_rebuilt(tmp_path):
    extra = ("model.preset=debug-neuron", "train.checkpoint_every=2", "train.keep_checkpoints=0")
    train(tmp_path, "ref", *extra)
    ref, run = tmp_path / "ref", tmp_path / "run"
    shutil.copytree(ref, run)
    cut_back_to(run, 2)
    train(tmp_path, "run", *extra, "--resume")
    same(run, ref)
    assert summary(run)["params_compact"] == summary(run)["params_training"]  # compacted: trains at the stored size

    final = run / "checkpoints" / "step6" / "mp_rank_00_model_states.pt"
    stamp = os.path.getmtime(final)
    os.remove(run / "summary.json")  # a crash between the final checkpoint and the summary
    train(tmp_path, "run", *extra, "--resume")
    same(run, ref)
    assert os.path.getmtime(final) == stamp  # the final checkpoint is not written again
    before = {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(run) for f in fs}
    again = train(tmp_path, "run", *extra, "--resume")  # finished, summary intact: nothing is touched
    assert "already finished at step 6" in again.stderr
    assert before == {os.path.join(d, f): os.path.getmtime(os.path.join(d, f)) for d, _, fs in os.walk(run) for f in fs}

    grown = train(tmp_path, "run", *extra, "train.steps=8", "--resume")
    assert "train.steps 6 -> 8" in grown.stderr
    assert summary(run)["start_step"] == 6 and len(summary(run)["losses"]) == 8


def test_moe_p_resumes_exactly_after_its_partition_and_old_checkpoints_are_pruned(tmp_path):
    extra = ("partition.method=moe_p", "partition.warmup_steps=2", "train.checkpoint_every=1",
             "train.keep_checkpoints=2")
    train(tmp_path, "ref", *extra)
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert sorted(n for n in os.listdir(ref / "checkpoints") if n.startswith("step")) == ["step5", "step6"]
    shutil.copytree(ref, run)
    cut_back_to(run, 5)  # after the partition at step 2: λs = 0 is not in the model's state and must be dropped again
    train(tmp_path, "run", *extra, "--resume")
    same(run, ref)
    assert summary(run)["partition"]["method"] == "moe_p"
