"""``padmoe export``: a DeepSpeed checkpoint (any world size / ep_size) -> a compact single-process deploy model.

The deploy folder:

    deploy.json          format, version, source checkpoint, one spec per compact FFN block, parameter counts
    config.yaml          the run config (moe.ep_size=1)
    weights.safetensors  every tensor of the deploy model (compact blocks: see :mod:`pad_moe.deploy.compact`)
    config.json, tokenizer files    for Hugging Face based models

``load_deployed(dir)`` rebuilds the model without DeepSpeed's engine or process groups: the run's architecture with
dense FFN placeholders (mode=static), whose MoE / PAD positions are then replaced by the compact blocks. Export writes
into a temporary folder, loads the model back from it and compares it with the training-form model on a few examples
of the run's data before renaming the folder into place.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

import torch
from torch import nn

from pad_moe.deploy.checkpoint import AtomicDir, CheckpointError, read_checkpoint, with_ep_size
from pad_moe.deploy.compact import block_from_spec, compact_block
from pad_moe.errors import UsageError

FORMAT, VERSION = "pad_moe.deploy", 1
META_FILE, WEIGHTS_FILE = "deploy.json", "weights.safetensors"
VERIFY_TOLERANCE = 1e-5


def compact_model(model: nn.Module) -> tuple[nn.Module, dict[str, dict]]:
    """Replace every MoE / PAD-MoE block of a training-form model (ep_size=1) by its compact block, in place.
    Returns (model, {block name: spec})."""
    from pad_moe.moe.layer import MoEFFN

    convert = {MoEFFN: compact_block}
    try:  # PAD-DyConv (vision package)
        from pad_moe.deploy.dyconv import compact_dyconv
        from pad_moe.vision.layers import PadDynamicConv2d

        convert[PadDynamicConv2d] = compact_dyconv
    except ImportError:
        pass
    found = [(name, fn) for name, m in model.named_modules() for cls, fn in convert.items() if isinstance(m, cls)]
    specs = {}
    for name, fn in found:
        block = fn(model.get_submodule(name))
        _set_submodule(model, name, block)
        specs[name] = block.spec
    return model, specs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def param_counts(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes) of a model's state: floating tensors are parameters; masks count as stored bytes."""
    params = nbytes = 0
    for _, t in model.state_dict().items():
        nbytes += t.numel() * t.element_size()
        if t.is_floating_point():
            params += t.numel()
    return params, nbytes


def export(checkpoint_dir: str, out: str, *, tag: Optional[str] = None, config: Optional[str] = None,
           verify: bool = True) -> dict:
    """Export one checkpoint to the deploy folder ``out``; returns the deploy.json content."""
    from pad_moe.deploy.consolidate import build_training_job, full_weights

    writer = AtomicDir(out, "model")  # refuse a non-empty --out before reading anything
    ckpt = read_checkpoint(checkpoint_dir, tag, config)
    job = build_training_job(ckpt.cfg, full_weights(ckpt), record=ckpt.record)
    training = job.model.eval()
    params_training = sum(p.numel() for p in training.parameters())
    batch = _verify_batch(job) if verify else None
    reference = _logits(job, training, batch) if verify else None
    deployed, specs = compact_model(training)  # in place: the training model is consumed
    source = {"checkpoint": ckpt.ref.tag_dir, "tag": ckpt.ref.tag, "step": ckpt.step,
              "world_size": ckpt.world_size, "ep_size": ckpt.ep_size}
    with writer as tmp:
        meta = save_deployed(deployed, tmp, cfg=with_ep_size(ckpt.cfg, 1), specs=specs, source=source,
                             params_training=params_training, tokenizer=job.extras.get("tokenizer"))
        if verify:
            loaded = load_deployed(tmp)
            diff = float((_logits(job, loaded, batch) - reference).abs().max())
            if not diff <= VERIFY_TOLERANCE:
                raise RuntimeError(f"the exported model differs from the training-form model by {diff:.3g} "
                                   f"(> {VERIFY_TOLERANCE}); nothing was written")
            meta["verified_max_abs_diff"] = diff
            with open(os.path.join(tmp, META_FILE), "w") as f:
                json.dump(meta, f, indent=1)
    return meta


def save_deployed(model: nn.Module, folder: str, *, cfg=None, specs: dict, source: Optional[dict] = None,
                  params_training: Optional[int] = None, tokenizer=None) -> dict:
    """Write a compacted model (see ``compact_model``) into ``folder`` (which must exist). ``cfg``: the run config
    (None for models built outside a run config, which then load with a skeleton)."""
    from safetensors.torch import save_file

    from pad_moe.config import save_config

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(folder, WEIGHTS_FILE), metadata={"format": FORMAT})
    if cfg is not None:
        save_config(cfg, os.path.join(folder, "config.yaml"))
    hf = None
    hf_model = getattr(model, "hf", model)  # the job may wrap the HF model (MeanPoolClassifier)
    if hasattr(getattr(hf_model, "config", None), "save_pretrained"):
        hf_model.config.save_pretrained(folder)
        hf = {"architecture": type(hf_model).__name__, "wrapper": type(model).__name__ if hf_model is not model
              else None}
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(folder)
    params, nbytes = param_counts(model)
    meta = {"format": FORMAT, "version": VERSION, "arch": cfg.model.arch if cfg is not None else None, "hf": hf,
            "source": source,
            "blocks": specs, "params": params, "params_training": params_training, "weights_bytes": nbytes,
            "dtype": "fp32"}
    with open(os.path.join(folder, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def read_deploy_meta(folder: str) -> dict:
    path = os.path.join(os.fspath(folder), META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{folder} is not a pad_moe deploy folder (no {META_FILE})")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is corrupt ({type(err).__name__}); export again") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UsageError(f"{path}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v{VERSION}")
    return meta


def load_deployed(folder: str, skeleton: Optional[nn.Module] = None, *, dtype: Optional[torch.dtype] = None,
                  resident: str = "auto") -> nn.Module:
    """The deployed model of ``folder`` in eval mode: one process, no DeepSpeed engine, fp32 unless ``dtype``.

    A folder written by ``padmoe compress`` (a compressed HF MoE) loads as a Hugging Face causal LM whose
    ``forward(input_ids)`` gives ``.logits`` (``generate``, ``pipeline`` and ``.to(device)`` work); ``resident`` says
    what its experts hold in memory (``pad_moe.hfmoe.serving``: auto | full | narrow | compact). The rest is below.

    The architecture comes from the folder's config (toy and Hugging Face runs); for other models (e.g. a vision
    network exported with ``compact_model`` + ``save_deployed``) pass ``skeleton``, the model built by its own
    constructor: its dynamic layers are replaced by the compact blocks and every tensor is loaded strictly."""
    from safetensors.torch import load_file

    from pad_moe.hfmoe import deployed as hf_deployed

    if skeleton is None and os.path.isfile(os.path.join(os.fspath(folder), hf_deployed.META_FILE)):
        # a compressed HF MoE (padmoe compress): no DeepSpeed import
        return hf_deployed.load_compressed(folder, dtype=dtype, resident=resident)
    if resident != "auto":
        raise UsageError(f"resident={resident!r} selects the serving form of a compressed HF MoE (padmoe compress); "
                         f"{folder} is a pad_moe export, whose compact blocks are its only form: drop it")
    from pad_moe.config import load_config

    meta = read_deploy_meta(folder)
    if skeleton is not None:
        model = skeleton
    else:
        config_file = os.path.join(folder, "config.yaml")
        if not os.path.isfile(config_file):
            raise UsageError(f"{folder} has no config.yaml: pass the model's skeleton to load_deployed")
        model = _skeleton(load_config(config_file), meta, folder)
    if any(spec.get("kind") == "pad-dyconv" for spec in meta["blocks"].values()):
        import pad_moe.deploy.dyconv  # noqa: F401 - registers the kind
    for name, spec in meta["blocks"].items():
        _set_submodule(model, name, block_from_spec(spec))
    try:
        state = load_file(os.path.join(folder, WEIGHTS_FILE))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise UsageError(f"{folder}/{WEIGHTS_FILE} is missing or corrupt ({type(err).__name__}); export again") from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise UsageError(f"{folder}: weights do not fit the deploy model ({first[-1][:200]})") from None
    for m in model.modules():
        if hasattr(m, "materialize") and hasattr(m, "spec"):
            m.materialize()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _skeleton(cfg, meta: dict, folder: str) -> nn.Module:
    """The run's architecture with dense FFN blocks where the deploy blocks go (they are replaced by the caller)."""
    dense = dataclasses.replace(cfg.moe, mode="static", ep_size=1)
    if cfg.model.arch == "toy":
        from pad_moe.toy import ToyClassifier

        return ToyClassifier(cfg.model, dense, cfg.data.num_labels, seed=cfg.train.seed)
    if cfg.model.arch == "hf":
        import transformers
        from transformers import AutoConfig

        from pad_moe.models.upcycle import upcycle

        arch = (meta.get("hf") or {}).get("architecture")
        cls = getattr(transformers, str(arch), None)
        if cls is None:
            raise UsageError(f"{folder}/{META_FILE}: unknown Hugging Face architecture {arch!r}")
        model = upcycle(cls(AutoConfig.from_pretrained(folder)), mode="static", every=cfg.moe.every)
        if (meta.get("hf") or {}).get("wrapper") == "MeanPoolClassifier":
            from pad_moe.models.upcycle import MeanPoolClassifier

            model = MeanPoolClassifier(model)
        return model
    raise UsageError(f"model.arch={cfg.model.arch!r} cannot be deployed; allowed: toy, hf")


# -- verification ---------------------------------------------------------------------------------------------------
def _verify_batch(job, n: int = 8):
    data = job.eval_sets.get("eval") if job.eval_sets else None
    data = data if data is not None else job.train_set
    return job.collate([data[i] for i in range(min(n, len(data)))])


def _logits(job, model: nn.Module, batch) -> torch.Tensor:
    with torch.no_grad():
        out = job.forward(model, batch)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return getattr(out, "logits", out).detach().float()


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe export`` subparser."""
    p = sub.add_parser("export", help="compact single-process deploy model of a checkpoint",
                       description="Export a DeepSpeed checkpoint (any world size / ep_size) to a compact deploy "
                                   "folder, verified against the training form before it is renamed into place.")
    p.add_argument("checkpoint", help="RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/TAG")
    p.add_argument("--out", required=True, help="new folder for the deploy model")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--config", default=None, help="run config (default: RUN_DIR/config.yaml)")
    p.add_argument("--no-verify", action="store_true", help="skip the output comparison with the training form")
    p.set_defaults(handler=_export_command)
    return p


def _export_command(args) -> int:
    try:
        meta = export(args.checkpoint, args.out, tag=args.tag, config=args.config, verify=not args.no_verify)
    except RuntimeError as err:  # the verification failed: not bad input
        print(f"padmoe export: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"out": os.path.abspath(args.out), "params": meta["params"],
                      "params_training": meta["params_training"], "weights_bytes": meta["weights_bytes"],
                      "verified_max_abs_diff": meta.get("verified_max_abs_diff")}))
    return 0


def export_main(argv: Optional[list[str]] = None) -> int:
    """``padmoe export CHECKPOINT_DIR --out DIR [--tag T] [--config RUN.yaml] [--no-verify]``; returns the exit
    status (bad input: one line on stderr, 2)."""
    from pad_moe.commands import run_command

    return run_command(register, argv)


__all__ = ["export", "export_main", "load_deployed", "compact_model", "save_deployed", "CheckpointError"]
