"""Parameter counts of Switch presets from their shapes (no model is built), in pad_moe's two forms.

- ``params_training``: every parameter a training run holds over all ranks (PAD: static FFN + all experts + φ).
- ``params`` (compact, deployable): PAD stores each FFN weight entry once where it is static and E times where it is
  dynamic, so a sparse layer costs (1 − κ + E·κ)·FFN; the BERT convention of ``pad_moe.accounting`` / the paper.
  MoE is the κ = 1 case; static mode has one dense FFN where Switch has experts.

An FFN holds ``ffn_matrices · d_model · d_ff`` weights (2 for mlp presets, 3 for GEGLU ones: Switch-XXL), no biases.
Both count the router (d_model × E per sparse layer, no bias), the tied or separate LM head, the relative attention
bias tables, and PAD's scale parameter φ (1 per sparse layer; 2 for scale_mode 'unconstrained', 0 for 'none').
"""

from __future__ import annotations

from pad_moe.switch.presets import SwitchArch, get_arch

PHI_PER_LAYER = {"none": 0, "static": 1, "dynamic": 1, "both": 1, "unconstrained": 2}
COUNT_MODES = ("static", "moe", "pad")


def arch_parts(arch: SwitchArch) -> dict[str, int]:
    """The non-expert parameters and the shapes that the counts multiply."""
    H, inner = arch.d_model, arch.num_heads * arch.d_kv
    attn = 4 * H * inner
    bias_table = arch.relative_attention_num_buckets * arch.num_heads
    enc = arch.num_layers * (attn + 2 * H) + bias_table + H
    dec = arch.num_decoder_layers * (2 * attn + 3 * H) + bias_table + H
    embed = arch.vocab_size * H * (1 if arch.tie_word_embeddings else 2)
    n_sparse = len(arch.sparse_layers("encoder")) + len(arch.sparse_layers("decoder"))
    ffn = arch.ffn_matrices * H * arch.d_ff
    dense_ffns = arch.num_layers + arch.num_decoder_layers - n_sparse
    return {"backbone": enc + dec + embed + dense_ffns * ffn, "ffn": ffn, "sparse_layers": n_sparse,
            "router": H * arch.num_experts, "dense_ffns": dense_ffns}


def count_arch(arch: SwitchArch, mode: str = "moe", kappa: float | None = None,
               scale_mode: str = "both") -> dict[str, int | float]:
    if mode not in COUNT_MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(COUNT_MODES)}")
    if kappa is not None and not 0 < kappa <= 1:
        raise ValueError(f"kappa={kappa} must be in (0, 1]")
    if scale_mode not in PHI_PER_LAYER:
        raise ValueError(f"scale_mode={scale_mode!r} is unknown; allowed: {', '.join(PHI_PER_LAYER)}")
    p = arch_parts(arch)
    E, n, ffn, base = arch.num_experts, p["sparse_layers"], p["ffn"], p["backbone"]
    if mode == "static":
        total = base + n * ffn
        return {"params": total, "params_training": total, "non_expert": total, "expert": 0, **_shape(arch, p)}
    router = n * p["router"]
    if mode == "moe":
        total = base + router + n * E * ffn
        return {"params": total, "params_training": total, "non_expert": base + router, "expert": n * E * ffn,
                **_shape(arch, p)}
    k = 0.5 if kappa is None else kappa
    phi = n * PHI_PER_LAYER[scale_mode]
    training = base + router + phi + n * (E + 1) * ffn
    compact = base + router + phi + n * (1 - k + E * k) * ffn
    return {"params": int(round(compact)), "params_training": training, "kappa": k,
            "non_expert": base + router + phi + n * ffn, "expert": n * E * ffn, **_shape(arch, p)}


def _shape(arch: SwitchArch, p: dict) -> dict:
    return {"num_experts": arch.num_experts, "sparse_layers": p["sparse_layers"], "ffn_params": p["ffn"]}


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def count_switch(name: str, mode: str = "moe", kappa: float | None = None, experts: int | None = None,
                 scale_mode: str = "both", dtype: str = "fp32") -> dict[str, int | float | str | None]:
    """Counts of Switch preset ``name`` (``experts`` overrides its expert count), in the record format of
    ``padmoe count``: ``params`` is the compact count, ``params_training`` the training form, ``params_active`` what
    one token uses (top-1), ``bytes`` / ``bytes_training`` add the masks (packed bits / one bool per entry).
    ``non_expert`` / ``expert`` split the training form the way DeepSpeed shards it (expert = the E experts' FFN
    weights; PAD's static FFN, routers and φ are non-expert)."""
    arch = get_arch(name)
    if experts is not None:
        if experts < 1:
            raise ValueError(f"experts={experts} must be >= 1")
        arch = arch.with_(num_experts=experts)
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype={dtype!r} is unknown; allowed: {', '.join(DTYPE_BYTES)}")
    c = count_arch(arch, mode, kappa, scale_mode)
    n, ffn = c["sparse_layers"], c["ffn_params"]
    dense = arch_parts(arch)["backbone"] + n * ffn
    active = dense if mode == "static" else dense + n * arch_parts(arch)["router"]
    masks = n * ffn if mode == "pad" else 0
    size = DTYPE_BYTES[dtype]
    return {"name": name, "preset": name, "mode": mode, "convention": "ours", "granularity": "element",
            "kappa": c.get("kappa"), "experts": None if mode == "static" else arch.num_experts, "k": 1, **c,
            "params_active": active, "params_M": f"{c['params'] / 1e6:.1f}M",
            "params_training_M": f"{c['params_training'] / 1e6:.1f}M", "params_B": f"{c['params'] / 1e9:.2f}B",
            "bytes": c["params"] * size + -(-masks // 8), "bytes_training": c["params_training"] * size + masks,
            "dtype": dtype, "ffn_blocks": n}


def count_table(name: str, kappas=(0.7, 0.5, 0.3, 0.1), experts: int | None = None) -> dict[str, int]:
    """{'static', 'moe', 'pad@0.7', ...} compact counts, the rows of the paper's Table 1 for a Switch preset."""
    out = {"static": count_switch(name, "static", experts=experts)["params"],
           "moe": count_switch(name, "moe", experts=experts)["params"]}
    for k in kappas:
        out[f"pad@{k:g}"] = count_switch(name, "pad", k, experts=experts)["params"]
    return out
