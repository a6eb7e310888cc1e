"""The main job's comparison outputs (table, PNG) and the evidence grid's cells and paired statistics."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest
from scipy import stats

from pad_moe.train import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_evidence():
    spec = importlib.util.spec_from_file_location("evidence_main_job", os.path.join(REPO, "tools",
                                                                                     "evidence_main_job.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def summary(mode, value, seed=0, params=(10_000_000, 8_000_000), extra_splits=None):
    evals = {"validation": {"accuracy": value}}
    evals.update(extra_splits or {})
    return {"mode": mode, "eval": evals, "main_metric": "accuracy", "seed": seed, "params_training": params[0],
            "params_compact": params[1], "wall_time_s": 1.0}


def test_comparison_png_and_table(tmp_path):
    runs = [summary("static", 0.75), summary("moe", 0.74, params=(32e6, 32e6)), summary("pad", 0.76)]
    for r in runs:
        r["run_dir"] = "x"
    path = compare.plot_comparison(runs, str(tmp_path / "c.png"))
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = compare.table(runs)
    assert "accuracy=0.7600" in text and "32.00M" in text


def test_t_interval_matches_scipy():
    evidence = load_evidence()
    values = [0.01, -0.004, 0.02, 0.007, 0.012]
    mean, low, high = evidence.t_interval(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=stats.tmean(values), scale=stats.sem(values))
    assert mean == pytest.approx(sum(values) / 5) and (low, high) == pytest.approx(ref, abs=1e-12)


def test_cells_are_seed_major_and_shared_between_studies():
    evidence = load_evidence()
    tags = [c[0] for c in evidence.cells(["main", "kappa"])]
    assert len(tags) == len(set(tags)) == 2 * 5 * 3 + 3 * 3  # the κ=0.5 cells of kappa are main's
    assert tags[:3] == ["vader-movies-static-s0", "vader-movies-moe-s0", "vader-movies-pad-k0.5-s0"]
    overrides = {c[0]: c[2].overrides for c in evidence.cells(["methods", "scale"])}
    assert overrides["vader-movies-pad-oneshot-k0.5-s1"] == ("partition.kappa=0.5", "partition.iterations=1")
    assert "moe.scale_mode=none" in overrides["vader-movies-pad-scale_none-k0.5-s0"]


def test_report_pairs_by_seed(tmp_path):
    evidence = load_evidence()
    values = {"static": [0.70, 0.72, 0.71], "moe": [0.71, 0.70, 0.73], "pad-k0.5": [0.73, 0.74, 0.72]}
    for variant, per_seed in values.items():
        for seed, v in enumerate(per_seed):
            with open(tmp_path / f"vader-movies-{variant}-s{seed}.json", "w") as f:
                json.dump(summary(variant.split("-")[0], v, seed), f)
    (tmp_path / "vader-movies-moe-s3.json.tmp").write_text("{")  # a record being written: not counted
    (tmp_path / "cells.jsonl").write_text("")
    text = evidence.report(str(tmp_path))
    diffs = [a - b for a, b in zip(values["pad-k0.5"], values["moe"])]
    mean, low, high = evidence.t_interval(diffs)
    assert f"| vader-movies | pad-k0.5 − moe | 3 | {mean:+.4f} | [{low:+.4f}, {high:+.4f}] |" in text
    assert "| vader-movies | moe | 3 |" in text


def test_recorded_cell_is_not_rerun_and_a_new_one_is_recorded(monkeypatch, tmp_path):
    """The record (a tracked folder) is what makes the grid resumable across fresh checkouts."""
    evidence = load_evidence()
    record, out = tmp_path / "record", tmp_path / "out"
    record.mkdir()
    (record / "vader-movies-static-s0.json").write_text(json.dumps(summary("static", 0.7, 0)))
    calls = []

    def fake_run_mode(config, mode, tag, ranks, args):
        calls.append(tag)
        os.makedirs(out / tag / "checkpoints")
        return summary(mode, 0.71, 1)

    monkeypatch.setattr(evidence, "run_mode", fake_run_mode)
    cell = dict(task="vader-movies", variant=evidence.STATIC, extra=(), ranks=2, overrides=[])
    assert evidence.run_cell(str(out), str(record), "vader-movies-static-s0", seed=0, **cell)["eval"]
    assert calls == []
    evidence.run_cell(str(out), str(record), "vader-movies-static-s1", seed=1, **cell)
    assert calls == ["vader-movies-static-s1"]
    assert json.loads((record / "vader-movies-static-s1.json").read_text()) == summary("static", 0.71, 1)
    line = json.loads((record / "cells.jsonl").read_text().splitlines()[-1])
    assert line["tag"] == "vader-movies-static-s1" and "data.seed=1" in line["args"] and line["commit"]
    assert not (out / "vader-movies-static-s1" / "checkpoints").exists()


def test_each_launch_takes_a_free_rendezvous_port(monkeypatch, tmp_path):
    """Two jobs on one machine must not collide on DeepSpeed's default port 29500 (the main job next to a grid)."""
    import socket
    import subprocess

    seen = []

    class Done(Exception):
        pass

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        raise Done

    monkeypatch.setattr(subprocess, "Popen", fake_run)
    with socket.socket() as busy:  # hold 29500 if we can, as another job would
        try:
            busy.bind(("127.0.0.1", 29500))
        except OSError:
            pass
        with pytest.raises(Done):
            compare.run_mode("configs/minilm_vader.yaml", "static", "x", 2, [f"output_dir={tmp_path}"])
    port = int(seen[0][seen[0].index("--master_port") + 1])
    assert port != 29500
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_the_main_job_shows_one_progress_line_per_tenth_of_a_run():
    """bash launch/main_job.sh printed nothing for minutes while each mode trained (the output was captured)."""
    import io

    bar = "".join(f"\rrun-pad:  {i * 5}%|##| {i}/20 [00:0{i % 10}<00:{20 - i:02d},  1.5it/s, loss=0.{70 - i}]"
                  for i in range(1, 21))
    stream, out = io.StringIO("[2026] loading\n" + bar + "\n{\"name\": \"run-pad\"}\n"), io.StringIO()
    tail = compare.follow_progress(stream, "pad", out=out)
    lines = out.getvalue().splitlines()
    assert [line.split()[3] for line in lines] == [f"{i}/20" for i in (1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20)]
    assert lines[-1] == "[compare] pad: step 20/20 loss 0.50 elapsed 00:00 ETA 00:00"
    assert tail[0] == "[2026] loading" and tail[-1] == '{"name": "run-pad"}'


def test_the_small_data_study_has_its_own_tags_and_record():
    evidence = load_evidence()
    tags = [c[0] for c in evidence.cells(["small5"])]
    assert len(tags) == 2 * 5 * 3 and all(t.startswith("small5-vader-movies") for t in tags)
    assert {c[4] for c in evidence.cells(["small5"])} == {("data.max_train=2490", "train.epochs=5")}
    assert evidence.TAG.fullmatch("small5-vader-movies-reg-pad-k0.5-s4")["study"] == "small5-"
    with pytest.raises(SystemExit):  # one folder per invocation: its cells never mix with the one-epoch record
        evidence.main(["--study", "small5", "--study", "main", "--report"])


def load_pretrain():
    spec = importlib.util.spec_from_file_location("evidence_pretrain", os.path.join(REPO, "tools",
                                                                                     "evidence_pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_pretrain_report_pairs_by_seed_and_plots(tmp_path):
    pretrain = load_pretrain()
    ppl = {"dense": [60.0, 62.0, 61.0], "moe": [50.0, 53.0, 51.0], "pad-w250": [49.0, 52.5, 51.5]}
    for name, values in ppl.items():
        for seed, v in enumerate(values):
            record = {"eval": {"heldout": {"perplexity": v, "token_accuracy": 0.2}}, "params_training": 5e6,
                      "params_compact": 3e6 if name.startswith("pad") else 5e6, "step_seconds": [0.5, 0.7, 0.6],
                      "memory": {"state_bytes": 2 ** 20}, "wall_time_s": 60.0, "losses": [8.0 - i / 10 for i in range(30)],
                      "partition": {"expert_divergence": {"a": 0.8, "b": 0.6}} if name.startswith("pad") else None}
            (tmp_path / f"{name}-s{seed}.json").write_text(json.dumps(record))
    text = pretrain.report(str(tmp_path))
    mean, low, high = pretrain.t_interval([a - b for a, b in zip(ppl["moe"], ppl["dense"])])
    assert f"| moe − dense | 3 | {mean:+.2f} | [{low:+.2f}, {high:+.2f}] |" in text
    assert "| pad-w250 | 3 | 5.00M | 3.00M | 51.00 ± 1.80 | 0.2000 | 0.600 | 1.0 | 0.700 |" in text
    for path in pretrain.plot(str(tmp_path), str(tmp_path / "png")):
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def load_compress():
    spec = importlib.util.spec_from_file_location("evidence_compress", os.path.join(REPO, "tools",
                                                                                     "evidence_compress.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_compress_cells_match_bytes_per_size_and_the_report_tabulates_and_plots(tmp_path):
    ev = load_compress()
    ratios = {6: 0.82, 3: 0.56, 2: 0.47, 1: 0.38}
    cells = ev.cells(ratios, [0, 1])
    tags = [t for t, _ in cells]
    assert len(tags) == len(set(tags)) == 1 + 2 * 2 * (4 * len(ev.METHODS) + 1)
    assert tags[0] == "reference" and tags.index("pad-e6-c1") > tags.index("merge-heal-c0")  # seed-major
    for tag, flags in cells:  # every sized cell asks for the drop size's bytes; healing only in -heal cells
        method, healed, size = ev._group(tag) if tag != "reference" else ("reference", False, "")
        assert ("--heal-steps" in flags) == healed
        if method in ev.METHODS:
            assert flags[flags.index("--target-bytes-ratio") + 1] == f"{ratios[int(size[1:])]:.6f}"
        assert flags[flags.index("--seed") + 1] == tag.rsplit("-c", 1)[1] if tag != "reference" else "0"
    folder = tmp_path / "model"
    folder.mkdir()
    ppl = {"pad-e3-c0": 150.0, "pad-e3-c1": 154.0, "drop-e3-c0": 170.0, "drop-e3-c1": 160.0, "merge-heal-c0": 300.0}
    for tag, value in ppl.items():
        (folder / f"{tag}.json").write_text(json.dumps({"eval": {"perplexity": value, "token_accuracy": 0.2},
                                                        "bytes_ratio": 0.56, "wall_s": 10.0}))
    (folder / "speed.json").write_text(json.dumps({"ratios": {"pad": 1.1}}))  # the speed pass's record: not a cell
    (folder / "pad-best-e3-heal-c0.json").write_text(json.dumps({"eval": {"perplexity": 140.0, "token_accuracy": 0.2},
                                                                 "bytes_ratio": 0.56, "wall_s": 10.0}))
    (folder / "pad-best-e3-heal-c1.json").write_text(json.dumps({"eval": {"perplexity": 151.0, "token_accuracy": 0.2},
                                                                 "bytes_ratio": 0.56, "wall_s": 10.0}))
    verdict = ev.verdict(str(folder))  # the fixed PAD recipe against the best baseline, paired by seed
    from evidence_main_job import t_interval

    mean, low, high = t_interval([140.0 - 170.0, 151.0 - 160.0])
    assert f"| 3 experts | pad-best | 145.50 | drop | 165.00 | {mean:+.2f} [{low:+.2f}, {high:+.2f}] | -30.00 -9.00 |" \
        in verdict
    for name in ("pad-best-e3-heal-c0", "pad-best-e3-heal-c1", "speed"):
        (folder / f"{name}.json").unlink()
    text, groups = ev.table(str(folder))
    mean, half = ev.t_interval([150.0, 154.0])
    assert f"| 3 experts | pad | no | 0.5600 | 2 | {mean:.2f} ± {half:.2f} | 0.2000 ± 0.0000 | 10 |" in text
    assert "| 1 experts | merge | yes | 0.5600 | 1 | 300.00 | 0.2000 | 10 |" in text
    assert text.index("| 3 experts | pad |") < text.index("| 3 experts | drop |") < text.index("| 1 experts |")
    png = ev.plot(str(folder), groups, "model", str(tmp_path / "f.png"), {"pad": 1.1, "drop": 1.3})
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compress_speed_pass_loads_every_kept_output_and_records_ratios(tmp_path):
    """The --speed pass loads PAD outputs with load_deployed and baselines as plain HF models (it once imported
    load_deployed from a module that does not have it, found only when the real pass ran)."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    from pad_moe.hfmoe.deployed import save_compressed
    from pad_moe.hfmoe.experts import import_hf_moe
    from pad_moe.lm.tokenizer import train_bpe

    ev = load_compress()
    threads = torch.get_num_threads()
    config = MixtralConfig(vocab_size=320, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=128, eos_token_id=1, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    source = MixtralForCausalLM(config).eval()
    source.save_pretrained(tmp_path / "source")
    out = tmp_path / "out"
    source.save_pretrained(out / "drop-e3-c0")  # a baseline's output is a plain HF folder
    pad = MixtralForCausalLM(config).eval()
    pad.load_state_dict(source.state_dict())
    import_hf_moe(pad, granularity="neuron")
    tokenizer = train_bpe([f"line {i} of {w}" for i in range(200) for w in ("sun", "fog")], 320)
    save_compressed(pad, tokenizer, str(out / "pad-neuron-e3-c0"),
                    {"family": "mixtral", "method": "random", "kappa": 1.0, "granularity": "neuron"})
    record = tmp_path / "record"
    record.mkdir()
    try:
        ratios = ev.measure_speed(str(tmp_path / "source"), str(out), str(record), repeats=1)
    finally:
        torch.set_num_threads(threads)
    assert set(ratios) == {"drop", "pad-neuron"} and all(r > 0 for r in ratios.values())
    saved = json.loads((record / "speed.json").read_text())
    assert saved["ratios"] == ratios and saved["source_decode_tok_s"] > 0


def test_compress_resume_skips_cells_that_were_refused_but_not_ones_that_crashed(tmp_path):
    """A refusal (exit 2) is the same on every run, so a resume does not run it again (it once did, every resume);
    a crash (any other exit) is retried."""
    ev = load_compress()
    assert ev.refused(str(tmp_path)) == set()
    (tmp_path / "failures.jsonl").write_text(
        json.dumps({"tag": "pad-best-e1-c0", "rc": 2, "error": "padmoe compress: error: ..."}) + "\n"
        + json.dumps({"tag": "drop-e3-c1", "rc": 1, "error": "Traceback"}) + "\n\n"
        + json.dumps({"tag": "pad-best-e1-c0", "rc": 2, "error": "padmoe compress: error: ..."}) + "\n")
    assert ev.refused(str(tmp_path)) == {"pad-best-e1-c0"}
