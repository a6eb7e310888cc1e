"""``padmoe reshard``: rewrite a checkpoint for another ep_size / world size, as a run folder the trainer resumes from.

    padmoe reshard RUN_DIR --ep N --world W --out NEW_RUN_DIR
    deepspeed --num_gpus W -m pad_moe.cli train NEW_RUN_DIR/config.yaml --resume

How: the checkpoint is read into full weights (global expert ids) and per-parameter optimizer state (from the ZeRO
shards' parameter mappings); then W local processes (gloo, CPU) each build the run's model for their ep rank, load
their experts, create the DeepSpeed engine of the new layout, write the optimizer state into the engine's own ZeRO
partitions and call ``engine.save_checkpoint``. The files are therefore DeepSpeed's own for the new layout, and the
trainer's ordinary full resume (``engine.load_checkpoint``) loads weights, optimizer moments, step counts and the
learning-rate schedule; no trainer change is needed.

Carried over: weights (fp32 masters where the run trained in bf16/fp16), masks, φ, partition record and per-rank mask
files, the client state (step, partition record), ``global_steps``, the LR scheduler, and the Adam moments and step of
ZeRO-1/2 runs. Not carried: optimizer state of runs without ZeRO (stage 0; reported, weights only), RNG streams of ranks
that did not exist before. The global micro-batch (micro_batch_size × world examples) is kept: the new config's
train.micro_batch_size is old micro × old world / new world, so the run continues over the same examples in the same
order; a world that does not divide the global micro-batch is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import replace
from typing import Optional

import torch

from pad_moe.deploy.checkpoint import (
    AtomicDir,
    CheckpointError,
    local_expert_state,
    read_checkpoint,
    read_optimizer_state,
    with_ep_size,
)
from pad_moe.errors import UsageError
from pad_moe.train.checkpoints import point_latest, write_manifest

PAYLOAD = ".reshard_payload.pt"
SUMMARY = "reshard.json"


def reshard(checkpoint_dir: str, ep: int, world: int, out: str, *, tag: Optional[str] = None,
            config: Optional[str] = None, optimizer: bool = True, timeout: float = 900.0) -> dict:
    """Write a run folder ``out`` whose latest checkpoint is ``checkpoint_dir``'s, laid out for (ep, world)."""
    from pad_moe.config import save_config
    from pad_moe.deploy.consolidate import full_weights
    from pad_moe.testing.ranks import run_ranks

    for flag, value in (("--ep", ep), ("--world", world)):
        if value < 1:
            raise UsageError(f"{flag} {value} must be >= 1")
    if world % ep:
        raise UsageError(f"--ep {ep} must divide --world {world} (DeepSpeed forms expert-parallel groups of ep "
                         "consecutive ranks)")
    writer = AtomicDir(out, "run")
    ckpt = read_checkpoint(checkpoint_dir, tag, config)
    num_experts = ckpt.cfg.moe.num_experts
    if ckpt.cfg.moe.mode != "static" and num_experts % ep:
        raise UsageError(f"--ep {ep} does not divide moe.num_experts={num_experts}; choose a divisor of it")
    global_micro = ckpt.cfg.train.micro_batch_size * ckpt.world_size
    if global_micro % world:
        raise UsageError(f"--world {world} does not divide the run's global micro-batch of {global_micro} examples "
                         f"(train.micro_batch_size={ckpt.cfg.train.micro_batch_size} x {ckpt.world_size} ranks); "
                         "choose a world size that divides it, so the run keeps its batches")
    opt = read_optimizer_state(ckpt) if optimizer else None
    why = None
    if opt is None:
        why = ("--no-optimizer given" if not optimizer else
               "the checkpoint has no ZeRO-1/2 optimizer shards (runs without ZeRO keep theirs per expert-parallel "
               "rank; only ZeRO-1/2 state is resharded)")
    out_abs = writer.out
    cfg = with_ep_size(ckpt.cfg, ep, name=os.path.basename(out_abs), output_dir=os.path.dirname(out_abs))
    cfg = replace(cfg, train=replace(cfg.train, micro_batch_size=global_micro // world))  # the same batches
    record = ckpt.record
    with writer as tmp:
        save_config(cfg, os.path.join(tmp, "config.yaml"))
        payload = {"state": full_weights(ckpt), "record_json": json.dumps(record), "tag": ckpt.ref.tag,
                   "step": ckpt.step, "meta": {k: ckpt.meta[k] for k in ("global_steps", "global_samples",
                                                                      "skipped_steps", "lr_scheduler", "losses")
                                               if ckpt.meta.get(k) is not None},
                   "opt": None if opt is None else {"tensors": opt.tensors, "scalars": opt.scalars}}
        torch.save(payload, os.path.join(tmp, PAYLOAD))
        del payload
        run_ranks(_reshard_rank, world, tmp, timeout=timeout)
        os.remove(os.path.join(tmp, PAYLOAD))
        tag_dir = os.path.join(tmp, "checkpoints", ckpt.ref.tag)
        for r in range(min(world, ckpt.world_size)):  # RNG streams of ranks that existed before
            src = os.path.join(ckpt.ref.tag_dir, f"rng_rank{r}.pt")
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tag_dir, f"rng_rank{r}.pt"))
        write_manifest(tag_dir, ckpt.step, world)  # complete: the trainer's --resume verifies it, then 'latest'
        point_latest(os.path.join(tmp, "checkpoints"), ckpt.ref.tag)
        summary = {"source": ckpt.ref.tag_dir, "tag": ckpt.ref.tag, "step": ckpt.step,
                   "from": {"world_size": ckpt.world_size, "ep_size": ckpt.ep_size},
                   "to": {"world_size": world, "ep_size": ep},
                   "micro_batch_size": {"from": ckpt.cfg.train.micro_batch_size, "to": cfg.train.micro_batch_size},
                   "optimizer": "resharded" if why is None else f"not carried: {why}",
                   "optimizer_keys": sorted({k for t in (opt.tensors.values() if opt else []) for k in t}),
                   "resume": f"deepspeed --num_gpus {world} -m pad_moe.cli train {out_abs}/config.yaml --resume"}
        with open(os.path.join(tmp, SUMMARY), "w") as f:
            json.dump(summary, f, indent=1)
    return summary


def _reshard_rank(rank: int, world: int, tmp: str) -> dict:
    """One rank of the new layout: build, load, engine, optimizer state, save (run under ``run_ranks``)."""
    import deepspeed

    from pad_moe import distributed as D
    from pad_moe.config import load_config
    from pad_moe.deploy.consolidate import build_training_job
    from pad_moe.pad.protocol import pad_modules

    payload = torch.load(os.path.join(tmp, PAYLOAD), map_location="cpu", weights_only=True, mmap=True)
    cfg = load_config(os.path.join(tmp, "config.yaml"))
    ep = cfg.moe.ep_size
    ep_rank = D.expert_parallel_rank(rank, world, ep)
    n_local = cfg.moe.num_experts // ep
    record = json.loads(payload["record_json"])
    local = local_expert_state(payload["state"], n_local, ep_rank)
    job = build_training_job(cfg, local, ep_size=ep, ep_rank=ep_rank, record=record)
    model = job.model
    accum = cfg.train.grad_accum
    per_epoch = len(job.train_set) // (cfg.train.micro_batch_size * world)
    total_steps = cfg.train.steps or cfg.train.epochs * max(1, per_epoch // accum)
    ds = D.build_ds_config(cfg, world, total_steps)
    ds["tensorboard"] = {"enabled": False}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=D.param_groups(model, cfg.train.weight_decay),
                                           config=ds)
    carried = False
    if payload["opt"] is not None:
        carried = _set_zero_state(engine, payload["opt"], payload["state"], n_local * ep_rank)
    meta = payload["meta"]
    sched = engine.lr_scheduler
    if sched is not None and "lr_scheduler" in meta:
        sched.load_state_dict(meta["lr_scheduler"])
        if hasattr(sched, "last_batch_iteration"):  # put the schedule's current LR into the optimizer's groups,
            sched.step(sched.last_batch_iteration)  # as the source's last scheduler step left them
    engine.global_steps = int(meta.get("global_steps", payload["step"]))
    engine.global_samples = int(meta.get("global_samples", engine.global_steps * engine.train_batch_size()))
    engine.skipped_steps = int(meta.get("skipped_steps", 0))
    engine.save_checkpoint(os.path.join(tmp, "checkpoints"), tag=payload["tag"],
                           client_state={"step": int(payload["step"]), "partition": record,
                                         "losses": list(meta.get("losses") or [])}, save_latest=False)
    pads = bool(list(pad_modules(model)))
    if pads and (record is not None or cfg.moe.compact):  # the trainer's partition folder, in the new layout
        from pad_moe.partition import save_partition

        save_partition(os.path.join(tmp, "partition"), model,
                       record if record is not None else {"method": None, "note": "masks carried by padmoe reshard"})
    D.barrier()
    return {"rank": rank, "optimizer": carried, "pad": pads}


def _set_zero_state(engine, opt: dict, full_state: dict, expert_offset: int) -> bool:
    """Fill the engine's ZeRO-1/2 partitions (Adam moments, step, fp32 masters) from per-parameter global state.

    Each model parameter's ``_hp_mapping`` (DeepSpeed's own link between a parameter and its fragment of this rank's
    flat fp32 partition) gives where its values go. Returns False when the engine has no ZeRO-1/2 optimizer."""
    from pad_moe.deploy.checkpoint import GROUPED_PARAM, _renumber, grouped_expert_keys

    zo = engine.optimizer
    if not (hasattr(zo, "single_partition_of_fp32_groups") and hasattr(zo, "bit16_groups")):
        return False
    names = {id(p): n for n, p in engine.module.named_parameters()}
    tensors, scalars = dict(opt["tensors"]), opt["scalars"]
    keys = sorted({k for t in tensors.values() for k in t})
    full_state = dict(full_state)
    for lp in engine.module.parameters():  # grouped store parameters: this rank's experts stacked from global ones
        name = names[id(lp)]
        if GROUPED_PARAM.match(name):
            per_expert = grouped_expert_keys(name, expert_offset, lp.shape[0])
            full_state[name] = torch.stack([full_state[k] for k in per_expert])
            if all(k in tensors for k in per_expert):
                tensors[name] = {key: torch.stack([tensors[k][key] for k in per_expert]) for key in keys
                                 if all(key in tensors[k] for k in per_expert)}
    with torch.no_grad():
        for i, flat in enumerate(zo.single_partition_of_fp32_groups):
            st = zo.optimizer.state[flat]
            st.clear()
            for key, value in scalars.items():
                st[key] = value.clone() if torch.is_tensor(value) else value
            for key in keys:
                st[key] = torch.zeros_like(flat)
            for lp in zo.bit16_groups[i]:
                mapping = getattr(lp, "_hp_mapping", None)
                if mapping is None:
                    continue
                name = names[id(lp)]
                name = name if GROUPED_PARAM.match(name) else _renumber(name, expert_offset)
                lpa, hpa = mapping.lp_fragment_address, mapping.hp_fragment_address
                for key in keys:
                    if name in tensors and key in tensors[name]:
                        src = tensors[name][key].reshape(-1).narrow(0, lpa.start, lpa.numel)
                        st[key].narrow(0, hpa.start, hpa.numel).copy_(src)
                master = full_state[name].float().reshape(-1).narrow(0, lpa.start, lpa.numel)
                flat.data.narrow(0, hpa.start, hpa.numel).copy_(master)
    zo._hp_optimizer_states_linked = False
    return True


def register(sub) -> argparse.ArgumentParser:
    """The ``padmoe reshard`` subparser."""
    p = sub.add_parser("reshard", help="rewrite a checkpoint for another ep_size / world size",
                       description="Write a new run folder whose latest checkpoint is CHECKPOINT_DIR's, laid out for "
                                   "--ep / --world; resume it with `padmoe train NEW/config.yaml --resume`.")
    p.add_argument("checkpoint", help="RUN_DIR, RUN_DIR/checkpoints or RUN_DIR/checkpoints/TAG")
    p.add_argument("--ep", type=int, required=True, help="new moe.ep_size")
    p.add_argument("--world", type=int, required=True, help="new number of ranks")
    p.add_argument("--out", required=True, help="new run folder (resume it with --resume)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the one 'latest' names)")
    p.add_argument("--config", default=None, help="run config (default: RUN_DIR/config.yaml)")
    p.add_argument("--no-optimizer", action="store_true", help="carry weights only (Adam moments restart at 0)")
    p.set_defaults(handler=_reshard_command)
    return p


def _reshard_command(args) -> int:
    summary = reshard(args.checkpoint, args.ep, args.world, args.out, tag=args.tag, config=args.config,
                      optimizer=not args.no_optimizer)
    if summary["optimizer"] != "resharded":
        print(f"padmoe reshard: warning: optimizer state {summary['optimizer']}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def reshard_main(argv: Optional[list[str]] = None) -> int:
    """``padmoe reshard CHECKPOINT_DIR --ep N --world W --out DIR [--tag T] [--config RUN.yaml] [--no-optimizer]``;
    returns the exit status (bad input: one line on stderr, 2)."""
    from pad_moe.commands import run_command

    return run_command(register, argv)


__all__ = ["reshard", "reshard_main", "CheckpointError"]
