"""The Switch span-corruption pre-training Job for pad_moe's trainer (``padmoe train`` with ``model.arch=switch``).

The trainer computes ``job.task_loss(logits, batch['labels'])`` and ``job.predictions(logits)``; ``Seq2SeqJob``
overrides both for token-level targets: logits (B, T, V) against labels (B, T) with −100 on padding (cross-entropy
over target tokens, as Hugging Face's T5 loss), predictions (B, T). The evaluation loop gathers (B, T) rows like
(B,) rows, so no trainer change is needed. The auxiliary loss the model returns already holds the router z-loss
(see ``SwitchModel``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pad_moe.lm.corpus import read_text_files
from pad_moe.switch import data as D
from pad_moe.switch.model import build_switch
from pad_moe.switch.presets import SWITCH_ALIASES, SWITCH_ARCHS, SwitchArch, get_arch
from pad_moe.train.job import Job
from pad_moe.train.registry import register_job

DEFAULT_Z_LOSS_COEF = 0.001
"""Router z-loss coefficient (Hugging Face / ST-MoE default) when the config has no ``moe.router_z_loss_coef``."""


@dataclass
class Seq2SeqJob(Job):
    """A Job whose labels are target token ids (B, T) with −100 on padding."""

    def task_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)


def _forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"], batch["decoder_input_ids"],
                 batch["decoder_attention_mask"])


def arch_from_run_config(cfg) -> SwitchArch:
    """The Switch architecture of a run: ``model.preset`` names it (a Switch preset), ``model``/``moe`` fields that the
    config tree shares with other backbones override it (hidden/FFN size, layers, heads, vocab, experts, every)."""
    name = cfg.model.preset
    if name not in SWITCH_ARCHS and name not in SWITCH_ALIASES:
        raise ValueError(f"model.preset={name!r} is not a Switch preset; use one of: "
                         f"{', '.join(sorted(SWITCH_ARCHS))}")
    base = get_arch(name)
    m = cfg.model
    symmetric = base.num_decoder_layers == base.num_layers
    return base.with_(d_model=m.hidden_size, d_ff=m.ffn_size, num_heads=m.num_heads, num_layers=m.num_layers,
                      num_decoder_layers=m.num_layers if symmetric else base.num_decoder_layers,
                      vocab_size=m.vocab_size, num_experts=cfg.moe.num_experts, sparse_step=cfg.moe.every,
                      dropout=m.dropout)


def switch_texts(cfg) -> list[str]:
    """The run's documents: ``data.text_files`` when the config has them, else the installed VADER sentences."""
    files = getattr(cfg.data, "text_files", None)
    if files:
        return read_text_files(list(files))  # the causal-LM job's reader: UTF-8 or one line
    texts = D.vader_texts(cfg.data.cache_dir)
    if not texts:
        raise ValueError("span_corruption without data.text_files reads the VADER sentences, which are not installed: "
                         "run `python -m pad_moe.data` (or bash tools/setup_env.sh), or set data.text_files")
    return texts


@register_job("switch")
def build_switch_job(cfg, ep_rank: int) -> Seq2SeqJob:
    """Span-corruption pre-training of the Switch backbone named by ``cfg.model.preset`` (mode ``cfg.moe.mode``).

    Vocabulary: byte-level BPE trained on the training split (``tokenizers``) inside ``model.vocab_size`` ids, the top
    32 (or vocab_size // 8) being the sentinels.
    Sequence length: ``model.max_seq_len`` input tokens; targets are padded to the longest possible target.
    """
    arch = arch_from_run_config(cfg)
    moe = cfg.moe
    z_coef = getattr(moe, "router_z_loss_coef", DEFAULT_Z_LOSS_COEF)
    train_texts, eval_texts = D.split_texts(switch_texts(cfg))
    if not eval_texts:
        eval_texts = train_texts[:max(1, len(train_texts) // 10)]
    num_sentinels = min(32, max(1, arch.vocab_size // 8))
    vocab = D.BpeVocab.build(train_texts, arch.vocab_size, num_sentinels=num_sentinels)
    L = cfg.model.max_seq_len
    train_set = D.SpanCorruptionDataset(train_texts, vocab, L, seed=cfg.data.seed)
    eval_set = D.SpanCorruptionDataset(eval_texts[:max(cfg.data.eval_size, 1)], vocab, L, seed=cfg.data.seed + 1)
    torch.manual_seed(cfg.train.seed)
    model = build_switch(arch, moe.mode, z_loss_coef=z_coef, aux_loss_coef=moe.aux_loss_coef, seed=cfg.train.seed,
                         ep_size=moe.ep_size, ep_rank=ep_rank, k=moe.k, capacity_factor=moe.capacity_factor,
                         eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
                         drop_tokens=moe.resolve_drop_tokens(upcycled=False),
                         dispatch=moe.resolve_dispatch(upcycled=False),
                         noisy_gate_policy=moe.noisy_gate_policy, use_rts=moe.use_rts,
                         granularity=moe.granularity, mask_sharing=moe.mask_sharing, scale_mode=moe.scale_mode)
    collate = functools.partial(D.collate, input_length=L, target_length=train_set.target_length)
    return Seq2SeqJob(model=model, train_set=train_set, eval_sets={"eval": eval_set}, collate=collate,
                      forward=_forward, num_labels=arch.vocab_size, metrics=D.token_accuracy,
                      main_metric="token_accuracy", extras={"vocab": vocab, "arch": arch})
