#!/usr/bin/env python
"""Compressing a trained MoE (issue 13's evidence): ``padmoe compress`` of the Mixtral-style MoE pre-trained here
(configs/lm_mixtral_20m.yaml) at κ 0.7 / 0.5 / 0.3 / 0.1 with IMP, against random masks and dropping the
least-routed experts at the same stored size, and merging all experts into their mean (κ = 0), each with and without
healing; held-out perplexity on the pre-training run's held-out split (every other one of its 2,790 documents,
about 28k tokens, never trained on).

    python tools/evidence_compress.py --model runs/lm-mixtral-20m/hf_model [--out runs/evidence-compress] \
        [--record docs/evidence/compress] [--workers 2]
    python tools/evidence_compress.py --report [--record docs/evidence/compress]

Calibration text: 1,024 training documents drawn with seed 0 (never held-out ones). Each cell is a real
``padmoe compress`` process (one CPU thread); its JSON summary goes to ``--record/<cell>.json`` and ``cells.jsonl``
(wall time, commit). Resumable: a recorded cell is not re-run. The κ = 1 IMP cell is the uncompressed reference (its
perplexity must equal the original's: the tool checks it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORD = os.path.join(REPO_ROOT, "docs", "evidence", "compress")
KAPPAS = (0.7, 0.5, 0.3, 0.1)
HEAL = ["--heal-steps", "64", "--heal-lr", "3e-4"]
COMMON = ["--calib-batches", "16", "--batch-size", "8", "--seq-len", "128", "--iterations", "5"]


def cells() -> list[tuple[str, list[str]]]:
    """(tag, compress flags), the cells without healing first."""
    plain = [("imp-k1", ["--method", "imp", "--kappa", "1", "--eval-before"]), ("merge", ["--method", "merge"])]
    for kappa in KAPPAS:
        plain += [(f"{m}-k{kappa}", ["--method", m, "--kappa", str(kappa)]) for m in ("imp", "random", "drop")]
    healed = [(f"{tag}-heal", flags + HEAL) for tag, flags in plain if tag != "imp-k1"]
    return plain + healed


def write_texts(folder: str) -> tuple[str, str]:
    from pad_moe.lm.corpus import load_corpus, split_documents

    train, held_out = split_documents(load_corpus("wordnet+vader"))
    calib = random.Random(0).sample(train, 1024)
    held_out = held_out[::2]  # every other one: both corpora, half the evaluation cost
    paths = os.path.join(folder, "calib.txt"), os.path.join(folder, "heldout.txt")
    for path, docs in zip(paths, (calib, held_out)):
        if not os.path.isfile(path):
            with open(path + ".tmp", "w") as f:
                f.write("\n".join(docs) + "\n")
            os.replace(path + ".tmp", path)
    return paths


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "?"


def run_cell(tag: str, flags: list[str], model: str, out: str, record: str, calib: str, held_out: str) -> str:
    target = os.path.join(out, tag)
    if os.path.exists(target):  # an interrupted cell: start it again
        import shutil

        shutil.rmtree(target)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pad_moe.cli", "compress", model, "--calib", calib, "--eval",
                           held_out, "--out", target, *COMMON, *flags], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        return f"{tag}: failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary.update(tag=tag, flags=flags, wall_s=round(wall, 1))
    with open(os.path.join(record, f"{tag}.json"), "w") as f:
        json.dump(summary, f, indent=1)
    with open(os.path.join(record, "cells.jsonl"), "a") as f:
        f.write(json.dumps({"tag": tag, "wall_s": round(wall, 1), "commit": _commit(), "time": time.time()}) + "\n")
    return f"{tag}: ppl {summary['eval']['perplexity']:.2f}, stored {summary['params_stored']:,} ({wall:.0f} s)"


def report(record: str) -> str:
    rows = {}
    for name in sorted(os.listdir(record)):
        if name.endswith(".json"):
            with open(os.path.join(record, name)) as f:
                s = json.load(f)
            if "tag" in s:  # pretrain-summary.json is not a cell
                rows[s["tag"]] = s
    if not rows:
        return "no finished cells"
    ref = rows.get("imp-k1")
    lines = []
    if ref is not None:
        o = ref["eval_original"]
        lines.append(f"Original MoE: {ref['params_original'] / 1e6:.2f}M parameters, held-out perplexity "
                     f"{o['perplexity']:.2f} over {o['tokens']:,} tokens (κ=1 IMP cell: {ref['eval']['perplexity']:.2f})"
                     "\n")
    lines.append("| method | κ | healed | stored (M) | stored / original | held-out ppl | next-token acc |")
    lines.append("|---|---|---|---|---|---|---|")

    def key(tag):
        s = rows[tag]
        return (-s["kappa"], tag.endswith("-heal"), ("imp", "random", "drop", "merge").index(s["method"]))

    for tag in sorted(rows, key=key):
        s = rows[tag]
        lines.append(f"| {s['method']} | {s['kappa']:g} | {'yes' if tag.endswith('-heal') else 'no'} | "
                     f"{s['params_stored'] / 1e6:.2f} | {s['stored_ratio']:.3f} | {s['eval']['perplexity']:.2f} | "
                     f"{s['eval']['token_accuracy']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="the pre-trained MoE's Hugging Face folder (RUN_DIR/hf_model)")
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "evidence-compress"))
    p.add_argument("--record", default=RECORD)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--only", nargs="*", default=None, help="cell tags to run (default: all)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.record))
        return 0
    if not args.model or not os.path.isfile(os.path.join(args.model, "config.json")):
        print(f"evidence_compress: error: --model {args.model} is not a Hugging Face folder", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.record, exist_ok=True)
    calib, held_out = write_texts(args.out)
    todo = [(t, f) for t, f in cells() if (args.only is None or t in args.only)
            and not os.path.isfile(os.path.join(args.record, f"{t}.json"))]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(run_cell, t, f, args.model, args.out, args.record, calib, held_out) for t, f in todo]
        for fut in concurrent.futures.as_completed(futures):
            print(fut.result(), flush=True)
    ref = os.path.join(args.record, "imp-k1.json")
    if os.path.isfile(ref):
        with open(ref) as f:
            s = json.load(f)
        if s["eval"] != s["eval_original"]:
            print("evidence_compress: error: the κ=1 cell does not reproduce the original perplexity", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
