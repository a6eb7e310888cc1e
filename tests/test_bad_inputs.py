"""A catalogue of bad inputs for every ``padmoe`` subcommand: exit status 2, one error line naming the value, no
traceback, and nothing created, overwritten or lost on disk.

What every case asserts about stderr (the contract of ``pad_moe.cli``): there is no ``Traceback``; the LAST line is the
error, ``padmoe[ COMMAND]: error: ...``, and holds the case's needles (the offending value); an argparse error
(``SystemExit(2)`` from the parser) may put argparse's usage block before it (a ``usage: padmoe ...`` line and its
indented continuation lines); every other error is that one line alone. On disk: the case's output folder and the inputs
it reads (bad files, the checkpoint) are as before: the same paths, and files of the same size and mtime.

The cases run in-process (``pad_moe.cli.main(argv)``, stderr through capsys); two subprocess cases prove the console
path (``python -m pad_moe``). Checkpoint cases read a small checkpoint written here in the layout of
``pad_moe.deploy.checkpoint`` (the debug model's state dict, one file per expert), not a trained run.
"""

import json
import os
import stat
import subprocess
import sys

import pytest
import torch

from pad_moe.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEBUG = os.path.join(ROOT, "configs", "debug.yaml")

BAD_YAML = {
    "list.yaml": "- name\n- model\n",
    "scalar.yaml": "3\n",
    "model3.yaml": "model: 3\n",
    "moe3.yaml": "moe: 3\n",
    "train_list.yaml": "train: [1, 2]\n",
    "lr_section.yaml": "train: {lr: {a: 1}}\n",
    "dup.yaml": "train:\n  lr: 0.1\n  lr: 0.2\n",
    "unclosed.yaml": "model: [unclosed\n",
    "evil.yaml": "name: !!python/object/apply:os.system ['echo hi']\n",
    "experts0.yaml": "moe: {num_experts: 0}\n",
}
DS_JSON = {"bad.json": "{\"zero_optimization\": {\"stage\": 2,}", "batch.json": json.dumps({"train_batch_size": 8})}


def _write_checkpoint(run_dir) -> None:
    """RUN_DIR/config.yaml + checkpoints/latest + checkpoints/step1: the debug model (ep_size=1, 4 experts, 2 MoE
    layers) split as DeepSpeed writes it: non-expert tensors in the model file, one file per (layer, expert)."""
    from pad_moe.config import load_config, save_config
    from pad_moe.deploy.checkpoint import EXPERT_KEY, MODEL_FILE
    from pad_moe.train.job import build_job

    cfg = load_config(DEBUG, [f"output_dir={run_dir.parent}", f"name={run_dir.name}", "moe.ep_size=1"])
    state = build_job(cfg, 0).model.state_dict()
    tag = run_dir / "checkpoints" / "step1"
    tag.mkdir(parents=True)
    layers, module, experts = [], {}, {}
    for key, value in state.items():
        m = EXPERT_KEY.match(key)
        if m is None:
            module[key] = value
            continue
        if m.group(1) not in layers:
            layers.append(m.group(1))
        experts.setdefault((layers.index(m.group(1)), int(m.group(2))), {})[key] = value
    torch.save({"module": module, "num_experts": [cfg.moe.num_experts] * len(layers), "dp_world_size": 1,
                "mp_world_size": 1, "global_steps": 1, "step": 1}, tag / MODEL_FILE)
    for (layer, expert), part in experts.items():
        torch.save(part, tag / f"layer_{layer}_expert_{expert}_mp_rank_00_model_states.pt")
    (run_dir / "checkpoints" / "latest").write_text("step1")
    save_config(cfg, str(run_dir / "config.yaml"))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad files, a checkpoint run, a folder without a checkpoint, existing outputs and an existing run."""
    d = tmp_path_factory.mktemp("inputs")
    for name, text in {**BAD_YAML, **DS_JSON}.items():
        (d / name).write_text(text)
    (d / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (d / "a_dir.yaml").mkdir()
    _write_checkpoint(d / "run")
    (d / "bare").mkdir()
    (d / "bare" / "notes.txt").write_text("no checkpoint here\n")
    (d / "existing").mkdir()
    (d / "existing" / "keep.txt").write_text("keep me\n")
    (d / "existing.safetensors").write_bytes(b"keep me")
    (d / "afile").write_text("a file, not a folder\n")
    (d / "runs" / "taken").mkdir(parents=True)
    (d / "runs" / "taken" / "config.yaml").write_text("name: taken\n")
    return d


def snapshot(*roots) -> dict:
    """Every path under ``roots``: its kind, and size and mtime for files (folder mtimes change with temporary
    entries that are removed again, which is allowed)."""
    out = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                st = os.lstat(path)
                out[path] = ("dir",) if stat.S_ISDIR(st.st_mode) else ("file", st.st_size, st.st_mtime_ns)
    return out


def T(*overrides):
    """A train command on the debug config in one process (ep_size=1), writing under the case's folder."""
    return ["train", DEBUG, "output_dir=@TMP", "name=bad", "moe.ep_size=1", "partition.iterations=1",
            "partition.num_batches=1", *overrides]


def C(*overrides):
    return ["config", DEBUG, *overrides]


def case(id, argv, *needles, marks=()):
    return pytest.param(argv, needles, id=id, marks=marks)


CASES = [
    # -- config values: non-finite numbers -------------------------------------------------------------------------
    case("config-lr-inf", C("train.lr=.inf"), "train.lr=inf", "must be a finite number"),
    case("config-lr-nan", C("train.lr=nan"), "train.lr='nan'", "must be a finite number"),
    case("config-capacity-minus-inf", C("moe.capacity_factor=-.inf"), "moe.capacity_factor=-inf", "finite"),
    case("config-kappa-yaml-nan", C("partition.kappa=.nan"), "partition.kappa=nan", "finite"),
    case("config-optional-float-inf", C("vision.init_kappa=.inf"), "vision.init_kappa=inf", "finite"),
    case("config-betas-item-inf", C("train.betas=[0.9, .inf]"), "train.betas[1]=inf", "finite"),
    case("config-lr-overflow", C("train.lr=1e999"), "train.lr='1e999'", "finite"),
    case("config-int-inf", C("moe.num_experts=.inf"), "moe.num_experts=inf", "not an integer"),
    # -- config structure -------------------------------------------------------------------------------------------
    case("config-file-top-list", ["config", "@IN/list.yaml"], "list.yaml", "got list"),
    case("config-file-top-scalar", ["config", "@IN/scalar.yaml"], "scalar.yaml", "got int 3"),
    case("config-file-model-scalar", ["config", "@IN/model3.yaml"], "model=3", "must be a section"),
    case("config-file-moe-scalar", ["config", "@IN/moe3.yaml"], "moe=3", "must be a section"),
    case("config-file-train-list", ["config", "@IN/train_list.yaml"], "train=[1, 2]", "must be a section"),
    case("config-file-lr-section", ["config", "@IN/lr_section.yaml"], "train.lr={'a': 1}", "single float"),
    case("config-betas-scalar", C("train.betas=0.9"), "train.betas=0.9", "not a list"),
    case("config-betas-strings", C("train.betas=[a, b]"), "train.betas[0]='a'", "not a number"),
    case("config-override-into-scalar", C("train.lr.x=1"), "train.lr.x=1", "train.lr is 0.003, not a section"),
    case("config-override-section-scalar", C("train=3"), "train=3", "must be a section"),
    case("config-int-is-bool", C("moe.num_experts=true"), "moe.num_experts=True", "not an integer"),
    case("config-bool-is-int", C("moe.drop_tokens=1"), "moe.drop_tokens=1", "not true/false"),
    case("config-float-is-bool", C("train.lr=true"), "train.lr=True", "not a number"),
    case("config-optional-int-is-bool", C("train.zero_stage=false"), "train.zero_stage=False", "not an integer"),
    case("config-str-is-list", C("name=[a]"), "name=['a']", "single str"),
    case("config-preset-is-list", C("model.preset=[x]"), "model.preset=['x']", "single str"),
    case("config-list-item-int", C("data.text_files=[1]"), "data.text_files[0]=1", "not a string"),
    case("config-steps-fraction", C("train.steps=2.5"), "train.steps=2.5", "not an integer"),
    case("config-unknown-key", C("moe.nope=1"), "unknown config key moe.nope"),
    case("config-not-key-value", C("justakey"), "'justakey'", "key=value"),
    case("config-empty-key-part", C("train..lr=1"), "'train..lr=1'", "empty key part"),
    case("config-override-bad-yaml", C("train.lr=[1"), "train.lr=[1", "not valid YAML"),
    # -- config files -------------------------------------------------------------------------------------------------
    case("config-file-missing", ["config", "@IN/missing.yaml"], "@IN/missing.yaml", "does not exist"),
    case("config-file-is-dir", ["config", "@IN/a_dir.yaml"], "@IN/a_dir.yaml", "is a directory"),
    case("config-file-not-utf8", ["config", "@IN/latin1.yaml"], "@IN/latin1.yaml", "not UTF-8", "0xe9"),
    case("config-file-read-error", ["config", "/proc/self/mem"], "/proc/self/mem", "cannot be read",
         marks=pytest.mark.skipif(not os.path.isfile("/proc/self/mem"), reason="Linux /proc only")),
    case("config-file-duplicate-key", ["config", "@IN/dup.yaml"], "@IN/dup.yaml", "repeats the key 'lr'"),
    case("config-file-invalid-yaml", ["config", "@IN/unclosed.yaml"], "@IN/unclosed.yaml", "not valid YAML"),
    case("config-file-python-tag", ["config", "@IN/evil.yaml"], "@IN/evil.yaml", "not valid YAML"),
    case("config-unknown-flag", C("--bogus"), "--bogus"),
    case("unknown-command", ["bogus"], "'bogus'"),
    # -- presets ----------------------------------------------------------------------------------------------------
    case("presets-extra-arg", ["presets", "extra"], "extra"),
    case("presets-unknown-flag", ["presets", "--json"], "--json"),
    # -- train: arguments and config ---------------------------------------------------------------------------------
    case("train-no-config", ["train"], "config"),
    case("train-resume-value", ["train", DEBUG, "--resume=3"], "--resume"),
    case("train-nan-override", T("train.lr=nan"), "train.lr='nan'", "finite"),
    case("train-config-top-list", ["train", "@IN/list.yaml", "output_dir=@TMP"], "list.yaml"),
    case("train-unknown-key", T("train.nope=1"), "unknown config key train.nope"),
    # -- train: checks that need the world, the data or the DeepSpeed JSON (before the run dir exists) ---------------
    case("train-ep-size-vs-world", T("moe.ep_size=2"), "moe.ep_size=2", "world size 1"),
    case("train-ep-size-3-vs-world", T("moe.num_experts=3", "moe.ep_size=3"), "moe.ep_size=3"),
    case("train-existing-run", ["train", DEBUG, "output_dir=@IN/runs", "name=taken", "moe.ep_size=1"],
         "already holds a run"),
    case("train-ds-json-invalid", T("train.ds_config=@IN/bad.json"), "@IN/bad.json", "not valid JSON"),
    case("train-ds-json-missing", T("train.ds_config=@IN/missing.json"), "@IN/missing.json", "does not exist"),
    case("train-ds-json-batch-size", T("train.ds_config=@IN/batch.json"), "train_batch_size"),
    case("train-fp16-on-cpu", T("train.dtype=fp16"), "train.dtype=fp16",
         marks=pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on CPU only")),
    case("train-zero3-with-moe", T("train.zero_stage=3"), "ZeRO stage 3"),
    case("train-data-smaller-than-a-batch", T("data.train_size=8", "train.micro_batch_size=16"), "8 examples",
         "train.micro_batch_size=16"),
    # -- count --------------------------------------------------------------------------------------------------------
    case("count-unknown-preset", ["count", "nope"], "'nope'", "neither a config file nor a preset"),
    case("count-kappa-above-1", ["count", "bert-base", "--kappa", "1.5"], "--kappa 1.5"),
    case("count-kappa-nan", ["count", "bert-base", "--kappa", "nan"], "--kappa", "'nan'", "finite"),
    case("count-kappa-inf-switch", ["count", "switch-base-8", "--kappa", "inf"], "--kappa", "'inf'"),
    case("count-kappa-not-a-number", ["count", "bert-base", "--kappa", "x"], "--kappa", "'x'"),
    case("count-bad-mode", ["count", "bert-base", "--mode", "dense"], "--mode", "'dense'"),
    case("count-k-above-experts", ["count", "bert-base", "--experts", "2", "--k", "3"], "--k 3"),
    case("count-config-with-errors", ["count", "@IN/experts0.yaml"], "moe.num_experts=0"),
    case("count-config-nonfinite-override", ["count", DEBUG, "train.lr=inf"], "train.lr='inf'", "finite"),
    case("count-text-flag-on-vision", ["count", "resnet50", "--mode", "pad"], "--mode", "resnet50"),
    case("count-vision-flag-on-text", ["count", "bert-base", "--conv", "pad"], "--conv", "bert-base"),
    case("count-paper-on-switch", ["count", "switch-base-8", "--convention", "paper"], "--convention",
         "switch-base-8"),
    case("count-vision-image-size-0", ["count", "resnet50", "--image-size", "0"], "--image-size 0"),
    case("count-no-target", ["count"], "target"),
    # -- export -------------------------------------------------------------------------------------------------------
    case("export-missing-dir", ["export", "@IN/nowhere", "--out", "@TMP/out"], "@IN/nowhere", "does not exist"),
    case("export-dir-without-latest", ["export", "@IN/bare", "--out", "@TMP/out"], "@IN/bare",
         "no DeepSpeed checkpoint"),
    case("export-existing-out", ["export", "@IN/run", "--out", "@IN/existing"], "@IN/existing", "already exists"),
    case("export-out-under-a-file", ["export", "@IN/run", "--out", "@IN/afile/deploy"], "@IN/afile", "is a file"),
    case("export-unknown-tag", ["export", "@IN/run", "--tag", "step9", "--out", "@TMP/out"], "--tag step9"),
    case("export-missing-config", ["export", "@IN/run", "--config", "@IN/missing.yaml", "--out", "@TMP/out"],
         "@IN/missing.yaml"),
    case("export-no-out", ["export", "@IN/run"], "--out"),
    # -- consolidate --------------------------------------------------------------------------------------------------
    case("consolidate-missing-dir", ["consolidate", "@IN/nowhere", "--out", "@TMP/full.safetensors"],
         "@IN/nowhere", "does not exist"),
    case("consolidate-dir-without-latest", ["consolidate", "@IN/bare", "--out", "@TMP/full"], "@IN/bare"),
    case("consolidate-existing-file", ["consolidate", "@IN/run", "--out", "@IN/existing.safetensors"],
         "@IN/existing.safetensors", "already exists"),
    case("consolidate-existing-dir", ["consolidate", "@IN/run", "--out", "@IN/existing"], "@IN/existing",
         "already exists"),
    case("consolidate-out-under-a-file", ["consolidate", "@IN/run", "--out", "@IN/afile/x/full.safetensors"],
         "@IN/afile", "is a file"),
    case("consolidate-bad-run-config", ["consolidate", "@IN/run", "--config", "@IN/experts0.yaml", "--out",
                                        "@TMP/full.safetensors"], "moe.num_experts=0"),
    case("consolidate-bad-dtype", ["consolidate", "@IN/run", "--out", "@TMP/full", "--dtype", "int8"], "'int8'"),
    case("consolidate-no-args", ["consolidate"], "checkpoint", "--out"),
    # -- reshard ------------------------------------------------------------------------------------------------------
    case("reshard-world-0", ["reshard", "@IN/run", "--ep", "1", "--world", "0", "--out", "@TMP/r"], "--world 0"),
    case("reshard-ep-0", ["reshard", "@IN/run", "--ep", "0", "--world", "2", "--out", "@TMP/r"], "--ep 0"),
    case("reshard-ep-not-dividing-experts", ["reshard", "@IN/run", "--ep", "3", "--world", "3", "--out", "@TMP/r"],
         "--ep 3", "moe.num_experts=4"),
    case("reshard-ep-not-dividing-world", ["reshard", "@IN/run", "--ep", "2", "--world", "3", "--out", "@TMP/r"],
         "--ep 2", "--world 3"),
    case("reshard-ep-not-a-number", ["reshard", "@IN/run", "--ep", "two", "--world", "2", "--out", "@TMP/r"],
         "--ep", "'two'"),
    case("reshard-existing-out", ["reshard", "@IN/run", "--ep", "1", "--world", "1", "--out", "@IN/existing"],
         "@IN/existing", "already exists"),
    case("reshard-missing-dir", ["reshard", "@IN/nowhere", "--ep", "1", "--world", "1", "--out", "@TMP/r"],
         "@IN/nowhere"),
    case("reshard-no-world", ["reshard", "@IN/run", "--ep", "1", "--out", "@TMP/r"], "--world"),
    # -- plan ---------------------------------------------------------------------------------------------------------
    case("plan-no-preset", ["plan"], "preset"),
    case("plan-unknown-preset", ["plan", "switch-base-999"], "'switch-base-999'"),
    case("plan-nodes-0", ["plan", "switch-base-8", "--nodes", "0"], "--nodes=0"),
    case("plan-nodes-negative", ["plan", "switch-base-8", "--nodes", "-2"], "--nodes=-2"),
    case("plan-gpus-per-node-0", ["plan", "switch-base-8", "--gpus-per-node", "0"], "--gpus-per-node=0"),
    case("plan-nodes-not-a-number", ["plan", "switch-base-8", "--nodes", "x"], "--nodes", "'x'"),
    case("plan-ep-not-dividing-world", ["plan", "switch-base-8", "--ep", "3"], "--ep=3"),
    case("plan-ep-not-dividing-experts", ["plan", "switch-base-8", "--nodes", "2", "--ep", "16"], "--ep=16"),
    case("plan-unknown-dtype", ["plan", "switch-base-8", "--dtype", "fp8"], "--dtype='fp8'"),
    case("plan-zero-3", ["plan", "switch-base-8", "--zero", "3"], "--zero=3"),
    case("plan-kappa-nan", ["plan", "switch-base-8", "--kappa", "nan"], "--kappa", "'nan'"),
    case("plan-reduce-bucket-inf", ["plan", "switch-base-8", "--reduce-bucket", "inf"], "--reduce-bucket", "'inf'"),
    case("plan-reduce-bucket-negative", ["plan", "switch-base-8", "--reduce-bucket", "-5"], "--reduce-bucket=-5"),
    case("plan-gpu-mem-dots", ["plan", "switch-base-8", "--gpu-mem", "..."], "--gpu-mem='...'"),
    case("plan-gpu-mem-overflow", ["plan", "switch-base-8", "--gpu-mem", "1e400"], "--gpu-mem='1e400'"),
    case("plan-overhead-not-a-size", ["plan", "switch-base-8", "--overhead", "lots"], "--overhead='lots'"),
    case("plan-capacity-factor-0", ["plan", "switch-base-8", "--capacity-factor", "0"], "--capacity-factor=0"),
]


def _fill(text: str, paths: dict) -> str:
    for key, value in paths.items():
        text = text.replace(key, str(value))
    return text


def run_in_process(argv, capsys):
    """(exit status, stderr, whether argparse refused the arguments)."""
    capsys.readouterr()
    try:
        rc, by_argparse = main(argv), False
    except SystemExit as exit_:
        rc, by_argparse = exit_.code, True
    return rc, capsys.readouterr().err, by_argparse


def assert_one_error_line(rc, err, needles, by_argparse):
    assert "Traceback" not in err, err
    assert rc == 2, (rc, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "no error line on stderr"
    last = lines[-1]
    assert last.startswith("padmoe") and ": error: " in last, lines
    if by_argparse:  # argparse's usage block, then its one error line
        assert lines[0].startswith("usage: padmoe") and all(ln.startswith(" ") for ln in lines[1:-1]), lines
    else:
        assert len(lines) == 1, lines
    for needle in needles:
        assert needle in last, (needle, last)


@pytest.mark.parametrize("argv,needles", CASES)
def test_bad_input_exits_2_with_one_line_and_touches_nothing(argv, needles, inputs, tmp_path, capsys):
    paths = {"@IN": inputs, "@TMP": tmp_path}
    argv = [_fill(a, paths) for a in argv]
    before = snapshot(inputs, tmp_path)
    rc, err, by_argparse = run_in_process(argv, capsys)
    assert_one_error_line(rc, err, [_fill(n, paths) for n in needles], by_argparse)
    assert snapshot(inputs, tmp_path) == before, "the command created, changed or removed files"


def test_the_catalogue_is_large_and_covers_every_command():
    commands = {p.values[0][0] for p in CASES}
    assert {"train", "config", "presets", "count", "export", "consolidate", "reshard", "plan"} <= commands
    assert len(CASES) >= 60


def test_the_checkpoint_the_cases_read_is_valid(inputs, tmp_path, capsys):
    """The checkpoint cases fail for the bad flag alone: the same checkpoint consolidates."""
    out = tmp_path / "full.safetensors"
    assert main(["consolidate", str(inputs / "run"), "--out", str(out)]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["step"] == 1 and out.is_file()


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


@pytest.mark.parametrize("argv,needle", [
    (["config", "@IN/list.yaml"], "list.yaml"),
    (["plan", "switch-base-8", "--gpu-mem", "..."], "--gpu-mem='...'"),  # was a ValueError traceback
], ids=["config-top-level-list", "plan-gpu-mem"])
def test_console_path_prints_one_line_and_exits_2(argv, needle, inputs):
    argv = [_fill(a, {"@IN": inputs}) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "pad_moe", *argv], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("padmoe") and needle in lines[0], lines
