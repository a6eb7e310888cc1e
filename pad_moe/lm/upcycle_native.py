"""``padmoe upcycle``: a dense Llama / Mistral causal LM made into a native Hugging Face Mixtral MoE (sparse upcycling,
Komatsuzaki et al. 2022; the recipe of Qwen1.5-MoE and other upcycled MoEs).

Every expert of a layer is a copy of that layer's dense MLP (gate/up/down, SwiGLU); attention, norms, embeddings and
the head are copied unchanged; the router is new (normal, std = the config's initializer_range, seeded). With
identical experts and Mixtral's top-k softmax renormalised to sum 1, the MoE computes exactly the dense model's
function at the start: the command checks the logits on a probe batch before it writes anything (≤ 1e-5 relative),
so a config field the two families read differently (rope, norms, biases) cannot pass silently.

The output is an ordinary MixtralForCausalLM folder (config, safetensors, tokenizer, generation config): ``padmoe
train`` trains it as an HF MoE (``model.path=DIR``, ``moe.mode=moe`` or ``pad``), ``padmoe compress`` and
``padmoe count`` read it like any Mixtral.

    padmoe upcycle DENSE_DIR --out DIR [--experts 8] [--k 2] [--seed 0] [--aux-loss-coef 0.01]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch

SOURCES = ("llama", "mistral")
# Fields of the dense config that change the function and that Mixtral has no counterpart for: refused when set.
UNSUPPORTED = {"attention_bias": False, "mlp_bias": False}


def _check_args(args) -> None:
    if not os.path.isdir(args.dense_dir) or not os.path.isfile(os.path.join(args.dense_dir, "config.json")):
        raise ValueError(f"{args.dense_dir} is not a Hugging Face model folder (no config.json); pass the dense "
                         "model's folder")
    if os.path.exists(args.out):
        raise ValueError(f"--out {args.out} exists; pass a new folder (nothing is overwritten)")
    if args.experts < 2:
        raise ValueError(f"--experts {args.experts}: an MoE needs at least 2 experts")
    if not 1 <= args.k <= args.experts:
        raise ValueError(f"--k {args.k} must be between 1 and --experts {args.experts}")
    if not args.aux_loss_coef >= 0:
        raise ValueError(f"--aux-loss-coef {args.aux_loss_coef} must be >= 0")


def mixtral_config(dense, experts: int, k: int, aux_loss_coef: float):
    """The MixtralConfig of ``dense`` (a Llama / Mistral config) with ``experts`` experts of its MLP width, top ``k``."""
    from transformers import MixtralConfig

    if dense.model_type not in SOURCES:
        raise ValueError(f"model_type={dense.model_type!r}: padmoe upcycle makes Mixtral MoEs from "
                         f"{' / '.join(SOURCES)} models (same attention, SwiGLU MLP); upcycle other families with "
                         "padmoe train (moe.mode=moe on the dense folder keeps pad_moe's own MoE blocks)")
    for name, ok in UNSUPPORTED.items():
        if getattr(dense, name, ok) != ok:
            raise ValueError(f"{dense.model_type} config {name}={getattr(dense, name)}: Mixtral has no such "
                             "biases, so the MoE could not compute the dense function; not supported")
    if getattr(dense, "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={dense.hidden_act!r}: Mixtral experts are SwiGLU (silu); not supported")
    fields = {key: value for key, value in dense.to_dict().items()
              if key not in ("model_type", "architectures", "transformers_version", "attention_bias", "mlp_bias",
                             "pretraining_tp", "auto_map")}
    fields.update(num_local_experts=experts, num_experts_per_tok=k, router_aux_loss_coef=aux_loss_coef,
                  output_router_logits=True)
    return MixtralConfig(**fields)


@torch.no_grad()
def upcycle_dense(dense_model, experts: int, k: int, seed: int, aux_loss_coef: float = 0.01):
    """A MixtralForCausalLM equal to ``dense_model`` at init (experts = copies of each dense MLP, seeded router)."""
    from transformers import MixtralForCausalLM

    config = mixtral_config(dense_model.config, experts, k, aux_loss_coef)
    moe = MixtralForCausalLM(config).to(torch.float32).eval()
    dense_state = dense_model.state_dict()
    target = moe.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in target.items():
        if ".mlp." not in name:
            if name not in dense_state:
                raise ValueError(f"the dense model has no {name}; its layout is not the Llama one")
            tensor.copy_(dense_state[name])
            continue
        prefix = name.split(".mlp.")[0] + ".mlp."
        if name.endswith("mlp.gate.weight"):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * config.initializer_range)
        elif name.endswith("experts.gate_up_proj"):  # (E, 2F, H): the gate rows, then the up rows
            gate_up = torch.cat([dense_state[prefix + "gate_proj.weight"], dense_state[prefix + "up_proj.weight"]])
            tensor.copy_(gate_up.expand_as(tensor))
        elif name.endswith("experts.down_proj"):  # (E, H, F)
            tensor.copy_(dense_state[prefix + "down_proj.weight"].expand_as(tensor))
        else:
            raise ValueError(f"Mixtral parameter {name} has no dense counterpart in this transformers version")
    return moe


@torch.no_grad()
def check_same_function(dense_model, moe_model, vocab: int, rtol: float = 1e-5) -> float:
    """The largest logit difference on a probe batch, relative to the logits' scale; refused above ``rtol``."""
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    a = dense_model.eval()(input_ids=ids).logits.double()
    b = moe_model.eval()(input_ids=ids).logits.double()
    error = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if error > rtol:
        raise ValueError(f"the upcycled Mixtral's logits differ from the dense model's by {error:.2e} (relative); a "
                         "config field is read differently by the two families; not written")
    return error


def _upcycle(args) -> int:
    _check_args(args)
    from transformers import AutoConfig, AutoModelForCausalLM

    from pad_moe.hfmoe.weights import check_weight_files

    dense_config = AutoConfig.from_pretrained(args.dense_dir)
    mixtral_config(dense_config, args.experts, args.k, args.aux_loss_coef)  # refusals before the weights load
    check_weight_files(args.dense_dir)
    dense = AutoModelForCausalLM.from_pretrained(args.dense_dir, dtype=torch.float32)
    moe = upcycle_dense(dense, args.experts, args.k, args.seed, args.aux_loss_coef)
    error = check_same_function(dense, moe, dense.config.vocab_size)
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(args.out)}.tmp-", dir=parent)
    try:
        moe.save_pretrained(staging)
        for name in os.listdir(args.dense_dir):  # tokenizer and generation settings travel with the model
            if name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config")):
                shutil.copy2(os.path.join(args.dense_dir, name), os.path.join(staging, name))
        os.rename(staging, args.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    total = sum(p.numel() for p in moe.parameters())
    print(f"upcycled {args.dense_dir} -> {args.out}: Mixtral, {args.experts} experts top-{args.k}, {total:,} "
          f"parameters; logits equal the dense model's (max relative difference {error:.1e})")
    return 0


def register(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("upcycle", help="make a dense Llama / Mistral LM into a native Mixtral MoE (same function)",
                       description="Sparse upcycling: every expert a copy of the dense MLP, a new seeded router; the "
                                   "logits are checked equal to the dense model's before anything is written.")
    p.add_argument("dense_dir", help="a local Hugging Face Llama or Mistral folder")
    p.add_argument("--out", required=True, help="new folder for the Mixtral model")
    p.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    p.add_argument("--k", type=int, default=2, help="experts per token (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the router's initialisation")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="Mixtral's router_aux_loss_coef")
    p.set_defaults(handler=_upcycle, error_prog="padmoe upcycle")
    return p
