"""Switch Transformer architectures (Fedus et al., 2021) as named presets, and their registry entries.

Shapes follow the released Hugging Face checkpoints where they exist (``google/switch-base-*``: T5-v1.0 style FFN,
ReLU, no bias, d_ff 3072) and the paper's Table 9 otherwise. Each preset names its FFN type (``expert_type``): ``mlp``
has two matrices (``wi``, ``wo``, as Hugging Face's SwitchTransformers), ``glu`` three (GEGLU, T5 v1.1: ``wi_0``,
``wi_1``, ``wo``; pad_moe's gate_proj, up_proj, down_proj with gelu_tanh). The paper's Switch-Base/Large/XXL use GEGLU:

- Switch-Base (paper: GEGLU, d_ff 2048) has exactly the expert size of the released ReLU d_ff 3072 FFN
  (3·768·2048 = 2·768·3072), so the 7.4B of ``switch-base-128`` is the paper's 7B model.
- Switch-Large uses d_ff 4096 (T5-v1.0 large, the convention of the released checkpoints; the paper's GEGLU d_ff 2816 has
  3 % more parameters per expert). Not checked against the released switch-large-128 config.
- Switch-XXL is GEGLU (``expert_type='glu'``) with the paper's d_ff 10240: 3·4096·10240 per FFN, so
  ``switch-xxl-128`` counts 394.6B, the paper's 395B (its 395B needs 128 experts: with the 64 its table lists, the
  same shapes hold 201B). Both are offered (``switch-xxl-64``, ``switch-xxl-128``; ``switch-xxl`` is the paper's 64).
- Switch-C has no GEGLU (its two-matrix FFN is the paper's count) and every FFN sparse (paper: "expert frequency 1"),
  15 + 15 layers, 32 heads: 1571B as published. (The released switch-c-2048 config.json lists 30 heads and a 12-layer
  decoder.)

Sparse placement is Hugging Face's: with ``sparse_step`` s, FFN i of a stack is sparse when ``i % s == 1`` (s = 2:
layers 1, 3, 5, ...) or when s = 1 (every layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class SwitchArch:
    """One Switch encoder-decoder architecture."""

    d_model: int
    d_ff: int
    d_kv: int
    num_heads: int
    num_layers: int
    """Encoder layers (the decoder has ``num_decoder_layers``)."""
    num_decoder_layers: int
    num_experts: int
    sparse_step: int
    """1: every FFN is sparse; 2: every other FFN (layers 1, 3, ...)."""
    vocab_size: int = 32128
    tie_word_embeddings: bool = True
    """True: the LM head is the input embedding (T5 v1.0, released Switch-Base); False: a separate LM head."""
    relative_attention_num_buckets: int = 32
    dropout: float = 0.1
    expert_type: str = "mlp"
    """FFN type of every FFN, dense and sparse: mlp (wi, wo; ReLU) | glu (wi_0, wi_1, wo; GEGLU with gelu_tanh)."""
    source: str = ""

    def __post_init__(self):
        if self.expert_type not in ("mlp", "glu"):
            raise ValueError(f"expert_type={self.expert_type!r} is unknown; allowed: mlp, glu")
        for name in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "num_decoder_layers", "num_experts",
                     "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.sparse_step < 1:
            raise ValueError(f"sparse_step={self.sparse_step} must be >= 1")

    def sparse_layers(self, stack: str) -> list[int]:
        """Indices of the sparse FFN layers of the 'encoder' or 'decoder' stack."""
        n = self.num_layers if stack == "encoder" else self.num_decoder_layers
        return [i for i in range(n) if self.sparse_step == 1 or i % self.sparse_step == 1]

    @property
    def activation(self) -> str:
        """The FFN activation: relu for mlp (T5 v1.0), gelu_tanh for glu (GEGLU, T5 v1.1's gated-gelu)."""
        return "gelu_tanh" if self.expert_type == "glu" else "relu"

    @property
    def ffn_matrices(self) -> int:
        """Weight matrices per FFN: 2 (wi, wo) or 3 (wi_0, wi_1, wo)."""
        return 3 if self.expert_type == "glu" else 2

    def with_(self, **changes) -> "SwitchArch":
        return replace(self, **changes)


_BASE = dict(d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12, sparse_step=2)
_BASE_SRC = "released google/switch-base-N config (T5 v1.0 base, ReLU FFN)"

SWITCH_ARCHS: dict[str, SwitchArch] = {
    **{f"switch-base-{e}": SwitchArch(**_BASE, num_experts=e, source=_BASE_SRC) for e in (8, 16, 32, 64, 128, 256)},
    "switch-large-128": SwitchArch(d_model=1024, d_ff=4096, d_kv=64, num_heads=16, num_layers=24,
                                   num_decoder_layers=24, num_experts=128, sparse_step=2,
                                   source="paper Table 9 (Switch-Large), T5-v1.0 large ReLU FFN d_ff 4096"),
    "switch-xxl-64": SwitchArch(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24, num_decoder_layers=24,
                                num_experts=64, sparse_step=2, tie_word_embeddings=False, expert_type="glu",
                                source="paper Table 9 (Switch-XXL, 64 experts), GEGLU FFN"),
    "switch-xxl-128": SwitchArch(d_model=4096, d_ff=10240, d_kv=64, num_heads=64, num_layers=24,
                                 num_decoder_layers=24, num_experts=128, sparse_step=2, tie_word_embeddings=False,
                                 expert_type="glu",
                                 source="released google/switch-xxl-128 expert count, paper Table 9 shapes, GEGLU"),
    "switch-c-2048": SwitchArch(d_model=2080, d_ff=6144, d_kv=64, num_heads=32, num_layers=15, num_decoder_layers=15,
                                num_experts=2048, sparse_step=1, tie_word_embeddings=False,
                                source="paper Table 9 (Switch-C: every FFN sparse)"),
    # Tiny Switch for CI: 2 + 2 layers, 4 experts, every other FFN sparse; trains on CPU in seconds.
    "switch-debug": SwitchArch(d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
                               num_experts=4, sparse_step=2, vocab_size=512, relative_attention_num_buckets=8,
                               dropout=0.0, source="pad_moe debug model"),
}
SWITCH_ALIASES = {"switch-xxl": "switch-xxl-64", "switch-c": "switch-c-2048"}


def switch_names() -> list[str]:
    return sorted(SWITCH_ARCHS) + sorted(SWITCH_ALIASES)


def get_arch(name: str) -> SwitchArch:
    """The architecture of a Switch preset (aliases resolved); ValueError naming the known presets otherwise."""
    key = SWITCH_ALIASES.get(name, name)
    if key not in SWITCH_ARCHS:
        raise ValueError(f"preset {name!r} is not a Switch preset; known: {', '.join(switch_names())}")
    return SWITCH_ARCHS[key]


def arch_from_hf_config(config) -> SwitchArch:
    """A SwitchArch from a Hugging Face SwitchTransformersConfig (a checkpoint's config.json)."""
    steps = {config.encoder_sparse_step, config.decoder_sparse_step}
    if len(steps) != 1 or 0 in steps:
        raise ValueError(f"encoder_sparse_step={config.encoder_sparse_step} and decoder_sparse_step="
                         f"{config.decoder_sparse_step}: pad_moe builds checkpoints whose two stacks share one "
                         "non-zero sparse step")
    return SwitchArch(d_model=config.d_model, d_ff=config.d_ff, d_kv=config.d_kv, num_heads=config.num_heads,
                      num_layers=config.num_layers, num_decoder_layers=config.num_decoder_layers,
                      num_experts=config.num_experts, sparse_step=steps.pop(), vocab_size=config.vocab_size,
                      tie_word_embeddings=config.tie_word_embeddings,
                      relative_attention_num_buckets=config.relative_attention_num_buckets,
                      dropout=config.dropout_rate, source="Hugging Face config")


def hf_config(arch: SwitchArch, *, num_experts: int | None = None, dropout: float | None = None, **extra):
    """The Hugging Face SwitchTransformersConfig of ``arch`` (``num_experts`` overrides, e.g. 1 for a cheap shell)."""
    from transformers import SwitchTransformersConfig

    def n_sparse(n_layers: int) -> int:
        # HF derives sparse_step = num_layers // num_sparse_layers; choose the count that gives arch.sparse_step.
        return n_layers if arch.sparse_step == 1 else max(1, n_layers // arch.sparse_step)

    cfg = SwitchTransformersConfig(
        vocab_size=arch.vocab_size, d_model=arch.d_model, d_kv=arch.d_kv, d_ff=arch.d_ff, num_layers=arch.num_layers,
        num_decoder_layers=arch.num_decoder_layers, num_heads=arch.num_heads,
        num_experts=arch.num_experts if num_experts is None else num_experts,
        num_sparse_encoder_layers=n_sparse(arch.num_layers),
        num_sparse_decoder_layers=n_sparse(arch.num_decoder_layers),
        relative_attention_num_buckets=arch.relative_attention_num_buckets,
        dropout_rate=arch.dropout if dropout is None else dropout, tie_word_embeddings=arch.tie_word_embeddings,
        dense_act_fn="relu", **extra)
    cfg._attn_implementation = "eager"
    if {cfg.encoder_sparse_step, cfg.decoder_sparse_step} != {arch.sparse_step}:
        raise ValueError(f"sparse_step={arch.sparse_step} with {arch.num_layers} encoder / {arch.num_decoder_layers} "
                         "decoder layers has no Hugging Face equivalent; use a number of layers divisible by it")
    return cfg


def registry_entries() -> dict[str, dict[str, dict[str, Any]]]:
    """Entries for ``pad_moe.presets.MODEL_PRESETS`` (same format): ``model`` and ``moe`` sections per Switch preset.

    ``model.arch`` is ``switch``; the Switch-only fields (d_kv, decoder layers, sparse step, tied head) are looked up
    from ``model.preset`` by the Switch job, the shared ones (hidden/FFN size, layers, heads, vocab) come from the config
    so that ``key=value`` overrides work.
    """
    out = {}
    for name in switch_names():
        a = get_arch(name)
        model = {"arch": "switch", "hidden_size": a.d_model, "ffn_size": a.d_ff, "num_layers": a.num_layers,
                 "num_heads": a.num_heads, "vocab_size": a.vocab_size, "max_seq_len": 512 if a.d_model > 32 else 32,
                 "dropout": a.dropout}
        moe = {"num_experts": a.num_experts, "k": 1, "every": a.sparse_step, "activation": a.activation,
               "capacity_factor": 1.25, "eval_capacity_factor": 2.0, "min_capacity": 0 if a.d_model <= 32 else 4,
               "aux_loss_coef": 0.01}
        out[name] = {"model": model, "moe": moe}
    return out


def describe(name: str) -> dict[str, Any]:
    return {"name": name, **asdict(get_arch(name))}
