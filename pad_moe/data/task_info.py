"""What a text-classification task is: its columns, labels, splits and metric (shared by GLUE and VADER tasks)."""

from __future__ import annotations

from dataclasses import dataclass, field

METRIC_KINDS = ("accuracy", "matthews", "f1_accuracy", "pearson_spearman")


@dataclass(frozen=True)
class TaskInfo:
    """One task of the registry (``pad_moe.data.tasks.task_info(name)``)."""

    name: str
    """Registry name, e.g. ``sst2`` or ``vader-movies``."""
    text_columns: tuple[str, ...]
    """One column (single sentence) or two (sentence pair), in the order given to the tokenizer."""
    num_labels: int
    """Classes; 1 means regression (float labels, MSE loss)."""
    metric: str
    """Metric kind, one of ``METRIC_KINDS`` (see ``pad_moe.data.metrics``)."""
    eval_splits: tuple[str, ...] = ("validation",)
    """Splits returned for evaluation (MNLI: matched and mismatched)."""
    label_column: str = "label"
    """Column holding the gold label."""
    label_names: tuple[str, ...] = ()
    """Class names in label-id order; string labels in local files are mapped through them."""
    column_aliases: dict[str, str] = field(default_factory=dict)
    """Alternative column name -> canonical name (headers of the original GLUE TSV files)."""
    source: str = "glue"
    """glue (hub or local files) | vader (pad_moe's cache of the VADER corpora) ."""
    description: str = ""
    """One line for listings."""

    def __post_init__(self):
        if self.metric not in METRIC_KINDS:
            raise ValueError(f"task {self.name!r}: metric={self.metric!r} is not one of {', '.join(METRIC_KINDS)}")
        if len(self.text_columns) not in (1, 2):
            raise ValueError(f"task {self.name!r}: text_columns={self.text_columns} must hold 1 or 2 columns")
        if self.num_labels < 1:
            raise ValueError(f"task {self.name!r}: num_labels={self.num_labels} must be >= 1 (1: regression)")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"task {self.name!r}: {len(self.label_names)} label_names for "
                             f"num_labels={self.num_labels}")

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def splits(self) -> tuple[str, ...]:
        """The training split followed by the evaluation splits."""
        return ("train",) + self.eval_splits
