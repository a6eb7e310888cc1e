"""Data and metrics: the GLUE tasks, the offline VADER sentiment tasks, tokenisation, batching and GLUE metrics."""

from pad_moe.data.embedded import minilm_path, vader_corpus_path
from pad_moe.data.metrics import compute_metrics, main_metric
from pad_moe.data.task_info import TaskInfo
from pad_moe.data.tasks import (
    TASKS,
    TokenizedDataset,
    load_task,
    make_dataloader,
    pad_collate,
    task_info,
    task_names,
)

__all__ = ["TASKS", "TaskInfo", "TokenizedDataset", "compute_metrics", "load_task", "main_metric", "make_dataloader",
           "minilm_path", "pad_collate", "task_info", "task_names", "vader_corpus_path"]
