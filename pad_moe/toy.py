"""pad_moe's tiny encoder and synthetic task: what the debug presets, CI and the demo train.

The encoder is pre-LN: token + position embeddings, then per layer self-attention and an FFN block (dense, MoE or
PAD-MoE from ``build_ffn_block``), mean pooling over the sequence, and a linear head.
"""

from __future__ import annotations

import torch
from torch import nn

from pad_moe.config import DataConfig, ModelConfig, MoEConfig, RunConfig
from pad_moe.moe.layer import build_ffn_block
from pad_moe.train.job import Batch, Job, accuracy
from pad_moe.train.registry import register_job


def ffn_block_kwargs(moe: MoEConfig, ep_rank: int, seed: int) -> dict:
    """Keyword arguments of build_ffn_block / ffn_block_from_dense taken from a MoEConfig."""
    return dict(num_experts=moe.num_experts, k=moe.k, ep_size=moe.ep_size, ep_rank=ep_rank,
                activation=moe.activation, expert_type=moe.expert_type, capacity_factor=moe.capacity_factor,
                eval_capacity_factor=moe.eval_capacity_factor, min_capacity=moe.min_capacity,
                drop_tokens=moe.resolve_drop_tokens(upcycled=False), dispatch=moe.resolve_dispatch(upcycled=False),
                noisy_gate_policy=moe.noisy_gate_policy,
                use_rts=moe.use_rts,
                second_expert_sampling=moe.second_expert_sampling, granularity=moe.granularity,
                mask_sharing=moe.mask_sharing, scale_mode=moe.scale_mode, seed=seed)


class ToyLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, ffn: nn.Module):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size)
        self.attn = nn.MultiheadAttention(cfg.hidden_size, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.hidden_size)
        self.ffn = ffn
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BTH: torch.Tensor, pad_BT: torch.Tensor | None):
        h = self.norm1(x_BTH)
        x_BTH = x_BTH + self.drop(self.attn(h, h, h, key_padding_mask=pad_BT, need_weights=False)[0])
        out, l_aux, _ = self.ffn(self.norm2(x_BTH))
        return x_BTH + self.drop(out), l_aux


class ToyClassifier(nn.Module):
    """forward(input_ids (B, T), attention_mask (B, T) | None) -> (logits (B, num_labels), aux loss scalar)."""

    def __init__(self, cfg: ModelConfig, moe: MoEConfig, num_labels: int, *, ep_rank: int = 0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.pos = nn.Parameter(torch.randn(cfg.max_seq_len, cfg.hidden_size, generator=g) * 0.02)
        layers = []
        for i in range(cfg.num_layers):
            mode = moe.mode if (i % moe.every) == moe.every - 1 else "static"
            layers.append(ToyLayer(cfg, build_ffn_block(mode, cfg.hidden_size, cfg.ffn_size,
                                                        **ffn_block_kwargs(moe, ep_rank, seed * 131 + i))))
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(cfg.hidden_size)
        self.head = nn.Linear(cfg.hidden_size, num_labels)
        with torch.no_grad():
            self.embed.weight.normal_(0, 0.5, generator=g)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        B, T = input_ids.shape
        x = self.embed(input_ids) + self.pos[:T]
        pad = None if attention_mask is None else attention_mask == 0
        aux = x.new_zeros((), dtype=torch.float32)
        for layer in self.layers:
            x, l_aux = layer(x, pad)
            aux = aux + l_aux
        x = self.norm(x)
        if attention_mask is None:
            pooled = x.mean(1)
        else:
            w = attention_mask.to(x.dtype).unsqueeze(-1)
            pooled = (x * w).sum(1) / w.sum(1).clamp_min(1)
        return self.head(pooled), aux


def synthetic_dataset(model: ModelConfig, data: DataConfig, split: str) -> torch.utils.data.TensorDataset:
    """Token sequences labelled by which token band holds the majority (a task attention-free FFNs can learn).

    With num_labels classes the vocabulary is cut into num_labels bands; each sequence draws most of its tokens from
    one band (its label) and the rest uniformly. Deterministic in (data.seed, split).
    """
    n = data.train_size if split == "train" else data.eval_size
    g = torch.Generator().manual_seed(data.seed + (0 if split == "train" else 1))
    C, V, T = max(data.num_labels, 2), model.vocab_size, model.max_seq_len
    labels = torch.randint(0, C, (n,), generator=g)
    band = V // C
    in_band = labels[:, None] * band + torch.randint(0, band, (n, T), generator=g)
    uniform = torch.randint(0, V, (n, T), generator=g)
    tokens = torch.where(torch.rand(n, T, generator=g) < 0.45, in_band, uniform)
    return torch.utils.data.TensorDataset(tokens, torch.ones(n, T, dtype=torch.long), labels)


def _collate(items: list) -> Batch:
    tokens, attn, labels = (torch.stack(x) for x in zip(*items))
    return {"input_ids": tokens, "attention_mask": attn, "labels": labels}


def _forward(model: nn.Module, batch: Batch):
    return model(batch["input_ids"], batch["attention_mask"])


@register_job("toy")
def build_toy_job(cfg: RunConfig, ep_rank: int) -> Job:
    """The toy encoder (seeded by train.seed) on the synthetic task (the config refuses any other data.task)."""
    if cfg.data.task != "synthetic":  # RunConfig refuses it; a config changed after validation is refused here
        raise ValueError(f"model.arch=toy trains only data.task=synthetic, got data.task={cfg.data.task}")
    torch.manual_seed(cfg.train.seed)
    model = ToyClassifier(cfg.model, cfg.moe, cfg.data.num_labels, ep_rank=ep_rank, seed=cfg.train.seed)
    return Job(model=model, train_set=synthetic_dataset(cfg.model, cfg.data, "train"),
               eval_sets={"eval": synthetic_dataset(cfg.model, cfg.data, "eval")}, collate=_collate,
               forward=_forward, num_labels=cfg.data.num_labels, metrics=accuracy, main_metric="accuracy")
