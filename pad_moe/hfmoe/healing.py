"""Healing of a compressed HF MoE on its calibration text (``padmoe compress --heal-steps N``).

AdamW (no decay, clip 1.0; ``pad_moe.distributed.fine_tuning_engine``, gradients averaged over the ranks) trains the
PAD parts (λ, W_s, the kept dynamic entries; for drop / reap the experts left) and, with ``router=True``, the routers
(the family's router of each sparse block); attention, norms and embeddings stay frozen. The loss:

- ``lm`` (default): next-token cross-entropy on the calibration batches;
- ``kd``: KL(source ‖ compressed) of the next-token distributions, the source's log-probabilities computed once per
  batch (no grad) before compression and kept on the CPU (fp32: batches × batch size × seq len × vocab × 4 bytes).

Selection (``select_every=N``): the held-out slice of the calibration text (its last 10 % of blocks, never healed
on, never the --eval text) is evaluated with the same loss before healing, every N steps and after the last; the
best state is kept. The record (losses, held-out curve, chosen step) goes into the output's pad_deploy.json.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pad_moe.errors import UsageError

LOSSES = ("lm", "kd")
HELD_OUT_FRACTION = 0.1


class BlockRange:
    """Blocks [start, stop) of a ``PackedBlocks`` (same item and collate)."""

    def __init__(self, blocks, start: int, stop: int):
        self.base, self.start, self.stop = blocks, start, stop
        self.collate = blocks.collate

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.base[self.start + i]


def split_held_out(blocks) -> tuple[BlockRange, BlockRange]:
    """(calibration blocks, held-out blocks): the last ⌈10 %⌉ of the blocks are held out."""
    n = len(blocks)
    held = max(1, math.ceil(HELD_OUT_FRACTION * n))
    return BlockRange(blocks, 0, n - held), BlockRange(blocks, n - held, n)


def all_batches(blocks, batch_size: int) -> list[dict]:
    return [blocks.collate([blocks[j] for j in range(i, min(i + batch_size, len(blocks)))])
            for i in range(0, len(blocks), batch_size)]


@torch.no_grad()
def teacher_log_probs(model: nn.Module, batches) -> list[torch.Tensor]:
    """The source's next-token log-probabilities per batch, (B·L, V) fp32 on the CPU."""
    model.eval()
    out = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"]).logits.float()
        out.append(torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1).cpu())
    return out


def lm_loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def kd_loss(model, batch, teacher: torch.Tensor) -> torch.Tensor:
    """KL(source ‖ model), mean over the batch's tokens."""
    logits = model(input_ids=batch["input_ids"]).logits.float()
    log_q = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
    return torch.nn.functional.kl_div(log_q, teacher.to(log_q.device), log_target=True, reduction="batchmean")


def trainable_parameters(model: nn.Module, router: bool) -> list[nn.Parameter]:
    from pad_moe.hfmoe.experts import PadHFExperts, block_router, moe_blocks

    chosen = set()
    for _, block in moe_blocks(model):
        experts = block.experts
        if isinstance(experts, PadHFExperts):  # λ, the static weights and the kept dynamic entries (masked: no grad)
            chosen |= {id(p) for p in experts.parameters(recurse=False)}
        else:  # drop / reap: the experts that are left
            chosen |= {id(p) for p in experts.parameters()}
        if router:
            chosen |= {id(p) for p in block_router(model, block).parameters()}
    return [p for p in model.parameters() if id(p) in chosen]


def heal(model: nn.Module, batches: list, *, steps: int, lr: float, batch_size: int, loss: str = "lm",
         teachers: list | None = None, router: bool = False, select_every: int | None = None,
         held_out: list | None = None, held_out_teachers: list | None = None) -> dict:
    """Heal ``model`` in place (see the module doc); returns the record."""
    from pad_moe import distributed as D
    from pad_moe.partition.collectives import world_size

    def loss_of(module, i, pool, teacher_pool):
        batch = pool[i % len(pool)]
        return lm_loss(module, batch) if loss == "lm" else kd_loss(module, batch, teacher_pool[i % len(pool)])

    params = trainable_parameters(model, router)
    keep = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    record = {"loss": loss, "router": router, "steps": steps, "lr": lr, "losses": []}
    engine = D.fine_tuning_engine(model, params, batch_size, lr)
    best = None

    def evaluate(step: int):
        nonlocal best
        engine.eval()
        with torch.no_grad():  # every rank evaluates the whole held-out slice: all agree on the best step
            tokens = [held_out[i]["input_ids"].numel() for i in range(len(held_out))]
            value = sum(float(loss_of(engine, i, held_out, held_out_teachers)) * n for i, n in enumerate(tokens))
        value /= sum(tokens)  # the mean over the held-out tokens, whatever the batch size
        engine.train()
        record["held_out"].append([step, value])
        if not math.isfinite(value):
            _diverged(f"the held-out loss is {value} at healing step {step}", lr)
        if best is None or value < best[1]:
            best = (step, value, [p.detach().clone() for p in params])

    try:
        if select_every:
            record.update(select_every=select_every, held_out=[], held_out_batches=len(held_out))
            evaluate(0)
        engine.train()
        for step in range(steps):
            value = loss_of(engine, step, batches, teachers)
            engine.backward(value)
            engine.step()
            record["losses"].append(float(D.all_reduce_(value.detach().clone())) / world_size())
            if not math.isfinite(record["losses"][-1]):
                _diverged(f"the calibration loss is {record['losses'][-1]} at healing step {step}", lr)
            if select_every and ((step + 1) % select_every == 0 or step + 1 == steps):
                evaluate(step + 1)
        with torch.no_grad():  # the loss after the last step (all ranks agree: the loss is all-reduced)
            final = float(D.all_reduce_(loss_of(engine, steps, batches, teachers).detach().clone())) / world_size()
        if not math.isfinite(final):
            _diverged(f"the calibration loss is {final} after {steps} healing steps", lr)
        record["final_loss"] = final
        if best is not None:
            record["best_step"] = best[0]
            with torch.no_grad():
                for p, kept in zip(params, best[2], strict=True):
                    p.copy_(kept)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
            p.grad = None
    model.eval()
    return record


def _diverged(what: str, lr: float):
    raise UsageError(f"healing diverged ({what}); lower --heal-lr {lr:g}, nothing was written")
