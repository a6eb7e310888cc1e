#!/usr/bin/env python
"""Serving a compressed HF MoE as a user meets it: prefill and decode tokens/s of ``pad_moe.load_deployed`` outputs
against the source model, in one invocation (ratios measured in the same process, same threads, same prompts).

    python tools/bench_deployed.py [--model DIR] [--kappa 0.5] [--batches 1 8] [--prompt 128] [--new 32] \
        [--threads 1] [--repeats 3] [--rounds 3] [--device cpu|cuda] [--dtype fp32|bf16] [--json PATH]

The source: ``--model`` (a trained HF MoE folder with its tokenizer) or, by default, a randomly initialised
Mixtral-style MoE of the size the compression evidence uses (4 layers, H=256, 8 experts of F=640, top-2, 8,192 ids:
speed does not depend on training). Outputs, each written by ``padmoe compress`` (``--method random``: the masks'
quality does not change the speed; IMP gives the same forms) and loaded with ``load_deployed``:

  pad-element/full     element masks, effective weights rebuilt once at load (the default for element)
  pad-element/compact  element masks, weights rebuilt at every forward (resident = the stored bytes)
  pad-neuron/narrow    neuron masks, static units one narrow FFN + narrow experts (the default for neuron)
  pad-neuron/compact   neuron masks, rebuilt at every forward
  drop                 the least-routed experts dropped (plain HF model) at about PAD's stored size
  merge                every block's experts merged into one FFN (κ = 0)

Per output: prefill tokens/s (one forward over batch × prompt tokens), decode tokens/s (greedy ``generate`` with the
KV cache, ``--new`` tokens per sequence after the prompt; the prefill is subtracted), resident bytes (parameters and
buffers the loaded model holds), disk bytes (the folder's files), and each ratio to the source. A benchmark, not a
test: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

OUTPUTS = (("pad-element", ["--method", "random", "--granularity", "element"], ("full", "compact")),
           ("pad-neuron", ["--method", "random", "--granularity", "neuron"], ("narrow", "compact")),
           ("drop", ["--method", "drop"], (None,)),
           ("merge", ["--method", "merge"], (None,)))


def source_model(folder: str, texts: list[str]) -> str:
    """A randomly initialised Mixtral-style MoE with a BPE tokenizer, saved to ``folder``."""
    from transformers import GenerationConfig, MixtralConfig, MixtralForCausalLM

    from pad_moe.lm.tokenizer import train_bpe

    tokenizer = train_bpe(texts, 8192)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=8192, hidden_size=256, intermediate_size=640, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=None,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = MixtralForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def texts_for_calibration() -> list[str]:
    from pad_moe.lm.corpus import load_corpus

    for task in ("wordnet+vader", "vader", "wordnet"):
        try:
            return load_corpus(task)[:20000]
        except ValueError:
            continue
    raise SystemExit("bench_deployed: no offline corpus (apt-get install -y wordnet-base, or python -m pad_moe.data)")


def resident_bytes(model) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def disk_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.endswith((".safetensors", ".bin")))


@torch.no_grad()
def speed(model, batch: int, prompt: int, new: int, repeats: int, device: str) -> dict[str, float]:
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(1)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model(input_ids=ids)  # warm-up
    prefill, decode = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids)
        sync()
        t_prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, use_cache=True)
        sync()
        t_gen = time.perf_counter() - t0
        prefill.append(batch * prompt / t_prefill)
        decode.append(batch * (new - 1) / max(t_gen - t_prefill, 1e-9))  # the first new token comes from the prefill
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a trained HF MoE folder (default: a random 21M Mixtral-style MoE)")
    p.add_argument("--kappa", type=float, default=0.5)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per round (their median)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all outputs (the median of rounds)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--work", default=None, help="folder for the outputs (default: a temporary one)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from pad_moe.deploy.export import load_deployed
    from pad_moe.hfmoe.compress import compress

    hf_logging.disable_progress_bar()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    work = args.work or tempfile.mkdtemp(prefix="bench-deployed-")
    os.makedirs(work, exist_ok=True)
    texts = texts_for_calibration()
    calib = os.path.join(work, "calib.txt")
    with open(calib, "w") as f:
        f.write("\n".join(texts[:2000]) + "\n")
    source = args.model or source_model(os.path.join(work, "source"), texts)
    candidates = [("source", None, lambda: AutoModelForCausalLM.from_pretrained(source, dtype=dtype), source)]
    source_bytes = disk_bytes(source)
    for name, flags, forms in OUTPUTS:
        out = os.path.join(work, name)
        if not os.path.isdir(out):
            extra = [] if name == "merge" else ["--kappa", str(args.kappa)]
            if name == "drop":  # keep as many experts as PAD's stored size allows (the closest integer count)
                extra = ["--kappa", str(args.kappa)]
            compress(source, out=out, calib=calib, calib_batches=2, batch_size=4, seq_len=64,
                     **_flags(flags + extra))
        for form in forms:
            label = name if form is None else f"{name}/{form}"
            load = (lambda o=out, f=form: load_deployed(o, dtype=dtype, **({} if f is None else {"resident": f})))
            candidates.append((label, form, load, out))
    # every output loaded once, then measured in interleaved rounds: a drift of the machine's speed hits all alike
    models, rows = [], []
    for label, _form, load, folder in candidates:
        models.append(load().to(args.device).eval())
        rows.append({"output": label, "resident_bytes": resident_bytes(models[-1]), "disk_bytes": disk_bytes(folder)})
    samples: dict[tuple[int, str], list[float]] = {}
    for _ in range(args.rounds):
        for i, model in enumerate(models):
            for b in args.batches:
                for key, value in speed(model, b, args.prompt, args.new, args.repeats, args.device).items():
                    samples.setdefault((i, f"{key}@{b}"), []).append(value)
    for (i, key), values in samples.items():
        rows[i][key] = statistics.median(values)
    del models
    base = rows[0]
    print(f"device {args.device}, {args.dtype}, {args.threads} thread(s), prompt {args.prompt}, {args.new} new tokens, "
          f"κ={args.kappa}, source disk {source_bytes / 2**20:.1f} MiB")
    keys = [k for k in base if "@" in k]
    print("| output | disk (× source) | resident (× source) | " + " | ".join(f"{k} (× source)" for k in keys) + " |")
    print("|---|---|---|" + "---|" * len(keys))
    for row in rows:
        cells = [f"{row[k]:.0f} ({row[k] / base[k]:.2f}×)" for k in keys]
        print(f"| {row['output']} | {row['disk_bytes'] / 2**20:.1f} MiB ({row['disk_bytes'] / base['disk_bytes']:.2f}×) "
              f"| {row['resident_bytes'] / 2**20:.1f} MiB ({row['resident_bytes'] / base['resident_bytes']:.2f}×) | "
              + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


def _flags(flags: list[str]) -> dict:
    out = {}
    for key, value in zip(flags[::2], flags[1::2]):
        name = key.lstrip("-").replace("-", "_")
        out[name] = float(value) if name == "kappa" else value
    return out


if __name__ == "__main__":
    sys.exit(main())
