"""Save / load an upcycled model as a folder that loads without DeepSpeed (one process, all experts local).

The folder holds ``config.json`` (the Hugging Face config), ``pad_moe.json`` (how the model was upcycled, which blocks
were replaced, per-block state such as compaction), ``model.safetensors`` (every weight: routers, all experts under
their global ids, static FFNs, φ and the bool partition masks) and, when given, the tokenizer files. It is written to a
temporary folder next to the target and renamed at the end, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict, is_dataclass
from typing import Mapping, Optional

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pad_moe.models.upcycle import upcycle, upcycle_info, upcycled_ffns

FORMAT = "pad_moe.upcycled"
VERSION = 1
META_FILE = "pad_moe.json"
WEIGHTS_FILE = "model.safetensors"
_EXPERT_KEY = re.compile(r"^(.*\.deepspeed_experts\.)(\d+)(\..*)$")


# -- expert ids ------------------------------------------------------------------------------------------------------
def global_expert_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """This rank's state dict with expert keys renamed from local to global expert ids.

    Merging these dicts from all ranks of one expert-parallel group gives the full state ``save_upcycled`` takes.
    """
    info = upcycle_info(model)
    first = info.ep_rank * (info.num_experts // info.ep_size)
    return {_renumber(k, first): v for k, v in model.state_dict().items()}


def _renumber(key: str, offset: int) -> str:
    m = _EXPERT_KEY.match(key)
    return key if m is None else f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}"


def _local_experts(state: dict, num_experts: int, ep_size: int, ep_rank: int) -> dict:
    """Keep this rank's experts of a full state dict, renumbered to local ids."""
    n_local = num_experts // ep_size
    first, out = ep_rank * n_local, {}
    for key, value in state.items():
        m = _EXPERT_KEY.match(key)
        if m is None:
            out[key] = value
        elif first <= int(m.group(2)) < first + n_local:
            out[_renumber(key, -first)] = value
    return out


# -- save ------------------------------------------------------------------------------------------------------------
def save_upcycled(model: nn.Module, path, tokenizer=None, moe_config=None,
                  state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> str:
    """Write ``model`` (upcycled Hugging Face model) to the new folder ``path``; returns its absolute path.

    ``moe_config``: the run's ``MoEConfig`` (or dict), recorded for the trainer and checked against the model.
    ``state_dict``: for a model built with ep_size > 1, the merged ``global_expert_state_dict`` of all ranks.
    """
    info = upcycle_info(model)
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise ValueError(f"{type(model).__name__} has no Hugging Face config; save the PreTrainedModel itself")
    if state_dict is None and info.ep_size != 1:
        raise ValueError(f"the model holds {info.num_experts // info.ep_size} of {info.num_experts} experts "
                         f"(ep_size={info.ep_size}); pass state_dict= the merged global_expert_state_dict of all ranks")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{path} already exists and is not empty; choose another directory or delete it")
    cfg = _config_dict(moe_config)
    _check_config_matches(info, cfg)
    ffns = upcycled_ffns(model)
    state = dict(state_dict if state_dict is not None else model.state_dict())
    _check_all_experts(state, ffns, info.num_experts if info.mode != "static" else 0)
    meta = {
        "format": FORMAT, "version": VERSION, "architecture": type(model).__name__,
        "upcycle": info.upcycle_kwargs(), "activation": info.activation, "replaced": list(ffns),
        "layers": {name: {"compacted": bool(getattr(f.block, "compacted", False)),
                          "static_dropped": bool(getattr(f.block, "static_dropped", False))}
                   for name, f in ffns.items()},
        "moe_config": cfg,
    }
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        config = copy.deepcopy(model.config)
        config.architectures = [type(model).__name__]
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=2)
        save_file(_unshared(state), os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def _config_dict(moe_config) -> Optional[dict]:
    if moe_config is None or isinstance(moe_config, dict):
        return None if moe_config is None else dict(moe_config)
    if is_dataclass(moe_config):
        return asdict(moe_config)
    raise ValueError(f"moe_config must be a MoEConfig or a dict, got {type(moe_config).__name__}")


def _check_config_matches(info, cfg: Optional[dict]) -> None:
    if cfg is None:
        return
    structure = info.upcycle_kwargs()  # routing settings (capacity, drop_tokens, ...) may differ; structure may not
    for key in ("mode", "num_experts", "k", "every", "granularity", "mask_sharing", "scale_mode"):
        value = structure.get(key)
        if key in cfg and value is not None and cfg[key] != value:
            raise ValueError(f"moe_config.{key}={cfg[key]!r} does not match the model's {key}={value!r}; pass the "
                             "MoEConfig the model was upcycled with")


def _check_all_experts(state: Mapping, ffns: dict, num_experts: int) -> None:
    for name in ffns:
        ids = {int(m.group(2)) for k in state if k.startswith(name + ".") and (m := _EXPERT_KEY.match(k))}
        if ids != set(range(num_experts)):
            raise ValueError(f"the weights of {name} hold experts {sorted(ids)}, expected 0..{num_experts - 1}; "
                             "merge the global_expert_state_dict of every expert-parallel rank")


def _unshared(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no two sharing storage (tied weights are cloned; safetensors refuses sharing)."""
    out, seen = {}, set()
    for key, value in state.items():
        t = value.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        out[key] = t
    return out


# -- load ------------------------------------------------------------------------------------------------------------
def read_upcycled_meta(path) -> dict:
    """The ``pad_moe.json`` of a saved folder, checked (one-line ValueError if missing or corrupt)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory; pass a folder written by pad_moe.models.save_upcycled")
    for name in ("config.json", META_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"{path} is not a saved upcycled model: {name} is missing; save it with save_upcycled")
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{os.path.join(path, META_FILE)} is corrupt ({type(err).__name__}); save the model again") \
            from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ValueError(f"{os.path.join(path, META_FILE)} is not a {FORMAT} v{VERSION} file; save the model again")
    for key in ("architecture", "upcycle", "replaced", "layers"):
        if key not in meta:
            raise ValueError(f"{os.path.join(path, META_FILE)} lacks {key!r}; save the model again")
    return meta


def load_upcycled(path, *, ep_size: int = 1, ep_rank: int = 0) -> nn.Module:
    """Rebuild a model saved by ``save_upcycled`` (no download, no DeepSpeed engine), weights loaded strictly.

    ``ep_size > 1`` builds this rank's part of an expert-parallel model (its experts only; the process groups come
    from ``deepspeed.initialize`` later). Returns the model in eval mode; the tokenizer loads with
    ``AutoTokenizer.from_pretrained(path)``.
    """
    import transformers
    from transformers import AutoConfig, PreTrainedModel

    meta = read_upcycled_meta(path)
    path = os.fspath(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as err:  # noqa: BLE001 - any parse failure is a corrupt folder
        raise ValueError(f"{path}/config.json cannot be read ({type(err).__name__}); save the model again") from None
    cls = getattr(transformers, str(meta["architecture"]), None)
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedModel)):
        raise ValueError(f"architecture {meta['architecture']!r} in {path}/{META_FILE} is not a transformers model")
    model = cls(config)
    upcycle(model, ep_size=ep_size, ep_rank=ep_rank, **meta["upcycle"])
    ffns = upcycled_ffns(model)
    if list(ffns) != list(meta["replaced"]):
        raise ValueError(f"{path}: upcycling rebuilt blocks {list(ffns)}, the folder records {meta['replaced']}")
    try:
        state = load_file(os.path.join(path, WEIGHTS_FILE))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{path}/{WEIGHTS_FILE} is corrupt ({type(err).__name__}); save the model again") from None
    if ep_size > 1:
        state = _local_experts(state, meta["upcycle"]["num_experts"], ep_size, ep_rank)
    _restore_block_state(model, ffns, meta["layers"], state, path)
    _check_keys(model, state, path)
    model.load_state_dict(state, strict=True)
    model.pad_moe_upcycle.moe_config = meta.get("moe_config")
    return model.eval()


def _restore_block_state(model, ffns: dict, layers: dict, state: dict, path: str) -> None:
    """MoE-P flags and neuron compaction (which changes weight shapes) before the strict load."""
    for name, flags in layers.items():
        block = ffns[name].block
        if flags.get("static_dropped"):
            block.drop_static(True)
        if flags.get("compacted"):
            with torch.no_grad():
                for bname, buf in block.named_buffers(recurse=False):  # layer-shared masks live on the block
                    key = f"{name}.block.{bname}"
                    if key not in state or state[key].shape != buf.shape:
                        raise ValueError(f"{path}/{WEIGHTS_FILE} lacks mask {key} of a compacted block; save again")
                    buf.copy_(state[key])
            block.compact_()


def _check_keys(model: nn.Module, state: dict, path: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise ValueError(f"{path}/{WEIGHTS_FILE} does not match the rebuilt model: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected, {len(shapes)} wrong-shape tensors (first: {first}); "
                         "save the model again")
