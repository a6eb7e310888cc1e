"""Bad inputs of ``padmoe compress``, ``padmoe count`` on HF MoE folders and the causal-LM job's inputs (issue 22):
each is exit status 2, exactly one non-empty stderr line naming the bad value (no progress bar, no traceback), found
before anything is loaded or computed where no model is needed, and nothing on disk changes (every path under the
inputs and the outputs' folders: kind, size and mtime, folders included; an existing empty --out stays as it was).

The CLI runs as a subprocess (``python -m pad_moe.cli``), so stderr is the whole of it. The inputs are variants of
test_compress's tiny random Mixtral folder (one per module)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_compress import folders  # noqa: F401 - the tiny Mixtral folder, calibration and eval text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}
ENV.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)  # the CLI must silence the bars itself
FAST = ["--seq-len", "32", "--batch-size", "4", "--calib-batches", "2", "--iterations", "1"]


def snapshot(*roots) -> dict:
    """Every path under ``roots`` (the roots included): kind, size and mtime, for folders too."""
    out = {}
    for root in map(str, roots):
        for folder, dirs, files in os.walk(root):
            for path in [folder] + [os.path.join(folder, n) for n in dirs + files]:
                st = os.lstat(path)
                out[path] = (st.st_mode >> 12, st.st_size if os.path.isfile(path) else 0, st.st_mtime_ns)
    return out


def cli(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pad_moe.cli", *map(str, argv)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_refusal(proc, *needles) -> str:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("padmoe") and "Traceback" not in proc.stderr, lines
    assert all(n in lines[0] for n in needles), (needles, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def bad(folders, tmp_path_factory):  # noqa: F811 - the fixture imported above
    """Broken copies of the tiny Mixtral folder, broken configs for count, a folder where text is expected."""
    import numpy as np
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bad")
    good = folders / "mixtral"
    for name in ("trunc", "bigtok", "notok", "pickled"):
        shutil.copytree(good, d / name)
    weights = d / "trunc" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # an interrupted download
    tok = AutoTokenizer.from_pretrained(good)
    tok.add_tokens([f"<extra{i}>" for i in range(10)])  # 330 ids for a 320-row embedding
    tok.save_pretrained(d / "bigtok")
    for name in os.listdir(d / "notok"):
        if name.startswith("tokenizer"):
            os.remove(d / "notok" / name)
    os.remove(d / "pickled" / "model.safetensors")  # PyTorch pickle weights holding more than tensors
    torch.save({"model.embed_tokens.weight": torch.zeros(320, 32), "extra": np.ones(3)},
               d / "pickled" / "pytorch_model.bin")
    (d / "textdir").mkdir()
    (d / "textdir" / "a.txt").write_text("some text\n")
    config = json.loads((good / "config.json").read_text())
    for name, patch in {"layers_neg": {"num_hidden_layers": -2}, "layers_frac": {"num_hidden_layers": 1.5},
                        "vocab_neg": {"vocab_size": -1}, "hidden_str": {"hidden_size": "abc"},
                        "experts0": {"num_local_experts": 0}, "topk_over": {"num_experts_per_tok": 5},
                        "unknown_type": {"model_type": "no_such_family"}}.items():
        (d / "count" / name).mkdir(parents=True)
        (d / "count" / name / "config.json").write_text(json.dumps({**config, **patch}))
    (d / "count" / "not_json").mkdir()
    (d / "count" / "not_json" / "config.json").write_text('{"model_type": "mixtral",')
    (d / "count" / "dense").mkdir()
    (d / "count" / "dense" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
         "num_attention_heads": 2}))
    return d


def compress_case(id, model, *needles, flags=(), absent=()):
    return pytest.param(model, flags, needles, absent, id=id)


COMPRESS = [
    # a traceback before: SafetensorError after the model load began
    compress_case("truncated-safetensors", "@BAD/trunc", "@BAD/trunc/model.safetensors", "truncated or corrupt",
                  "download the model again"),
    # IndexError in the first forward, after ~50 s before; now refused with the tokenizer, before any load
    compress_case("tokenizer-larger-than-vocab", "@BAD/bigtok", "330 ids", "embeds only 320"),
    # refused only after 35-46 s before, suggesting the train key data.tokenizer=bpe
    compress_case("no-tokenizer", "@BAD/notok", "@BAD/notok has no readable tokenizer", "save the model's own",
                  absent=("data.",)),
    # transformers' UnpicklingError before, advising weights_only=False
    compress_case("pickle-with-objects", "@BAD/pickled", "@BAD/pickled/pytorch_model.bin", "pickled Python objects",
                  absent=("weights_only",)),
    # "does not exist" before, for an existing folder
    compress_case("calib-is-a-folder", "@GOOD", "--calib @BAD/textdir is a folder", flags=("--calib", "@BAD/textdir")),
    # refused after loading the model before
    compress_case("eval-before-without-eval", "@GOOD", "--eval-before", "--eval TEXTFILE", flags=("--eval-before",)),
    # suggested data.max_length before
    compress_case("seq-len-longer-than-the-text", "@GOOD", "fewer than one block", "lower --seq-len",
                  flags=("--seq-len", "100000"), absent=("data.",)),
    # blamed the export check (max |diff| nan), exit 1, after the progress bars
    compress_case("healing-diverges", "@GOOD", "healing diverged", "--heal-lr 1e+30",
                  flags=("--heal-steps", "2", "--heal-lr", "1e30")),
]


@pytest.mark.parametrize("model, flags, needles, absent", COMPRESS)
def test_compress_refuses_in_one_line_and_touches_nothing(folders, bad, tmp_path, model, flags,  # noqa: F811
                                                          needles, absent):
    def fill(text):
        return text.replace("@BAD", str(bad)).replace("@GOOD", str(folders / "mixtral"))

    out = tmp_path / "out"
    out.mkdir()  # an existing empty --out is allowed, and must stay as it was
    argv = [fill(model), "--kappa", "0.5", "--calib", folders / "calib.txt", *FAST, *map(fill, flags)]
    before = snapshot(folders, bad, tmp_path)
    line = assert_one_line_refusal(cli("compress", *argv, "--out", out), *map(fill, needles))
    assert not any(a in line for a in absent), line
    assert snapshot(folders, bad, tmp_path) == before


def test_compress_refuses_an_unwritable_out_before_computing(folders, bad, tmp_path):  # noqa: F811
    """Permissions cannot tell (root writes everywhere): /proc takes no new folder, even for root. The error came
    after the whole compression before, naming a temporary path."""
    out = "/proc/padmoe-compress-out"
    before = snapshot(folders, bad)
    line = assert_one_line_refusal(cli("compress", folders / "mixtral", "--kappa", "0.5", "--calib",
                                       folders / "calib.txt", *FAST, "--out", out), f"--out {out}")
    assert ".tmp-" not in line and not os.path.exists(out)
    assert snapshot(folders, bad) == before


COUNT = [  # traceback (RuntimeError / TypeError), a model with no layers, or the wrong reason before
    ("layers_neg", ("num_hidden_layers=-2",)),
    ("layers_frac", ("num_hidden_layers=1.5",)),
    ("vocab_neg", ("vocab_size=-1",)),
    ("hidden_str", ('hidden_size="abc"',)),
    ("experts0", ("num_local_experts=0",)),
    ("topk_over", ("num_experts_per_tok", "=5", "4 experts")),
    ("not_json", ("not_json/config.json", "is not valid JSON")),
    ("unknown_type", ("no_such_family", "not a model type")),
    ("dense", ("is a dense llama model", "not an HF MoE")),
]


@pytest.mark.parametrize("name, needles", COUNT, ids=[c[0] for c in COUNT])
def test_count_refuses_a_bad_hf_config_in_one_line(bad, name, needles):
    before = snapshot(bad / "count")
    line = assert_one_line_refusal(cli("count", bad / "count" / name), *needles)
    assert "--k" not in line and "neither a config file nor a preset" not in line, line
    assert snapshot(bad / "count") == before


def test_compress_clears_a_killed_runs_temporary_folder_but_not_a_live_ones(folders, tmp_path):  # noqa: F811
    """A SIGKILL during the write leaves ``.OUT.tmp-*`` (a complete copy) for ever: the next run of the same target
    removes it, saying so in one line; a folder another run holds locked (it is writing) stays."""
    import fcntl

    out = tmp_path / "out"
    stale, live, other = tmp_path / ".out.tmp-killed", tmp_path / ".out.tmp-writing", tmp_path / ".other.tmp-x"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 100)
    fd = os.open(live, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        proc = cli("compress", folders / "mixtral", "--method", "merge", "--calib", folders / "calib.txt", *FAST,
                   "--out", out)
    finally:
        os.close(fd)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 0 and len(lines) == 1 and ".out.tmp-killed" in lines[0], proc.stderr[-3000:]
    assert not stale.exists() and live.exists() and other.exists() and (out / "pad_deploy.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-x", ".out.tmp-writing", "out"]


# -- the causal-LM job's inputs (padmoe train: the same checks, called in-process: a train subprocess builds DeepSpeed
# -- ops first) and the CLI's last resort for weight files ---------------------------------------------------------
def test_train_refuses_a_truncated_model_path_naming_the_file(bad):
    from pad_moe.config import load_config
    from pad_moe.errors import UsageError
    from pad_moe.lm.job import build_model

    cfg = load_config(None, ["model.arch=causal_lm", f"model.path={bad / 'trunc'}", "data.task=vader",
                             "moe.mode=moe", "moe.num_experts=4"])
    before = snapshot(bad)
    with pytest.raises(UsageError, match="trunc/model.safetensors is truncated or corrupt") as err:
        build_model(cfg, 320, 0)
    assert "\n" not in str(err.value) and snapshot(bad) == before


def test_text_files_naming_a_folder_say_it_is_a_folder(bad):
    from pad_moe.lm.corpus import load_corpus

    with pytest.raises(ValueError, match=f"'{bad / 'textdir'}' is a folder; list the text files in it"):
        load_corpus("text", [str(bad / "textdir")])


@pytest.mark.parametrize("kind", ["SafetensorError", "UnpicklingError"])
def test_the_cli_reports_weight_file_errors_in_one_line(kind, capsys):
    """What the commands' own checks do not reach: one line, exit 2, never torch's advice to load unsafely."""
    import argparse
    import pickle

    from safetensors import SafetensorError

    from pad_moe.cli import dispatch

    error = {"SafetensorError": SafetensorError("Error while deserializing header: incomplete metadata"),
             "UnpicklingError": pickle.UnpicklingError("Weights only load failed ... weights_only=False ...")}[kind]

    def handler(args):
        raise error

    assert dispatch(argparse.Namespace(handler=handler, error_prog="padmoe train")) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("padmoe train: error:") and "weights_only" not in err, err
