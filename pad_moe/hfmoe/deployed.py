"""The compact export of a compressed HF MoE model, and ``load_deployed`` for it (no DeepSpeed, one process).

Folder: the HF ``config.json`` and tokenizer files as ``save_pretrained`` writes them, ``pad_deploy.json`` (format,
family, method, κ, granularity, per-block shapes, stored parameter counts, the source) and ``model.safetensors``: every
tensor of the model outside the sparse blocks' experts as it is, and per block ``B.experts.``:

- ``mask_{gate,up,down}``: the partition mask expanded to the weight's shape, bit-packed (uint8);
- ``static_{gate,up,down}``: λs·W_s at the static (M=0) entries, 1-D, row-major (absent once the static part is dropped);
- ``dynamic_{gate,up,down}``: λd·W_k at the dynamic (M=1) entries of every expert, (E, n_dynamic).

``DeployedPadExperts`` rebuilds each expert's weights from these at every forward (one block at a time), so the model
holds only the stored parameters. A method that yields a plain HF model (``drop``: fewer experts) is saved with
``save_pretrained`` and ``pad_deploy.json``; ``load_deployed`` reads both kinds.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from pad_moe.deploy.compact import pack_bits, unpack_bits
from pad_moe.errors import UsageError
from pad_moe.hfmoe.experts import PadHFExperts, moe_blocks, run_experts
from pad_moe.pad.mixing import as_float

FORMAT, VERSION = "pad_moe-hf-moe", 1
META_FILE, WEIGHTS_FILE = "pad_deploy.json", "model.safetensors"
PARTS = ("gate", "up", "down")
_MASK_OF = {"gate": "gate_proj.weight", "up": "up_proj.weight", "down": "down_proj.weight"}


def _part_weights(module: PadHFExperts) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """part -> (λs·W_s (out, in), λd·W_k (E, out, in)), fp32, detached."""
    lam_s, lam_d = module.scale_factors()
    lam_s, lam_d = as_float(lam_s), as_float(lam_d)
    F = module.intermediate_dim
    with torch.no_grad():
        s_gu, s_down = module.static_gate_up.float() * lam_s, module.static_down.float() * lam_s
        d_gu, d_down = module.gate_up_proj.float() * lam_d, module.down_proj.float() * lam_d
    return {"gate": (s_gu[:F], d_gu[:, :F]), "up": (s_gu[F:], d_gu[:, F:]), "down": (s_down, d_down)}


def compact_tensors(module: PadHFExperts) -> tuple[dict[str, torch.Tensor], dict]:
    """The stored tensors of one PAD experts module and its spec."""
    masks = module.weight_masks()
    tensors, spec = {}, {"num_experts": module.num_experts, "hidden": module.hidden_dim,
                         "intermediate": module.intermediate_dim, "static_dropped": bool(module.static_dropped),
                         "act": _act_name(module.act_fn), "granularity": module.granularity.name}
    for part, (static, dynamic) in _part_weights(module).items():
        mask = masks[_MASK_OF[part]].expand(static.shape).to(torch.bool)
        tensors[f"mask_{part}"] = pack_bits(mask)
        if not module.static_dropped:
            tensors[f"static_{part}"] = static[~mask].contiguous()
        tensors[f"dynamic_{part}"] = dynamic[:, mask].contiguous()
    return tensors, spec


def _act_name(act_fn) -> str:
    from transformers.activations import ACT2CLS

    for name, cls in ACT2CLS.items():
        if type(act_fn) is (cls[0] if isinstance(cls, tuple) else cls):
            return name
    raise ValueError(f"the experts' activation {type(act_fn).__name__} has no transformers ACT2FN name")


class DeployedPadExperts(nn.Module):
    """Compact PAD experts of one block: the stored values only (see the module doc)."""

    def __init__(self, spec: dict):
        super().__init__()
        from transformers.activations import ACT2FN

        self.spec = dict(spec)
        E, H, F = spec["num_experts"], spec["hidden"], spec["intermediate"]
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, F
        self.act_fn = ACT2FN[spec["act"]]
        self._shapes = {"gate": (F, H), "up": (F, H), "down": (H, F)}
        for part, shape in self._shapes.items():
            n = shape[0] * shape[1]
            self.register_buffer(f"mask_{part}", torch.zeros((n + 7) // 8, dtype=torch.uint8))
            # sized when the state is loaded (the counts live in the masks)
            if not spec["static_dropped"]:
                self.register_parameter(f"static_{part}", nn.Parameter(torch.empty(0)))
            self.register_parameter(f"dynamic_{part}", nn.Parameter(torch.empty(E, 0)))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name, param in self.named_parameters(recurse=False):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != param.shape:
                setattr(self, name, nn.Parameter(torch.empty_like(state_dict[key])))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2F, H), down (E, H, F)) rebuilt from the stored values."""
        out = {}
        E = self.num_experts
        for part, shape in self._shapes.items():
            mask = unpack_bits(getattr(self, f"mask_{part}"), shape)
            dynamic = getattr(self, f"dynamic_{part}")
            w = dynamic.new_zeros((E, *shape))
            if not self.spec["static_dropped"]:
                w[:, ~mask] = getattr(self, f"static_{part}")
            w[:, mask] = dynamic
            out[part] = w
        return torch.cat([out["gate"], out["up"]], dim=1), out["down"]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        gate_up, down = self.weights()
        return run_experts(hidden_states, top_k_index, top_k_weights, gate_up, down, self.act_fn)


def save_compressed(model: nn.Module, tokenizer, out: str, meta: dict) -> dict:
    """Write ``model`` (PAD experts, or a plain HF MoE for methods that change the experts themselves) to ``out``, an
    existing empty directory (the caller makes it atomic). Returns the meta written."""
    from safetensors.torch import save_file

    blocks = {name: block for name, block in moe_blocks(model) if isinstance(block.experts, PadHFExperts)}
    state = {}
    specs = {}
    for name, tensor in model.state_dict().items():
        if not any(name.startswith(f"{b}.experts.") for b in blocks):
            state[name] = tensor.detach().float().contiguous()
    for name, block in blocks.items():
        tensors, specs[name] = compact_tensors(block.experts)
        state.update({f"{name}.experts.{k}": v for k, v in tensors.items()})
    shared = _tied_names(model)
    for name in shared:
        state.pop(name, None)
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_file(state, os.path.join(out, WEIGHTS_FILE))
    stored = sum(v.numel() for k, v in state.items() if not k.split(".")[-1].startswith("mask_"))
    meta = {"format": FORMAT, "version": VERSION, "blocks": specs, "tied": shared, "params_stored": int(stored),
            **meta}
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return meta


def _tied_names(model: nn.Module) -> list[str]:
    """State-dict names that alias an earlier tensor (tied embeddings): stored once, re-tied at load."""
    seen, tied = {}, []
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = tensor.data_ptr() if tensor.numel() else None
        if key is not None and key in seen:
            tied.append(name)
        elif key is not None:
            seen[key] = name
    return tied


def read_meta(folder: str) -> dict:
    path = os.path.join(os.fspath(folder), META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{folder} is not a pad_moe deploy folder (no {META_FILE}); write one with padmoe compress "
                         "or padmoe export")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is corrupt ({type(err).__name__}); write the folder again") from None


def load_compressed(folder: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The compressed HF MoE model of ``folder`` in eval mode (fp32 unless ``dtype``)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    meta = read_meta(folder)
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UsageError(f"{folder}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v{VERSION}")
    if meta.get("plain_hf"):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype or torch.float32).eval()
    config = AutoConfig.from_pretrained(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # non-persistent buffers (rotary) built
    blocks = dict(moe_blocks(model))
    for name, spec in meta["blocks"].items():
        if name not in blocks:
            raise UsageError(f"{folder}: block {name} of {META_FILE} is not in the model its config.json builds")
        blocks[name].experts = DeployedPadExperts(spec)
    try:
        state = load_file(os.path.join(folder, WEIGHTS_FILE))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise UsageError(f"{folder}/{WEIGHTS_FILE} is missing or corrupt ({type(err).__name__})") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise UsageError(f"{folder}: weights do not fit the model ({first[-1][:200]})") from None
    missing = [k for k in missing if k not in meta.get("tied", [])]
    if missing or unexpected:
        raise UsageError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); write the folder again")
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()
