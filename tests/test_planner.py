"""The cluster memory planner: checked against the measured memory of real training steps of a small Switch preset
on CPU (within 10 %), DeepSpeed's sharding rules, the all-to-all volume model, the CLI, and bad input."""

import json
import os
import subprocess
import sys

import pytest

from pad_moe.plan.planner import GIB, PlanError, PlanRequest, parse_bytes, plan, plan_main
from pad_moe.switch.count import count_switch
from pad_moe.switch.presets import get_arch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4, num_experts=8,
             vocab_size=8000)


def test_planner_predicts_measured_cpu_memory_within_10_percent():
    """One process, fp32, ZeRO-0-equivalent torch AdamW: weights, gradients, optimizer states, activations and the
    step are all real; the Python/torch runtime below the baseline is excluded (see pad_moe.plan.measure)."""
    cmd = [sys.executable, "-m", "pad_moe.plan.measure", "switch-debug", "--mode", "pad", "--micro-batch", "8",
           "--seq", "128", "--target-seq", "32", "--steps", "2", "--arch", json.dumps(SMALL), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    arch = get_arch("switch-debug").with_(dropout=0.1, **SMALL)
    req = PlanRequest("switch-debug", arch=arch, nodes=1, gpus_per_node=1, ep=1, zero=0, dtype="fp32",
                      micro_batch=8, seq=128, target_seq=32, gpu_mem=None, optimizer="torch",
                      dropout_mask_bytes=4)  # CPU dropout keeps fp32 noise, not a bool mask
    b = plan(req)["bytes_per_rank"]
    pairs = {"weights": (measured["after_build"], b["weights"] + b["masks"]),
             "weights + optimizer states": (measured["steady"], b["persistent"]),
             "backward peak": (measured["backward_peak"], b["backward_peak"]),
             "optimizer-step peak": (measured["step_peak"], b["step_peak"]),
             "activations + gradients": (measured["backward_peak"] - measured["steady"],
                                         b["backward_peak"] - b["persistent"])}
    for what, (got, want) in pairs.items():
        assert abs(want - got) <= 0.10 * got, (what, got / 2**20, want / 2**20)
    assert b["activations"] > 0.3 * b["backward_peak"]  # the check is not carried by the model states alone


def test_sharding_follows_deepspeed_groups():
    common = dict(preset="switch-base-128", nodes=4, gpus_per_node=8, dtype="bf16", micro_batch=8, seq=512,
                  gpu_mem=None)
    z0 = plan(PlanRequest(ep=32, zero=0, **common))
    z2 = plan(PlanRequest(ep=32, zero=2, **common))
    z2e8 = plan(PlanRequest(ep=8, zero=2, **common))
    ne, ex = z2["params"]["non_expert_per_rank"], z2["params"]["expert_per_rank"]
    c = count_switch("switch-base-128", "pad")
    assert ex == c["expert"] // 32 and ne == c["params_training"] - c["expert"]
    # ZeRO ≥ 1 (and bf16 at ZeRO 0): fp32 master + m + v = 12 bytes, non-expert over the world (32),
    # experts over the expert-data-parallel group (world / ep)
    assert z2["bytes_per_rank"]["optimizer_states"] == int(12 * (ne / 32 + ex / 1))
    assert z2e8["params"]["expert_per_rank"] == 4 * ex and z2e8["params"]["data_parallel_expert"] == 4
    assert z2e8["bytes_per_rank"]["optimizer_states"] == int(12 * (ne / 32 + 4 * ex / 4))
    assert z0["bytes_per_rank"]["gradients"] == 2 * (ne + ex) > z2["bytes_per_rank"]["gradients"]
    assert z0["bytes_per_rank"]["peak"] > z2["bytes_per_rank"]["peak"]


def test_all_to_all_volume_model():
    common = dict(preset="switch-base-128", nodes=1, gpus_per_node=8, zero=1, dtype="bf16", micro_batch=4,
                  seq=256, target_seq=64, gpu_mem=None, capacity_factor=1.0)
    assert plan(PlanRequest(ep=1, **common))["communication_per_step"]["all_to_all_bytes_sent"] == 0
    res = plan(PlanRequest(ep=8, **common))
    # 4 exchanges (dispatch, combine, and their gradients) of the E·C·H buffer per sparse layer, 7/8 leaves the rank;
    # C = tokens/E: 6 encoder layers see 4·256 tokens (C = 8); 6 decoder layers 4·64 (C = 2, raised to min_capacity 4)
    want = 4 * 768 * 2 * 7 / 8 * 6 * 128 * (8 + 4)
    assert res["communication_per_step"]["all_to_all_bytes_sent"] == int(want)
    assert plan(PlanRequest(ep=8, grad_accum=2, **common))["communication_per_step"]["all_to_all_bytes_sent"] \
        == int(2 * want)


def test_plan_main_prints_a_plan_and_json(capsys):
    argv = ["switch-base-128", "--kappa", "0.5", "--nodes", "4", "--gpus-per-node", "8", "--ep", "32", "--zero", "2",
            "--dtype", "bf16", "--micro-batch", "8", "--seq", "512", "--target-seq", "114", "--gpu-mem", "80GiB"]
    assert plan_main(argv) == 0
    text = capsys.readouterr().out
    assert "fits in 80.0 GiB: yes" in text and "all-to-all" in text
    assert plan_main(argv + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["fits"] is True and res["params"]["compact_total"] == count_switch("switch-base-128", "pad", 0.5)["params"]
    assert res["bytes_per_rank"]["peak"] < 80 * GIB


@pytest.mark.parametrize("argv,match", [
    (["switch-base-128", "--nodes", "1", "--gpus-per-node", "8", "--ep", "16"], "--ep=16 is larger than the world of 8"),
    (["switch-base-128", "--nodes", "3", "--gpus-per-node", "4", "--ep", "12"], "--ep=12 does not divide the 128"),
    (["switch-base-128", "--nodes", "1", "--gpus-per-node", "6", "--ep", "4"], "--ep=4 does not divide the world"),
    (["switch-base-128", "--zero", "3"], "--zero=3"),
    (["switch-base-999"], "preset 'switch-base-999' does not exist"),
    (["switch-base-128", "--gpu-mem", "lots"], "--gpu-mem='lots'"),
    (["switch-c-2048", "--nodes", "1", "--gpus-per-node", "8", "--ep", "8", "--zero", "0"], "needs .* GiB per rank"),
])
def test_bad_input_and_no_fit_exit_2_with_one_line(capsys, argv, match):
    import re

    assert plan_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("padmoe plan: error:") and re.search(match, err[0]), err


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * 2**30 == parse_bytes("80G") and parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("1024") == 1024 and parse_bytes("1.5MiB") == 1.5 * 2**20
    with pytest.raises(PlanError):
        parse_bytes("-3")


def test_compact_after_warmup_plans_both_phases():
    """Upcycling with in-place compaction: the warm-up phase is the full PAD run, the phase after it the compacted
    one (below the MoE's memory at κ=0.5, as BENCHMARKS.md's Switch-Base-128 figures)."""
    base = dict(preset="switch-base-128", kappa=0.5, nodes=4, gpus_per_node=8, ep=32, zero=2, dtype="bf16")
    two = plan(PlanRequest(**base, compact_after_warmup=True))
    full, compacted = plan(PlanRequest(**base)), plan(PlanRequest(**base, compact=True))
    moe = plan(PlanRequest(**base, mode="moe"))
    assert two["bytes_per_rank"] == full["bytes_per_rank"]
    assert two["after_compaction"]["bytes_per_rank"] == compacted["bytes_per_rank"]
    assert compacted["bytes_per_rank"]["peak"] < moe["bytes_per_rank"]["peak"] < full["bytes_per_rank"]["peak"]
    for bad in ({"mode": "moe"}, {"compact": True}):
        with pytest.raises(PlanError, match="--compact-after-warmup applies to --mode pad without --compact"):
            plan(PlanRequest(**{**base, **bad}, compact_after_warmup=True))
