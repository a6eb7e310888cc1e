"""``padmoe compress MODEL_DIR --kappa K --calib TEXT --out DIR``: make a trained HF MoE smaller with PAD.

Steps: import the experts as PAD experts (all masks one: the same model), partition on calibration text (IMP, sharded
over the ranks when launched with several: each rank scores its share of the calibration blocks, the scores are
summed), optionally heal (a few AdamW steps of next-token loss on the calibration text training only λ, the static
weights and the kept dynamic entries; the router, attention, norms, embeddings and the static-side entries of the
experts stay frozen), then write the compact export (``pad_moe.hfmoe.deployed``), reload it and check it computes what
the compressed model computed.

Methods (``--method``): ``imp`` (the paper's), ``random`` (random masks at the same κ), and two baselines at the same
stored size: ``merge`` (every layer's experts merged into their mean W_s, κ = 0: one dense FFN behind the router's
weights) and ``drop`` (keep the round(1 + κ(E−1)) experts the router picks most on the calibration text: the stored
size of PAD at κ; written as a plain HF model with fewer experts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import torch

from pad_moe.errors import UsageError, finite_float

METHODS = ("imp", "random", "merge", "drop")


def _check_inputs(model_dir, kappa, calib, out, heal_steps, method, granularity, static_init, iterations,
                  calib_batches, seq_len, batch_size, heal_lr, eval_text) -> str:
    """Every refusal that needs no model: one line each, before anything is loaded or written. Returns the family."""
    from transformers import AutoConfig

    from pad_moe.deploy.checkpoint import check_new_path
    from pad_moe.hfmoe.experts import family_of

    if method not in METHODS:
        raise UsageError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if method == "merge":
        if kappa is not None:
            raise UsageError("--method merge keeps no dynamic entry (κ = 0): drop --kappa")
    elif kappa is None or not 0 < kappa <= 1:
        raise UsageError(f"--kappa {kappa} must be in (0, 1] (the fraction of expert entries kept dynamic)")
    if method in ("merge", "drop") and granularity is not None:
        raise UsageError(f"--granularity is the PAD mask granularity of --method imp|random; --method {method} has "
                         "no masks to partition: drop --granularity")
    if method == "drop" and static_init is not None:
        raise UsageError("--static-init sets the static weight of PAD experts; --method drop keeps whole experts: "
                         "drop --static-init")
    for flag, value, low in (("--heal-steps", heal_steps, 0), ("--iterations", iterations, 1),
                             ("--calib-batches", calib_batches, 1), ("--seq-len", seq_len, 2),
                             ("--batch-size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{flag} {value} must be an integer >= {low}")
    if not heal_lr > 0:
        raise UsageError(f"--heal-lr {heal_lr} must be positive")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise UsageError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - a malformed or unknown config: one line
        raise UsageError(f"{model_dir}/config.json cannot be read ({type(err).__name__})") from None
    try:
        family = family_of(config)
    except ValueError as err:
        raise UsageError(f"{model_dir}: {err}") from None
    for flag, path in (("--calib", calib), ("--eval", eval_text)):
        if path is not None:
            _read_lines(path, flag)
    check_new_path(out, empty_dir_ok=True, what="compressed model")
    return family


def _read_lines(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} does not exist; pass a text file (one document per line)")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError:
        raise UsageError(f"{flag} {path} is not UTF-8 text") from None
    if not lines:
        raise UsageError(f"{flag} {path} is empty: pass text to {'calibrate' if flag == '--calib' else 'evaluate'} on")
    return lines


def _blocks(tokenizer, path: str, flag: str, seq_len: int):
    from pad_moe.lm.corpus import PackedBlocks
    from pad_moe.lm.tokenizer import encode_all

    try:
        return PackedBlocks(encode_all(tokenizer, _read_lines(path, flag)), seq_len, tokenizer.eos_token_id)
    except ValueError as err:
        raise UsageError(f"{flag} {path}: {err}") from None


def rank_batches(blocks, rank: int, world: int, batch_size: int, count: int) -> list[dict]:
    """This rank's share of ``count`` global batches (global batch g: blocks g·world·B .. (g+1)·world·B, rank r its
    r-th slice), cycling through the blocks."""
    n = len(blocks)
    out = []
    for g in range(count):
        first = (g * world + rank) * batch_size
        out.append(blocks.collate([blocks[(first + j) % n] for j in range(batch_size)]))
    return out


def lm_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 16) -> dict[str, float]:
    """Held-out perplexity (exp of the mean next-token loss over every block) and next-token accuracy: the
    causal-LM job's evaluation (``token_rows`` / ``lm_metrics``) on one process."""
    from pad_moe.lm.job import lm_metrics, token_rows

    model.eval()
    rows = []
    for i in range(0, len(blocks), batch_size):
        batch = blocks.collate([blocks[j] for j in range(i, min(i + batch_size, len(blocks)))])
        rows.append(token_rows(model(input_ids=batch["input_ids"]).logits, batch["labels"]))
    rows = torch.cat(rows)
    return {**lm_metrics(rows, None), "tokens": int(rows[:, 1].sum())}


def _drop_experts(model, frequency: dict[str, torch.Tensor], keep: int):
    """A new model of the same family with the ``keep`` most-routed experts of every block (ties: lower id)."""
    from transformers import AutoModelForCausalLM

    from pad_moe.hfmoe.experts import HF_MOE_FAMILIES

    config = model.config
    key = HF_MOE_FAMILIES[config.model_type]
    new_config = config.__class__.from_dict({**config.to_dict(), key: keep,
                                             "num_experts_per_tok": min(config.num_experts_per_tok, keep)})
    chosen = {name: torch.sort(torch.argsort(-f.double() + torch.arange(len(f)) * 1e-9)[:keep]).values
              for name, f in frequency.items()}
    state = {}
    for name, tensor in model.state_dict().items():
        block = next((b for b in chosen if name in (f"{b}.gate.weight", f"{b}.experts.gate_up_proj",
                                                    f"{b}.experts.down_proj")), None)
        state[name] = tensor[chosen[block]].clone() if block is not None else tensor
    smaller = AutoModelForCausalLM.from_config(new_config, dtype=torch.float32)
    smaller.load_state_dict(state, strict=True)
    return smaller, {b: c.tolist() for b, c in chosen.items()}


def _all_reduced_frequency(model, batches) -> dict[str, torch.Tensor]:
    from pad_moe import distributed as D
    from pad_moe.hfmoe.experts import router_frequencies

    counts = router_frequencies(model, batches, lambda m, b: m(input_ids=b["input_ids"]))
    return {name: D.all_reduce_(c) for name, c in counts.items()}


def _heal(model, batches, steps: int, lr: float, batch_size: int) -> list[float]:
    """``steps`` AdamW steps of next-token loss on the calibration batches; only the PAD parts train."""
    from pad_moe import distributed as D
    from pad_moe.hfmoe.experts import PadHFExperts, moe_blocks
    from pad_moe.partition.collectives import world_size

    trainable = set()
    for _, block in moe_blocks(model):
        experts = block.experts
        if isinstance(experts, PadHFExperts):  # λ, the static weights and the kept dynamic entries (masked: no grad)
            trainable |= {id(p) for p in experts.parameters(recurse=False)}
        else:  # drop: the experts that are left
            trainable |= {id(p) for p in experts.parameters()}
    params = []
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
        if p.requires_grad:
            params.append(p)
    engine = D.fine_tuning_engine(model, params, batch_size, lr)
    engine.train()
    losses = []
    for step in range(steps):
        loss = lm_loss(engine, batches[step % len(batches)])
        engine.backward(loss)
        engine.step()
        losses.append(float(D.all_reduce_(loss.detach().clone())) / world_size())
    for p in model.parameters():
        p.requires_grad_(True)
    return losses


def compress(model_dir: str, *, out: str, calib: str, kappa: Optional[float] = None, method: str = "imp",
             granularity: Optional[str] = None, static_init: Optional[str] = None, heal_steps: int = 0,
             heal_lr: float = 1e-4, iterations: int = 5, calib_batches: int = 8, seq_len: int = 128,
             batch_size: int = 8, seed: int = 0, eval_text: Optional[str] = None, eval_before: bool = False) -> dict:
    """Compress the HF MoE at ``model_dir`` into ``out`` (see the module doc); returns the summary (rank 0 writes)."""
    from transformers import AutoModelForCausalLM

    from pad_moe import distributed as D
    from pad_moe.deploy.checkpoint import AtomicDir
    from pad_moe.hfmoe.deployed import META_FILE, load_compressed, save_compressed
    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks
    from pad_moe.lm.tokenizer import model_tokenizer
    from pad_moe.partition import partition

    family = _check_inputs(model_dir, kappa, calib, out, heal_steps, method, granularity, static_init, iterations,
                           calib_batches, seq_len, batch_size, heal_lr, eval_text)
    rank, world = D.init_distributed()
    try:
        tokenizer = model_tokenizer(model_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    blocks = _blocks(tokenizer, calib, "--calib", seq_len)
    if len(blocks) < world * batch_size:
        raise UsageError(f"--calib {calib} packs into {len(blocks)} blocks of {seq_len + 1} tokens, fewer than one "
                         f"batch per rank ({world} x --batch-size {batch_size}); pass more text or lower --batch-size")
    eval_blocks = _blocks(tokenizer, eval_text, "--eval", seq_len) if eval_text else None
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    original_params = sum(p.numel() for p in model.parameters())
    summary = {"method": method, "kappa": 0.0 if method == "merge" else kappa, "family": family,
               "model_dir": os.path.abspath(model_dir), "world_size": world, "calib_blocks": len(blocks),
               "params_original": original_params}
    if eval_before and eval_blocks is None:
        raise UsageError("--eval-before evaluates the source model on the --eval text: pass --eval TEXTFILE")
    if eval_before and rank == 0:
        summary["eval_original"] = perplexity(model, eval_blocks)
    batches = rank_batches(blocks, rank, world, batch_size, calib_batches)
    frequency = None
    if method == "drop" or static_init == "frequency":
        frequency = _all_reduced_frequency(model, batches)
    if method == "drop":
        E = next(iter(moe_blocks(model)))[1].gate.weight.shape[0]
        keep = max(1, round(1 + kappa * (E - 1)))
        model, summary["kept_experts"] = _drop_experts(model, frequency, keep)
    else:
        import_hf_moe(model, granularity=granularity or "element", static_init=static_init or "mean",
                      expert_frequency=frequency)
        if method == "merge":
            for _, block in moe_blocks(model):
                block.experts.set_masks({k: torch.zeros_like(v) for k, v in block.experts.masks().items()})
        else:
            report = partition(model, batches, lm_loss, method=method, kappa=kappa, iterations=iterations, seed=seed)
            summary["partition"] = report.to_dict()
    if heal_steps:
        summary["heal_losses"] = _heal(model, batches, heal_steps, heal_lr, batch_size)
    model.eval()
    meta = {"family": family, "method": method, "kappa": summary["kappa"], "granularity": granularity or "element",
            "static_init": static_init, "heal_steps": heal_steps, "params_original": original_params,
            "source": {"model_dir": os.path.abspath(model_dir), "calib": os.path.abspath(calib)}}
    if rank == 0:
        probe = blocks.collate([blocks[j] for j in range(min(4, len(blocks)))])
        with torch.no_grad():
            expected = model(input_ids=probe["input_ids"]).logits
        with AtomicDir(out, what="compressed model") as tmp:
            if method == "drop":
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                stored = sum(p.numel() for p in model.parameters())
                meta = {"format": "pad_moe-hf-moe", "version": 1, "plain_hf": True, "params_stored": stored, **meta}
                with open(os.path.join(tmp, META_FILE), "w") as f:
                    json.dump(meta, f, indent=1)
            else:
                meta = save_compressed(model, tokenizer, tmp, meta)
            reloaded = load_compressed(tmp)
            with torch.no_grad():
                diff = float((reloaded(input_ids=probe["input_ids"]).logits - expected).abs().max())
            if not diff <= 1e-4:
                raise RuntimeError(f"the written model computes other logits than the compressed one (max |diff| "
                                   f"{diff:.3g}); nothing was written to {out}")
        summary.update(params_stored=meta["params_stored"], stored_ratio=meta["params_stored"] / original_params,
                       verified_max_abs_diff=diff, out=os.path.abspath(out))
        if eval_blocks is not None:
            summary["eval"] = perplexity(reloaded, eval_blocks)
    D.barrier()
    return summary


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe compress`` subparser."""
    p = sub.add_parser("compress", help="make a trained HF MoE smaller with PAD (IMP on calibration text)",
                       description="Import a Hugging Face MoE (Mixtral, Qwen2/Qwen3-MoE, OLMoE) as PAD experts, "
                                   "partition it on calibration text, optionally heal, and write a compact export "
                                   "that pad_moe.load_deployed reads (no DeepSpeed). Several ranks (deepspeed "
                                   "--num_gpus N -m pad_moe.cli compress ...) shard the calibration text.")
    p.add_argument("model_dir", help="a local Hugging Face MoE folder (config.json, weights, tokenizer)")
    p.add_argument("--kappa", type=finite_float, default=None, help="fraction of expert entries kept dynamic, (0, 1]")
    p.add_argument("--calib", required=True, help="calibration text, one document per line")
    p.add_argument("--out", required=True, help="new folder for the compressed model")
    p.add_argument("--method", default="imp", choices=METHODS, help="imp (default) | random | merge | drop")
    p.add_argument("--heal-steps", type=int, default=0, help="AdamW steps of healing on the calibration text")
    p.add_argument("--heal-lr", type=finite_float, default=1e-4)
    p.add_argument("--granularity", choices=("element", "neuron"), default=None, help="PAD masks (default element)")
    p.add_argument("--static-init", choices=("mean", "frequency", "first"), default=None,
                   help="W_s from the experts: mean (default), router-frequency-weighted mean, or expert 0")
    p.add_argument("--iterations", type=int, default=5, help="IMP rounds T")
    p.add_argument("--calib-batches", type=int, default=8, help="calibration batches per rank (IMP and healing)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per packed block")
    p.add_argument("--batch-size", type=int, default=8, help="blocks per batch per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval", default=None, dest="eval_text",
                   help="held-out text: report the compressed model's perplexity on it (rank 0)")
    p.add_argument("--eval-before", action="store_true", help="also the source model's perplexity on --eval")
    p.set_defaults(handler=_compress_command)
    return p


def _compress_command(args) -> int:
    try:
        summary = compress(args.model_dir, out=args.out, calib=args.calib, kappa=args.kappa, method=args.method,
                           granularity=args.granularity, static_init=args.static_init, heal_steps=args.heal_steps,
                           heal_lr=args.heal_lr, iterations=args.iterations, calib_batches=args.calib_batches,
                           seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, eval_text=args.eval_text,
                           eval_before=args.eval_before)
    except RuntimeError as err:  # the verification failed: not bad input
        print(f"padmoe compress: error: {err}", file=sys.stderr)
        return 1
    if "out" in summary:
        print(json.dumps({k: v for k, v in summary.items() if k not in ("partition", "heal_losses")}))
    return 0


def compress_main(argv: Optional[list[str]] = None) -> int:
    from pad_moe.cli import run_command

    return run_command(register, argv)
