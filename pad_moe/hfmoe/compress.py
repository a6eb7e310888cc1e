"""``padmoe compress MODEL_DIR --kappa K --calib TEXT --out DIR``: make a trained HF MoE smaller with PAD.

Steps: the source's statistics on the calibration text that the options need (summed over the ranks), import the
experts as PAD experts (all masks one: the same model), partition on calibration text (IMP, sharded over the ranks
when launched with several: each rank scores its share of the calibration blocks, the scores are summed), optionally
heal (a few AdamW steps on the calibration text training only λ, the static weights and the kept dynamic entries, and
the routers if asked; attention, norms, embeddings and the static-side entries of the experts stay frozen), then
write the compact export (``pad_moe.hfmoe.deployed``), reload it and check it computes what the compressed model
computed and stores the bytes counted.

Methods (``--method``): ``imp`` (the paper's), ``random`` (random masks at the same κ), and baselines in the same output
format: ``merge`` (every layer's experts merged into their W_s, κ = 0: one dense FFN behind the router's weights),
``drop`` (keep the round(1 + κ(E−1)) experts the router picks most on the calibration text) and ``reap`` (keep the
experts of highest REAP saliency; ``pad_moe.hfmoe.baselines``), both written as plain HF models with fewer experts.

Options of the PAD methods: ``--static-init fisher`` (W_s weighted per entry by frequency × diagonal Fisher,
``pad_moe.hfmoe.calibration``), ``--align`` (experts' hidden units permuted to a reference first,
``pad_moe.hfmoe.align``), ``--mask-sharing expert`` (per-expert masks under one global threshold, κ a byte budget,
``pad_moe.hfmoe.budget``); of healing: ``--heal-loss kd``, ``--heal-router``, ``--heal-select N``
(``pad_moe.hfmoe.healing``); of every method: ``--target-bytes-ratio R`` (κ or the expert count picked so the output
stores R × the source's bytes within 2 %, or one line naming the nearest reachable ratio). Every output's
pad_deploy.json records ``bytes_stored`` (values at fp32 + bit-packed masks).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from typing import Optional

import torch

from pad_moe.errors import UsageError, finite_float
from pad_moe.hfmoe.healing import lm_loss

METHODS = ("imp", "random", "merge", "drop", "reap")
PRUNING = ("drop", "reap")  # plain HF outputs: whole experts kept, no masks
REAP_LAYOUTS = ("concatenated", "gpt_oss")  # experts(hidden, top_k_index, top_k_weights): a gate weight per output


def _check_inputs(model_dir, kappa, calib, out, heal_steps, method, granularity, static_init, iterations,
                  calib_batches, seq_len, batch_size, heal_lr, eval_text, eval_before=False, options=None):
    """Every refusal that needs no model: one line each, before anything is loaded or written. Returns the family,
    the model's tokenizer and its config."""
    from transformers import AutoConfig

    from pad_moe.deploy.checkpoint import check_new_path
    from pad_moe.hfmoe.experts import family_of
    from pad_moe.hfmoe.weights import check_weight_files
    from pad_moe.lm.tokenizer import model_tokenizer

    _check_flags(method, kappa, granularity, static_init, heal_steps, **(options or {}))
    for flag, value, low in (("--heal-steps", heal_steps, 0), ("--iterations", iterations, 1),
                             ("--calib-batches", calib_batches, 1), ("--seq-len", seq_len, 2),
                             ("--batch-size", batch_size, 1)):
        if not isinstance(value, int) or value < low:
            raise UsageError(f"{flag} {value} must be an integer >= {low}")
    if not heal_lr > 0:
        raise UsageError(f"--heal-lr {heal_lr} must be positive")
    if eval_before and eval_text is None:
        raise UsageError("--eval-before evaluates the source model on the --eval text: pass --eval TEXTFILE")
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
    check_weight_files(model_dir)
    for flag, path in (("--calib", calib), ("--eval", eval_text)):
        if path is not None:
            _read_lines(path, flag)
    check_new_path(out, empty_dir_ok=True, what="compressed model")
    try:
        tokenizer = model_tokenizer(model_dir, fix="save the model's own tokenizer into it (save_pretrained)")
    except ValueError as err:
        raise UsageError(str(err)) from None
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:  # ids past the embedding: IndexError in the first forward
        raise UsageError(f"the tokenizer of {model_dir} has {len(tokenizer)} ids but the model embeds only {vocab} "
                         "(config.json vocab_size); save the model's own tokenizer into the folder")
    return family, tokenizer, config


def _check_flags(method, kappa, granularity, static_init, heal_steps, *, align=False, mask_sharing=None,
                 heal_loss=None, heal_router=False, heal_select=None, target_bytes_ratio=None) -> None:
    """The flag combinations that make no sense, one line each."""
    from pad_moe.hfmoe.experts import MASK_SHARINGS
    from pad_moe.hfmoe.healing import LOSSES

    if method not in METHODS:
        raise UsageError(f"--method {method!r} is unknown; use one of {', '.join(METHODS)}")
    if target_bytes_ratio is not None:
        if not (isinstance(target_bytes_ratio, (int, float)) and math.isfinite(target_bytes_ratio)
                and target_bytes_ratio > 0):
            raise UsageError(f"--target-bytes-ratio {target_bytes_ratio} must be a positive number (the output's "
                             "stored bytes over the source's)")
        if kappa is not None:
            raise UsageError("--target-bytes-ratio picks the size (κ or the expert count) itself: drop --kappa")
    elif method == "merge":
        if kappa is not None:
            raise UsageError("--method merge keeps no dynamic entry (κ = 0): drop --kappa")
    elif kappa is None or not 0 < kappa <= 1:
        raise UsageError(f"--kappa {kappa} must be in (0, 1] (the fraction of expert entries kept dynamic)")
    if method in ("merge", *PRUNING) and granularity is not None:
        raise UsageError(f"--granularity is the PAD mask granularity of --method imp|random; --method {method} has "
                         "no masks to partition: drop --granularity")
    if method in PRUNING:
        for flag, given in (("--static-init", static_init is not None), ("--align", align),
                            ("--mask-sharing", mask_sharing is not None)):
            if given:
                raise UsageError(f"{flag} shapes the PAD experts (W_s, their units, their masks); --method {method} "
                                 f"keeps whole experts: drop {flag}")
    if mask_sharing is not None and mask_sharing not in MASK_SHARINGS:
        raise UsageError(f"--mask-sharing {mask_sharing!r} is unknown; use one of {', '.join(MASK_SHARINGS)}")
    if mask_sharing == "expert" and method == "merge":
        raise UsageError("--mask-sharing expert shares out dynamic entries; --method merge keeps none: drop "
                         "--mask-sharing")
    if heal_loss is not None and heal_loss not in LOSSES:
        raise UsageError(f"--heal-loss {heal_loss!r} is unknown; use one of {', '.join(LOSSES)}")
    if heal_select is not None and (not isinstance(heal_select, int) or heal_select < 1):
        raise UsageError(f"--heal-select {heal_select} must be an integer >= 1 (evaluate every N healing steps)")
    if not (isinstance(heal_steps, int) and heal_steps > 0):
        for flag, given in (("--heal-loss", heal_loss is not None), ("--heal-router", heal_router),
                            ("--heal-select", heal_select is not None)):
            if given:
                raise UsageError(f"{flag} sets how healing runs; without --heal-steps N there is no healing: pass "
                                 f"--heal-steps or drop {flag}")


def _check_writable(out: str) -> None:
    """Create and remove a folder where the output's temporary folder will go (permissions alone do not tell: root,
    read-only or pseudo file systems), restoring that folder's mtime: a refusal here leaves the disk as it was."""
    import tempfile

    parent = os.path.dirname(out)
    while not os.path.isdir(parent):
        parent = os.path.dirname(parent)
    before = os.stat(parent)
    try:
        probe = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot create a folder in {parent} ({err.strerror}); choose another "
                         "--out") from None
    os.rmdir(probe)
    os.utime(parent, ns=(before.st_atime_ns, before.st_mtime_ns))


def _remove_stale_temp_folders(out: str) -> None:
    """Remove the temporary folders of ``out`` that no live run holds (a killed run's; a writing run holds a lock on
    its own, see ``_locked``), saying so in one line."""
    import fcntl
    import glob
    import shutil

    parent, name = os.path.split(out)
    stale = []
    for path in sorted(glob.glob(os.path.join(glob.escape(parent), f".{glob.escape(name)}.tmp-*"))):
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # another run is writing it
        finally:
            os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
        stale.append(os.path.basename(path))
    if stale:
        print(f"padmoe compress: removed {len(stale)} temporary folder(s) of an interrupted run next to {out}: "
              f"{', '.join(stale)}", file=sys.stderr)


@contextlib.contextmanager
def _locked(folder: str):
    """An exclusive lock on ``folder`` while the block runs (the kernel drops it when the process dies): it marks the
    temporary folder as live for ``_remove_stale_temp_folders`` of a concurrent run."""
    import fcntl

    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_lines(path: str, flag: str) -> list[str]:
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder; pass a text file (one document per line)")
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
        return PackedBlocks(encode_all(tokenizer, _read_lines(path, flag)), seq_len, tokenizer.eos_token_id,
                            length_key="--seq-len")
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


def compress(model_dir: str, *, out: str, calib: str, kappa: Optional[float] = None, method: str = "imp",
             granularity: Optional[str] = None, static_init: Optional[str] = None, heal_steps: int = 0,
             heal_lr: float = 1e-4, iterations: int = 5, calib_batches: int = 8, seq_len: int = 128,
             batch_size: int = 8, seed: int = 0, eval_text: Optional[str] = None, eval_before: bool = False,
             align: bool = False, mask_sharing: Optional[str] = None, heal_loss: Optional[str] = None,
             heal_router: bool = False, heal_select: Optional[int] = None,
             target_bytes_ratio: Optional[float] = None) -> dict:
    """Compress the HF MoE at ``model_dir`` into ``out`` (see the module doc); returns the summary (rank 0 writes)."""
    from transformers import AutoModelForCausalLM

    from pad_moe import distributed as D
    from pad_moe.deploy.checkpoint import AtomicDir
    from pad_moe.hfmoe import budget
    from pad_moe.hfmoe.deployed import load_compressed, save_compressed, save_plain_hf
    from pad_moe.hfmoe.healing import heal, split_held_out

    options = dict(align=align, mask_sharing=mask_sharing, heal_loss=heal_loss, heal_router=heal_router,
                   heal_select=heal_select, target_bytes_ratio=target_bytes_ratio)
    family, tokenizer, config = _check_inputs(model_dir, kappa, calib, out, heal_steps, method, granularity,
                                              static_init, iterations, calib_batches, seq_len, batch_size, heal_lr,
                                              eval_text, eval_before, options)
    blocks = _blocks(tokenizer, calib, "--calib", seq_len)
    eval_blocks = _blocks(tokenizer, eval_text, "--eval", seq_len) if eval_text else None
    world = int(os.environ.get("WORLD_SIZE", "1"))  # the launcher's; init_distributed below confirms it
    held_blocks = None
    if heal_select:
        blocks, held_blocks = split_held_out(blocks)
    if len(blocks) < world * batch_size:
        held = f" after holding out {len(held_blocks)} for --heal-select" if held_blocks is not None else ""
        raise UsageError(f"--calib {calib} packs into {len(blocks)} blocks of {seq_len + 1} tokens{held}, fewer than "
                         f"one batch per rank ({world} x --batch-size {batch_size}); pass more text or lower "
                         "--batch-size")
    if static_init == "fisher" and len(blocks) < world * batch_size * calib_batches:
        raise UsageError(f"--static-init fisher averages squared gradients over {calib_batches} distinct batches per "
                         f"rank ({world} x {calib_batches} x --batch-size {batch_size} blocks); --calib {calib} packs "
                         f"into {len(blocks)} blocks of {seq_len + 1} tokens: pass more text or lower --calib-batches")
    # merge keeps no dynamic unit: neuron masks (all zero, the same model) serve it as one narrow FFN per block
    granularity = granularity or ("neuron" if method == "merge" else "element")
    sharing = mask_sharing or "layer"
    plan = _plan_size(config, method, kappa, granularity, sharing, align, target_bytes_ratio)
    kappa = plan.get("kappa", kappa)
    out = os.path.abspath(out)
    if int(os.environ.get("RANK", "0")) == 0:  # the rank that writes (and no two probes racing on the mtime)
        _check_writable(out)
    rank, world = D.init_distributed()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    original_params = budget.stored_numel(model)  # parameters and persistent buffers (a router's bias)
    bytes_model = budget.ByteModel(model)
    summary = {"method": method, "kappa": 0.0 if method == "merge" else kappa, "family": family,
               "model_dir": os.path.abspath(model_dir), "world_size": world, "calib_blocks": len(blocks),
               "params_original": original_params, "bytes_source": bytes_model.source}
    if eval_before and rank == 0:
        summary["eval_original"] = perplexity(model, eval_blocks)
    batches = rank_batches(blocks, rank, world, batch_size, calib_batches)
    prepared = _prepare(model, batches, method, static_init, align, heal_steps and heal_loss == "kd",
                        held_blocks, batch_size)
    summary.update(prepared["summary"])
    if method in PRUNING:
        model, summary["kept_experts"] = _prune(model, method, plan["keep"], prepared)
    else:
        summary.update(_pad(model, batches, method, kappa, granularity, sharing, static_init, iterations, seed,
                            prepared, plan, bytes_model))
    if heal_steps:
        summary["heal"] = heal(model, batches, steps=heal_steps, lr=heal_lr, batch_size=batch_size,
                               loss=heal_loss or "lm", teachers=prepared.get("teachers"), router=heal_router,
                               select_every=heal_select, held_out=prepared.get("held_out"),
                               held_out_teachers=prepared.get("held_out_teachers"))
        summary["heal_losses"] = summary["heal"]["losses"]
    model.eval()
    meta = {"family": family, "method": method, "kappa": summary["kappa"], "granularity": granularity,
            "static_init": static_init, "heal_steps": heal_steps, "params_original": original_params,
            "bytes_source": bytes_model.source, "target_bytes_ratio": target_bytes_ratio,
            "mask_sharing": None if method in PRUNING else sharing,
            "norm_topk_prob": getattr(model.config, "norm_topk_prob", None),
            **{k: summary[k] for k in ("align", "budget", "heal", "kept_experts") if k in summary},
            "source": {"model_dir": os.path.abspath(model_dir), "calib": os.path.abspath(calib)}}
    if rank == 0:
        probe = blocks.collate([blocks[j] for j in range(min(4, len(blocks)))])
        with torch.no_grad():
            expected = model(input_ids=probe["input_ids"]).logits
        _remove_stale_temp_folders(out)
        with AtomicDir(out, what="compressed model") as tmp, _locked(tmp):
            save = save_plain_hf if method in PRUNING else save_compressed  # generation config and manifest included
            meta = save(model, tokenizer, tmp, meta)
            _check_bytes(model, meta, method, target_bytes_ratio, bytes_model, out)
            reloaded = load_compressed(tmp)
            with torch.no_grad():
                diff = float((reloaded(input_ids=probe["input_ids"]).logits - expected).abs().max())
            if not diff <= 1e-4:
                raise RuntimeError(f"the written model computes other logits than the compressed one (max |diff| "
                                   f"{diff:.3g}); nothing was written to {out}")
        summary.update(params_stored=meta["params_stored"], stored_ratio=meta["params_stored"] / original_params,
                       bytes_stored=meta["bytes_stored"], bytes_ratio=meta["bytes_stored"] / bytes_model.source,
                       verified_max_abs_diff=diff, out=os.path.abspath(out))
        if eval_blocks is not None:
            summary["eval"] = perplexity(reloaded, eval_blocks)
    D.barrier()
    return summary


def _plan_size(config, method, kappa, granularity, sharing, align, ratio) -> dict:
    """What needs only the model's shapes (a meta-device model): --align on gated experts, the κ or the expert count
    --target-bytes-ratio asks for, the byte budget of per-expert masks; one line each."""
    from transformers import AutoModelForCausalLM

    from pad_moe.hfmoe import budget
    from pad_moe.hfmoe.align import check_gated
    from pad_moe.hfmoe.experts import moe_blocks
    from pad_moe.hfmoe.families import family_spec

    with torch.device("meta"):
        shapes = AutoModelForCausalLM.from_config(config)
    spec = family_spec(config)
    try:
        if align:
            for name, block in moe_blocks(shapes):
                check_gated(name, block.experts, spec.expert_layout)
        if method == "reap" and spec.expert_layout.name not in REAP_LAYOUTS:
            raise ValueError(f"--method reap weighs each expert's output by its gate weight; {spec.title} scales the "
                             "experts' inputs by the router instead: use --method drop")
    except ValueError as err:
        raise UsageError(str(err)) from None
    bm = budget.ByteModel(shapes)
    E = bm.shapes[0][0]  # the experts per block (a byte target or per-expert masks need every block alike)
    if method in PRUNING:
        keep = budget.keep_for_ratio(bm, ratio, method) if ratio is not None else max(1, round(1 + kappa * (E - 1)))
        try:
            spec.drop_config(config, keep)  # the family may not route over that few experts
        except ValueError as err:
            raise UsageError(str(err)) from None
        return {"keep": keep}
    if method == "merge":
        if ratio is not None:
            budget.check_fixed_ratio(bm, ratio, bm.pad(0, granularity), method)
        return {}
    plan = {}
    if ratio is not None and sharing == "layer":
        plan["kappa"] = budget.kappa_for_ratio(bm, ratio, granularity, method)
    if sharing == "expert":
        total = E * bm.entries(granularity)
        if ratio is not None:
            target = ratio * bm.source
            most = bm.pad(total, granularity, "expert") - budget.VALUE_BYTES * sum(3 * F * H for _, F, H in bm.shapes)
            if target > most:  # every entry dynamic (no W_s stored) is the most there is
                budget.check_fixed_ratio(bm, ratio, most, method)
        else:
            target = budget.layer_pad_bytes(bm, kappa, granularity)
        what = f"--target-bytes-ratio {ratio:g}" if ratio is not None else f"--mask-sharing expert at --kappa {kappa:g}"
        entries = total if ratio is None and kappa == 1 else budget.expert_entries_for_bytes(bm, target, granularity,
                                                                                             what)
        plan.update(target_bytes=int(target), dynamic_entries=entries, total_entries=total,
                    unit=bm.unit(granularity, bm.shapes[0][2]))
        plan.setdefault("kappa", entries / total if ratio is not None else kappa)
    return plan


def _prepare(model, batches, method, static_init, align, kd, held_blocks, batch_size) -> dict:
    """What the source model gives before it is compressed: router frequencies, the alignment, the Fisher, REAP
    saliency, the teacher's log-probabilities for kd healing and the held-out batches."""
    from pad_moe.hfmoe.align import align_experts, most_routed
    from pad_moe.hfmoe.calibration import all_reduced_frequency, expert_fisher, reap_saliency
    from pad_moe.hfmoe.healing import all_batches, teacher_log_probs

    out = {"summary": {}}
    if method == "drop" or static_init in ("frequency", "fisher") or align:
        out["frequency"] = all_reduced_frequency(model, batches)
    if align:
        out["summary"]["align"] = align_experts(model, most_routed(out["frequency"]))
    if static_init == "fisher":
        out["fisher"] = expert_fisher(model, batches, lm_loss)
    if method == "reap":
        out["saliency"] = reap_saliency(model, batches)
    if held_blocks is not None:
        out["held_out"] = all_batches(held_blocks, batch_size)
    if kd:  # the source's next-token distributions, before anything changes it (--align does not)
        out["teachers"] = teacher_log_probs(model, batches)
        if held_blocks is not None:
            out["held_out_teachers"] = teacher_log_probs(model, out["held_out"])
    return out


def _prune(model, method, keep, prepared):
    from pad_moe.hfmoe.baselines import keep_experts, top_experts

    scores = prepared["frequency"] if method == "drop" else prepared["saliency"]
    return keep_experts(model, top_experts(scores, keep))


def _pad(model, batches, method, kappa, granularity, sharing, static_init, iterations, seed, prepared, plan,
         bytes_model) -> dict:
    """Import as PAD experts and partition (merge: all masks zero); per-expert masks fill their byte budget."""
    from pad_moe.hfmoe import budget
    from pad_moe.hfmoe.experts import import_hf_moe, moe_blocks
    from pad_moe.partition import partition

    import_hf_moe(model, granularity=granularity, static_init=static_init or "mean",
                  expert_frequency=prepared.get("frequency"), expert_fisher=prepared.get("fisher"),
                  mask_sharing=sharing)
    experts = [block.experts for _, block in moe_blocks(model)]
    if method == "merge":
        for x in experts:
            x.set_masks({k: torch.zeros_like(v) for k, v in x.masks().items()})
        return {}
    if sharing == "layer":
        return {"partition": partition(model, batches, lm_loss, method=method, kappa=kappa, iterations=iterations,
                                       seed=seed).to_dict()}
    entries, total, target = plan["dynamic_entries"], plan["total_entries"], plan["target_bytes"]
    attempts = []
    while True:  # W_s is not stored where every expert is dynamic: top up until the budget is spent
        for x in experts:
            x.set_masks({k: torch.ones_like(v) for k, v in x.masks().items()})
        report = partition(model, batches, lm_loss, method=method, kappa=entries / total, iterations=iterations,
                           seed=seed)
        got = budget.live_pad_bytes(model)
        attempts.append({"dynamic_entries": entries, "bytes": got})
        room = (target - got) // (budget.VALUE_BYTES * plan["unit"])
        if entries == total or target - got <= 0.005 * target or room < 1 or len(attempts) == 4:
            break
        entries = min(total, entries + room)
    return {"partition": report.to_dict(), "budget": {"target_bytes": target, "attempts": attempts}}


def _check_bytes(model, meta, method, ratio, bytes_model, out) -> None:
    """The bytes written are the bytes counted (PAD: the live model's), and the asked-for ratio is met."""
    from pad_moe.hfmoe import budget

    if method not in PRUNING and meta["bytes_stored"] != budget.live_pad_bytes(model):
        raise RuntimeError(f"the export holds {meta['bytes_stored']} bytes, the model counts "
                           f"{budget.live_pad_bytes(model)}; nothing was written to {out}")
    if ratio is not None and not budget.within(meta["bytes_stored"], ratio * bytes_model.source):
        raise RuntimeError(f"the export holds {meta['bytes_stored'] / bytes_model.source:.4f} of the source's bytes, "
                           f"not --target-bytes-ratio {ratio:g} within 2 %; nothing was written to {out}")


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe compress`` subparser."""
    p = sub.add_parser("compress", help="make a trained HF MoE smaller with PAD (IMP on calibration text)",
                       description="Import a Hugging Face MoE (a family of docs/lm.md §2) as PAD experts, "
                                   "partition it on calibration text, optionally heal, and write a compact export "
                                   "that pad_moe.load_deployed reads (no DeepSpeed). Several ranks (deepspeed "
                                   "--num_gpus N -m pad_moe.cli compress ...) shard the calibration text.")
    p.add_argument("model_dir", help="a local Hugging Face MoE folder (config.json, weights, tokenizer)")
    p.add_argument("--kappa", type=finite_float, default=None, help="fraction of expert entries kept dynamic, (0, 1]")
    p.add_argument("--calib", required=True, help="calibration text, one document per line")
    p.add_argument("--out", required=True, help="new folder for the compressed model")
    p.add_argument("--method", default="imp", choices=METHODS, help="imp (default) | random | merge | drop | reap")
    p.add_argument("--heal-steps", type=int, default=0, help="AdamW steps of healing on the calibration text")
    p.add_argument("--heal-lr", type=finite_float, default=1e-4)
    p.add_argument("--granularity", choices=("element", "neuron"), default=None, help="PAD masks (default element)")
    p.add_argument("--static-init", choices=("mean", "frequency", "fisher", "first"), default=None,
                   help="W_s from the experts: mean (default), router-frequency-weighted mean, frequency x diagonal "
                        "Fisher weighted per entry, or expert 0")
    p.add_argument("--align", action="store_true",
                   help="permute each expert's hidden units to its block's most-routed expert first (same function)")
    p.add_argument("--mask-sharing", default=None, choices=("layer", "expert"),
                   help="PAD masks shared by a layer's experts (default) or per expert under one global threshold "
                        "(κ then names the bytes of the layer-shared model at κ)")
    p.add_argument("--heal-loss", default=None, choices=("lm", "kd"),
                   help="healing loss: next-token cross-entropy (default) or KL to the source's next-token "
                        "distribution")
    p.add_argument("--heal-router", action="store_true", help="healing also trains the routers")
    p.add_argument("--heal-select", type=int, default=None, metavar="N",
                   help="hold out the last 10%% of the calibration blocks, evaluate every N healing steps, keep the best")
    p.add_argument("--target-bytes-ratio", type=finite_float, default=None, metavar="R",
                   help="pick κ (PAD) or the expert count (drop, reap) so the output stores R x the source's bytes "
                        "(within 2%%), instead of --kappa")
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
                           eval_before=args.eval_before, align=args.align, mask_sharing=args.mask_sharing,
                           heal_loss=args.heal_loss, heal_router=args.heal_router, heal_select=args.heal_select,
                           target_bytes_ratio=args.target_bytes_ratio)
    except RuntimeError as err:  # the verification failed: not bad input
        print(f"padmoe compress: error: {err}", file=sys.stderr)
        return 1
    if "out" in summary:
        print(json.dumps({k: v for k, v in summary.items()
                          if k not in ("partition", "heal_losses", "heal", "budget", "align")}))
    return 0


def compress_main(argv: Optional[list[str]] = None) -> int:
    from pad_moe.commands import run_command

    return run_command(register, argv)
