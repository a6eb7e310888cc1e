"""``padmoe train``: partition, then train a Job under a DeepSpeed engine, with checkpoints, exact resume and
TensorBoard. Runs the same under ``deepspeed --num_gpus N`` on CPU (gloo) and on GPUs, on one node or many."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from typing import Iterator

import torch

from pad_moe import distributed as D
from pad_moe.accounting import count_live
from pad_moe.config import RunConfig
from pad_moe.pad.mixing import as_float
from pad_moe.pad.protocol import pad_modules
from pad_moe.train import state
from pad_moe.train.compaction import compact_and_rebuild, compact_model_
from pad_moe.train.job import Batch, Job, build_job


class MicroBatches:
    """This rank's micro-batches, in a deterministic order per (seed, epoch), resumable at any global position.

    Global micro-batch g holds ``micro * world`` examples of the epoch's permutation; rank r takes its r-th slice.
    """

    def __init__(self, dataset, collate, micro: int, rank: int, world: int, seed: int):
        self.dataset, self.collate, self.micro, self.rank, self.world, self.seed = (
            dataset, collate, micro, rank, world, seed)
        self.per_epoch = len(dataset) // (micro * world)
        if self.per_epoch == 0:
            raise D.UsageError(f"the training set has {len(dataset)} examples, fewer than one global micro-batch "
                               f"(train.micro_batch_size={micro} x {world} ranks); lower train.micro_batch_size")

    def batch(self, g: int) -> Batch:
        epoch, i = divmod(g, self.per_epoch)
        perm = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = (i * self.world + self.rank) * self.micro
        return self.collate([self.dataset[int(j)] for j in perm[start:start + self.micro]])

    def iterate(self, start: int) -> Iterator[Batch]:
        g = start
        while True:
            yield self.batch(g)
            g += 1


def _to_device(batch: Batch, device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _loss(job: Job, model, batch: Batch, aux_coef: float):
    logits, aux = job.forward(model, batch)
    task = job.task_loss(logits, batch["labels"])
    return task + aux_coef * aux, task, aux


def _eval_batch(job: Job, dataset, b: int, rank: int, world: int, micro: int, device) -> Batch:
    """This rank's share of global eval micro-batch b: examples (b·world + rank)·micro + j, wrapping past the end."""
    first = (b * world + rank) * micro
    return _to_device(job.collate([dataset[(first + j) % len(dataset)] for j in range(micro)]), device)


def evaluate(engine, job: Job, cfg: RunConfig, rank: int, world: int) -> dict[str, dict[str, float]]:
    """Metrics on every eval set. Every rank runs the same number of forwards (all-to-all needs lockstep): the set is
    padded to a multiple of micro*world and the padding is dropped before the metric."""
    engine.eval()
    results = {}
    micro = cfg.train.micro_batch_size
    for name, dataset in job.eval_sets.items():
        n = len(dataset)
        chunk = micro * world
        padded = -(-n // chunk) * chunk
        preds, labels = [], []
        with torch.no_grad():
            for b in range(padded // chunk):
                batch = _eval_batch(job, dataset, b, rank, world, micro, engine.device)
                logits, _ = job.forward(engine, batch)
                preds.append(job.eval_rows(logits, batch).float())
                labels.append(batch["labels"].float())
        p, y = state.gather_rank_major(torch.cat(preds), world), state.gather_rank_major(torch.cat(labels), world)
        # rank-major layout back to dataset order: chunk c, rank r, item j -> c*chunk + r*micro + j
        order = torch.arange(padded).reshape(-1, world, micro).permute(1, 0, 2).reshape(-1)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(padded)
        p, y = p[inverse][:n], y[inverse][:n]
        if job.num_labels > 1 and job.integer_predictions:
            p, y = p.long(), y.long()
        results[name] = job.metrics(p, y)
    engine.train()
    return results


def evaluate_all(engine, job: Job, cfg: RunConfig, rank: int, world: int) -> tuple[dict, dict[str, float]]:
    """Eval metrics and Fig. 6 scalars, with the RNG left as it was: evaluation must not change training (DeepSpeed's
    top-2 gate samples its second expert from the global RNG even in eval mode), so runs with different eval
    schedules, and a resumed run, follow the same trajectory."""
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else []):
        return evaluate(engine, job, cfg, rank, world), dynamics_scalars(engine, job, cfg, rank, world)


def dynamics_scalars(engine, job: Job, cfg: RunConfig, rank: int, world: int) -> dict[str, float]:
    """Paper Fig. 6 per MoE layer over the first ``train.dynamics_batches`` eval micro-batches of every rank (all ranks
    run the same forwards: all-to-all needs lockstep); empty for models without MoE layers."""
    from pad_moe.analysis import dynamic_properties
    from pad_moe.moe.layer import MoEFFN

    n = cfg.train.dynamics_batches
    if n == 0 or not job.eval_sets or not any(isinstance(m, MoEFFN) for m in job.model.modules()):
        return {}
    dataset = next(iter(job.eval_sets.values()))
    micro = cfg.train.micro_batch_size

    def run_forward():
        for b in range(n):
            job.forward(engine, _eval_batch(job, dataset, b, rank, world, micro, engine.device))

    engine.eval()
    props = dynamic_properties(job.model, run_forward, reduce_sum=D.all_reduce_, gather_experts=D.gather_expert_rows)
    engine.train()
    return {f"dynamics/{key}/{i}": v for i, p in enumerate(props.values()) for key, v in p.items()}


def pad_scalars(model) -> dict[str, float]:
    out = {}
    for i, (_, module) in enumerate(pad_modules(model)):
        lam_s, lam_d = module.scale_factors()
        out[f"pad/lambda_s/{i}"] = as_float(lam_s)
        out[f"pad/lambda_d/{i}"] = as_float(lam_d)
        out[f"pad/dynamic_ratio/{i}"] = module.dynamic_ratio()
    return out


def expert_loads(model) -> list[torch.Tensor]:
    """Tokens per expert of each MoE layer in the latest forward (this rank's tokens)."""
    from deepspeed.moe.layer import MoE

    return [m.deepspeed_moe.exp_counts.detach().float().cpu() for m in model.modules()
            if isinstance(m, MoE) and getattr(m.deepspeed_moe, "exp_counts", None) is not None]


def run_partition(job: Job, cfg: RunConfig, batches: MicroBatches, engine=None) -> dict:
    """IMP (or a baseline) on this rank's share of the first partition.num_batches global batches; returns the record.

    Without an engine (partition before training) the expert-parallel groups are attached for the duration, so that
    deepspeed.initialize can attach them itself afterwards. With an engine (after partition.warmup_steps of fully
    dynamic training) the engine's module is scored as it is. The score uses the task loss (the paper's), plus the
    load-balancing loss when partition.score_loss is 'task+aux'.
    """
    from pad_moe.analysis import expert_divergence
    from pad_moe.partition import partition_from_config

    model = job.model if engine is None else engine.module
    device = D.device() if engine is None else engine.device
    with_aux = cfg.partition.score_loss == "task+aux"

    def loss_fn(m, b):
        total, task, _ = _loss(job, m, _to_device(b, device), cfg.moe.aux_loss_coef)
        return total if with_aux else task

    part_batches = [batches.batch(g) for g in range(cfg.partition.num_batches)]
    divergence = expert_divergence(model)  # how far the experts moved apart before they are partitioned (Fig. 6)
    if engine is not None:
        report = partition_from_config(model, part_batches, loss_fn, cfg.partition)
    else:
        D.attach_expert_groups(model)
        try:
            report = partition_from_config(model, part_batches, loss_fn, cfg.partition)
        finally:
            D.detach_expert_groups(model)
    record = report.to_dict() if hasattr(report, "to_dict") else dict(report)
    record["warmup_steps"] = cfg.partition.warmup_steps
    record["expert_divergence"] = divergence
    return record


def plan_steps(cfg: RunConfig, batches: MicroBatches, is_pad: bool) -> tuple[int, int]:
    """(total optimizer steps, steps per epoch), with the checks that need them: a 'pad' run must partition."""
    steps_per_epoch = max(1, batches.per_epoch // cfg.train.grad_accum)
    total_steps = cfg.train.steps or cfg.train.epochs * steps_per_epoch
    p = cfg.partition
    if is_pad and p.enabled and p.warmup_steps >= total_steps:
        raise D.UsageError(f"partition.warmup_steps={p.warmup_steps} is not below the run's {total_steps} steps: the "
                           "partition would never run and this 'pad' run would train a plain MoE; lower "
                           "partition.warmup_steps or raise train.steps")
    return total_steps, steps_per_epoch


def preflight(cfg: RunConfig, world: int = 1) -> None:
    """The checks of a run that need neither data nor model: ``padmoe config`` runs them, and ``train`` runs them
    before it loads anything (a bad DeepSpeed config or warm-up length used to be refused after the model loaded)."""
    p = cfg.partition
    if cfg.moe.mode == "pad" and p.enabled and cfg.train.steps and p.warmup_steps >= cfg.train.steps:
        raise D.UsageError(f"partition.warmup_steps={p.warmup_steps} is not below train.steps={cfg.train.steps}: the "
                           "partition would never run and this 'pad' run would train a plain MoE; lower "
                           "partition.warmup_steps or raise train.steps")
    ds = D.build_ds_config(cfg, world, max(cfg.train.steps, 1))
    D.check_ds_config(ds, cfg.train.ds_config)
    if cfg.moe.mode == "pad" and cfg.moe.compact and p.warmup_steps:
        D.check_rebuildable(ds, cfg)


def train(cfg: RunConfig, resume: bool = False) -> dict:
    """Train per cfg; returns the run summary (also written to RUN_DIR/summary.json on rank 0).

    Everything that can be refused (config, data, DeepSpeed config, world size, the checkpoint to resume) is checked
    before the run directory is created; a start that fails before its first step removes the directory it created.
    """
    t0 = time.time()
    length_note = state.check_run_dir(cfg, resume)
    rank, world = D.init_distributed()
    point = state.find_resume_point(cfg.run_dir, world) if resume else None  # a world-size change: reshard first
    ep_rank = D.expert_parallel_rank(rank, world, cfg.moe.ep_size)
    preflight(cfg, world)
    job = build_job(cfg, ep_rank)
    batches = MicroBatches(job.train_set, job.collate, cfg.train.micro_batch_size, rank, world, cfg.data.seed)
    is_pad = any(True for _ in pad_modules(job.model))
    total_steps, steps_per_epoch = plan_steps(cfg, batches, is_pad)
    eval_every = cfg.train.eval_every or steps_per_epoch  # default: every epoch (and always at the end)
    ds = D.build_ds_config(cfg, world, total_steps)
    D.check_ds_config(ds, cfg.train.ds_config)
    if is_pad and cfg.moe.compact and cfg.partition.warmup_steps:
        D.check_rebuildable(ds, cfg)
    if point is not None and point.step > total_steps:
        raise D.UsageError(f"--resume: the newest checkpoint is at step {point.step}, past this run's {total_steps} "
                           "steps; resume with train.steps >= its step")
    if point is not None and point.step == total_steps and _summary_of(cfg, total_steps) is not None:
        return _finished(cfg, point, rank)
    for note in (point.note if point is not None else "", length_note):
        if note and rank == 0:
            print(note, file=sys.stderr, flush=True)
    if point is not None and not D.all_equal(point.tag):
        raise D.UsageError(f"--resume: the ranks see different newest checkpoints under {cfg.run_dir}: the run folder "
                           "must be on a filesystem every rank shares")
    created = state.create_run_dir(cfg, resume, rank)
    events_before = state.tensorboard_files(cfg.run_dir)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminated) if in_main else None  # a failed peer: unwind, clean up
    try:
        engine, record = _start(job, cfg, batches, world, total_steps, ds, resume, rank,
                                resume_step=point.step if point is not None else None)
        start_step, losses = 0, []
        if point is not None:
            client = state.load_checkpoint(engine, cfg.run_dir, point, rank)
            start_step, record, losses = point.step, client.get("partition"), list(client.get("losses") or [])
            if is_pad and record is not None:
                state.check_masks_match_partition(cfg.run_dir, engine.module, record)
            elif is_pad and cfg.partition.enabled and start_step > cfg.partition.warmup_steps:
                raise D.UsageError(f"--resume: checkpoint {point.tag} has no partition record although the partition "
                                   f"runs at step {cfg.partition.warmup_steps}; it was not written by this run")
    except BaseException:
        if rank == 0 and created:
            state.remove_fresh_run_dir(cfg, rank)
        elif rank == 0:
            state.remove_new_tensorboard_files(cfg.run_dir, events_before)
        raise
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    monitor = engine.monitor if rank == 0 and getattr(engine, "monitor", None) is not None else None

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc=cfg.name, dynamic_ncols=True)
    accum = cfg.train.grad_accum
    stream = batches.iterate((cfg.train.data_offset_steps + start_step) * accum)
    step_seconds: list[float] = []  # the steps this process ran (a resumed run: from its start step)
    window = {"loss": 0.0, "task": 0.0, "aux": 0.0, "n": 0, "samples": 0, "tokens": 0, "t": time.time()}
    loads: list[torch.Tensor] = []
    on_step = job.extras.get("on_step")  # e.g. the DY-Conv temperature, set per optimizer step
    for step in range(start_step, total_steps):
        if on_step is not None:
            on_step(job.model, step, steps_per_epoch)
        if is_pad and cfg.partition.enabled and record is None and step == cfg.partition.warmup_steps:
            record = run_partition(job, cfg, batches, engine)
            state.save_run_partition(cfg.run_dir, job.model, record, rank)
            if cfg.moe.compact:  # from here on step time and memory follow κ
                engine = compact_and_rebuild(engine, job.model, cfg, world, total_steps, ds)
            if monitor is not None:
                monitor.write_events([(f"partition/churn/round{i}", c, step)
                                      for i, c in enumerate(record.get("churn_per_round", []))])
        t_step = time.perf_counter()
        for _ in range(accum):
            batch = _to_device(next(stream), engine.device)
            loss, task, aux = _loss(job, engine, batch, cfg.moe.aux_loss_coef)
            engine.backward(loss)
            engine.step()
            window["loss"] += float(loss.detach()) / accum
            window["task"] += float(task.detach()) / accum
            window["aux"] += float(aux.detach()) / accum
            window["samples"] += batch["labels"].shape[0] * world
            if "attention_mask" in batch:
                window["tokens"] += int(batch["attention_mask"].sum()) * world
            new = expert_loads(job.model)
            loads = new if not loads else [a + b for a, b in zip(loads, new)]
        window["n"] += 1
        step_seconds.append(round(time.perf_counter() - t_step, 5))  # this rank's forward+backward+step
        losses.append(_global_mean(loss.detach(), world))
        if not math.isfinite(losses[-1]):
            bar.close()
            raise TrainingError(f"the training loss is {losses[-1]} at step {step + 1}: the run diverged; lower "
                                f"train.lr (now {cfg.train.lr}) or resume from an earlier checkpoint")
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        done = step + 1
        if done % cfg.train.log_every == 0 or done == total_steps:
            _log(monitor, engine, job, window, loads, done, world)
            window = {k: 0.0 if k != "t" else time.time() for k in window}
            loads = []
        if done % eval_every == 0 and done != total_steps:
            _log_eval(monitor, *evaluate_all(engine, job, cfg, rank, world), done)
        if cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0 and done != total_steps:
            state.save_checkpoint(engine, cfg, done, rank, world, record, losses)
    bar.close()
    metrics, dynamics = evaluate_all(engine, job, cfg, rank, world)
    _log_eval(monitor, metrics, dynamics, total_steps)
    if start_step < total_steps:  # a resume of a finished run whose summary was lost writes only the summary
        state.save_checkpoint(engine, cfg, total_steps, rank, world, record, losses)
    save_final = job.extras.get("save_final")  # e.g. the causal-LM job's Hugging Face folder
    exported = save_final(engine.module, cfg.run_dir) if save_final is not None and rank == 0 else None
    summary = {"name": cfg.name, "mode": cfg.moe.mode, "steps": total_steps, "start_step": start_step,
               "losses": losses, "eval": metrics, "main_metric": job.main_metric, "world_size": world,
               "seed": cfg.train.seed, "task": cfg.data.task, "wall_time_s": time.time() - t0, "partition": record,
               "dynamics": dynamics, "step_seconds": step_seconds, "memory": D.memory_report(engine),
               **count_live(job.model, cfg.moe.ep_size), **({"exported": exported} if exported else {})}
    if rank == 0:
        with open(os.path.join(cfg.run_dir, "summary.json.tmp"), "w") as f:
            json.dump(summary, f, indent=1)
        os.replace(os.path.join(cfg.run_dir, "summary.json.tmp"), os.path.join(cfg.run_dir, "summary.json"))
    D.barrier()
    return summary


def _terminated(signum, frame):
    raise SystemExit(128 + signum)


class TrainingError(ValueError):
    """A run that cannot go on as asked (e.g. a non-finite loss): one line, exit status 2."""


def _start(job: Job, cfg: RunConfig, batches: MicroBatches, world: int, total_steps: int, ds: dict, resume: bool,
           rank: int, resume_step: int | None = None):
    """Partition before training (when it runs before the first step), compact, and build the engine. A resume past
    a warm-up partition with moe.compact compacts to the run's saved partition first: its checkpoints are compact."""
    record = None
    job.model.to(D.device())
    torch.manual_seed(cfg.train.seed * 1000 + rank)  # per-rank stream for dropout and gate noise
    if any(True for _ in pad_modules(job.model)) and cfg.partition.enabled and cfg.partition.warmup_steps == 0:
        if resume:  # the masks shape a compacted model: set them before the engine; the checkpoint is checked later
            record = state.load_run_partition(cfg.run_dir, job.model)
        else:
            record = run_partition(job, cfg, batches)
            state.save_run_partition(cfg.run_dir, job.model, record, rank)
    warm = cfg.partition.warmup_steps
    if cfg.moe.compact and warm and resume_step is not None and resume_step > warm:
        record = state.load_run_partition(cfg.run_dir, job.model)
    if cfg.moe.compact and (not warm or record is not None):
        compact_model_(job.model)
    engine, _ = D.initialize_engine(job.model, cfg, world, total_steps, ds)
    engine.train()  # from_pretrained returns models in eval mode: dropout would stay off until the first evaluation
    return engine, record


def _summary_of(cfg: RunConfig, steps: int) -> dict | None:
    """RUN_DIR/summary.json if it is the summary of a run that ended at ``steps`` (all its losses), else None."""
    try:
        with open(os.path.join(cfg.run_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(summary, dict) and summary.get("steps") == steps and len(summary.get("losses") or []) == steps
    return summary if ok else None


def _finished(cfg: RunConfig, point, rank: int) -> dict:
    """--resume of a run whose last checkpoint is its final step and whose summary says so: nothing to do."""
    if rank == 0:
        print(f"padmoe: {cfg.name} already finished at step {point.step}; nothing to resume (pass a larger "
              "train.steps with --resume to train longer)", file=sys.stderr, flush=True)
    D.barrier()
    return _summary_of(cfg, point.step)


def _global_mean(value: torch.Tensor, world: int) -> float:
    t = value.detach().float().reshape(1).cpu()
    D.all_reduce_(t)
    return float(t) / world


def _log(monitor, engine, job, window, loads, step, world) -> None:
    loads = [D.all_reduce_(x.clone()) for x in loads]  # every rank joins the collective, rank 0 writes
    if monitor is None:
        return
    dt = max(time.time() - window["t"], 1e-9)
    n = max(window["n"], 1)
    events = [("train/loss", window["loss"] / n, step), ("train/task_loss", window["task"] / n, step),
              ("train/aux_loss", window["aux"] / n, step), ("train/lr", engine.get_lr()[0], step),
              ("perf/samples_per_s", window["samples"] / dt, step), ("perf/tokens_per_s", window["tokens"] / dt, step)]
    events += [(k, v, step) for k, v in pad_scalars(job.model).items()]
    if "scalars" in job.extras:
        events += [(k, v, step) for k, v in job.extras["scalars"](job.model).items()]
    for layer, counts in enumerate(loads):
        share = counts / counts.sum().clamp_min(1)
        events += [(f"expert_load/layer{layer}/e{e}", float(s), step) for e, s in enumerate(share)]
    monitor.write_events(events)


def _log_eval(monitor, metrics: dict, dynamics: dict[str, float], step: int) -> None:
    if monitor is None:
        return
    monitor.write_events([(f"eval/{split}/{k}", v, step) for split, m in metrics.items() for k, v in m.items()]
                         + [(k, v, step) for k, v in dynamics.items()])
