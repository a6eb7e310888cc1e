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
    if cfg.model.arch == "hf":
        return _hf_job(cfg, ep_rank)
    if cfg.model.arch == "vision":
        from pad_moe.vision.job import build_vision_job

        return build_vision_job(cfg.vision, cfg.train.seed)
    if cfg.model.arch == "switch":
        from pad_moe.switch.job import build_switch_job

        return build_switch_job(cfg, ep_rank)
    raise ValueError(f"model.arch={cfg.model.arch!r} has no training job; allowed: toy, hf, vision, switch")


def _fixed_length_collate(collate, max_length: int, pad_id: int):
    """Pad every batch to max_length: all ranks then route the same number of tokens (DeepSpeed sizes expert
    capacity from the local token count, and the all-to-all needs equal shapes)."""

    def fn(items):
        batch = collate(items)
        for key, value in batch.items():
            if key != "labels" and value.shape[1] < max_length:
                fill = pad_id if key == "input_ids" else 0
                batch[key] = F.pad(value, (0, max_length - value.shape[1]), value=fill)
        return batch

    return fn


class MeanPoolClassifier(nn.Module):
    """A Hugging Face sequence classifier that pools by the mean of the real tokens' last hidden states instead of
    its [CLS] pooler: how sentence encoders such as all-MiniLM-L6-v2 were trained. The unused pooler is frozen."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not isinstance(getattr(hf_model, "classifier", None), nn.Linear):
            raise ValueError(f"model.pooling=mean needs a classifier that is one nn.Linear on the pooled vector; "
                             f"{type(hf_model).__name__} has another head: use model.pooling=cls")
        self.hf = hf_model
        pooler = getattr(hf_model.base_model, "pooler", None)
        for p in pooler.parameters() if pooler is not None else ():
            p.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        from pad_moe.models.upcycle import reset_stats

        reset_stats(self.hf)  # the upcycled model's own forward (which resets them) is bypassed
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h_BTH = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        w_BT1 = attention_mask.unsqueeze(-1).to(h_BTH.dtype)
        pooled = (h_BTH * w_BT1).sum(1) / w_BT1.sum(1).clamp_min(1)
        head = self.hf.classifier
        return head(self.hf.dropout(pooled)) if hasattr(self.hf, "dropout") else head(pooled)


def _hf_job(cfg: RunConfig, ep_rank: int) -> Job:
    """A Hugging Face encoder from a local directory, upcycled per cfg.moe, on a GLUE / VADER task."""
    import os

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pad_moe.data import compute_metrics, load_task, main_metric
    from pad_moe.models import aux_loss, minilm_dir, upcycle_from_config

    path = minilm_dir() if cfg.model.path in (None, "minilm") else cfg.model.path
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model.path={cfg.model.path!r} is not a Hugging Face model directory (no config.json); "
                         "pass a local directory or 'minilm'")
    if cfg.data.task == "synthetic":
        raise ValueError("data.task=synthetic needs model.arch=toy; pick a GLUE or VADER task for an hf model")
    tokenizer = AutoTokenizer.from_pretrained(path)
    d = cfg.data
    train_set, eval_sets, info = load_task(d.task, tokenizer, max_length=d.max_length, data_files=d.data_files,
                                           cache_dir=d.cache_dir, max_train=d.max_train, max_eval=d.max_eval)
    torch.manual_seed(cfg.train.seed)  # the classifier head: identical on every rank
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=info.num_labels, num_hidden_layers=cfg.model.num_layers,
        problem_type="regression" if info.num_labels == 1 else "single_label_classification")
    upcycle_from_config(model, cfg.moe, ep_rank=ep_rank)
    if cfg.model.pooling == "mean":
        model = MeanPoolClassifier(model)
    inputs = [k for k in ("input_ids", "attention_mask", "token_type_ids")]

    def forward(m, batch):
        out = m(**{k: batch[k] for k in inputs if k in batch})
        return getattr(out, "logits", out), aux_loss(m)

    return Job(model=model, train_set=train_set, eval_sets=eval_sets,
               collate=_fixed_length_collate(train_set.collate, d.max_length, tokenizer.pad_token_id),
               forward=forward, num_labels=info.num_labels,
               metrics=lambda p, y: compute_metrics(info, p.numpy(), y.numpy()), main_metric=main_metric(info),
               extras={"tokenizer": tokenizer, "task": info})
