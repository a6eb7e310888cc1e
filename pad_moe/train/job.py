"""What a training run trains: the model, its data, its loss and its metrics, independent of DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pad_moe.config import RunConfig

Batch = dict[str, torch.Tensor]


@dataclass
class Job:
    model: nn.Module
    train_set: torch.utils.data.Dataset
    eval_sets: dict[str, torch.utils.data.Dataset]
    collate: Callable[[list], Batch]
    forward: Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]
    """(model, batch) -> (logits, auxiliary load-balancing loss)."""
    num_labels: int
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    """(predictions, labels) -> metric values."""
    main_metric: str
    extras: dict[str, Any] = field(default_factory=dict)

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.num_labels == 1 else logits.argmax(-1)


def _accuracy(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((preds == labels).float().mean())}


def _toy_collate(items: list) -> Batch:
    tokens, attn, labels = (torch.stack(x) for x in zip(*items))
    return {"input_ids": tokens, "attention_mask": attn, "labels": labels}


def _toy_forward(model: nn.Module, batch: Batch):
    return model(batch["input_ids"], batch["attention_mask"])


def build_job(cfg: RunConfig, ep_rank: int) -> Job:
    """The Job for cfg.model.arch (the model built on CPU in fp32, expert weights seeded by global expert id)."""
    if cfg.model.arch == "toy":
        from pad_moe.toy import ToyClassifier, synthetic_dataset

        torch.manual_seed(cfg.train.seed)
        model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels, ep_rank=ep_rank, seed=cfg.train.seed)
        return Job(model=model, train_set=synthetic_dataset(cfg.model, cfg.data, "train"),
                   eval_sets={"eval": synthetic_dataset(cfg.model, cfg.data, "eval")}, collate=_toy_collate,
                   forward=_toy_forward, num_labels=cfg.data.num_labels, metrics=_accuracy, main_metric="accuracy")
    raise ValueError(f"model.arch={cfg.model.arch!r} has no training job; allowed: toy")
