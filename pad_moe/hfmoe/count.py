"""Parameter counts of an HF MoE (any registered family, ``pad_moe.hfmoe.families``) from its config.json alone (a
folder, or a preset of a published checkpoint's config: ``HF_MOE_PRESETS``), as it is (``moe``), after ``padmoe
compress`` at κ (``pad``), or merged to one FFN per layer (``static``).

The model is built on the meta device (no memory, no weights), so the counts are the family's own modules: tied
embeddings once, shared experts and routers in the non-expert part. Per sparse block with E experts of N = 3·F·H
weights and D = the dynamic entries of the partition (element: ⌊κN + ½⌋ per layer; neuron: ⌊κF + ½⌋ units × 3H):

    stored  moe: E·N        pad: (N − D) + E·D        static: N
    active  moe: k·N        pad: (N − D) + k·D        static: N      (per token, + every non-expert parameter)

Counted values are parameters and persistent buffers (DeepSeek-V3 / GLM-4.5's ``e_score_correction_bias``: one per
expert and block, stored by every output); ``params_training`` counts parameters only. Expert biases (gpt-oss) stay
each expert's own: E·(2F + H) stored per block in every mode, k·(2F + H) active.

A partition with ``scope=global`` (the IMP default) spreads D unevenly over layers; its total stored count is the same
to within rounding when every layer has the same N.

A compressed export folder (``pad_deploy.json``: ``padmoe compress``, the causal-LM job's ``RUN_DIR/deployed``) is
counted as stored: its tensors on disk (masks are not parameters), which must equal its recorded ``params_stored``;
κ is then the dynamic fraction its masks hold. The convention is the export's (``pad_moe.hfmoe.deployed``): φ is folded
into the stored values and not counted.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from pad_moe.errors import UsageError

HF_MOE_PRESETS: dict[str, tuple[str, dict]] = {
    # name -> (model_type, config fields) of published checkpoints (their config.json), for counting without weights
    "mixtral-8x7b": ("mixtral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                     num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                                     num_experts_per_tok=2, tie_word_embeddings=False)),
    "olmoe-1b-7b": ("olmoe", dict(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                  num_experts_per_tok=8, tie_word_embeddings=False)),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                                            moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16,
                                            num_experts=60, num_experts_per_tok=4, decoder_sparse_step=1,
                                            tie_word_embeddings=False)),
    "qwen3-30b-a3b": ("qwen3_moe", dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                                        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                                        decoder_sparse_step=1, tie_word_embeddings=False)),
    # the sizes of these families' config.json files (tests/test_hf_families.py checks the published totals)
    "deepseek-v2": ("deepseek_v2", dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288,
                                        moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
                                        num_key_value_heads=128, n_shared_experts=2, n_routed_experts=160,
                                        routed_scaling_factor=16.0, kv_lora_rank=512, q_lora_rank=1536,
                                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
                                        topk_method="group_limited_greedy", n_group=8, topk_group=3,
                                        num_experts_per_tok=6, first_k_dense_replace=1, norm_topk_prob=False,
                                        tie_word_embeddings=False)),
    "deepseek-v3": ("deepseek_v3", dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                                        topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                                        norm_topk_prob=True, tie_word_embeddings=False)),
    "gpt-oss-120b": ("gpt_oss", dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=36,
                                     num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=128,
                                     num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0,
                                     tie_word_embeddings=False)),
    "gpt-oss-20b": ("gpt_oss", dict(vocab_size=201088, hidden_size=2880, intermediate_size=2880, num_hidden_layers=24,
                                    num_attention_heads=64, num_key_value_heads=8, head_dim=64, num_local_experts=32,
                                    num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0,
                                    tie_word_embeddings=False)),
    "glm-4.5": ("glm4_moe", dict(vocab_size=151552, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                                 num_hidden_layers=92, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                                 n_routed_experts=160, n_shared_experts=1, num_experts_per_tok=8,
                                 first_k_dense_replace=3, n_group=1, topk_group=1, routed_scaling_factor=2.5,
                                 norm_topk_prob=True, partial_rotary_factor=0.5, attention_bias=True, use_qk_norm=True,
                                 tie_word_embeddings=False)),
    "glm-4.5-air": ("glm4_moe", dict(vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                                     moe_intermediate_size=1408, num_hidden_layers=46, num_attention_heads=96,
                                     num_key_value_heads=8, head_dim=128, n_routed_experts=128, n_shared_experts=1,
                                     num_experts_per_tok=8, first_k_dense_replace=1, n_group=1, topk_group=1,
                                     routed_scaling_factor=1.0, norm_topk_prob=True, partial_rotary_factor=0.5,
                                     attention_bias=True, use_qk_norm=False, tie_word_embeddings=False)),
    "qwen3-next-80b-a3b": ("qwen3_next", dict(vocab_size=151936, hidden_size=2048, intermediate_size=5120,
                                              moe_intermediate_size=512, shared_expert_intermediate_size=512,
                                              num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2,
                                              head_dim=256, num_experts=512, num_experts_per_tok=10,
                                              decoder_sparse_step=1, mlp_only_layers=[], full_attention_interval=4,
                                              linear_conv_kernel_dim=4, linear_key_head_dim=128,
                                              linear_num_key_heads=16, linear_num_value_heads=32,
                                              linear_value_head_dim=128, norm_topk_prob=True,
                                              partial_rotary_factor=0.25, tie_word_embeddings=False)),
    # the text model of Llama-4-Scout-17B-16E (its config.json's text_config; the vision encoder is not imported)
    "llama-4-scout": ("llama4_text", dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                                          intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
                                          num_key_value_heads=8, head_dim=128, num_local_experts=16,
                                          num_experts_per_tok=1, interleave_moe_layer_step=1, use_qk_norm=True,
                                          tie_word_embeddings=False)),
}


def is_hf_moe_target(target: str) -> bool:
    """A preset or any folder with a config.json: ``count_hf_moe`` counts it or says why it cannot (not JSON, a model
    type transformers does not know, a dense model, a bad size)."""
    return target in HF_MOE_PRESETS or (os.path.isdir(target) and os.path.isfile(os.path.join(target, "config.json")))


POSITIVE_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts_per_tok", "num_local_experts",
                  "num_experts", "n_routed_experts", "decoder_sparse_step")
NULLABLE_SIZES = ("num_key_value_heads", "head_dim")  # null: the family's default (the number of heads, H / heads)


def _config(target: str):
    from transformers import CONFIG_MAPPING, AutoConfig

    from pad_moe.hfmoe.experts import HF_MOE_FAMILIES
    from pad_moe.hfmoe.families import refusal

    if target in HF_MOE_PRESETS:
        model_type, fields = HF_MOE_PRESETS[target]
        return CONFIG_MAPPING[model_type](**fields)
    import json

    path = os.path.join(target, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as err:
        raise UsageError(f"{path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    if not isinstance(raw, dict):
        raise UsageError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields")
    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UsageError(f"{path}: model_type={model_type!r} is not a model type this transformers knows; pass a "
                         "Hugging Face model folder")
    if refusal(model_type) is not None:
        raise UsageError(f"{target}: model_type={model_type!r}: {refusal(model_type)}")
    if model_type not in HF_MOE_FAMILIES:
        raise UsageError(f"{target} is a dense {model_type} model, not an HF MoE ({', '.join(HF_MOE_FAMILIES)}): "
                         "padmoe count counts HF MoE folders, their presets, pad_moe presets and run configs")
    for key in POSITIVE_SIZES + ("shared_expert_intermediate_size",):
        if key not in raw or (raw[key] is None and key in NULLABLE_SIZES):
            continue
        value, low = raw[key], 0 if key == "shared_expert_intermediate_size" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(f"{path}: {key}={json.dumps(value)} must be an integer >= {low}")
    try:
        return AutoConfig.from_pretrained(target)
    except Exception as err:  # noqa: BLE001 - transformers' own validation: one line
        reason = " ".join(str(err).split())[:200]
        raise UsageError(f"{path} cannot be read as a {model_type} config ({type(err).__name__}: {reason})") from None


def is_hf_moe_folder(path: str) -> bool:
    """Whether ``path`` is a folder whose config.json names an HF MoE family pad_moe imports."""
    import json

    from pad_moe.hfmoe.experts import HF_MOE_FAMILIES

    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config) as f:
            return json.load(f).get("model_type") in HF_MOE_FAMILIES
    except (OSError, ValueError):
        return False


def count_hf_moe(path: str, *, mode: Optional[str] = None, kappa: Optional[float] = None, k: Optional[int] = None,
                 granularity: Optional[str] = None, dtype_bytes: int = 4) -> dict:
    """The counts of ``path`` (a preset or a model folder) as it is (``mode`` moe, the default), at κ (pad) or merged
    (static); an export folder counts what it stores (see the module doc) and takes no mode, κ or granularity."""
    from pad_moe.hfmoe.deployed import META_FILE

    if path not in HF_MOE_PRESETS and os.path.isfile(os.path.join(path, META_FILE)):
        given = [f for f, v in (("--mode", mode), ("--kappa", kappa), ("--granularity", granularity)) if v is not None]
        if given:
            raise UsageError(f"{given[0]} does not apply to {path}, a compressed export ({META_FILE}): it is counted as "
                             "stored; drop it (or count the source model folder)")
        return count_export(path, k=k, dtype_bytes=dtype_bytes)
    return _count_config(path, mode or "moe", kappa, k, granularity or "element", dtype_bytes)


def _count_config(path: str, mode: str, kappa: Optional[float], k: Optional[int], granularity: str,
                  dtype_bytes: int) -> dict:
    """The counts of the model ``path``'s config.json (or preset) builds."""
    from transformers import AutoModelForCausalLM

    from pad_moe.hfmoe.experts import moe_blocks
    from pad_moe.hfmoe.families import family_spec
    from pad_moe.partition import dynamic_count

    if mode not in ("moe", "pad", "static"):
        raise UsageError(f"--mode {mode} is unknown for an HF MoE; use moe, pad or static")
    if mode == "pad" and (kappa is None or not 0 < kappa <= 1):
        raise UsageError(f"--mode pad needs --kappa in (0, 1], got {kappa}")
    if mode != "pad" and kappa is not None:
        raise UsageError(f"--kappa applies to --mode pad, not --mode {mode}")
    if granularity not in ("element", "neuron"):
        raise UsageError(f"--granularity {granularity} is unknown; use element or neuron")
    config = _config(path)
    spec = family_spec(config)
    family, layout = spec.model_type, spec.expert_layout
    k = config.num_experts_per_tok if k is None else k
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    from pad_moe.hfmoe.budget import stored_numel

    params = sum(p.numel() for p in model.parameters())
    total = stored_numel(model)  # persistent buffers (DeepSeek-V3 / GLM's router bias) are stored values too
    stored = active = total
    blocks = moe_blocks(model)
    for _, block in blocks:
        E, F, H = layout.sizes(block.experts)
        N = 3 * F * H
        bias = 2 * F + H if layout.has_bias else 0  # per expert, outside the partition
        if not 1 <= k <= E:
            given = "num_experts_per_tok in config.json" if k == config.num_experts_per_tok else "--k"
            raise UsageError(f"{given}={k} must be between 1 and the {E} experts per layer")
        if mode == "pad":
            D = (dynamic_count(kappa, N) if granularity == "element" else dynamic_count(kappa, F) * 3 * H)
        else:
            D = N if mode == "moe" else 0
        stored -= E * N - ((N - D) + E * D)
        active -= E * N - ((N - D) + k * D) + (E - k) * bias
    name = path if path in HF_MOE_PRESETS else os.path.basename(os.path.abspath(path))
    return {"name": name, "family": family, "mode": mode, "kappa": kappa,
            "granularity": granularity if mode == "pad" else None, "experts": E if blocks else 0, "k": k,
            "moe_layers": len(blocks), "params": int(stored), "params_training": int(params),
            "params_active": int(active), "bytes": int(stored) * dtype_bytes}


def count_export(path: str, *, k: Optional[int] = None, dtype_bytes: int = 4) -> dict:
    """The counts of an export folder from what it stores: the tensors of its safetensors files (their headers), which
    must equal ``params_stored`` of its ``pad_deploy.json``; active per token and κ from its value tensors' shapes."""
    from safetensors import safe_open

    from pad_moe.hfmoe.deployed import META_FILE, read_meta, weight_files
    from pad_moe.hfmoe.families import layout_named

    meta = read_meta(path)
    blocks = {} if meta.get("plain_hf") else meta["blocks"]
    shapes = {}
    for file in weight_files(path, meta):
        try:
            with safe_open(file, "pt") as f:
                shapes.update({key: tuple(f.get_slice(key).get_shape()) for key in f.keys()})
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise UsageError(f"{file} is missing or corrupt ({type(err).__name__}); write the folder again") from None
    numel = {key: int(torch.Size(shape).numel()) for key, shape in shapes.items()}
    stored = sum(n for key, n in numel.items() if not any(key.startswith(f"{b}.experts.mask_") for b in blocks))
    if stored != meta["params_stored"]:
        raise UsageError(f"{path}: {META_FILE} records params_stored {meta['params_stored']}, its tensors hold {stored}; "
                         "write the folder again")
    as_built = _count_config(path, "moe", None, k, "element", dtype_bytes)  # its config.json: the source (PAD)
    result = {**as_built, "method": meta.get("method"), "export": True, "params": stored,
              "params_training": int(meta.get("params_original") or as_built["params_training"]),
              "bytes": stored * dtype_bytes}
    if meta.get("plain_hf"):  # drop: an HF MoE with fewer experts, counted from its own config
        if as_built["params"] != stored:
            raise UsageError(f"{path}: its config.json builds {as_built['params']} parameters, its tensors hold "
                             f"{stored}; write the folder again")
        return result
    k = as_built["k"]
    dynamic = total = 0
    active = stored
    for name, spec in blocks.items():
        d = sum(shapes.get(f"{name}.experts.dynamic_{part}", (0, 0))[-1] for part in ("gate", "up", "down"))
        if spec.get("mask_sharing") == "expert":  # 1-D: every expert's own dynamic entries; per token the mean
            d /= spec["num_experts"]
        dynamic, total = dynamic + d, total + 3 * spec["hidden"] * spec["intermediate"]
        active -= (spec["num_experts"] - k) * d  # per token: k experts' dynamic entries of the E stored
        if layout_named(spec.get("layout", "concatenated")).has_bias:  # and k experts' biases
            active -= (spec["num_experts"] - k) * (2 * spec["intermediate"] + spec["hidden"])
    granularities = sorted({spec["granularity"] for spec in blocks.values()})
    return {**result, "mode": "pad", "kappa": round(dynamic / total, 6) if total else 0.0,
            "granularity": "/".join(granularities) or None, "params_active": int(active)}
