"""Real 2-rank ep_size=2 checkpoints (the deepspeed launcher, CPU, ZeRO-2, IMP) of the debug config, element and
neuron (compacted) masks: export round trip with equal outputs and a folder sized by the compact count, consolidation,
resharding 2 -> 1 -> 2 with continued training, and bad input (exit 2, one line, nothing half-written)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from pad_moe.deploy.checkpoint import read_checkpoint, read_optimizer_state, safe_load
from pad_moe.deploy.consolidate import consolidate_main, load_training_form
from pad_moe.deploy.count import count, resolve
from pad_moe.deploy.export import META_FILE, WEIGHTS_FILE, export_main, load_deployed
from pad_moe.deploy.reshard import reshard_main
from pad_moe.testing.ranks import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "DEEPSPEED_TIMEOUT": "3",
       "PYTHONUNBUFFERED": "1"}
RUNS = {"el": [], "ne": ["model.preset=debug-neuron"]}  # debug-neuron: neuron masks, compacted after IMP


def train_cmd(config, args, ranks):
    if ranks == 1:  # one process needs no launcher
        return [sys.executable, "-m", "pad_moe.cli", "train", config, *args]
    deepspeed = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    return [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "pad_moe.cli",
            "train", config, *args]


def run_all(cmds):
    """Run commands concurrently (the launches are mostly start-up time); fail with the tail of a failing one."""
    procs = [subprocess.Popen(c, cwd=ROOT, env={**ENV, "MASTER_PORT": str(free_port())}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for c in cmds]
    for p in procs:
        out, _ = p.communicate(timeout=600)
        if p.returncode != 0:
            raise AssertionError(f"{p.args} exited {p.returncode}\n{out[-3000:]}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    run_all([train_cmd("configs/debug.yaml", [f"output_dir={out}", f"name={name}", "train.steps=6", *extra], 2)
             for name, extra in RUNS.items()])
    return {name: out / name for name in RUNS} | {"out": out}


def eval_tokens(run_dir):
    from pad_moe.config import load_config
    from pad_moe.toy import synthetic_dataset

    cfg = load_config(str(run_dir / "config.yaml"))
    data = synthetic_dataset(cfg.model, cfg.data, "eval")
    return data.tensors[0][:16], data.tensors[1][:16]


def no_sampling(model):
    for m in model.modules():
        if hasattr(m, "top2_2nd_expert_sampling"):
            m.top2_2nd_expert_sampling = False
    return model


@pytest.mark.parametrize("name", sorted(RUNS))
def test_export_round_trip_equal_outputs_and_compact_size(runs, name, capsys):
    out = runs["out"] / f"deploy-{name}"
    assert export_main([str(runs[name]), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["verified_max_abs_diff"] <= 1e-5
    tokens, attn = eval_tokens(runs[name])
    training = no_sampling(load_training_form(str(runs[name])))
    deployed = load_deployed(str(out))
    assert not any("deepspeed" in type(m).__module__ for m in deployed.modules())  # no DeepSpeed module inside
    with torch.no_grad():
        torch.testing.assert_close(deployed(tokens, attn)[0], training(tokens, attn)[0], atol=1e-5, rtol=0)
    meta = json.loads((out / META_FILE).read_text())
    want = count(resolve(str(runs[name] / "config.yaml")))  # IMP kept exactly κ = 0.5 of the entries / units
    assert (meta["params"], meta["params_training"]) == (want["params"], want["params_training"])
    size = sum(f.stat().st_size for f in out.iterdir())
    assert want["bytes"] <= os.path.getsize(out / WEIGHTS_FILE) <= want["bytes"] + 16384
    assert size < want["bytes"] + 32768
    blocks = meta["blocks"]
    assert {b["kind"] for b in blocks.values()} == {"pad-element" if name == "el" else "pad-neuron"}
    if name == "el":
        assert size < 0.7 * want["bytes_training"]  # κ = 0.5 with 4 experts: (0.5 + 4·0.5)/5 of the FFN


def test_consolidate_has_every_expert_with_global_ids(runs, tmp_path, capsys):
    target = tmp_path / "full.safetensors"
    assert consolidate_main([str(runs["el"]), "--out", str(target)]) == 0
    from safetensors.torch import load_file

    full = load_file(str(target))
    ckpt = read_checkpoint(str(runs["el"]))
    assert ckpt.world_size == 2 and ckpt.ep_size == 2
    for layer in range(2):
        for e in range(4):  # experts 2, 3 came from ep rank 1
            key = f"layers.{layer}.ffn.moe.deepspeed_moe.experts.deepspeed_experts.{e}.fc1.weight"
            stored = safe_load(str(runs["el"] / "checkpoints" / "step6" /
                                   f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt"))
            assert torch.equal(full[key], stored[key])
    assert set(full) == set(load_training_form(str(runs["el"])).state_dict())
    assert consolidate_main([str(runs["el"]), "--out", str(target)]) == 2  # exists: refused


@pytest.mark.slow  # ~100 s: four launcher runs; run with -m slow before a release
def test_reshard_2_to_1_to_2_then_training_continues(runs, capsys):
    src, one, two = runs["el"], runs["out"] / "r1", runs["out"] / "r2"
    assert reshard_main([str(src), "--ep", "1", "--world", "1", "--out", str(one)]) == 0
    assert reshard_main([str(one), "--ep", "2", "--world", "2", "--out", str(two)]) == 0
    a, b = read_checkpoint(str(src)), read_checkpoint(str(one))
    assert b.cfg.train.micro_batch_size == 2 * a.cfg.train.micro_batch_size  # the same global batches
    assert (b.world_size, b.ep_size, b.step, b.meta["lr_scheduler"]) == (1, 1, 6, a.meta["lr_scheduler"])
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state) and set(a.state) == set(b.state)
    oa, ob = read_optimizer_state(a), read_optimizer_state(b)
    assert set(oa.tensors) == set(ob.tensors) and int(oa.scalars["step"]) == int(ob.scalars["step"]) == 6
    assert all(torch.equal(oa.tensors[n][k], ob.tensors[n][k]) for n in oa.tensors for k in oa.tensors[n])
    lr = [safe_load(f)["optimizer_state_dict"]["base_optimizer_state"]["param_groups"][0]["lr"]
          for f in (a.files["zero"][0], b.files["zero"][0])]
    assert lr[0] == lr[1] > 0
    run_all([train_cmd(str(one / "config.yaml"), ["train.steps=8", "--resume"], 1),
             train_cmd(str(two / "config.yaml"), ["train.steps=8", "--resume"], 2)])
    for folder, world in ((one, 1), (two, 2)):
        summary = json.loads((folder / "summary.json").read_text())
        assert (summary["start_step"], summary["world_size"], len(summary["losses"])) == (6, world, 8)  # history kept
        assert all(0 < x < 1.0 for x in summary["losses"][6:])  # continues from the trained weights (start ~0.69)
        assert (folder / "checkpoints" / "step8" / "mp_rank_00_model_states.pt").is_file()
    assert "optimizer" in json.loads((two / "reshard.json").read_text())


def _copy_run(runs, tmp_path, name="el"):
    dst = tmp_path / name
    shutil.copytree(runs[name], dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst, dst / "checkpoints" / "step6"


def _expect_error(capsys, argv, fn, needle, out):
    assert fn(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(out) and not glob.glob(f"{out}*") and not glob.glob(os.path.join(
        os.path.dirname(out), f".{os.path.basename(out)}.tmp-*"))


def test_bad_input_exits_2_with_one_line_and_writes_nothing(runs, tmp_path, capsys):
    run, tag = _copy_run(runs, tmp_path)
    out = str(tmp_path / "deploy")
    os.remove(tag / "layer_1_expert_3_mp_rank_00_model_states.pt")
    _expect_error(capsys, [str(run), "--out", out], export_main, "missing expert file", out)
    _expect_error(capsys, [str(run), "--ep", "1", "--world", "1", "--out", out], reshard_main,
                  "missing expert file", out)

    run, tag = _copy_run(runs, tmp_path / "b")
    model_file = tag / "mp_rank_00_model_states.pt"
    model_file.write_bytes(model_file.read_bytes()[: model_file.stat().st_size // 2])
    _expect_error(capsys, [str(run), "--out", out], export_main, "truncated or corrupt", out)
    _expect_error(capsys, [str(run), "--out", out + ".safetensors"], consolidate_main, "truncated or corrupt",
                  out + ".safetensors")

    run, tag = _copy_run(runs, tmp_path / "c")
    (run / "checkpoints" / "latest").write_text("step99")
    _expect_error(capsys, [str(run), "--out", out], export_main, "mismatched tag", out)
    tag.rename(run / "checkpoints" / "step7")
    (run / "checkpoints" / "latest").write_text("step7")
    _expect_error(capsys, [str(run), "--out", out], export_main, "mismatched tag", out)

    run, tag = _copy_run(runs, tmp_path / "d")
    shard = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"not a checkpoint")
    _expect_error(capsys, [str(run), "--ep", "1", "--world", "1", "--out", out], reshard_main, "corrupt", out)
    _expect_error(capsys, [str(run), "--ep", "3", "--world", "3", "--out", out], reshard_main, "--ep 3", out)
    _expect_error(capsys, [str(run), "--ep", "1", "--world", "3", "--out", out], reshard_main,
                  "--world 3 does not divide the run's global micro-batch of 32 examples", out)

    existing = tmp_path / "existing"
    assert export_main([str(runs["el"]), "--out", str(existing), "--no-verify"]) == 0
    capsys.readouterr()
    before = {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in existing.iterdir()}
    assert export_main([str(runs["el"]), "--out", str(existing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0]
    assert {f.name: (f.stat().st_mtime_ns, f.stat().st_size) for f in existing.iterdir()} == before
