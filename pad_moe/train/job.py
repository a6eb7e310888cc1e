"""What a training run trains: the model, its data, its loss and its metrics, independent of DeepSpeed.

Each track builds its Job in its own module and registers the builder (``pad_moe.train.registry``); ``build_job``
here is the registry's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from pad_moe.train.registry import build_job, register_job, registered_jobs

Batch = dict[str, torch.Tensor]

__all__ = ["Batch", "Job", "accuracy", "build_job", "register_job", "registered_jobs"]


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
    integer_predictions: bool = True
    """Classification jobs: evaluation rows are class ids (cast to long before ``metrics``); False keeps floats."""

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.num_labels == 1 else logits.argmax(-1)

    def eval_rows(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """What evaluation gathers per example for ``metrics`` (default: the predictions)."""
        return self.predictions(logits)


def accuracy(preds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"accuracy": float((preds == labels).float().mean())}

