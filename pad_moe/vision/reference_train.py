"""Single-process reference training of a vision job, without DeepSpeed: the evidence runs of docs/vision.md and a
baseline to compare ``padmoe train`` against. The paper's recipe: IMP on ten batches before training (PAD), SGD with
momentum 0.9, linear warmup then one cosine cycle to zero, weight decay 1e-4 (ResNet) / 4e-5 (MobileNetV2), τ annealed
per step.

    python -m pad_moe.vision.reference_train --conv pad --kappa 0.1 --epochs 3 --width-mult 0.25 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

from pad_moe.vision.accounting import count_model
from pad_moe.vision.config import VisionConfig
from pad_moe.vision.job import VisionJob, build_vision_job


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear 0 -> 1 over ``warmup`` steps, then half a cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def batches(job: VisionJob, batch_size: int, epoch: int, seed: int):
    order = torch.randperm(len(job.train_set), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    for start in range(0, len(order) - batch_size + 1, batch_size):
        yield job.collate([job.train_set[int(i)] for i in order[start:start + batch_size]])


def evaluate(job: VisionJob, batch_size: int = 256) -> float:
    job.model.eval()
    correct = total = 0
    with torch.no_grad():
        for dataset in job.eval_sets.values():
            for start in range(0, len(dataset), batch_size):
                batch = job.collate([dataset[i] for i in range(start, min(len(dataset), start + batch_size))])
                logits, _ = job.forward(job.model, batch)
                correct += int((logits.argmax(-1) == batch["labels"]).sum())
                total += len(batch["labels"])
    job.model.train()
    return correct / total


def partition(job: VisionJob, kappa: float, batch_size: int, seed: int, num_batches: int = 10,
              iterations: int = 5) -> dict:
    """IMP (SNIP scores, exponential schedule, global scope) on ``num_batches`` training batches."""
    from pad_moe.partition import iterative_mode_partition

    stream = batches(job, batch_size, epoch=-1, seed=seed)
    scored = [next(stream) for _ in range(num_batches)]
    loss_fn = lambda model, b: job.task_loss(job.forward(model, b)[0], b["labels"])  # noqa: E731
    report = iterative_mode_partition(job.model, scored, loss_fn, kappa=kappa, iterations=iterations)
    return report.to_dict()


def train(cfg: VisionConfig, *, epochs: int, batch_size: int, lr: float, warmup_epochs: float, seed: int,
          kappa: float | None, log=print) -> dict:
    t0 = time.time()
    job = build_vision_job(cfg, seed)
    record = partition(job, kappa, batch_size, seed) if (cfg.conv == "pad" and kappa is not None) else None
    counts = count_model(job.model, (cfg.in_chans, cfg.image_size, cfg.image_size))
    steps_per_epoch = len(job.train_set) // batch_size
    total, warmup = epochs * steps_per_epoch, int(warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.SGD(job.model.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
    schedule = job.extras["temperature"]
    torch.manual_seed(seed)
    step, history = 0, []
    for epoch in range(epochs):
        losses = []
        for batch in batches(job, batch_size, epoch, seed):
            for group in optimizer.param_groups:
                group["lr"] = lr * cosine_with_warmup(step, total, warmup)
            schedule.apply(job.model, step, steps_per_epoch)
            loss = job.task_loss(job.forward(job.model, batch)[0], batch["labels"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
        accuracy = evaluate(job)
        history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "test_accuracy": accuracy})
        log(f"{cfg.model} {cfg.conv} epoch {epoch + 1}/{epochs}: loss {history[-1]['train_loss']:.4f}, "
            f"test accuracy {accuracy:.4f} ({time.time() - t0:.0f} s)")
    return {"model": cfg.model, "conv": cfg.conv, "kappa": kappa, "epochs": epochs, "history": history,
            "test_accuracy": history[-1]["test_accuracy"] if history else None, "counts": counts,
            "partition": record, "wall_s": time.time() - t0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet10")
    p.add_argument("--conv", default="pad")
    p.add_argument("--kappa", type=float, default=None, help="PAD: IMP dynamic ratio (none: stay all dynamic)")
    p.add_argument("--dataset", default="fashion_mnist")
    p.add_argument("--dataset-path", default=None)
    p.add_argument("--in-chans", type=int, default=1)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--width-mult", type=float, default=1.0)
    p.add_argument("--train-limit", type=int, default=0)
    p.add_argument("--eval-limit", type=int, default=0)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.5)
    p.add_argument("--temperature-epochs", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        cfg = VisionConfig(model=args.model, conv=args.conv, dataset=args.dataset, dataset_path=args.dataset_path,
                           in_chans=args.in_chans, image_size=args.image_size, width_mult=args.width_mult,
                           train_limit=args.train_limit, eval_limit=args.eval_limit,
                           temperature_epochs=args.temperature_epochs)
        result = train(cfg, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       warmup_epochs=args.warmup_epochs, seed=args.seed, kappa=args.kappa)
    except ValueError as err:
        print(f"reference_train: error: {err}", file=sys.stderr)
        return 2
    result["command"] = " ".join(["python -m pad_moe.vision.reference_train", *(argv or sys.argv[1:])])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps({k: result[k] for k in ("model", "conv", "kappa", "test_accuracy", "counts", "wall_s")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
