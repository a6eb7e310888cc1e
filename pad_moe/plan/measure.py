"""Measure the memory of real Switch training steps in this process, phase by phase, to check the planner.

Run it in a fresh process (``python -m pad_moe.plan.measure --json ...``) so that nothing else holds memory. Resident
memory is read from /proc/self/status (VmRSS, and VmHWM — the peak, reset through /proc/self/clear_refs before each
phase); glibc is asked to map every large block separately (MALLOC_MMAP_THRESHOLD_, set by ``main`` before torch
loads) so that freed tensors leave the resident set at once and RSS follows live tensors.

What is measured is what the planner models for one rank with ZeRO 0 in fp32 and torch's AdamW (a single process is a
world of one, ep 1): weights, gradients, optimizer states, the activations of a forward + backward, the optimizer step.
Bytes are relative to the resident set before the model is built (Python, torch, the libraries: not modelled).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536", "MALLOC_ARENA_MAX": "1"}


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} missing from /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(preset: str, mode: str = "pad", micro_batch: int = 8, seq: int = 128, target_seq: int = 32,
            steps: int = 3, dropout: float = 0.1, capacity_factor: float = 1.25, **arch_changes) -> dict:
    """Resident bytes (relative to before the model exists) after setup, at the backward peak, at the step peak, and
    the steady state between steps, for ``steps`` fp32 AdamW steps of a Switch preset on CPU."""
    import torch
    import torch.nn.functional as F

    from pad_moe.switch.model import build_switch
    from pad_moe.switch.presets import get_arch

    torch.set_num_threads(1)
    arch = get_arch(preset).with_(dropout=dropout, **arch_changes)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, arch.vocab_size, (micro_batch, seq), generator=g)
    dec = torch.randint(3, arch.vocab_size, (micro_batch, target_seq), generator=g)
    labels = torch.randint(3, arch.vocab_size, (micro_batch, target_seq), generator=g)
    ones_e, ones_d = torch.ones_like(ids), torch.ones_like(dec)
    _warm_up(mode)  # import and initialise everything a step touches before the baseline is taken
    gc.collect()
    base = _status("VmRSS")
    model = build_switch(arch, mode, min_capacity=0, capacity_factor=capacity_factor, seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=False)
    gc.collect()
    out = {"after_build": _status("VmRSS") - base, "backward_peak": 0, "step_peak": 0, "steady": 0,
           "params": sum(p.numel() for p in model.parameters())}
    for step in range(steps):
        gc.collect()
        _reset_peak()
        logits, aux = model(ids, ones_e, dec, ones_d)
        loss = F.cross_entropy(logits.float().reshape(-1, arch.vocab_size), labels.reshape(-1)) + 0.01 * aux
        del logits
        loss.backward()
        del loss, aux
        bwd = _status("VmHWM") - base
        gc.collect()
        _reset_peak()
        opt.step()
        stp = _status("VmHWM") - base
        opt.zero_grad(set_to_none=True)
        gc.collect()
        if step > 0:  # the first step creates the optimizer states
            out["backward_peak"] = max(out["backward_peak"], bwd)
            out["step_peak"] = max(out["step_peak"], stp)
            out["steady"] = _status("VmRSS") - base
    return out


def measure_engine(rank: int, world: int, zero: int, preset: str = "switch-debug", mode: str = "pad",
                   micro_batch: int = 8, seq: int = 128, target_seq: int = 32, steps: int = 3,
                   reduce_bucket: int = 5_000_000, dropout: float = 0.1, **arch_changes) -> dict:
    """As ``measure``, for one rank of a DeepSpeed engine (fp32, ZeRO ``zero``, ep = world, torch AdamW) inside an
    initialised process group of ``world`` ranks (e.g. ``pad_moe.testing.ranks.run_ranks``). The ranks must have been
    started with ``MMAP_ENV`` in their environment."""
    import deepspeed
    import torch
    import torch.nn.functional as F

    from pad_moe.distributed import param_groups
    from pad_moe.switch.model import build_switch
    from pad_moe.switch.presets import get_arch

    torch.set_num_threads(1)
    arch = get_arch(preset).with_(dropout=dropout, **arch_changes)
    g = torch.Generator().manual_seed(rank)
    ids = torch.randint(3, arch.vocab_size, (micro_batch, seq), generator=g)
    dec = torch.randint(3, arch.vocab_size, (micro_batch, target_seq), generator=g)
    _warm_up(mode)
    gc.collect()
    base = _status("VmRSS")
    model = build_switch(arch, mode, min_capacity=0, ep_size=world, ep_rank=rank, seed=0).train()
    ds = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": 1,
          "train_batch_size": micro_batch * world, "steps_per_print": 10**9,
          "zero_optimization": {"stage": zero, "reduce_bucket_size": reduce_bucket, "contiguous_gradients": True,
                                "allgather_bucket_size": reduce_bucket, "overlap_comm": False},
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0, "torch_adam": True}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=param_groups(model, 0.0), config=ds)
    out = {"backward_peak": 0, "step_peak": 0, "steady": 0}
    for step in range(steps):
        gc.collect()
        _reset_peak()
        logits, aux = engine(ids, torch.ones_like(ids), dec, torch.ones_like(dec))
        loss = F.cross_entropy(logits.float().reshape(-1, arch.vocab_size), dec.reshape(-1)) + 0.01 * aux
        del logits
        engine.backward(loss)
        del loss, aux
        bwd = _status("VmHWM") - base
        gc.collect()
        _reset_peak()
        engine.step()
        stp = _status("VmHWM") - base
        gc.collect()
        if step > 0:
            out["backward_peak"] = max(out["backward_peak"], bwd)
            out["step_peak"] = max(out["step_peak"], stp)
            out["steady"] = _status("VmRSS") - base
    return out


def _warm_up(mode: str) -> None:
    import torch

    from pad_moe.switch.model import build_switch
    from pad_moe.switch.presets import get_arch

    arch = get_arch("switch-debug")
    model = build_switch(arch, mode, min_capacity=0).train()
    opt = torch.optim.AdamW(model.parameters(), foreach=False)
    ids = torch.randint(3, arch.vocab_size, (2, 8))
    logits, aux = model(ids, torch.ones_like(ids), ids, torch.ones_like(ids))
    (logits.float().logsumexp(-1).mean() + aux).backward()
    opt.step()
    del model, opt, logits, aux


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("preset")
    p.add_argument("--mode", default="pad")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--target-seq", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--arch", default="{}", help="JSON of SwitchArch fields to change, e.g. '{\"d_model\": 256}'")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if any(os.environ.get(k) != v for k, v in MMAP_ENV.items()):  # glibc reads these at start: re-exec with them
        os.execve(sys.executable, [sys.executable, "-m", "pad_moe.plan.measure", *sys.argv[1:]],
                  {**os.environ, **MMAP_ENV})
    res = measure(args.preset, args.mode, args.micro_batch, args.seq, args.target_seq, args.steps,
                  **json.loads(args.arch))
    print(json.dumps(res) if args.json else "\n".join(f"{k:14s} {v / 2**20:10.1f} MiB" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
