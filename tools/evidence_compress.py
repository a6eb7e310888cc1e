#!/usr/bin/env python
"""Compression at matched bytes (issue 23's evidence): ``padmoe compress`` of trained MoEs by every method, each output
at the same stored bytes as the others, with and without healing, over calibration seeds; held-out perplexity and
next-token accuracy (mean, 95 % t interval over the seeds), one frontier PNG per model, decode speed per method.

    python tools/evidence_compress.py --model NAME=HF_DIR [--seeds 0 1 2] [--out runs/evidence-compress] \
        [--record docs/evidence/compress-bytes]
    python tools/evidence_compress.py --speed --model NAME=HF_DIR          # decode tokens/s of the kept outputs
    python tools/evidence_compress.py --report [--png-dir DIR]             # tables (and PNGs) of the recorded cells

Models (tools/evidence_pretrain.py trains them; their folders are rebuilt with ``--rebuild-models``): ``scratch`` =
runs/evidence-pretrain/moe-s0/hf_model (the Mixtral MoE from scratch), ``upcycled`` =
runs/evidence-pretrain/up-moe-s0/hf_model (a dense Llama upcycled to the same Mixtral shape, then trained).

Sizes: the stored bytes of dropping to 6, 3, 2 and 1 experts per layer (the reachable points nearest to 0.8 / 0.6 /
0.45 / 0.35 of the source; a 4-layer model's embeddings and attention are about 30 % of it, so one expert per layer is
the least any method stores), every other method picks its κ to match each within 2 % (``--target-bytes-ratio``;
stored bytes count the bit-packed masks and the permutations). Methods:

  pad          IMP, element masks shared by a layer's experts, mean base (PAD's plain recipe)
  pad-best     IMP, Fisher × frequency base, experts aligned, per-expert masks under one global threshold
  pad-neuron   IMP, neuron masks, Fisher × frequency base, aligned (the form that serves narrow)
  drop         the least-routed experts dropped (router rows sliced)
  reap         REAP: the experts of least gate-weighted output norm dropped
  merge        every block's experts merged into their mean (one size: one expert per layer)

Healing (the ``-heal`` cells): 64 AdamW steps at 3e-4, KL to the source's next-token distribution, routers trained,
the best of every 16 steps kept on a held-out tenth of the calibration text (never the evaluation text). Calibration
seed c: 1,024 training documents drawn with seed c (``--seed c`` too). Evaluation: every other held-out document of
the pre-training corpus (about 28k tokens), never trained on. Every cell is one ``padmoe compress`` process (one CPU
thread), recorded in ``--record/<model>/<cell>.json`` and ``cells.jsonl`` (commit, wall time); a recorded cell is not
run again. The seed-major order leaves whole seeds if a run is cut off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)
sys.path.insert(0, os.path.join(REPO_ROOT, "tools"))
RECORD = os.path.join(REPO_ROOT, "docs", "evidence", "compress-bytes")
KEEP = (6, 3, 2, 1)
COMMON = ["--calib-batches", "16", "--batch-size", "8", "--seq-len", "128", "--iterations", "5"]
HEAL = ["--heal-steps", "64", "--heal-lr", "3e-4", "--heal-loss", "kd", "--heal-router", "--heal-select", "16"]
METHODS = {
    "pad": ["--method", "imp"],
    "pad-best": ["--method", "imp", "--static-init", "fisher", "--align", "--mask-sharing", "expert"],
    "pad-neuron": ["--method", "imp", "--granularity", "neuron", "--static-init", "fisher", "--align"],
    "drop": ["--method", "drop"],
    "reap": ["--method", "reap"],
}
ORDER = ("pad", "pad-best", "pad-neuron", "drop", "reap", "merge")


def byte_ratios(model_dir: str) -> dict[int, float]:
    """Stored bytes / the source's of dropping to k experts per block, for k in KEEP (the model's shapes only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pad_moe.hfmoe.budget import ByteModel

    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    bm = ByteModel(shapes)
    return {k: bm.drop(k) / bm.source for k in KEEP}


def cells(ratios: dict[int, float], seeds) -> list[tuple[str, list[str]]]:
    """(tag, flags): per seed, the reference (κ = 1, which must reproduce the source), then every method and size,
    unhealed before healed."""
    out = []
    for seed in seeds:
        base = ["--seed", str(seed)]
        if seed == seeds[0]:
            out.append(("reference", ["--method", "imp", "--kappa", "1", "--eval-before", *base]))
        for heal in (False, True):
            suffix, extra = ("-heal", HEAL) if heal else ("", [])
            for keep, ratio in ratios.items():
                for name, flags in METHODS.items():
                    out.append((f"{name}-e{keep}{suffix}-c{seed}",
                                [*flags, "--target-bytes-ratio", f"{ratio:.6f}", *base, *extra]))
            out.append((f"merge{suffix}-c{seed}", ["--method", "merge", *base, *extra]))
    return out


def write_texts(folder: str, seeds) -> dict:
    from pad_moe.lm.corpus import load_corpus, split_documents

    train, held_out = split_documents(load_corpus("wordnet+vader"))
    texts = {f"calib-c{s}": random.Random(s).sample(train, 1024) for s in seeds}
    texts["heldout"] = held_out[::2]  # every other one: both corpora, half the evaluation cost
    paths = {}
    for name, docs in texts.items():
        path = paths[name] = os.path.join(folder, f"{name}.txt")
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


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _seed_of(tag: str) -> int:
    return int(tag.rsplit("-c", 1)[1]) if "-c" in tag else 0


def run_cell(tag: str, flags: list[str], model: str, out: str, record: str, texts: dict, keep_output: bool) -> str:
    target = os.path.join(out, tag)
    shutil.rmtree(target, ignore_errors=True)  # an interrupted cell starts again
    calib = texts[f"calib-c{_seed_of(tag)}"]
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pad_moe.cli", "compress", model, "--calib", calib, "--eval",
                           texts["heldout"], "--out", target, *COMMON, *flags], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        line = (proc.stderr.strip().splitlines() or ["?"])[-1]
        with open(os.path.join(record, "failures.jsonl"), "a") as f:
            f.write(json.dumps({"tag": tag, "rc": proc.returncode, "error": line, "commit": _commit()}) + "\n")
        return f"{tag}: failed ({proc.returncode}): {line}"
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    summary.update(tag=tag, flags=flags, wall_s=round(wall, 1))
    with open(os.path.join(record, f"{tag}.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(record, f"{tag}.json.tmp"), os.path.join(record, f"{tag}.json"))
    with open(os.path.join(record, "cells.jsonl"), "a") as f:
        f.write(json.dumps({"tag": tag, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "wall_s": round(wall, 1),
                            "commit": _commit()}) + "\n")
    if not keep_output:
        shutil.rmtree(target, ignore_errors=True)
    return f"{tag}: ppl {summary['eval']['perplexity']:.2f}, bytes {summary['bytes_ratio']:.4f} ({wall:.0f} s)"


def refused(record: str) -> set[str]:
    """Tags whose cell ``padmoe compress`` refused (exit 2: bad input, the same on every run at this code) in
    ``record/failures.jsonl``; a resume skips them unless asked to retry."""
    path = os.path.join(record, "failures.jsonl")
    if not os.path.isfile(path):
        return set()
    with open(path) as f:
        return {r["tag"] for r in map(json.loads, filter(str.strip, f)) if r.get("rc") == 2}


# -- report -----------------------------------------------------------------------------------------------------------
def collect(folder: str) -> dict[str, dict]:
    rows = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json") and name != "speed.json":  # speed.json: the --speed pass's record, not a cell
            with open(os.path.join(folder, name)) as f:
                rows[name[:-5]] = json.load(f)
    return rows


def _group(tag: str) -> tuple[str, bool, str]:
    """(method, healed, size key) of a cell tag."""
    stem = tag.rsplit("-c", 1)[0]
    healed = stem.endswith("-heal")
    stem = stem.removesuffix("-heal")
    if stem == "merge":
        return "merge", healed, "e1"
    method, size = stem.rsplit("-", 1)
    return method, healed, size


def t_interval(values: list[float]) -> tuple[float, float]:
    from evidence_main_job import t_interval as interval

    mean, low, high = interval(values)
    return mean, (high - low) / 2


def _mean_interval(values: list[float], digits: int) -> str:
    """'mean ± 95 % half-width' over the seeds, or the one value."""
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    mean, half = t_interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def table(folder: str) -> tuple[str, dict]:
    rows = collect(folder)
    ref = rows.pop("reference", None)
    groups: dict[tuple, list[dict]] = {}
    for tag, s in rows.items():
        groups.setdefault(_group(tag), []).append(s)
    lines = []
    if ref is not None:
        o = ref["eval_original"]
        lines.append(f"Source: {ref['params_original'] / 1e6:.2f}M parameters, held-out perplexity {o['perplexity']:.2f}"
                     f", next-token accuracy {o['token_accuracy']:.4f} over {o['tokens']:,} tokens (κ = 1 PAD export: "
                     f"{ref['eval']['perplexity']:.2f}).\n")
    lines += ["| size (experts' bytes) | method | healed | stored / source (bytes) | seeds | held-out ppl (±95 %) | "
              "next-token acc (±95 %) | wall (s) |", "|---|---|---|---|---|---|---|---|"]
    sizes = sorted({g[2] for g in groups}, key=lambda k: -int(k[1:]))
    for size in sizes:
        for method in ORDER:
            for healed in (False, True):
                runs = groups.get((method, healed, size))
                if not runs:
                    continue
                ppl = _mean_interval([r["eval"]["perplexity"] for r in runs], 2)
                acc = _mean_interval([r["eval"]["token_accuracy"] for r in runs], 4)
                lines.append(f"| {size[1:]} experts | {method} | {'yes' if healed else 'no'} | "
                             f"{statistics.mean(r['bytes_ratio'] for r in runs):.4f} | {len(runs)} | {ppl} | {acc} | "
                             f"{statistics.mean(r['wall_s'] for r in runs):.0f} |")
    return "\n".join(lines), groups


PAD_RECIPE = ("pad-best", "pad-neuron")  # fixed before the runs: the first one that reaches the size, healed
BASELINES = ("drop", "reap", "merge")


def verdict(folder: str) -> str:
    """Per size: the fixed PAD recipe against the best baseline there (chosen on the evaluation text, which favours
    the baselines), paired by calibration seed, 95 % t interval of the perplexity difference."""
    from evidence_main_job import t_interval as interval

    by_seed: dict[tuple, dict[str, float]] = {}
    for tag, s in collect(folder).items():
        if tag != "reference":
            by_seed.setdefault(_group(tag), {})[_seed_of(tag)] = s["eval"]["perplexity"]
    lines = ["| size | PAD recipe (healed) | ppl | best baseline | ppl | PAD − baseline (95 %, paired by seed) | per seed |",
             "|---|---|---|---|---|---|---|"]
    for size in sorted({k[2] for k in by_seed}, key=lambda k: -int(k[1:])):
        pad = next((m for m in PAD_RECIPE if (m, True, size) in by_seed), None)
        candidates = [(statistics.mean(v.values()), m, h) for (m, h, z), v in by_seed.items()
                      if z == size and m in BASELINES]
        if pad is None or not candidates:
            continue
        _, base, healed = min(candidates)
        a, b = by_seed[(pad, True, size)], by_seed[(base, healed, size)]
        seeds = sorted(set(a) & set(b))
        diffs = [a[c] - b[c] for c in seeds]
        mean, low, high = interval(diffs) if len(diffs) > 1 else (diffs[0], float("nan"), float("nan"))
        lines.append(f"| {size[1:]} experts | {pad} | {statistics.mean(a[c] for c in seeds):.2f} | {base}"
                     f"{' healed' if healed else ''} | {statistics.mean(b[c] for c in seeds):.2f} | {mean:+.2f} "
                     f"[{low:+.2f}, {high:+.2f}] | {' '.join(f'{d:+.2f}' for d in diffs)} |")
    return "\n".join(lines)


def plot(folder: str, groups: dict, title: str, png: str, speeds: dict | None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if speeds else 1, figsize=(12 if speeds else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    colours = dict(zip(ORDER, ("tab:blue", "tab:red", "tab:purple", "tab:green", "tab:orange", "tab:gray")))
    for method in ORDER:
        for healed in (False, True):
            points = sorted((statistics.mean(r["bytes_ratio"] for r in runs),
                             statistics.mean(r["eval"]["perplexity"] for r in runs))
                            for (m, h, _), runs in groups.items() if m == method and h == healed)
            if points:
                ax.plot(*zip(*points), marker="o" if healed else "x", linestyle="-" if healed else "--",
                        color=colours[method], label=f"{method}{' healed' if healed else ''}")
    best = min(y for line in ax.get_lines() for y in line.get_ydata())
    ax.set_ylim(0.98 * best, 1.4 * best)  # the frontier lives near the source; the collapsed cells are in the table
    ax.set(xlabel="stored bytes / source", ylabel="held-out perplexity (mean over seeds)",
           title=f"{title}: the frontier (clipped at 1.4x the best cell)")
    ax.legend(fontsize=7)
    if speeds:
        names = list(speeds)
        axes[0][1].barh(names, [speeds[n] for n in names])
        axes[0][1].axvline(1.0, color="k", lw=0.8)
        axes[0][1].set(xlabel="decode tokens/s / source's (batch 1, greedy, KV cache)", title="decode speed")
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def measure_speed(model: str, out: str, record: str, repeats: int = 5) -> dict[str, float]:
    """Decode tokens/s of each method's kept output (seed 0, the 3-expert size) relative to the source, in one
    process, source and outputs alternated so that a load change on the machine hits them alike."""
    import torch

    from bench_deployed import speed

    from pad_moe.deploy.export import load_deployed

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    models = {"source": AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()}
    for name in ORDER:
        folder = os.path.join(out, f"{name}-c0" if name == "merge" else f"{name}-e3-c0")
        if os.path.isdir(folder):
            models[name] = load_deployed(folder) if os.path.isfile(os.path.join(folder, "pad_deploy.json")) else \
                AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok_s: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, m in models.items():
            tok_s[name].append(speed(m, 1, 64, 32, 1, "cpu")["decode_tok_s"])
    source = statistics.median(tok_s["source"])
    ratios = {name: statistics.median(v) / source for name, v in tok_s.items() if name != "source"}
    with open(os.path.join(record, "speed.json"), "w") as f:
        json.dump({"source_decode_tok_s": source, "ratios": ratios, "commit": _commit(),
                   "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "batch": 1, "prompt": 64, "new": 32,
                   "threads": 1, "repeats": repeats}, f, indent=1)
    return ratios


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], metavar="NAME=HF_DIR", help="repeatable")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default=os.path.join(REPO_ROOT, "runs", "evidence-compress"))
    p.add_argument("--record", default=RECORD)
    p.add_argument("--only", nargs="*", default=None, help="cell tags to run (default: all)")
    p.add_argument("--speed", action="store_true", help="measure the decode speed of the kept seed-0 outputs")
    p.add_argument("--retry-refused", action="store_true",
                   help="run again the cells compress refused before (exit 2 in failures.jsonl)")
    p.add_argument("--report", action="store_true")
    p.add_argument("--png-dir", default=None)
    args = p.parse_args(argv)
    if args.report:
        for name in sorted(os.listdir(args.record)) if os.path.isdir(args.record) else []:
            folder = os.path.join(args.record, name)
            if not os.path.isdir(folder):
                continue
            text, groups = table(folder)
            print(f"### {name}\n\n{text}\n\n{verdict(folder)}\n")
            speeds = None
            if os.path.isfile(os.path.join(folder, "speed.json")):
                with open(os.path.join(folder, "speed.json")) as f:
                    speeds = json.load(f)["ratios"]
                print("decode tokens/s / source's: " + ", ".join(f"{k} {v:.2f}×" for k, v in speeds.items()) + "\n")
            if args.png_dir and groups:
                os.makedirs(args.png_dir, exist_ok=True)
                print(plot(folder, groups, name, os.path.join(args.png_dir, f"compress-{name}.png"), speeds))
        return 0
    models = {}
    for item in args.model:
        name, _, path = item.partition("=")
        if not name or not os.path.isfile(os.path.join(path, "config.json")):
            print(f"evidence_compress: error: --model {item!r} must be NAME=HF_DIR of a Hugging Face folder "
                  "(tools/evidence_pretrain.py --rebuild-models rebuilds the study's)", file=sys.stderr)
            return 2
        models[name] = path
    if not models:
        print("evidence_compress: error: pass --model NAME=HF_DIR", file=sys.stderr)
        return 2
    for name, path in models.items():
        out, record = os.path.join(args.out, name), os.path.join(args.record, name)
        os.makedirs(out, exist_ok=True)
        os.makedirs(record, exist_ok=True)
        if args.speed:
            print(name, json.dumps(measure_speed(path, out, record)))
            continue
        texts = write_texts(args.out, args.seeds)
        skip = set() if args.retry_refused else refused(record)
        for tag, flags in cells(byte_ratios(path), args.seeds):
            if (args.only is not None and tag not in args.only) or os.path.isfile(os.path.join(record, f"{tag}.json")):
                continue
            if tag in skip:
                print(f"{tag}: refused on an earlier run (failures.jsonl), skipped; --retry-refused runs it again")
                continue
            keep = tag.endswith("-e3-c0") or tag == "merge-c0"  # the outputs the speed pass measures
            print(run_cell(tag, flags, path, out, record, texts, keep), flush=True)
        ref = os.path.join(record, "reference.json")
        if os.path.isfile(ref):
            with open(ref) as f:
                s = json.load(f)
            if abs(s["eval"]["perplexity"] - s["eval_original"]["perplexity"]) > 1e-4 * s["eval_original"]["perplexity"]:
                print(f"evidence_compress: error: {name}: the κ=1 cell does not reproduce the source's perplexity",
                      file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
