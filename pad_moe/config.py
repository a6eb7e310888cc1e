"""One typed configuration tree for every pad_moe run.

YAML supplies a run (``yaml.safe_load``), ``key=value`` arguments override it (dotted paths, values parsed as YAML
scalars), and the resolved tree is saved as ``config.yaml`` in the run directory. Every dataclass validates itself in
``__post_init__`` and raises ``ValueError`` naming the value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from pad_moe.checks import at_least as _at_least
from pad_moe.checks import choice as _choice
from pad_moe.config_tree import SECTIONS, _checked, _short, apply_overrides, from_dict, read_yaml_file, to_dict
from pad_moe.moe.dropless import DISPATCHES
from pad_moe.moe.ffn import ACTIVATIONS, EXPERT_TYPES, GLU_ACTIVATIONS
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
    """Experts per token: 1 (Switch), 2 (paper), or more with the dropless dispatch."""
    ep_size: int = 1
    """Expert-parallel group size; must divide num_experts and the world size."""
    capacity_factor: float = 1.0
    """Expert capacity factor during training."""
    eval_capacity_factor: float = 1.0
    """Expert capacity factor during evaluation."""
    min_capacity: int = 4
    """Minimum tokens per expert regardless of the capacity factor."""
    drop_tokens: Optional[bool] = None
    """True: capacity dispatch (tokens over an expert's capacity lose that route) | False: dropless (capacity grows to
    the busiest expert; one all-reduce per forward) | null: dropless for upcycled models (model.arch=hf, so they start
    as their dense original), capacity for models built from scratch. The run's config.yaml saves it resolved."""
    dispatch: Optional[str] = None
    """capacity (DeepSpeed's MoE forward: capacity factor, or padding to the busiest expert when drop_tokens=false) |
    dropless (pad_moe's: every route computed, tokens grouped by expert, grouped GEMM, variable all-to-all; needs
    drop_tokens false or unset and no gate noise) | null: dropless when tokens are not dropped (the resolved
    drop_tokens is false) and there is no gate noise, else capacity. Saved resolved."""
    noisy_gate_policy: Optional[str] = None
    """None, 'Jitter' or 'RSample' (DeepSpeed's gate noise)."""
    use_rts: bool = True
    """Random token selection when an expert overflows (DeepSpeed)."""
    second_expert_sampling: bool = True
    """Top-2: sample the second expert with Gumbel noise (DeepSpeed/GShard); false makes routing deterministic."""
    activation: str = "gelu"
    """FFN activation for models built from scratch (upcycled models keep theirs)."""
    expert_type: str = "mlp"
    """mlp (act(x W1) W2) | glu (down(act(gate x) * up x): SwiGLU with activation=silu, GEGLU with gelu/gelu_tanh)."""
    granularity: str = "element"
    """element (the paper) | neuron (whole FFN hidden units, compactable)."""
    mask_sharing: str = "layer"
    """layer: one mask per FFN weight shared by all experts (paper) | expert: one mask per expert."""
    scale_mode: str = "both"
    """Scale factors λs, λd: none | static | dynamic | both (λs+λd=2) | unconstrained (paper Table 4)."""
    compact: bool = False
    """After partition, compact neuron-granularity layers (static units once per token). With
    partition.warmup_steps > 0 the layers shrink in place after the warm-up partition and the engine is rebuilt, the
    optimizer state of the kept entries carried over (ZeRO 1/2, or ZeRO 0 in fp32)."""
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
        if not 1 <= self.k <= self.num_experts:
            raise ValueError(f"moe.k={self.k} must be in [1, moe.num_experts={self.num_experts}]")

        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor={self.capacity_factor} / moe.eval_capacity_factor="
                             f"{self.eval_capacity_factor} must be > 0")
        _at_least(o, "min_capacity", self.min_capacity, 0)
        _choice(o, "noisy_gate_policy", self.noisy_gate_policy, (None, "Jitter", "RSample"))
        _choice(o, "dispatch", self.dispatch, (None, *DISPATCHES))
        if self.dispatch == "dropless" and self.drop_tokens:
            raise ValueError("moe.dispatch=dropless computes every route, moe.drop_tokens=true drops those over "
                             "capacity; unset moe.drop_tokens or use moe.dispatch=capacity")
        if self.dispatch == "dropless" and self.noisy_gate_policy is not None:
            raise ValueError(f"moe.noisy_gate_policy={self.noisy_gate_policy} is DeepSpeed's capacity gate; use "
                             "moe.dispatch=capacity, or no gate noise with moe.dispatch=dropless")
        _choice(o, "activation", self.activation, tuple(ACTIVATIONS))
        _choice(o, "expert_type", self.expert_type, EXPERT_TYPES)
        if self.expert_type == "glu" and self.activation not in GLU_ACTIVATIONS:
            raise ValueError(f"moe.activation={self.activation!r} is not a gated activation for moe.expert_type=glu; "
                             f"choose one of {', '.join(GLU_ACTIVATIONS)}")
        _choice(o, "granularity", self.granularity, tuple(GRANULARITIES))
        _choice(o, "mask_sharing", self.mask_sharing, MASK_SHARING)
        _choice(o, "scale_mode", self.scale_mode, SCALE_MODES)
        _at_least(o, "every", self.every, 1)
        _at_least(o, "aux_loss_coef", self.aux_loss_coef, 0.0)
        _at_least(o, "router_z_loss_coef", self.router_z_loss_coef, 0.0)
        if self.compact and (self.granularity != "neuron" or self.mask_sharing != "layer"):
            raise ValueError("moe.compact=true needs moe.granularity=neuron and moe.mask_sharing=layer, got "
                             f"granularity={self.granularity}, mask_sharing={self.mask_sharing}")

    def resolve_drop_tokens(self, upcycled: bool) -> bool:
        """moe.drop_tokens as set, else the default of the model family: dropless (False) for an upcycled model,
        capacity dispatch (True) for one built from scratch. The only place that default is decided."""
        if self.drop_tokens is None:
            return not upcycled and self.dispatch != "dropless"
        return self.drop_tokens

    def resolve_dispatch(self, upcycled: bool) -> str:
        """moe.dispatch as set, else dropless when no token is dropped and the gate has no noise, else capacity."""
        if self.dispatch is not None:
            return self.dispatch
        dropping = self.resolve_drop_tokens(upcycled)
        return "capacity" if dropping or self.noisy_gate_policy is not None else "dropless"


PARTITION_METHODS = ("imp", "random", "moe_p")
SCORERS = ("snip", "magnitude", "random")
SCOPES = ("global", "layer")
SCHEDULES = ("exponential", "linear")
SCORE_LOSSES = ("task", "task+aux")


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
    """Seed for random scorers / partitions, and of the RNG that scoring draws from (dropout, gate noise)."""
    nested: bool = True
    """true: a static entry stays static (paper §4.2); false: every round re-scores all entries."""
    score_loss: str = "task"
    """Loss IMP scores with: the task loss (paper) | task + aux_loss_coef·load-balancing loss."""
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
        _choice(o, "score_loss", self.score_loss, SCORE_LOSSES)
        _at_least(o, "num_batches", self.num_batches, 1)


HF_SIZES = {"hidden_size": "hidden_size", "ffn_size": "intermediate_size", "num_heads": "num_attention_heads",
            "vocab_size": "vocab_size", "max_seq_len": "max_position_embeddings", "num_layers": "num_hidden_layers"}
"""ModelConfig size field -> the attribute of a Hugging Face config that a pretrained model's sizes come from."""


@dataclass
class ModelConfig:
    """The backbone. ``preset`` fills the architecture; explicit fields override it. A pretrained model (arch=hf)
    takes its sizes from its own config.json; a preset or explicit size that contradicts it is refused."""

    preset: Optional[str] = None
    """A name from ``pad_moe.presets.MODEL_PRESETS`` (``padmoe presets`` lists them); null: ``debug`` for arch=toy,
    none for arch=hf (sizes from the checkpoint, moe from the MoEConfig defaults) and vision."""
    arch: str = "toy"
    """toy (pad_moe's small encoder) | hf (a Hugging Face encoder, upcycled) | causal_lm (a Hugging Face decoder LM,
    pad_moe.lm.job) | switch | vision."""
    path: Optional[str] = None
    """hf: a local Hugging Face model directory, or ``minilm`` (all-MiniLM-L6-v2 from the offline pip package);
    causal_lm: a local Hugging Face causal-LM directory (its sizes come from its config.json)."""
    family: Optional[str] = None
    """causal_lm built from scratch with the sizes below: mixtral (an MoE of moe.num_experts, top moe.k) | llama."""
    hidden_size: Optional[int] = None
    """Model width H (hf: the checkpoint's hidden_size)."""
    ffn_size: Optional[int] = None
    """FFN width F (hf: intermediate_size)."""
    num_layers: Optional[int] = None
    """Encoder layers (hf: the first N <= the checkpoint's num_hidden_layers; null: all of them)."""
    num_heads: Optional[int] = None
    """Attention heads (hf: num_attention_heads)."""
    vocab_size: Optional[int] = None
    """Vocabulary size (hf: vocab_size)."""
    max_seq_len: Optional[int] = None
    """Maximum sequence length in tokens (hf: max_position_embeddings)."""
    dropout: float = 0.0
    """Dropout probability in the toy encoder."""
    pooling: str = "cls"
    """hf: cls (the model's own [CLS] pooler and head) | mean (mean of token states; sentence encoders)."""
    freeze_embeddings: bool = False
    """hf: keep the word-embedding table fixed (it is most of a small encoder's parameters, and on CPU its dense
    gradient, all-reduce and Adam update cost more than the two-layer body; it still counts as stored)."""

    def __post_init__(self):
        o = "model"
        _choice(o, "arch", self.arch, ("toy", "hf", "causal_lm", "switch", "vision"))
        _choice(o, "pooling", self.pooling, ("cls", "mean"))
        if not isinstance(self.freeze_embeddings, bool):
            raise ValueError(f"model.freeze_embeddings={self.freeze_embeddings!r} is not a boolean; use true or false")
        if self.freeze_embeddings and self.arch != "hf":
            raise ValueError(f"model.freeze_embeddings=true is for model.arch=hf (got arch={self.arch}); drop it")
        for name in HF_SIZES:
            if getattr(self, name) is not None:
                _at_least(o, name, getattr(self, name), 1)
        if self.arch in ("toy", "switch"):
            self._fill_from_preset()
        elif self.arch == "hf":
            self.check_checkpoint(required=False)
        elif self.arch == "causal_lm":
            self._check_causal_lm()
        if self.family is not None and self.arch != "causal_lm":
            raise ValueError(f"model.family={self.family} builds a causal LM from scratch (model.arch=causal_lm), not "
                             f"model.arch={self.arch}; drop model.family")
        if self.hidden_size is not None and self.num_heads is not None and self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by model.num_heads="
                             f"{self.num_heads}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"model.dropout={self.dropout} must be in [0, 1)")

    def _check_causal_lm(self) -> None:
        """causal_lm: exactly one of model.path (sizes from its config.json) and model.family (sizes all set)."""
        if (self.path is None) == (self.family is None):
            raise ValueError("model.arch=causal_lm needs exactly one of model.path (a local Hugging Face causal LM) and "
                             f"model.family (mixtral | llama, built from scratch); got path={self.path!r}, "
                             f"family={self.family!r}")
        if self.family is not None:
            _choice("model", "family", self.family, ("mixtral", "llama"))
            unset = [name for name in HF_SIZES if getattr(self, name) is None]
            if unset:
                raise ValueError(f"model.family={self.family} builds the model from the model section's sizes; set "
                                 f"model.{unset[0]} (or pick a preset: padmoe presets)")
            return
        given = [name for name in HF_SIZES if getattr(self, name) is not None]
        if given:
            raise ValueError(f"model.{given[0]}={getattr(self, given[0])}: a pretrained causal LM's sizes come from "
                             f"{self.path}/config.json; drop model.{given[0]}")
        if not os.path.isfile(os.path.join(self.path, "config.json")):
            raise ValueError(f"model.path={self.path!r} is not a Hugging Face model directory (no config.json)")

    def _fill_from_preset(self) -> None:
        """toy / switch built in Python without a YAML: unset sizes are the preset's (toy: ``debug``)."""
        if self.arch == "toy" and self.preset is None:
            self.preset = "debug"
        if self.preset is None:
            raise ValueError(f"model.arch={self.arch} needs model.preset (padmoe presets lists them)")
        if all(getattr(self, name) is not None for name in HF_SIZES):
            return
        from pad_moe.presets import MODEL_PRESETS

        if self.preset not in MODEL_PRESETS:
            raise ValueError(f"model.preset={self.preset!r} does not exist; known presets: "
                             f"{', '.join(sorted(MODEL_PRESETS))}")
        values = MODEL_PRESETS[self.preset]["model"]
        for name in HF_SIZES:
            if getattr(self, name) is None:
                if name not in values:
                    raise ValueError(f"model.{name} is not set and model.preset={self.preset} has none; set it")
                setattr(self, name, values[name])

    def check_checkpoint(self, required: bool) -> Optional[str]:
        """arch=hf: the checkpoint directory, after filling the unset sizes from its config.json and refusing the set
        ones that contradict it (``num_layers`` may be fewer than the checkpoint's). Not required (config loading):
        a config whose sizes are all set may name no directory or one not on this machine (a saved run's config),
        and then None is returned; the job build requires it."""
        missing = [name for name in HF_SIZES if getattr(self, name) is None]
        if self.path is None:
            if required or missing:
                raise ValueError("model.arch=hf needs model.path: a local Hugging Face model directory, or minilm "
                                 "(its config.json gives the model's sizes)")
            return None
        try:
            directory = _hf_model_dir(self.path)
        except ValueError:
            if required or missing:
                raise
            return None
        hf = _hf_config(directory)
        source = f"{directory}/config.json"
        via = f" (model.preset={self.preset})" if self.preset else ""
        for name, key in HF_SIZES.items():
            theirs = getattr(hf, key, None)
            if not isinstance(theirs, int) or isinstance(theirs, bool):
                raise ValueError(f"{source} has no integer {key} (got {theirs!r}); model.arch=hf supports "
                                 "BERT-style encoders (BERT, RoBERTa, ELECTRA, MiniLM) and ALBERT")
            ours = getattr(self, name)
            if ours is None:
                setattr(self, name, theirs)
            elif name == "num_layers" and ours > theirs:
                raise ValueError(f"model.num_layers={ours}{via} but {source} has num_hidden_layers={theirs}: "
                                 f"model.num_layers may select the first N <= {theirs} layers")
            elif name != "num_layers" and ours != theirs:
                raise ValueError(f"model.{name}={ours}{via} contradicts {source}: {key}={theirs}; drop "
                                 f"model.{name} (a pretrained model's sizes come from its config.json) or fix model.path")
        return directory


def _hf_model_dir(path: str) -> str:
    """model.path as a directory holding config.json (``minilm``: the offline package's)."""
    if path == "minilm":
        from pad_moe.models.minilm import minilm_dir

        path = minilm_dir()
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"model.path={path!r} is not a Hugging Face model directory (no config.json); "
                         "pass a local directory or 'minilm'")
    return path


def _hf_config(directory: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - a malformed or unknown config: one line naming it
        text = " ".join(str(err).split())[:200]
        raise ValueError(f"{directory}/config.json cannot be read as a Hugging Face config "
                         f"({type(err).__name__}: {text})") from None


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
    """span_corruption and data.task=text: text files, one document per line (span_corruption without them: the
    VADER sentences)."""
    tokenizer: Optional[str] = None
    """causal_lm: model (the tokenizer in model.path) | bpe (byte-level BPE of model.vocab_size ids trained on the
    training documents); null: model with model.path, else bpe."""
    train_size: int = 2048
    """Synthetic training examples."""
    eval_size: int = 256
    """Synthetic evaluation examples."""
    seed: int = 1234
    """Seed of the synthetic data and of the shuffling order."""

    def __post_init__(self):
        from pad_moe.lm import CORPORA

        if self.task not in ("synthetic", "span_corruption") + CORPORA:
            from pad_moe.data.tasks import task_names

            _choice("data", "task", self.task, ("synthetic", "span_corruption") + CORPORA + tuple(task_names()))
        if self.tokenizer is not None:
            _choice("data", "tokenizer", self.tokenizer, ("model", "bpe"))
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

    def resolved_tokenizer(self, model: "ModelConfig") -> str:
        """data.tokenizer as set, else ``model`` when the model comes from a folder, else ``bpe``."""
        if self.tokenizer is None:
            return "model" if model.path is not None else "bpe"
        return self.tokenizer


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
    data_offset_steps: int = 0
    """Staged training: the data stream starts where a run of the same data.seed, batch size and world size stands
    after this many steps (a second stage, e.g. after upcycling, sees the tokens the first stage did not)."""
    log_every: int = 5
    """Steps between logged scalars."""
    eval_every: int = 0
    """Steps between evaluations (0: at the end of every epoch); there is always one at the end."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: at the end only)."""
    keep_checkpoints: int = 2
    """Complete checkpoints kept on disk, newest first (0: keep all); a save only replaces one once it is complete."""
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
        for name in ("steps", "data_offset_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                     "dynamics_batches"):
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
        arch, task = self.model.arch, self.data.task
        from pad_moe.lm import CORPORA

        if (arch == "causal_lm") != (task in CORPORA):
            raise ValueError(f"model.arch=causal_lm trains on a text corpus (data.task={' | '.join(CORPORA)}) and only it "
                             f"does; got model.arch={arch} with data.task={task}")
        if self.data.tokenizer is not None and arch != "causal_lm":
            raise ValueError(f"data.tokenizer={self.data.tokenizer} is for model.arch=causal_lm; drop it")
        if arch == "causal_lm":
            self._check_causal_lm()
        if arch == "switch" and task != "span_corruption":
            raise ValueError(f"model.arch=switch trains on data.task=span_corruption, got data.task={task}")
        if arch == "toy" and task != "synthetic":
            raise ValueError(f"model.arch=toy trains only data.task=synthetic, got data.task={task}; for {task} use "
                             "model.arch=hf model.path=DIR (or model.preset=minilm-2l)")
        if arch == "vision" and task != "synthetic":
            raise ValueError(f"model.arch=vision reads vision.dataset, not data.task={task}; drop data.task")
        if self.moe.expert_type != "mlp" and arch != "toy":
            raise ValueError(f"moe.expert_type={self.moe.expert_type} builds gated experts for model.arch=toy only; "
                             f"model.arch={arch} keeps its own FFN type (use moe.expert_type=mlp)")
        upcycled = arch in ("hf", "causal_lm")
        self.moe.dispatch = self.moe.resolve_dispatch(upcycled=upcycled)  # both saved resolved
        self.moe.drop_tokens = self.moe.resolve_drop_tokens(upcycled=upcycled)
        if self.moe.k > 2 and self.moe.dispatch != "dropless":
            raise ValueError(f"moe.k={self.moe.k} > 2 needs moe.dispatch=dropless (DeepSpeed's capacity gate and the "
                             f"deploy router take k = 1 or 2; this run resolved to dispatch={self.moe.dispatch})")
        if self.moe.compact and self.moe.mode != "pad":
            raise ValueError(f"moe.compact=true compacts PAD layers; moe.mode={self.moe.mode} has none (set moe.mode=pad "
                             "or moe.compact=false)")
        if not self.name or os.sep in self.name:
            raise ValueError(f"name={self.name!r} must be a non-empty name without '{os.sep}'")

    def _check_causal_lm(self) -> None:
        m, d = self.model, self.data
        tokenizer = d.resolved_tokenizer(m)
        if tokenizer == "model" and m.path is None:
            raise ValueError("data.tokenizer=model reads the tokenizer saved in model.path; a model built from scratch "
                             "(model.family) needs data.tokenizer=bpe")
        if m.max_seq_len is not None and d.max_length > m.max_seq_len:
            raise ValueError(f"data.max_length={d.max_length} (the packed block) exceeds model.max_seq_len="
                             f"{m.max_seq_len}; lower data.max_length")
        if m.family == "mixtral" and self.moe.mode == "static":
            raise ValueError("moe.mode=static with model.family=mixtral: a dense model from scratch is "
                             "model.family=llama; train the MoE with moe.mode=moe or pad")

    @property
    def run_dir(self) -> str:
        return os.path.join(self.output_dir, self.name)


# -- loading and saving (the generic machinery is pad_moe.config_tree) --------------------------------------------
def load_config(path: Optional[str] = None, overrides: list[str] = ()) -> RunConfig:
    """RunConfig from a YAML file (or the defaults), the model preset, then ``key=value`` overrides."""
    from pad_moe.presets import apply_model_preset

    data: Any = {}
    if path is not None:
        data = read_yaml_file(path)
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of sections (name, model, moe, partition, "
                             f"data, train, ...), got {type(data).__name__} {_short(data)}")
    data = apply_overrides(data, list(overrides))
    data = _checked(RunConfig, data, "")  # types and structure before the preset fills in its values
    data = apply_model_preset(data)
    return from_dict(RunConfig, data)


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)


SECTIONS.update({c.__name__: c for c in (MoEConfig, PartitionConfig, ModelConfig, DataConfig, TrainConfig,
                                        VisionConfig)})
