"""One typed configuration tree for every pad_moe run.

YAML supplies a run (``yaml.safe_load``), ``key=value`` arguments override it (dotted paths, values parsed as YAML
scalars), and the resolved tree is saved as ``config.yaml`` in the run directory. Every dataclass validates itself in
``__post_init__`` and raises ``ValueError`` naming the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import yaml

from pad_moe.checks import at_least as _at_least
from pad_moe.checks import choice as _choice
from pad_moe.moe.ffn import ACTIVATIONS
from pad_moe.moe.layer import MASK_SHARING, MODES
from pad_moe.pad.granularity import GRANULARITIES
from pad_moe.pad.mixing import SCALE_MODES
from pad_moe.vision.config import VisionConfig


@dataclass
class MoEConfig:
    """How FFN blocks are built: dense (static), fully dynamic MoE (moe) or PAD-MoE (pad)."""

    mode: str = "pad"
    """static | moe | pad: the paper's three model families, one flag."""
    num_experts: int = 8
    """Experts per MoE layer (paper: 8)."""
    k: int = 2
    """Experts per token: 1 (Switch) or 2 (paper)."""
    ep_size: int = 1
    """Expert-parallel group size; must divide num_experts and the world size."""
    capacity_factor: float = 1.0
    """Expert capacity factor during training."""
    eval_capacity_factor: float = 1.0
    """Expert capacity factor during evaluation."""
    min_capacity: int = 4
    """Minimum tokens per expert regardless of the capacity factor."""
    drop_tokens: bool = True
    """False: dropless routing (capacity grows to the busiest expert; adds one all-reduce per forward)."""
    noisy_gate_policy: Optional[str] = None
    """None, 'Jitter' or 'RSample' (DeepSpeed's gate noise)."""
    use_rts: bool = True
    """Random token selection when an expert overflows (DeepSpeed)."""
    second_expert_sampling: bool = True
    """Top-2: sample the second expert with Gumbel noise (DeepSpeed/GShard); false makes routing deterministic."""
    activation: str = "gelu"
    """FFN activation for models built from scratch (upcycled models keep theirs)."""
    granularity: str = "element"
    """element (the paper) | neuron (whole FFN hidden units, compactable)."""
    mask_sharing: str = "layer"
    """layer: one mask per FFN weight shared by all experts (paper) | expert: one mask per expert."""
    scale_mode: str = "both"
    """Scale factors λs, λd: none | static | dynamic | both (λs+λd=2) | unconstrained (paper Table 4)."""
    compact: bool = False
    """After partition, compact neuron-granularity layers (static units once per token)."""
    every: int = 1
    """Replace every N-th FFN block (1: all, 2: every other, as in Switch)."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss added to the task loss."""
    router_z_loss_coef: float = 0.001
    """Switch backbone: weight of the router z-loss (HF SwitchTransformers' definition); needs aux_loss_coef > 0."""

    def __post_init__(self):
        o = "moe"
        _choice(o, "mode", self.mode, MODES)
        _at_least(o, "num_experts", self.num_experts, 1)
        _at_least(o, "ep_size", self.ep_size, 1)
        if self.num_experts % self.ep_size:
            raise ValueError(f"moe.num_experts={self.num_experts} is not divisible by moe.ep_size={self.ep_size}")
        if not 1 <= self.k <= min(2, self.num_experts):
            raise ValueError(f"moe.k={self.k} must be 1 or 2 and <= moe.num_experts={self.num_experts}")
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor} / moe.eval_capacity_factor="
                             f"{self.eval_capacity_factor} must be > 0")
        _at_least(o, "min_capacity", self.min_capacity, 0)
        _choice(o, "noisy_gate_policy", self.noisy_gate_policy, (None, "Jitter", "RSample"))
        _choice(o, "activation", self.activation, tuple(ACTIVATIONS))
        _choice(o, "granularity", self.granularity, tuple(GRANULARITIES))
        _choice(o, "mask_sharing", self.mask_sharing, MASK_SHARING)
        _choice(o, "scale_mode", self.scale_mode, SCALE_MODES)
        _at_least(o, "every", self.every, 1)
        _at_least(o, "aux_loss_coef", self.aux_loss_coef, 0.0)
        _at_least(o, "router_z_loss_coef", self.router_z_loss_coef, 0.0)
        if self.compact and (self.granularity != "neuron" or self.mask_sharing != "layer"):
            raise ValueError("moe.compact=true needs moe.granularity=neuron and moe.mask_sharing=layer, got "
                             f"granularity={self.granularity}, mask_sharing={self.mask_sharing}")


PARTITION_METHODS = ("imp", "random", "moe_p")
SCORERS = ("snip", "magnitude", "random")
SCOPES = ("global", "layer")
SCHEDULES = ("exponential", "linear")


@dataclass
class PartitionConfig:
    """Iterative Mode Partition, run before the first training step (mode=pad only)."""

    enabled: bool = True
    """Run a partition before training (false: keep masks all dynamic, or as loaded)."""
    method: str = "imp"
    """imp (scored, iterative) | random (random partition baseline) | moe_p (SNIP pruning of the MoE, λs=0)."""
    kappa: float = 0.5
    """Final dynamic fraction κ in (0, 1]."""
    iterations: int = 5
    """Rounds T (1 = one-shot mode partition)."""
    scorer: str = "snip"
    """snip (|∂L/∂M|) | magnitude (|λd W_dyn − λs W_s|) | random."""
    scope: str = "global"
    """global (one threshold over all layers) | layer."""
    schedule: str = "exponential"
    """exponential κ^(t/T) | linear."""
    num_batches: int = 10
    """Mini-batches scored per round (global batches, split across data-parallel ranks)."""
    seed: int = 0
    """Seed for random scorers / partitions."""
    warmup_steps: int = 0
    """Train this many steps fully dynamic (all masks 1) before partitioning. An exactly upcycled model has
    W_k = W_s, so |∂L/∂M| = |∂L/∂Θ ⊙ (λd·W_k − λs·W_s)| is zero everywhere until the experts have diverged."""

    def __post_init__(self):
        o = "partition"
        _at_least(o, "warmup_steps", self.warmup_steps, 0)
        _choice(o, "method", self.method, PARTITION_METHODS)
        if not 0 < self.kappa <= 1:
            raise ValueError(f"partition.kappa={self.kappa} must be in (0, 1]")
        _at_least(o, "iterations", self.iterations, 1)
        _choice(o, "scorer", self.scorer, SCORERS)
        _choice(o, "scope", self.scope, SCOPES)
        _choice(o, "schedule", self.schedule, SCHEDULES)
        _at_least(o, "num_batches", self.num_batches, 1)


@dataclass
class ModelConfig:
    """The backbone. ``preset`` fills the architecture; explicit fields override it."""

    preset: str = "debug"
    """A name from ``pad_moe.presets.MODEL_PRESETS`` (``padmoe presets`` lists them)."""
    arch: str = "toy"
    """toy (pad_moe's small encoder) | hf (a Hugging Face encoder, upcycled)."""
    path: Optional[str] = None
    """hf: a local Hugging Face model directory, or ``minilm`` (all-MiniLM-L6-v2 from the offline pip package)."""
    hidden_size: int = 32
    """Model width H."""
    ffn_size: int = 64
    """FFN width F."""
    num_layers: int = 2
    """Encoder layers (hf: load the first N layers of the checkpoint)."""
    num_heads: int = 2
    """Attention heads."""
    vocab_size: int = 64
    """Toy vocabulary size."""
    max_seq_len: int = 16
    """Maximum sequence length (tokens)."""
    dropout: float = 0.0
    """Dropout probability in the toy encoder."""
    pooling: str = "cls"
    """hf: cls (the model's own [CLS] pooler and head) | mean (mean of token states; sentence encoders)."""

    def __post_init__(self):
        o = "model"
        _choice(o, "arch", self.arch, ("toy", "hf", "switch", "vision"))
        _choice(o, "pooling", self.pooling, ("cls", "mean"))
        for name in ("hidden_size", "ffn_size", "num_layers", "num_heads", "vocab_size", "max_seq_len"):
            _at_least(o, name, getattr(self, name), 1)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                             f"{self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")


@dataclass
class DataConfig:
    """Where examples come from."""

    task: str = "synthetic"
    """synthetic (toy model) | a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte) | vader-movies |
    vader-movies-reg (real movie-review sentences, offline): ``python -m pad_moe.data`` lists them."""
    num_labels: int = 2
    """Classes of the synthetic task (1: regression); real tasks define their own."""
    data_files: Optional[dict] = None
    """Local files per split ({train: path, validation: path}; csv, tsv, json(l), parquet) instead of the hub."""
    max_length: int = 128
    """Tokens per example; every batch is padded to it (equal shapes on all ranks for the all-to-all)."""
    max_train: Optional[int] = None
    """Deterministic subset of the training split (quick runs)."""
    max_eval: Optional[int] = None
    """Deterministic subset of each evaluation split."""
    cache_dir: Optional[str] = None
    """pad_moe's cache for fetched corpora (default ~/.cache/pad_moe, or $PAD_MOE_CACHE)."""
    text_files: list = field(default_factory=list)
    """span_corruption: text files, one document per line (empty: the VADER sentences, else a generated corpus)."""
    train_size: int = 2048
    """Synthetic training examples."""
    eval_size: int = 256
    """Synthetic evaluation examples."""
    seed: int = 1234
    """Seed of the synthetic data and of the shuffling order."""

    def __post_init__(self):
        if self.task not in ("synthetic", "span_corruption"):
            from pad_moe.data.tasks import task_names

            _choice("data", "task", self.task, ("synthetic", "span_corruption") + tuple(task_names()))
        if not isinstance(self.text_files, list):
            raise ValueError(f"data.text_files={self.text_files!r} must be a list of paths")
        _at_least("data", "num_labels", self.num_labels, 1)
        _at_least("data", "max_length", self.max_length, 1)
        for name in ("max_train", "max_eval"):
            if getattr(self, name) is not None:
                _at_least("data", name, getattr(self, name), 1)
        if self.data_files is not None and not isinstance(self.data_files, dict):
            raise ValueError(f"data.data_files={self.data_files!r} must map split names to file paths")
        _at_least("data", "train_size", self.train_size, 1)
        _at_least("data", "eval_size", self.eval_size, 1)


@dataclass
class TrainConfig:
    """Optimisation and the DeepSpeed engine. Batch size lives here only; ds_config files carry none."""

    ds_config: str = "configs/ds_zero2.json"
    """DeepSpeed JSON (ZeRO stage, offload, monitor); relative paths resolve against the repository root."""
    zero_stage: Optional[int] = None
    """Override the ZeRO stage of ds_config (0, 1 or 2 for MoE)."""
    dtype: str = "fp32"
    """fp32 | bf16 | fp16 (fp16 on GPU only)."""
    micro_batch_size: int = 16
    """Examples per rank per micro step."""
    grad_accum: int = 1
    """Micro steps per optimizer step."""
    steps: int = 20
    """Optimizer steps (0: derive from epochs)."""
    epochs: int = 1
    """Epochs when steps is 0."""
    optimizer: str = "adamw"
    """adamw (paper, NLP) | sgd (paper, vision: momentum, nesterov off)."""
    momentum: float = 0.9
    """SGD momentum."""
    schedule: str = "linear"
    """Learning-rate schedule after the linear warmup: linear decay to 0 (NLP) | cosine to 0 (vision)."""
    lr: float = 1e-3
    """Peak learning rate."""
    betas: tuple = (0.9, 0.98)
    """Adam betas (paper)."""
    weight_decay: float = 0.1
    """Adam weight decay (paper)."""
    warmup_ratio: float = 0.1
    """Linear warmup over this fraction of steps, then linear decay to 0."""
    seed: int = 42
    """Seed of model init and dropout."""
    log_every: int = 5
    """Steps between logged scalars."""
    eval_every: int = 0
    """Steps between evaluations (0: at the end of every epoch); there is always one at the end."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: at the end only)."""
    dynamics_batches: int = 4
    """MoE runs: at every evaluation, the dynamic-property scalars (paper Fig. 6: parameter and output variance across
    tokens, per layer) over this many eval micro-batches per rank (0: off; the expert weights are all-gathered)."""

    def __post_init__(self):
        o = "train"
        _choice(o, "dtype", self.dtype, ("fp32", "bf16", "fp16"))
        _choice(o, "optimizer", self.optimizer, ("adamw", "sgd"))
        _choice(o, "schedule", self.schedule, ("linear", "cosine"))
        if not 0 <= self.momentum < 1:
            raise ValueError(f"train.momentum={self.momentum} must be in [0, 1)")
        _choice(o, "zero_stage", self.zero_stage, (None, 0, 1, 2, 3))
        for name in ("micro_batch_size", "grad_accum", "epochs"):
            _at_least(o, name, getattr(self, name), 1)
        for name in ("steps", "log_every", "eval_every", "checkpoint_every", "dynamics_batches"):
            _at_least(o, name, getattr(self, name), 0)
        if self.lr <= 0:
            raise ValueError(f"train.lr={self.lr} must be > 0")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"train.betas={self.betas} must be two values in [0, 1)")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio={self.warmup_ratio} must be in [0, 1)")


@dataclass
class RunConfig:
    """A whole run: model, FFN blocks, partition, data, training, output."""

    name: str = "debug"
    """Run name; the run directory is output_dir/name."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)

    def __post_init__(self):
        if self.model.arch == "switch" and self.data.task != "span_corruption":
            raise ValueError(f"model.arch=switch trains on data.task=span_corruption, got data.task={self.data.task}")
        if self.moe.compact and self.partition.warmup_steps:
            raise ValueError(f"moe.compact=true needs the partition before training (partition.warmup_steps=0, got "
                             f"{self.partition.warmup_steps}): a compacted layer changes shape, the engine cannot")
        if not self.name or os.sep in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty name without '{os.sep}'")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)


# -- building, overriding, saving ------------------------------------------------------------------------------------
def from_dict(cls, data: dict[str, Any], path: str = ""):
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        where = f"{path}." if path else ""
        raise ValueError(f"unknown config key {where}{unknown[0]}; known keys: {', '.join(sorted(known))}")
    kwargs = {}
    for name, value in data.items():
        ftype = known[name].type
        sub = _DATACLASSES.get(ftype if isinstance(ftype, str) else getattr(ftype, "__name__", ""))
        where = f"{path}.{name}" if path else name
        kwargs[name] = from_dict(sub, value, where) if sub else _coerce(where, str(ftype), value)
    return cls(**kwargs)


def _coerce(where: str, ftype: str, value):
    """Check a scalar against its field type; accept YAML's strings for numbers such as '3e-3' (YAML 1.1 reads an
    exponent without a dot as a string)."""
    optional = ftype.startswith("Optional[")
    base = ftype[len("Optional["):-1] if optional else ftype
    if value is None:
        if optional:
            return None
        raise ValueError(f"{where} may not be null")
    if base == "float" and not isinstance(value, bool):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}={value!r} is not a number") from None
    if base == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{where}={value!r} is not an integer")
    if base == "bool" and not isinstance(value, bool):
        raise ValueError(f"{where}={value!r} is not true/false")
    if base == "str" and not isinstance(value, str):
        raise ValueError(f"{where}={value!r} is not a string")
    return value


def to_dict(cfg) -> dict[str, Any]:
    out = dataclasses.asdict(cfg)
    out["train"]["betas"] = list(out["train"]["betas"])
    return out


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides to a nested dict (values parsed as YAML scalars)."""
    data = yaml.safe_load(yaml.safe_dump(data))  # deep copy of plain data
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value (e.g. moe.num_experts=4)")
        key, raw = item.split("=", 1)
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    return data


def load_config(path: Optional[str] = None, overrides: list[str] = ()) -> RunConfig:
    """RunConfig from a YAML file (or the defaults), the model preset, then ``key=value`` overrides."""
    from pad_moe.presets import apply_model_preset

    data: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"config file {path!r} does not exist; pass a YAML file (see configs/)")
        with open(path) as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"config file {path!r} is not valid YAML: {str(err).splitlines()[0]}") from None
    data = apply_overrides(data, list(overrides))
    data = apply_model_preset(data)
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


_DATACLASSES = {c.__name__: c for c in (MoEConfig, PartitionConfig, ModelConfig, DataConfig, TrainConfig,
                                         VisionConfig)}
