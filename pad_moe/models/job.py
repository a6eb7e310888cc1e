"""The training job of ``model.arch=hf``: a Hugging Face encoder from a local directory, upcycled per ``cfg.moe``,
on a GLUE / VADER task (registered with ``pad_moe.train.registry``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pad_moe.config import RunConfig
from pad_moe.train.job import Job
from pad_moe.train.registry import register_job

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def fixed_length_collate(collate, max_length: int, pad_id: int):
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


@register_job("hf")
def build_hf_job(cfg: RunConfig, ep_rank: int) -> Job:
    """The encoder at ``model.path`` (its first ``model.num_layers`` layers), upcycled, on ``data.task``."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pad_moe.data import compute_metrics, load_task, main_metric
    from pad_moe.models.upcycle import MeanPoolClassifier, aux_loss, upcycle_from_config

    if cfg.data.task in ("synthetic", "span_corruption"):
        raise ValueError(f"data.task={cfg.data.task} is not a task for model.arch=hf (synthetic: model.arch=toy, "
                         "span_corruption: model.arch=switch); pick a GLUE or VADER task (python -m pad_moe.data)")
    path = cfg.model.check_checkpoint(required=True)  # the sizes in cfg.model agree with the checkpoint's config
    tokenizer = AutoTokenizer.from_pretrained(path)
    d = cfg.data
    train_set, eval_sets, info = load_task(d.task, tokenizer, max_length=d.max_length, data_files=d.data_files,
                                           cache_dir=d.cache_dir, max_train=d.max_train, max_eval=d.max_eval)
    torch.manual_seed(cfg.train.seed)  # the classifier head: identical on every rank
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=info.num_labels, num_hidden_layers=cfg.model.num_layers,
        problem_type="regression" if info.num_labels == 1 else "single_label_classification")
    upcycle_from_config(model, cfg.moe, ep_rank=ep_rank, seed=cfg.train.seed)
    if cfg.model.freeze_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if cfg.model.pooling == "mean":
        model = MeanPoolClassifier(model)

    def forward(m, batch):
        out = m(**{k: batch[k] for k in MODEL_INPUTS if k in batch})
        return getattr(out, "logits", out), aux_loss(m)

    return Job(model=model, train_set=train_set, eval_sets=eval_sets,
               collate=fixed_length_collate(train_set.collate, d.max_length, tokenizer.pad_token_id),
               forward=forward, num_labels=info.num_labels,
               metrics=lambda p, y: compute_metrics(info, p.numpy(), y.numpy()), main_metric=main_metric(info),
               extras={"tokenizer": tokenizer, "task": info})
