"""Benchmark of Iterative Mode Partition (issue 3): IMP wall time as a fraction of a fine-tuning epoch, and the peak
extra memory of the exact distributed selection versus gathering every score on one rank.

Part 1 (one process, world size 1, ep_size 1, fp32): the main job (``configs/minilm_vader.yaml``: all-MiniLM upcycled to
PAD-MoE, 8 experts top-2 on every FFN, VADER movie sentences at the config's max_length) is built with ``build_job`` and
wrapped in the trainer's DeepSpeed engine (``pad_moe.distributed.initialize_engine``: ZeRO-2, AdamW). As the trainer
does with ``partition.warmup_steps``, the model first trains 8 fully dynamic steps, so the experts leave the exact
upcycled point (where every SNIP score is zero and IMP refuses). Then, interleaved:

    train block 0 | IMP 1 | train block 1 | IMP 2 | ... | IMP R | train block R

A train block is ``--train-steps`` optimizer steps exactly as ``pad_moe.train.loop.train`` runs them (next batch,
``_loss``, ``engine.backward``, ``engine.step``), each timed. An IMP is the trainer's own call
``pad_moe.train.loop.run_partition(job, cfg, batches, engine)`` with T=5 rounds on 10 micro-batches of 32 (the paper's
budget, 320 examples), after the masks are reset to all dynamic. Repeat i's ratio is IMP i over one epoch
extrapolated from the median step of the two train blocks around it; an epoch is ``len(train_set) // batch`` steps, for
the config's 2,048-example subset and for the full 9,498-example vader-movies train split (the step cost does not depend
on the data: every batch is padded to max_length). Block-to-block load swings on a shared machine are large, so the tool
also takes ``--pairs`` paired samples (one training step and one scoring pass, IMP with T=1 on one batch, back to
back, alternating order) and predicts IMP / epoch from their median ratio: (T·B·ratio + selections / step) / steps.

Part 2: N float32 scores spread over P ranks (real gloo processes, one per simulated rank). Each rank records its
resident-set high-water mark while the method runs (Linux /proc/self/status VmHWM, reset through /proc/self/clear_refs
after the local scores are allocated, so the figure is what the method adds on top of the scores the rank already
holds). Methods: ``select`` = ``pad_moe.partition.selection.distributed_kth_largest`` with an all-reduce count reducer;
``select_top`` = IMP's own call (``select_top``: threshold, ties by index, the bool mask); ``gather`` = all scores
gathered into one preallocated buffer on rank 0 (no extra concatenation copy), then ``torch.kthvalue``. Every method
must return the same value.

    python tools/bench_imp.py                               # 2 MiniLM layers (the main job's default)
    python tools/bench_imp.py --layers 6 --json out.json    # the full 6-layer MiniLM
    python tools/bench_imp.py --quick                       # a smoke test (minutes)
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import torch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "minilm_vader.yaml")
FULL_SPLIT_NOTE = "vader-movies train split"


# ----------------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _proc_status_kib(*keys: str) -> dict[str, int]:
    with open("/proc/self/status") as f:
        text = f.read()
    return {k: int(re.search(rf"^{k}:\s+(\d+) kB", text, re.M).group(1)) for k in keys}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _spread(xs) -> str:
    if not xs:
        return "-"
    return f"{min(xs):.3g}..{max(xs):.3g}"


def _quartiles(xs) -> list[float]:
    if len(xs) < 2:
        return [xs[0], xs[0]] if xs else [float("nan")] * 2
    q = statistics.quantiles(xs, n=4)
    return [q[0], q[2]]


def _predict(pairs, passes: int, selection_s: float, steps: list[float], epoch_steps: int) -> float:
    """IMP / epoch from the paired ratio: (T·B scoring passes + T selections) over epoch_steps training steps."""
    if not pairs:
        return float("nan")
    return (passes * _median([p["ratio"] for p in pairs]) + selection_s / _median(steps)) / epoch_steps


def _quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    for name in ("DeepSpeed", "deepspeed", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ----------------------------------------------------------------------------------------------------------------------
# part 1: IMP time vs one epoch
# ----------------------------------------------------------------------------------------------------------------------
def full_train_split_size(cfg) -> int:
    """Examples in the task's whole train split (the 2,048 default is a deterministic subset of it)."""
    from pad_moe.data.tasks import load_raw_splits, task_info

    splits = load_raw_splits(task_info(cfg.data.task), cfg.data.data_files, cfg.data.cache_dir)
    return len(splits["train"])


def bench_imp(args) -> dict:
    _quiet_libraries()
    from pad_moe import distributed as D
    from pad_moe.config import load_config
    from pad_moe.pad.protocol import pad_modules
    from pad_moe.partition import iterative_mode_partition
    from pad_moe.partition.imp import dynamic_count, kappa_schedule
    from pad_moe.partition.layout import MaskLayout
    from pad_moe.partition.selection import select_top
    from pad_moe.train.job import build_job
    from pad_moe.train.loop import MicroBatches, _loss, _to_device, run_partition

    os.environ["MASTER_PORT"] = str(_free_port())
    out_dir = tempfile.mkdtemp(prefix="bench_imp_")
    overrides = ["moe.ep_size=1", f"model.num_layers={args.layers}", "train.dtype=fp32",
                 f"train.micro_batch_size={args.batch}", "partition.iterations=5", "partition.num_batches=10",
                 f"partition.warmup_steps={args.partition_warmup}", f"output_dir={out_dir}", "name=bench_imp"]
    cfg = load_config(CONFIG, overrides)
    t_build = time.perf_counter()
    rank, world = D.init_distributed()
    assert world == 1, "run bench_imp.py as one process"
    job = build_job(cfg, ep_rank=0)
    job.model.to(D.device())
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    batches = MicroBatches(job.train_set, job.collate, cfg.train.micro_batch_size, rank, world, cfg.data.seed)
    subset_size = len(job.train_set)
    full_size = full_train_split_size(cfg)
    epoch_steps = {"subset": subset_size // args.batch, "full": full_size // args.batch}
    total_steps = max(epoch_steps.values())  # the LR schedule of a 1-epoch run on the full split
    engine, _ = D.initialize_engine(job.model, cfg, world, total_steps)
    build_s = time.perf_counter() - t_build
    layout = MaskLayout(engine.module)
    mask_entries = layout.numel
    params = sum(p.numel() for p in job.model.parameters())
    print(f"[imp] MiniLM {args.layers} layers: {params / 1e6:.1f}M parameters, {mask_entries:,} mask entries in "
          f"{len(layout.modules)} PAD layers; batch {args.batch} x {cfg.data.max_length} tokens; train set "
          f"{subset_size} (subset) / {full_size} (full split); built in {build_s:.0f}s", flush=True)

    stream = batches.iterate(0)

    def train_step() -> float:
        t0 = time.perf_counter()
        batch = _to_device(next(stream), engine.device)
        loss, task, aux = _loss(job, engine, batch, cfg.moe.aux_loss_coef)
        engine.backward(loss)
        engine.step()
        float(loss.detach()), float(task.detach()), float(aux.detach())
        return time.perf_counter() - t0

    def reset_masks() -> None:
        for _, module in pad_modules(engine.module):
            module.set_masks({k: torch.ones_like(v) for k, v in module.masks().items()})

    # The trainer's partition.warmup_steps: fully dynamic training so that SNIP scores are non-zero. Untimed; they are
    # also the timing warm-up (allocator, DeepSpeed buffers).
    t0 = time.perf_counter()
    for _ in range(cfg.partition.warmup_steps):
        train_step()
    print(f"[imp] {cfg.partition.warmup_steps} fully dynamic warm-up steps in {time.perf_counter() - t0:.1f}s",
          flush=True)

    blocks: list[list[float]] = []
    imps: list[dict] = []
    for r in range(args.repeats + 1):
        block = [train_step() for _ in range(args.train_steps)]
        blocks.append(block)
        print(f"[imp] train block {r}: median step {_median(block):.3f}s ({_spread(block)})", flush=True)
        if r == args.repeats:
            break
        reset_masks()
        t0 = time.perf_counter()
        record = run_partition(job, cfg, batches, engine)
        wall = time.perf_counter() - t0
        imps.append({"wall_s": wall, "imp_time_s": record["time_s"], "dynamic_fraction":
                     record["dynamic_per_round"][-1] / record["total_entries"],
                     "churn_per_round": record["churn_per_round"]})
        print(f"[imp] IMP {r + 1}: {wall:.2f}s wall (IMP's own time_s {record['time_s']:.2f}s), dynamic fraction "
              f"{imps[-1]['dynamic_fraction']:.6f}", flush=True)

    # The selection's share of IMP: T select_top calls on this model's layout (random scores, the IMP's k schedule).
    kappas = kappa_schedule(cfg.partition.kappa, cfg.partition.iterations, cfg.partition.schedule)
    gen = torch.Generator().manual_seed(0)
    scores = torch.rand(mask_entries, generator=gen)
    sel_times = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        for kappa_t in kappas:
            k = torch.tensor([dynamic_count(kappa_t, mask_entries)])
            select_top(scores, k, layout.index_keys_of, counted=layout.counted, count_reducer=layout.selection_reducer)
        sel_times.append(time.perf_counter() - t0)
    selection_s = min(sel_times)

    # Paired fine-grained samples: one training step and one scoring pass (IMP with T=1 on one batch: its forward +
    # backward w.r.t. the relaxed masks, then one selection) back to back, alternating which goes first; their ratio
    # shares the machine's load far better than whole blocks do.
    loss_fn = lambda m, b: _loss(job, m, _to_device(b, engine.device), cfg.moe.aux_loss_coef)[0]  # noqa: E731
    pairs = []
    for i in range(args.pairs):
        batch = batches.batch(i % cfg.partition.num_batches)
        order = ("train", "score") if i % 2 == 0 else ("score", "train")
        sample = {}
        for what in order:
            if what == "train":
                sample["train_s"] = train_step()
            else:
                t0 = time.perf_counter()
                iterative_mode_partition(engine.module, [batch], loss_fn, kappa=cfg.partition.kappa, iterations=1)
                sample["score_s"] = time.perf_counter() - t0 - selection_s / cfg.partition.iterations
        sample["ratio"] = sample["score_s"] / sample["train_s"]
        pairs.append(sample)
    reset_masks()
    if pairs:
        ratios = sorted(p["ratio"] for p in pairs)
        print(f"[imp] {len(pairs)} paired samples: scoring pass / training step = {_median(ratios):.3f} "
              f"(range {_spread(ratios)})", flush=True)

    repeats = []
    for i, imp in enumerate(imps):
        step = _median(blocks[i] + blocks[i + 1])
        rep = {"imp_wall_s": imp["wall_s"], "step_s": step}
        for name, steps in epoch_steps.items():
            rep[f"epoch_{name}_s"] = step * steps
            rep[f"fraction_{name}"] = imp["wall_s"] / (step * steps)
        scoring = imp["imp_time_s"] - selection_s
        rep["scoring_batch_over_step"] = scoring / (cfg.partition.iterations * cfg.partition.num_batches) / step
        repeats.append(rep)
    all_steps = [s for b in blocks for s in b]
    passes = cfg.partition.iterations * cfg.partition.num_batches
    result = {
        "layers": args.layers, "params": params, "mask_entries": mask_entries, "batch": args.batch,
        "max_length": cfg.data.max_length, "iterations": cfg.partition.iterations,
        "num_batches": cfg.partition.num_batches, "pairs": pairs, "kappa": cfg.partition.kappa,
        "partition_warmup_steps": cfg.partition.warmup_steps, "snip_signal": "8 fully dynamic training steps first "
        "(the trainer's partition.warmup_steps), no perturbation", "train_set_subset": subset_size,
        "train_set_full": full_size, "epoch_steps": epoch_steps, "train_blocks_s": blocks, "imp": imps,
        "selection_s_per_imp": selection_s, "repeats": repeats,
        "summary": {
            "step_s_median": _median(all_steps),
            "step_s_cv": statistics.pstdev(all_steps) / statistics.mean(all_steps),
            "imp_wall_s_median": _median([i["wall_s"] for i in imps]),
            "fraction_subset_median": _median([r["fraction_subset"] for r in repeats]),
            "fraction_subset_range": [min(r["fraction_subset"] for r in repeats),
                                      max(r["fraction_subset"] for r in repeats)],
            "fraction_full_median": _median([r["fraction_full"] for r in repeats]),
            "fraction_full_range": [min(r["fraction_full"] for r in repeats), max(r["fraction_full"] for r in repeats)],
            "scoring_batch_over_step_median": _median([r["scoring_batch_over_step"] for r in repeats]),
            "selection_share_of_imp": selection_s / _median([i["imp_time_s"] for i in imps]),
            "paired_score_over_step_median": _median([p["ratio"] for p in pairs]),
            "paired_score_over_step_quartiles": _quartiles([p["ratio"] for p in pairs]),
            "predicted_fraction_subset": _predict(pairs, passes, selection_s, all_steps, epoch_steps["subset"]),
            "predicted_fraction_full": _predict(pairs, passes, selection_s, all_steps, epoch_steps["full"]),
            "floor_fraction_subset": passes / epoch_steps["subset"],
            "floor_fraction_full": passes / epoch_steps["full"],
        },
    }
    return result


# ----------------------------------------------------------------------------------------------------------------------
# part 2: distributed selection vs gather, peak extra memory per rank
# ----------------------------------------------------------------------------------------------------------------------
SEL_METHODS = ("select", "select_top", "gather")


def _local_scores(total: int, world: int, rank: int, block: int, seed: int) -> torch.Tensor:
    """This rank's slice of one global score vector that does not depend on P: SNIP-like (non-negative, heavy tail),
    generated in place block by block (no temporaries), with exact zeros and heavy ties at fixed global positions."""
    n = total // world
    start = rank * n
    scores = torch.empty(n, dtype=torch.float32)
    for b0 in range(start, start + n, block):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + b0 // block)
        scores[b0 - start:b0 - start + block].exponential_(generator=gen)
    scores[(-start) % 101::101] = 0.0  # exact zeros (entries no batch used)
    scores[(1 - start) % 103::103] = 0.5  # heavy ties
    return scores


def _run_method(method: str, scores: torch.Tensor, total: int, k: int, rank: int, reducer, dist):
    n = scores.numel()
    if method == "select":
        from pad_moe.partition.selection import distributed_kth_largest

        return float(distributed_kth_largest(scores, k, count_reducer=reducer))
    if method == "select_top":
        from pad_moe.partition.selection import select_top

        chosen = select_top(scores, torch.tensor([k]), lambda pos: pos + rank * n, count_reducer=reducer)
        return int(reducer(chosen.sum().reshape(1).to(torch.int64))[0])  # must equal k
    if method == "gather":
        if rank == 0:
            if dist.get_world_size() == 1:  # nothing to gather
                return float(torch.kthvalue(scores, total - k + 1).values)
            buffer = torch.empty(total, dtype=torch.float32)  # all scores, one preallocated buffer, no concatenation
            dist.gather(scores, gather_list=list(buffer.split(n)), dst=0)
            return float(torch.kthvalue(buffer, total - k + 1).values)  # the k-th largest
        dist.gather(scores, dst=0)
        return None
    raise ValueError(f"unknown method {method!r}")


def _allocator_peak(fn) -> tuple[object, int]:
    """(fn(), high-water of bytes held by torch's CPU allocator above the level at the call), from the profiler's
    memory events (each carries the running 'Total Allocated' since profiling began)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value = fn()
    path = tempfile.mktemp(suffix=".json", prefix="bench_imp_trace_")
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return value, max([0, *totals])


def _sel_worker(method: str, total: int, k: int, block: int, seed: int) -> None:
    """One simulated rank (RANK / WORLD_SIZE / MASTER_* in the environment); prints one JSON line."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world)

    def reducer(counts: torch.Tensor) -> torch.Tensor:
        if world == 1:
            return counts
        out = counts.clone()
        dist.all_reduce(out)
        return out

    # Warm-up on a small problem: pages of library code and first-use buffers are not the method's per-entry memory.
    small = _local_scores(world * block // 64, world, rank, block // 64, seed + 1)
    _run_method(method, small, world * (block // 64), world * (block // 64) // 2, rank, reducer, dist)
    del small
    scores = _local_scores(total, world, rank, block, seed)
    dist.barrier()
    _malloc_trim()
    peak_reset = _reset_peak_rss()
    base = _proc_status_kib("VmRSS")["VmRSS"]
    t0 = time.perf_counter()
    value = _run_method(method, scores, total, k, rank, reducer, dist)
    seconds = time.perf_counter() - t0
    peak = _proc_status_kib("VmHWM")["VmHWM"]
    dist.barrier()
    value2, alloc_peak = _allocator_peak(lambda: _run_method(method, scores, total, k, rank, reducer, dist))
    dist.barrier()
    print(json.dumps({"rank": rank, "method": method, "value": value, "value_again": value2, "seconds": seconds,
                      "base_rss_kib": base, "peak_kib": peak, "rss_extra_bytes": (peak - base) * 1024,
                      "alloc_extra_bytes": alloc_peak, "peak_reset": peak_reset, "local_entries": scores.numel()}),
          flush=True)
    dist.destroy_process_group()


def _run_ranks(method: str, total: int, world: int, k: int, block: int, seed: int) -> list[dict]:
    env = dict(os.environ, WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")
    procs = []
    for rank in range(world):
        cmd = [sys.executable, os.path.abspath(__file__), "--_sel-worker", method, "--_total", str(total), "--_k",
               str(k), "--_block", str(block), "--_seed", str(seed)]
        procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"selection worker ({method}, P={world}) failed:\n{err[-3000:]}")
        rows.append(json.loads([line for line in out.splitlines() if line.startswith("{")][-1]))
    return sorted(rows, key=lambda r: r["rank"])


def bench_selection(args) -> dict:
    worlds = [int(x) for x in args.sel_ranks.split(",")]
    lcm = math.lcm(*worlds)
    block = args.sel_n // lcm // 64 * 64  # generation block (the same global vector for every P)
    total = block * lcm
    k = total // 2  # κ = 0.5
    print(f"[sel] N = {total:,} float32 scores, k = {k:,} (κ=0.5), P in {worlds}, {args.sel_repeats} repeat(s)",
          flush=True)
    rows = []
    for rep in range(args.sel_repeats):
        for world in worlds:
            for method in SEL_METHODS:  # interleaved: every method at every P, then again
                ranks = _run_ranks(method, total, world, k, block, seed=0)
                root = ranks[0]
                row = {"repeat": rep, "P": world, "method": method, "N": total, "local_entries": total // world,
                       "value": root["value"], "value_again": root["value_again"], "seconds_rank0": root["seconds"],
                       "seconds_max": max(r["seconds"] for r in ranks),
                       "rss_extra_rank0": root["rss_extra_bytes"],
                       "rss_extra_max": max(r["rss_extra_bytes"] for r in ranks),
                       "alloc_extra_rank0": root["alloc_extra_bytes"],
                       "alloc_extra_max": max(r["alloc_extra_bytes"] for r in ranks),
                       "alloc_extra_other_max": max([r["alloc_extra_bytes"] for r in ranks[1:]], default=None),
                       "peak_reset": all(r["peak_reset"] for r in ranks)}
                rows.append(row)
                print(f"[sel] P={world} {method:10s} max over ranks: allocator {row['alloc_extra_max'] / 2**20:7.1f} "
                      f"MiB, RSS {row['rss_extra_max'] / 2**20:7.1f} MiB; rank 0 {row['seconds_rank0']:.2f}s; "
                      f"value {row['value']}", flush=True)
    # Correctness: both selections find gather's k-th largest value; select_top marks exactly k entries.
    values = {r[key] for r in rows if r["method"] in ("select", "gather") for key in ("value", "value_again")}
    counts = {r[key] for r in rows if r["method"] == "select_top" for key in ("value", "value_again")}
    summary = []
    for world in worlds:
        for method in SEL_METHODS:
            mine = [r for r in rows if r["P"] == world and r["method"] == method]
            local = total // world
            alloc, rss = _median([r["alloc_extra_max"] for r in mine]), _median([r["rss_extra_max"] for r in mine])
            summary.append({"P": world, "method": method, "local_entries": local,
                            "alloc_extra_max": alloc, "rss_extra_max": rss,
                            "rss_extra_max_range": [min(r["rss_extra_max"] for r in mine),
                                                    max(r["rss_extra_max"] for r in mine)],
                            "alloc_bytes_per_global_entry": alloc / total, "alloc_bytes_per_local_entry": alloc / local,
                            "rss_bytes_per_global_entry": rss / total, "rss_bytes_per_local_entry": rss / local,
                            "seconds_median": _median([r["seconds_max"] for r in mine])})
    return {"N": total, "k": k, "rows": rows, "summary": summary, "values_agree": len(values) == 1,
            "select_top_counts_exact": counts == {k}, "kth_value": sorted(values)[0] if values else None,
            "analytic_bytes_per_entry": ANALYTIC}


# Bytes per entry from reading the code and the profiler's allocation timeline (torch 2.13, CPU), for comparison with
# the measured high-water marks (n = local entries, N = all entries):
ANALYTIC = {
    "select": "25.4 B x n + bins. float_order_keys peaks at 12 B/entry (bits + two shift/and/xor temporaries) and "
              "leaves keys int32 4 B. Radix pass 1 (16-bit digits): in_play bool 1 + digit int32 4 + digit[in_play] "
              "(nonzero int64 8 -> int32 4) then .to(int64) 8 -> 21 B. Pass 2 computes the next digit (2 x 4 B "
              "temporaries) while pass 1's digit (4) and int64 slot (8) are still referenced -> peak 25.4 B "
              "(+1.5 MiB: 2^16 int64 bins, their cumsum and flips).",
    "select_top": "the same peak (its bool masks are allocated after the radix temporaries are freed) + ties.",
    "gather": "rank 0: receive buffer float32 4 B x N + torch.kthvalue's working copy (values 4 B + int64 indices "
              "8 B) x N = 16 B x N; other ranks ~0 (they send their own scores). P = 1: 12 B x N (no buffer).",
}


# ----------------------------------------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------------------------------------
def print_tables(result: dict) -> None:
    imp = result.get("imp")
    if imp:
        s = imp["summary"]
        print()
        print(f"IMP (T={imp['iterations']}, {imp['num_batches']} batches x {imp['batch']}) vs one epoch, MiniLM "
              f"{imp['layers']} layers, {imp['mask_entries']:,} mask entries, {result['threads']} thread(s)")
        print(f"{'repeat':>6} {'IMP s':>8} {'step s':>8} {'epoch 2048 s':>13} {'IMP/epoch':>10} "
              f"{'epoch 9498 s':>13} {'IMP/epoch':>10} {'score/step':>10}")
        for i, r in enumerate(imp["repeats"]):
            print(f"{i + 1:>6} {r['imp_wall_s']:8.2f} {r['step_s']:8.3f} {r['epoch_subset_s']:13.1f} "
                  f"{100 * r['fraction_subset']:9.1f}% {r['epoch_full_s']:13.1f} {100 * r['fraction_full']:9.1f}% "
                  f"{r['scoring_batch_over_step']:10.2f}")
        print(f"median: IMP/epoch {100 * s['fraction_subset_median']:.1f}% (2,048 subset, "
              f"{imp['epoch_steps']['subset']} steps), {100 * s['fraction_full_median']:.1f}% (full "
              f"{imp['train_set_full']:,}, {imp['epoch_steps']['full']} steps); target <= 5%. Step-time CV "
              f"{100 * s['step_s_cv']:.0f}%. Selection = {100 * s['selection_share_of_imp']:.1f}% of IMP. Floor if a "
              f"scoring pass cost one training step: {100 * s['floor_fraction_subset']:.1f}% / "
              f"{100 * s['floor_fraction_full']:.1f}%")
        if imp["pairs"]:
            q = s["paired_score_over_step_quartiles"]
            print(f"paired: scoring pass / training step = {s['paired_score_over_step_median']:.3f} (quartiles "
                  f"{q[0]:.3f}..{q[1]:.3f}, {len(imp['pairs'])} pairs) -> predicted IMP/epoch "
                  f"{100 * s['predicted_fraction_subset']:.1f}% (2,048) / {100 * s['predicted_fraction_full']:.1f}% "
                  f"(full)")
    sel = result.get("selection")
    if sel:
        print()
        print(f"Peak extra memory per rank above its own scores (max over ranks; median of repeats), N = {sel['N']:,} "
              "float32 scores; alloc = torch CPU allocator high-water, RSS = VmHWM - VmRSS")
        print(f"{'P':>3} {'method':>10} {'N/P':>12} {'alloc MiB':>10} {'B/local':>8} {'B/global':>9} "
              f"{'RSS MiB':>9} {'B/local':>8} {'s':>6}")
        for r in sel["summary"]:
            print(f"{r['P']:>3} {r['method']:>10} {r['local_entries']:>12,} {r['alloc_extra_max'] / 2**20:10.1f} "
                  f"{r['alloc_bytes_per_local_entry']:8.2f} {r['alloc_bytes_per_global_entry']:9.2f} "
                  f"{r['rss_extra_max'] / 2**20:9.1f} {r['rss_bytes_per_local_entry']:8.2f} {r['seconds_median']:6.2f}")
        print(f"values agree (select == gather's kthvalue, every P): {sel['values_agree']}; select_top marks exactly "
              f"k: {sel['select_top_counts_exact']}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=2, help="MiniLM layers (2: the main job's default, 6: full MiniLM)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, i.e. OMP_NUM_THREADS)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 repeat, 3-step blocks, N = 4M scores")
    p.add_argument("--json", help="write every sample and the summary here")
    p.add_argument("--repeats", type=int, default=3, help="IMP runs, each between two train blocks")
    p.add_argument("--train-steps", type=int, default=10, help="timed optimizer steps per train block")
    p.add_argument("--pairs", type=int, default=20, help="paired (training step, scoring pass) samples")
    p.add_argument("--batch", type=int, default=32, help="micro-batch of IMP and of the epoch's steps (paper: 32)")
    p.add_argument("--partition-warmup", type=int, default=8, help="fully dynamic steps before IMP (trainer's)")
    p.add_argument("--sel-n", type=int, default=32 * 2**20, help="scores spread over the simulated ranks")
    p.add_argument("--sel-ranks", default="1,2,4,8", help="simulated rank counts P")
    p.add_argument("--sel-repeats", type=int, default=2)
    p.add_argument("--skip-imp", action="store_true")
    p.add_argument("--skip-selection", action="store_true")
    p.add_argument("--_sel-worker", dest="sel_worker", help=argparse.SUPPRESS)
    p.add_argument("--_total", dest="total", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_k", dest="k", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_block", dest="block", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_seed", dest="seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.sel_worker:
        _sel_worker(args.sel_worker, args.total, args.k, args.block, args.seed)
        return 0
    if args.quick:
        args.repeats, args.train_steps, args.sel_repeats, args.pairs = 1, 3, 1, 2
        args.sel_n = min(args.sel_n, 4 * 2**20)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "cpus": os.cpu_count(), "loadavg_start": os.getloadavg(), "quick": args.quick}
    t0 = time.perf_counter()
    if not args.skip_imp:
        result["imp"] = bench_imp(args)
    if not args.skip_selection:
        result["selection"] = bench_selection(args)
    result["loadavg_end"] = os.getloadavg()
    result["total_s"] = time.perf_counter() - t0
    print_tables(result)
    print(f"\nload average {result['loadavg_start'][0]:.1f} at start, {result['loadavg_end'][0]:.1f} at end "
          f"({result['cpus']} CPUs); {result['total_s']:.0f}s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
