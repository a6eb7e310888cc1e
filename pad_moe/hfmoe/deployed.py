"""The compact export of a compressed HF MoE model, and ``load_deployed`` for it (no DeepSpeed, one process).

Folder: the HF ``config.json`` and tokenizer files as ``save_pretrained`` writes them, ``pad_deploy.json`` (format,
family, method, κ, granularity, per-block shapes, stored parameter counts, the source) and ``model.safetensors``: every
tensor of the model outside the sparse blocks' experts as it is, and per block ``B.experts.``:

- ``mask_{gate,up,down}``: the partition mask expanded to the weight's shape, bit-packed (uint8);
- ``static_{gate,up,down}``: λs·W_s at the static (M=0) entries, 1-D, row-major (absent once the static part is dropped);
- ``dynamic_{gate,up,down}``: λd·W_k at the dynamic (M=1) entries of every expert, (E, n_dynamic).

Per-expert masks (``mask_sharing: expert`` in the block's spec): ``mask_{part}`` is every expert's mask, (E, out, in)
bit-packed; ``static_{part}`` holds λs·W_s wherever at least one expert is static; ``dynamic_{part}`` is 1-D, expert 0's
dynamic entries then expert 1's ..., row-major, their counts per expert recorded in the spec (``dynamic_counts``) and
checked against the masks at load.

``DeployedPadExperts`` rebuilds each expert's weights from these at every forward (one block at a time), so the model
holds only the stored parameters. A method that yields a plain HF model (``drop``: fewer experts) is saved with
``save_pretrained`` and ``pad_deploy.json``; ``load_deployed`` reads both kinds.

Both kinds also hold the source's ``generation_config.json`` (``generate()`` keeps its settings) and, written last,
``pad_moe_manifest.json``: the size and sha256 of every file (``pad_moe.manifest``, as training checkpoints have).
``load_compressed`` refuses, with one ``UsageError`` naming the folder and what is wrong, a folder whose files do not
match the manifest, an edited ``pad_deploy.json`` (a missing field, a wrong type, an unknown granularity), tensors of
another dtype than the one it records, non-finite values, and value tensors whose shapes are not the masks' counts.

Counting convention (every count of an HF MoE agrees on it: ``params_stored`` here, ``padmoe count`` of a model at κ
or of an export folder, the live model's ``params_compact`` in the trainer's summary): the stored count is the
values the deployed model holds: its parameters and persistent buffers (DeepSeek-V3 / GLM-4.5's router bias
``e_score_correction_bias``). λ is folded into the stored values, so φ (one scalar per MoE layer, training only) is not
counted; the masks are not parameters (bit-packed, 1 bit per entry).
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from torch import nn

from pad_moe.deploy.compact import pack_bits, unpack_bits
from pad_moe.errors import UsageError
from pad_moe.hfmoe.experts import PadHFExperts, moe_blocks
from pad_moe.hfmoe.families.layouts import BIAS_NAMES, LAYOUTS, layout_named
from pad_moe.manifest import MANIFEST, verify_folder, write_manifest
from pad_moe.pad.granularity import GRANULARITIES
from pad_moe.pad.mixing import as_float

FORMAT, VERSION = "pad_moe-hf-moe", 2  # 2: generation config, manifest, dtype recorded
META_FILE, WEIGHTS_FILE, GENERATION_FILE = "pad_deploy.json", "model.safetensors", "generation_config.json"
STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json")  # files a load reads: each must be in the manifest
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
    masks = module.expert_masks()
    per_expert = module.mask_sharing == "expert"
    tensors, spec = {}, {"num_experts": module.num_experts, "hidden": module.hidden_dim,
                         "intermediate": module.intermediate_dim, "static_dropped": bool(module.static_dropped),
                         **module.layout.export_spec(module.act_fn), "granularity": module.granularity.name,
                         "mask_sharing": module.mask_sharing}
    for name, bias in module.named_parameters(recurse=False):  # expert biases: each expert's own, unmasked
        if name in BIAS_NAMES:
            tensors[name] = bias.detach().float().contiguous()
    for part, (static, dynamic) in _part_weights(module).items():
        if per_expert:
            mask = masks[_MASK_OF[part]].expand(dynamic.shape).to(torch.bool)  # (E, out, in)
            tensors[f"mask_{part}"] = pack_bits(mask)
            if not module.static_dropped:
                tensors[f"static_{part}"] = static[~mask.all(0)].contiguous()
            tensors[f"dynamic_{part}"] = dynamic[mask].contiguous()  # expert-major, row-major within an expert
            spec.setdefault("dynamic_counts", {})[part] = mask.flatten(1).sum(1).tolist()
            continue
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
        self.spec = dict(spec)
        E, H, F = spec["num_experts"], spec["hidden"], spec["intermediate"]
        self.num_experts, self.hidden_dim, self.intermediate_dim = E, H, F
        self.layout = layout_named(spec.get("layout", "concatenated"))  # no field: the concatenated layout
        self.act_fn = self.layout.activation_from_spec(spec)
        if self.layout.has_bias:
            self.gate_up_bias, self.down_bias = nn.Parameter(torch.zeros(E, 2 * F)), nn.Parameter(torch.zeros(E, H))
        self._shapes = {"gate": (F, H), "up": (F, H), "down": (H, F)}
        self.per_expert = spec.get("mask_sharing", "layer") == "expert"
        for part, shape in self._shapes.items():
            n = shape[0] * shape[1] * (E if self.per_expert else 1)
            self.register_buffer(f"mask_{part}", torch.zeros((n + 7) // 8, dtype=torch.uint8))
            # sized when the state is loaded (the counts live in the masks)
            if not spec["static_dropped"]:
                self.register_parameter(f"static_{part}", nn.Parameter(torch.empty(0)))
            self.register_parameter(f"dynamic_{part}", nn.Parameter(torch.empty(0) if self.per_expert
                                                                    else torch.empty(E, 0)))

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
            dynamic = getattr(self, f"dynamic_{part}")
            w = dynamic.new_zeros((E, *shape))
            if self.per_expert:
                mask = unpack_bits(getattr(self, f"mask_{part}"), (E, *shape))
                if not self.spec["static_dropped"]:
                    w[:, ~mask.all(0)] = getattr(self, f"static_{part}")
                w[mask] = dynamic
            else:
                mask = unpack_bits(getattr(self, f"mask_{part}"), shape)
                if not self.spec["static_dropped"]:
                    w[:, ~mask] = getattr(self, f"static_{part}")
                w[:, mask] = dynamic
            out[part] = w
        return torch.cat([out["gate"], out["up"]], dim=1), out["down"]

    def forward(self, hidden_states, *args):
        gate_up, down = self.weights()
        return self.layout.run(self, hidden_states, args, gate_up, down)


def save_compressed(model: nn.Module, tokenizer, out: str, meta: dict) -> dict:
    """Write ``model`` (PAD experts) to ``out``, an existing empty directory (the caller makes it atomic): its
    generation config included, the manifest last. Returns the meta written."""
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
    _save_generation_config(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    save_file(state, os.path.join(out, WEIGHTS_FILE))
    stored = sum(v.numel() for k, v in state.items() if not _is_mask(k, specs))
    meta = {"format": FORMAT, "version": VERSION, "dtype": "float32", "blocks": specs, "tied": shared,
            "params_stored": int(stored), **meta}
    return _finish(out, meta)


def save_plain_hf(model: nn.Module, tokenizer, out: str, meta: dict) -> dict:
    """Write a plain HF MoE (a method that changes the experts themselves: ``drop``) to ``out``, an existing empty
    directory: ``save_pretrained`` (weights, config, generation config), the tokenizer, ``pad_deploy.json``, the
    manifest last. Returns the meta written."""
    model.save_pretrained(out)
    _save_generation_config(model, out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    dtypes = {str(p.dtype).removeprefix("torch.") for p in model.parameters()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in STORED_DTYPES:
        raise ValueError(f"the model to export holds parameters of dtypes {sorted(dtypes)}; export one float dtype")
    from pad_moe.hfmoe.budget import stored_numel

    stored = stored_numel(model)  # persistent buffers too (a router's bias): save_pretrained writes them
    meta = {"format": FORMAT, "version": VERSION, "plain_hf": True, "dtype": dtypes.pop(), "params_stored": stored,
            **meta}
    return _finish(out, meta)


def _save_generation_config(model: nn.Module, out: str) -> None:
    """The model's generation settings (the source's, as ``from_pretrained`` read them): ``generate()`` of the loaded
    model uses them, not transformers' defaults."""
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)


def tensor_bytes(folder: str, meta: dict) -> int:
    """Bytes of every tensor in the export's safetensors files at its stored dtype, bit-packed masks included (the
    files' sizes less their headers)."""
    from safetensors import safe_open

    total = 0
    for path in weight_files(folder, meta):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                total += torch.Size(piece.get_shape()).numel() * _DTYPE_BYTES[piece.get_dtype()]
    return total


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "U8": 1, "I8": 1, "BOOL": 1, "I64": 8, "I32": 4, "F64": 8}


def _finish(out: str, meta: dict) -> dict:
    meta = {**meta, "bytes_stored": tensor_bytes(out, meta)}
    with open(os.path.join(out, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    write_manifest(out, format=FORMAT)
    return meta


def _is_mask(name: str, blocks) -> bool:
    """Whether ``name`` is a bit-packed mask of a PAD block (not a parameter)."""
    return any(name.startswith(f"{b}.experts.mask_") for b in blocks)


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
    """``pad_deploy.json`` of ``folder``, every field a load or a count reads checked (UsageError naming the field)."""
    path = os.path.join(os.fspath(folder), META_FILE)
    if not os.path.isfile(path):
        raise UsageError(f"{folder} is not a pad_moe deploy folder (no {META_FILE}); write one with padmoe compress "
                         "or padmoe export")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is corrupt ({type(err).__name__}); write the folder again") from None
    _check_meta(folder, meta)
    return meta


def _bad_field(folder: str, field: str, value, want: str) -> UsageError:
    shown = "missing" if value is _MISSING else f"{json.dumps(value)[:60]}"
    return UsageError(f"{folder}/{META_FILE}: field {field} is {shown}, expected {want}; the folder was edited or "
                      "damaged: write it again")


_MISSING = object()


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_meta(folder: str, meta) -> None:
    if not isinstance(meta, dict):
        raise _bad_field(folder, "(the file)", meta, "a JSON object")

    def need(where: dict, key: str, ok, want: str, prefix: str = "", optional: bool = False):
        value = where.get(key, _MISSING)
        if value is _MISSING and optional:
            return None
        if value is _MISSING or not ok(value):
            raise _bad_field(folder, prefix + key, value, want)
        return value

    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise UsageError(f"{folder}: format {meta.get('format')!r} v{meta.get('version')} is not {FORMAT} v{VERSION}; "
                         "write the folder again with this pad_moe")
    need(meta, "dtype", lambda v: v in STORED_DTYPES, f"one of {', '.join(STORED_DTYPES)}")
    need(meta, "params_stored", lambda v: _is_int(v, 0), "an integer >= 0")
    need(meta, "bytes_stored", lambda v: _is_int(v, 0), "an integer >= 0", optional=True)
    need(meta, "granularity", lambda v: v in GRANULARITIES, f"one of {', '.join(GRANULARITIES)}", optional=True)
    need(meta, "kappa", lambda v: v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                                and 0 <= v <= 1), "a number in [0, 1]", optional=True)
    if need(meta, "plain_hf", lambda v: isinstance(v, bool), "true or false", optional=True):
        return
    need(meta, "tied", lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v), "a list of names")
    blocks = need(meta, "blocks", lambda v: isinstance(v, dict), "an object of block specs")
    for name, spec in blocks.items():
        prefix = f"blocks.{name}."
        if not isinstance(spec, dict):
            raise _bad_field(folder, prefix[:-1], spec, "an object")
        for key in ("num_experts", "hidden", "intermediate"):
            need(spec, key, lambda v: _is_int(v, 1), "an integer >= 1", prefix)
        need(spec, "static_dropped", lambda v: isinstance(v, bool), "true or false", prefix)
        layout = need(spec, "layout", lambda v: v in LAYOUTS, f"one of {', '.join(LAYOUTS)}", prefix, optional=True)
        problem = layout_named(layout or "concatenated").spec_problem(spec)  # the activation (and its constants)
        if problem is not None:
            raise _bad_field(folder, prefix + problem[0], spec.get(problem[0], _MISSING), problem[2])
        need(spec, "granularity", lambda v: v in GRANULARITIES, f"one of {', '.join(GRANULARITIES)}", prefix)
        sharing = need(spec, "mask_sharing", lambda v: v in ("layer", "expert"), "layer or expert", prefix,
                       optional=True)
        if sharing == "expert":
            E = spec["num_experts"]
            need(spec, "dynamic_counts", lambda v, E=E: isinstance(v, dict) and set(v) == set(PARTS) and all(
                isinstance(c, list) and len(c) == E and all(_is_int(x, 0) for x in c) for c in v.values()),
                 "per part (gate, up, down) one count >= 0 per expert", prefix)


def _verify_files(folder: str) -> dict:
    """The manifest's files, once every one matches its size and checksum and nothing a load reads is unlisted."""
    files, why = verify_folder(folder)
    if files is None:
        raise UsageError(f"{folder}: {why}; the folder was edited or damaged (or written by an older pad_moe): write it "
                         "again")
    unlisted = sorted(n for n in os.listdir(folder) if n not in files and n != MANIFEST and n.endswith(_WEIGHT_SUFFIXES))
    if unlisted:
        raise UsageError(f"{folder}: {unlisted[0]} is not in its {MANIFEST} (added after the export); remove it or "
                         "write the folder again")
    return files


def weight_files(folder: str, meta: dict) -> list[str]:
    """The safetensors files of an export (one for PAD; ``save_pretrained`` may shard a plain HF model)."""
    if not meta.get("plain_hf"):
        return [os.path.join(folder, WEIGHTS_FILE)]
    names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise UsageError(f"{folder} holds no .safetensors weights; write the folder again")
    return [os.path.join(folder, n) for n in names]


def _check_values(folder: str, meta: dict, name: str, tensor: torch.Tensor, is_mask: bool) -> None:
    """A mask is uint8; every other tensor is the dtype ``pad_deploy.json`` records and finite."""
    want = torch.uint8 if is_mask else STORED_DTYPES[meta["dtype"]]
    if tensor.dtype != want:
        raise UsageError(f"{folder}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, {META_FILE} records "
                         f"{'uint8 masks' if is_mask else meta['dtype']}; write the folder again")
    if not is_mask and not bool(torch.isfinite(tensor).all()):
        raise UsageError(f"{folder}: tensor {name} holds non-finite values (NaN or inf); write the folder again")


def _check_block_shapes(folder: str, name: str, spec: dict, state: dict) -> None:
    """Each block's value tensors have the shapes its masks' counts give: (E, D) dynamic, (N − D,) static."""
    E, H, F = spec["num_experts"], spec["hidden"], spec["intermediate"]
    per_expert = spec.get("mask_sharing", "layer") == "expert"
    for part, shape in (("gate", (F, H)), ("up", (F, H)), ("down", (H, F))):
        prefix, n = f"{name}.experts.", shape[0] * shape[1]
        expected = {f"mask_{part}": ((n * (E if per_expert else 1) + 7) // 8,)}
        mask = state.get(prefix + f"mask_{part}")
        if mask is not None and tuple(mask.shape) == expected[f"mask_{part}"] and per_expert:
            bits = unpack_bits(mask, (E, *shape))
            counts = bits.flatten(1).sum(1).tolist()
            if counts != spec["dynamic_counts"][part]:
                raise UsageError(f"{folder}: the masks {prefix}mask_{part} hold {counts} dynamic entries per expert, "
                                 f"{META_FILE} records {spec['dynamic_counts'][part]}; write the folder again")
            expected[f"dynamic_{part}"] = (sum(counts),)
            if not spec["static_dropped"]:
                expected[f"static_{part}"] = (int((~bits.all(0)).sum()),)
        elif mask is not None and tuple(mask.shape) == expected[f"mask_{part}"]:
            dynamic = int(unpack_bits(mask, shape).sum())
            expected[f"dynamic_{part}"] = (E, dynamic)
            if not spec["static_dropped"]:
                expected[f"static_{part}"] = (n - dynamic,)
        if part == "down" and layout_named(spec.get("layout", "concatenated")).has_bias:
            expected.update(gate_up_bias=(E, 2 * F), down_bias=(E, H))
        for key, want in expected.items():
            got = state.get(prefix + key)
            if got is None or tuple(got.shape) != want:
                found = "missing" if got is None else f"of shape {tuple(got.shape)}"
                raise UsageError(f"{folder}: tensor {prefix}{key} is {found}, its block's masks give {want}; write the "
                                 "folder again")


def _check_bytes(folder: str, meta: dict, nbytes: int) -> None:
    if meta.get("bytes_stored", nbytes) != nbytes:
        raise UsageError(f"{folder}: {META_FILE} records bytes_stored {meta['bytes_stored']}, its weights hold "
                         f"{nbytes}; write the folder again")


def _stored(state: dict, blocks) -> int:
    return sum(v.numel() for k, v in state.items() if not _is_mask(k, blocks))


def load_compressed(folder: str, dtype: Optional[torch.dtype] = None, resident: str = "auto") -> nn.Module:
    """The compressed HF MoE model of ``folder`` in eval mode (fp32 unless ``dtype``), with its generation config;
    the folder is verified first (see the module doc). ``resident`` (``pad_moe.hfmoe.serving``): what the experts
    hold in memory: ``auto`` (narrow for neuron masks, full otherwise), ``full`` (the effective weights, rebuilt once:
    the source's size and speed), ``narrow`` (neuron: a narrow static FFN + narrow experts, the stored size, fewer
    FLOPs) or ``compact`` (the stored values only, every expert rebuilt at every forward: slow, least memory)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from pad_moe.hfmoe.serving import RESIDENT_FORMS

    folder = os.fspath(folder)
    if resident not in RESIDENT_FORMS:
        raise UsageError(f"resident={resident!r} is unknown; use one of {', '.join(RESIDENT_FORMS)}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"dtype={dtype!r} is not a floating-point torch dtype (e.g. torch.bfloat16)")
    meta = read_meta(folder)
    _verify_files(folder)
    if meta.get("plain_hf"):
        if resident not in ("auto", "full"):
            raise UsageError(f"{folder} holds a plain HF model ({meta.get('method')}: whole experts), which has no "
                             f"compact form: drop resident={resident!r}")
        model = _load_plain(folder, meta)
    else:
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # non-persistent buffers (rotary) built
        blocks = dict(moe_blocks(model))
        templates = {}  # the family's own experts modules, to hold the rebuilt weights
        for name, spec in meta["blocks"].items():
            if name not in blocks:
                raise UsageError(f"{folder}: block {name} of {META_FILE} is not in the model its config.json builds")
            templates[name] = blocks[name].experts
            blocks[name].experts = DeployedPadExperts(spec)
        try:
            state = load_file(os.path.join(folder, WEIGHTS_FILE))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise UsageError(f"{folder}/{WEIGHTS_FILE} is missing or corrupt ({type(err).__name__})") from None
        for name, tensor in state.items():
            _check_values(folder, meta, name, tensor, _is_mask(name, meta["blocks"]))
        for name, spec in meta["blocks"].items():
            _check_block_shapes(folder, name, spec, state)
        if _stored(state, meta["blocks"]) != meta["params_stored"]:
            raise UsageError(f"{folder}: {META_FILE} records params_stored {meta['params_stored']}, its weights hold "
                             f"{_stored(state, meta['blocks'])}; write the folder again")
        _check_bytes(folder, meta, sum(v.numel() * v.element_size() for v in state.values()))
        _load_state(folder, model, state, meta["tied"])
        _set_resident(folder, blocks, templates, meta, resident)
    _load_generation_config(folder, model)
    if dtype is not None:
        model = model.to(dtype)
    return model.eval()


def _set_resident(folder: str, blocks: dict, templates: dict, meta: dict, resident: str) -> None:
    from pad_moe.hfmoe.serving import full_experts, narrow_experts, resolve_form

    for name, spec in meta["blocks"].items():
        deployed = blocks[name].experts
        try:
            form = resolve_form(resident, spec["granularity"], folder, spec.get("mask_sharing", "layer"))
            if form == "narrow" and not deployed.layout.narrow:  # the static units are not one shared FFN
                if resident == "narrow":
                    raise ValueError(f"resident='narrow' needs experts whose static units form one FFN shared by "
                                     f"the experts; the {deployed.layout.name} layout's do not (expert biases or "
                                     "router-scaled inputs): use resident='full' or 'compact'")
                form = "full"
            if form == "full":
                blocks[name].experts = full_experts(deployed, templates[name])
            elif form == "narrow":
                blocks[name].experts = narrow_experts(deployed, templates[name])
        except ValueError as err:
            raise UsageError(f"{folder}: block {name}: {err}") from None


def _load_state(folder: str, model: nn.Module, state: dict, tied: list) -> None:
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        first = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        raise UsageError(f"{folder}: weights do not fit the model ({first[-1][:200]})") from None
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise UsageError(f"{folder}: weights do not fit the model (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); write the folder again")
    model.tie_weights()


def _load_plain(folder: str, meta: dict) -> nn.Module:
    """A plain HF export: its tensors checked (dtype, finite, count), then ``from_pretrained`` (which writes the
    checkpoint's own layout) with every tensor of the model loaded and nothing left over."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    stored = nbytes = 0
    for path in weight_files(folder, meta):
        try:
            state = load_file(path)
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise UsageError(f"{path} is corrupt ({type(err).__name__}); write the folder again") from None
        for name, tensor in state.items():
            _check_values(folder, meta, name, tensor, False)
        stored += _stored(state, ())
        nbytes += sum(v.numel() * v.element_size() for v in state.values())
    if stored != meta["params_stored"]:
        raise UsageError(f"{folder}: {META_FILE} records params_stored {meta['params_stored']}, its weights hold "
                         f"{stored}; write the folder again")
    _check_bytes(folder, meta, nbytes)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(hf_logging.CRITICAL)  # its load report would print pages before our one line
    try:
        model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"{folder}: weights do not fit the model ({first}); write the folder again") from None
    finally:
        hf_logging.set_verbosity(level)
    wrong = {k: sorted(map(str, info.get(k) or ())) for k in ("missing_keys", "unexpected_keys", "mismatched_keys",
                                                               "error_msgs")}
    if any(wrong.values()):
        what = ", ".join(f"{k.split('_')[0]} {v[:3]}" for k, v in wrong.items() if v)
        raise UsageError(f"{folder}: weights do not fit the model ({what}); write the folder again")
    return model


def _load_generation_config(folder: str, model: nn.Module) -> None:
    from transformers import GenerationConfig

    if not os.path.isfile(os.path.join(folder, GENERATION_FILE)):
        raise UsageError(f"{folder} has no {GENERATION_FILE}; write the folder again")
    try:
        model.generation_config = GenerationConfig.from_pretrained(folder)
    except (OSError, ValueError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"{folder}/{GENERATION_FILE} cannot be read ({first}); write the folder again") from None
