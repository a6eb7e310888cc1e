"""Per-rank memory of a Switch PAD-MoE / MoE training step, the way DeepSpeed lays it out.

Model states (bytes per parameter, ψ = parameters this rank holds before sharding, N its group's data-parallel degree):

===========  =====================  ===========================================  ==================================
ZeRO stage   weights                gradients                                    optimizer (AdamW)
===========  =====================  ===========================================  ==================================
0            w·ψ                    w·ψ (+ 4·ψ fp32 buffer with bf16)            12·ψ/N with bf16, 8·ψ with fp32
1            w·ψ                    w·ψ (+ 4·ψ/N fp32 at the step with bf16)     12·ψ/N (fp32 master + m + v)
2            w·ψ                    w·ψ/N persistent + reduce bucket (backward)  12·ψ/N
                                    (+ 4·ψ/N fp32 at the step with bf16)
===========  =====================  ===========================================  ==================================

w = 2 (bf16/fp16) or 4 (fp32). N is the data-parallel degree of the parameter's group: the world for non-expert
parameters (attention, embeddings, dense FFNs, routers, PAD's static FFN and φ), world / ep for expert parameters
(DeepSpeed's expert-data-parallel group); a rank holds E / ep experts of every sparse layer. ZeRO-3 refuses
DeepSpeed MoE. PAD's masks are bool buffers (1 byte per FFN weight entry per sparse layer, replicated).

Activations are the tensors autograd saves in the forward of pad_moe's Switch model (Hugging Face eager attention,
DeepSpeed top-1 dispatch, PAD experts), derived from the code: ``activation_bytes`` itemises them. PAD experts build
their effective weights each forward (λs(1−M)⊙W_s + λd M⊙W_k: 2·H·F values per local expert per sparse layer), and
those are saved for the backward: a cost plain MoE does not have.

The peak of a step is the larger of the backward peak (model states + the activations still held + the gradients
produced so far, swept layer by layer from the LM head down; + the bucket under ZeRO-2) and the optimizer-step peak
(states + gradients + the optimizer's temporaries).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pad_moe.switch.count import arch_parts
from pad_moe.switch.presets import SwitchArch

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PAD_SHARED_WEIGHT_COPIES = 2
"""Weight-sized tensors a PAD layer saves once per FFN weight next to the E/ep effective weights (pad_moe.moe.ffn's
fused mix keeps the 0/1 float mask and the masked static weight λs(1−M)⊙W_s for the backward)."""


def _ceil(x: float) -> int:
    return int(math.ceil(x - 1e-9))


@dataclass
class StepShape:
    """What one rank runs per micro step."""

    micro_batch: int
    seq: int
    """Encoder (input) tokens per sequence."""
    target_seq: int
    """Decoder (target) tokens per sequence."""
    act_bytes: int = 2
    """Bytes per activation element (2: bf16/fp16, 4: fp32)."""
    param_bytes: int = 2
    """Bytes per weight element (PAD's effective weights are made in the weight dtype)."""
    dropout: bool = True
    """Dropout active (Switch: 0.1) — its masks are saved."""
    dropout_mask_bytes: int = 1
    """1 on GPUs (fused dropout keeps a bool mask); the activation size on CPU (dropout keeps the scaled noise)."""
    capacity_factor: float = 1.25
    min_capacity: int = 4
    ep: int = 1


@dataclass
class Activations:
    parts: dict[str, int] = field(default_factory=dict)
    per_layer: list[tuple[str, int, int, int]] = field(default_factory=list)
    """(name, activation bytes, non-expert weights, this rank's expert weights) from the input side to the LM head:
    what the backward sweep frees and the gradients it produces, layer by layer."""

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def add(self, key: str, nbytes: float) -> int:
        n = int(nbytes)
        self.parts[key] = self.parts.get(key, 0) + n
        return n


def _norm(acts: Activations, S: int, h: int, q: int) -> int:
    # x, x/rms (saved by the weight product), the output; the fp32 copy of x when activations are 16-bit; 1/rms.
    return acts.add("norm", S * h * (3 * q + (4 if q < 4 else 0)) + S * 4)


def _attention(acts: Activations, b: int, tq: int, tk: int, arch: SwitchArch, st: StepShape, kv_from_encoder: bool):
    q, inner, n = st.act_bytes, arch.num_heads * arch.d_kv, arch.num_heads
    scores = b * n * tq * tk
    total = acts.add("attn_qkv", b * tq * inner * q + 2 * b * tk * inner * q)
    total += acts.add("attn_probs", scores * q)
    if st.dropout:
        total += acts.add("attn_dropout", scores * (st.dropout_mask_bytes + q))
        total += acts.add("dropout", b * tq * arch.d_model * st.dropout_mask_bytes)
    total += acts.add("attn_out", b * tq * inner * q)
    return total


def _dense_ffn(acts: Activations, S: int, arch: SwitchArch, st: StepShape) -> int:
    q, f = st.act_bytes, arch.d_ff
    total = acts.add("ffn_hidden", S * f * q)
    if st.dropout:
        total += acts.add("ffn_dropout", S * f * (st.dropout_mask_bytes + q))
        total += acts.add("dropout", S * arch.d_model * st.dropout_mask_bytes)
    return total


def capacity(tokens: int, arch: SwitchArch, st: StepShape, k: int = 1) -> int:
    """DeepSpeed's expert capacity for ``tokens`` tokens on a rank (top-1: ceil(S/E·cf), at least min_capacity)."""
    return max(_ceil(tokens / arch.num_experts * st.capacity_factor * k), st.min_capacity)


def _sparse_ffn(acts: Activations, S: int, arch: SwitchArch, st: StepShape, mode: str, z_loss: bool) -> int:
    q, h, f, E = st.act_bytes, arch.d_model, arch.d_ff, arch.num_experts
    if mode == "static":
        return _dense_ffn(acts, S, arch, st)
    C = capacity(S, arch, st)
    rows = E * C  # dispatched slots this rank's experts process (ep ranks x local experts x capacity)
    total = acts.add("router", S * E * (4 + 4 + 8) + (S * h * 4 if q < 4 else 0))
    if z_loss:
        total += acts.add("router", S * E * 4 + S * 8 + (S * h * 4 if q < 4 else 0))
    total += acts.add("dispatch", rows * h * q + rows * 8 + S * 8)
    total += acts.add("expert_hidden", rows * f * q)
    total += acts.add("combine", S * h * q + S * 4)
    if mode == "pad":
        copies = E // st.ep + PAD_SHARED_WEIGHT_COPIES
        total += acts.add("pad_effective_weights", copies * 2 * h * f * st.param_bytes)
    if st.dropout:
        total += acts.add("dropout", S * h * st.dropout_mask_bytes)
    return total


def activation_bytes(arch: SwitchArch, mode: str, st: StepShape, z_loss: bool = True) -> Activations:
    """Bytes autograd holds at the end of one micro step's forward (loss included), itemised."""
    acts = Activations()
    b, s, t, h, q = st.micro_batch, st.seq, st.target_seq, arch.d_model, st.act_bytes
    parts = arch_parts(arch)
    ffn = parts["ffn"]
    # non-expert weights of a sparse FFN (PAD's static FFN and φ are non-expert) and this rank's expert weights
    sparse_ne = {"static": ffn, "moe": parts["router"], "pad": parts["router"] + ffn + 1}[mode]
    expert_w = 0 if mode == "static" else ffn * (arch.num_experts // st.ep)
    attn_w = 4 * h * arch.num_heads * arch.d_kv  # q, k, v, o
    S_e, S_d = b * s, b * t
    emb = acts.add("embedding", (S_e + S_d) * 8 + (S_e + S_d) * h * st.dropout_mask_bytes * st.dropout)
    acts.per_layer.append(("embedding", emb, arch.vocab_size * h, 0))
    sparse = {stack: set(arch.sparse_layers(stack)) for stack in ("encoder", "decoder")}
    for i in range(arch.num_layers):
        a = _norm(acts, S_e, h, q) + _attention(acts, b, s, s, arch, st, False) + _norm(acts, S_e, h, q)
        is_sparse = i in sparse["encoder"]
        a += _sparse_ffn(acts, S_e, arch, st, mode, z_loss) if is_sparse else _dense_ffn(acts, S_e, arch, st)
        ne, ex = (sparse_ne, expert_w) if is_sparse else (ffn, 0)
        acts.per_layer.append((f"encoder.{i}", a, attn_w + 2 * h + ne, ex))
    enc_out = _norm(acts, S_e, h, q) + acts.add("dropout", S_e * h * st.dropout_mask_bytes * st.dropout)
    acts.per_layer.append(("encoder.final", enc_out, h, 0))
    for i in range(arch.num_decoder_layers):
        a = _norm(acts, S_d, h, q) + _attention(acts, b, t, t, arch, st, False)
        a += _norm(acts, S_d, h, q) + _attention(acts, b, t, s, arch, st, True)
        a += _norm(acts, S_d, h, q)
        is_sparse = i in sparse["decoder"]
        a += _sparse_ffn(acts, S_d, arch, st, mode, z_loss) if is_sparse else _dense_ffn(acts, S_d, arch, st)
        ne, ex = (sparse_ne, expert_w) if is_sparse else (ffn, 0)
        acts.per_layer.append((f"decoder.{i}", a, 2 * attn_w + 3 * h + ne, ex))
    head = _norm(acts, S_d, h, q) + acts.add("dropout", S_d * h * st.dropout_mask_bytes * st.dropout)
    head += acts.add("lm_head", S_d * h * q + S_d * arch.vocab_size * 4 + S_d * 8)
    lm_w = h + (0 if arch.tie_word_embeddings else arch.vocab_size * h)
    acts.per_layer.append(("lm_head", head, lm_w, 0))
    return acts


def logits_transient(arch: SwitchArch, st: StepShape) -> int:
    """Logits and their gradient at the start of the backward (plus the fp32 copy when activations are 16-bit)."""
    S_d = st.micro_batch * st.target_seq
    return S_d * arch.vocab_size * (2 * st.act_bytes + (4 if st.act_bytes < 4 else 0))
