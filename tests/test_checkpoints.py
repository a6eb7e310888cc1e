"""Crash-safe checkpoints without an engine: manifests, verification, the resume choice, pruning."""

import json
import os

import pytest

from pad_moe.errors import UsageError
from pad_moe.train import checkpoints as C


def _fake_checkpoint(root, step, world=2, complete=True, files=("mp_rank_00_model_states.pt", "rng_rank0.pt")):
    tag_dir = os.path.join(root, f"step{step}")
    os.makedirs(tag_dir, exist_ok=True)
    for name in files:
        with open(os.path.join(tag_dir, name), "wb") as f:
            f.write(os.urandom(64) + name.encode())
    if complete:
        C.write_manifest(tag_dir, step, world)
        C.point_latest(root, f"step{step}")
    return tag_dir


def test_a_complete_checkpoint_verifies_and_each_kind_of_damage_is_named(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 3)
    manifest, why = C.verify(tag_dir)
    assert why == "" and manifest["step"] == 3 and manifest["world_size"] == 2
    assert set(manifest["files"]) == {"mp_rank_00_model_states.pt", "rng_rank0.pt"}
    model = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    data = open(model, "rb").read()
    open(model, "wb").write(data[:-5])  # truncated
    assert "bytes" in C.verify(tag_dir)[1]
    open(model, "wb").write(bytes([data[0] ^ 1]) + data[1:])  # same size, one bit flipped
    assert "checksum" in C.verify(tag_dir)[1]
    os.remove(model)
    assert "missing" in C.verify(tag_dir)[1]
    os.remove(os.path.join(tag_dir, C.MANIFEST))
    assert "did not finish" in C.verify(tag_dir)[1]
    with open(os.path.join(tag_dir, C.MANIFEST), "w") as f:
        f.write("{not json")
    assert "unreadable" in C.verify(tag_dir)[1]


def test_resume_takes_latest_when_it_is_intact(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    _fake_checkpoint(tmp_path, 6)
    point = C.find_resume_point(str(tmp_path), world=2)
    assert (point.tag, point.step, point.note) == ("step6", 6, "")


def test_an_unfinished_newer_save_is_skipped_with_one_line(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    _fake_checkpoint(tmp_path, 6, complete=False)  # a save that died: files, no manifest, latest not moved
    point = C.find_resume_point(str(tmp_path), world=2)
    assert point.tag == "step3"
    assert "step6" in point.note and "step3" in point.note and "\n" not in point.note


def test_a_damaged_latest_falls_back_to_the_newest_complete_checkpoint(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    tag_dir = _fake_checkpoint(tmp_path, 6)
    os.remove(os.path.join(tag_dir, "rng_rank0.pt"))
    point = C.find_resume_point(str(tmp_path), world=2)
    assert point.tag == "step3" and "rng_rank0.pt is missing" in point.note


def test_a_complete_save_whose_latest_was_not_moved_is_used(tmp_path):
    _fake_checkpoint(tmp_path, 3)
    tag_dir = _fake_checkpoint(tmp_path, 6, complete=False)
    C.write_manifest(tag_dir, 6, 2)  # the crash came after the manifest, before 'latest' moved
    point = C.find_resume_point(str(tmp_path), world=2)
    assert point.tag == "step6" and "latest" in point.note


def test_no_complete_checkpoint_and_a_world_size_change_are_one_line_errors(tmp_path):
    _fake_checkpoint(tmp_path, 3, complete=False)
    with pytest.raises(UsageError, match="no complete checkpoint.*step3: it has no manifest"):
        C.find_resume_point(str(tmp_path), world=2)
    _fake_checkpoint(tmp_path, 6)
    with pytest.raises(UsageError, match="written by 2 ranks, this launch has 1.*padmoe reshard"):
        C.find_resume_point(str(tmp_path), world=1)


def test_prune_keeps_the_newest_n_and_never_the_latest_target(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 1, complete=False)  # debris older than latest
    _fake_checkpoint(tmp_path, 10, complete=False)  # newer than latest: a save in flight, left alone
    C.prune(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step10", "step6", "step8"]
    C.write_manifest(str(tmp_path / "step10"), 10, 2)  # complete but 'latest' not moved: newer, so left alone
    C.prune(str(tmp_path), keep=1)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step10", "step8"]
    C.point_latest(str(tmp_path), "step8")


def test_prune_zero_keeps_all(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    C.prune(str(tmp_path), keep=0)
    assert sorted(os.listdir(tmp_path)) == ["latest", "step2", "step4", "step6"]


def test_manifest_is_json_with_sizes_and_hashes(tmp_path):
    tag_dir = _fake_checkpoint(tmp_path, 5)
    with open(os.path.join(tag_dir, C.MANIFEST)) as f:
        data = json.load(f)
    assert data["format_version"] == C.FORMAT_VERSION
    assert all(len(v["sha256"]) == 64 and v["bytes"] > 0 for v in data["files"].values())
