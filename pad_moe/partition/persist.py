"""Save and load a partition: bool masks (safetensors, one file per rank) plus the JSON record, in one folder.

Keys are ``<module name>::<mask name>``; per-expert masks carry their global expert id (``e3.fc1.weight``), so a folder
written with one expert-parallel layout loads into another: each rank takes the masks it holds from whichever file has
them. Loading checks names and shapes before changing anything and raises ValueError naming the mismatch.
"""

from __future__ import annotations

import glob
import json
import os
import re
from typing import Union

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pad_moe.partition import collectives as C
from pad_moe.partition.imp import PartitionReport
from pad_moe.partition.layout import MaskLayout

RECORD_FILE = "record.json"
MASK_FILES = "masks-rank*.safetensors"
FORMAT_VERSION = 1
_EXPERT_PREFIX = re.compile(r"e\d+\.")


def save_partition(path: str, model: nn.Module, record: Union[PartitionReport, dict]) -> None:
    """Write this rank's masks to ``path/masks-rank{r}.safetensors``; rank 0 also writes ``path/record.json``
    (with the world size, so that rank files of an earlier, larger run are ignored and removed). Call on every rank.
    """
    layout = MaskLayout(model)
    os.makedirs(path, exist_ok=True)
    rank, world = C.world_rank(), C.world_size()
    tensors = {}
    for name, module in layout.modules:
        for mask_name, mask in module.masks().items():
            tensors[f"{name}::{mask_name}"] = mask.detach().to("cpu", torch.bool).contiguous()
    _atomic(os.path.join(path, f"masks-rank{rank}.safetensors"), lambda tmp: save_file(tensors, tmp))
    if rank == 0:
        data = record.to_dict() if isinstance(record, PartitionReport) else dict(record)
        data.update(format_version=FORMAT_VERSION, saved_world_size=world)
        for file_rank, file in _rank_files(path):
            if file_rank >= world:
                os.remove(file)

        def write(tmp):
            with open(tmp, "w") as f:
                json.dump(data, f, indent=1)

        _atomic(os.path.join(path, RECORD_FILE), write)
    C.barrier()


def read_partition(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(every saved mask by ``<module>::<mask>`` key, the record), without touching any model."""
    record_path = os.path.join(path, RECORD_FILE)
    if not os.path.isfile(record_path):
        raise ValueError(f"{path!r} holds no saved partition ({RECORD_FILE} and {MASK_FILES} expected)")
    with open(record_path) as f:
        record = json.load(f)
    saved_world = int(record.get("saved_world_size", 1))
    files = [os.path.join(path, f"masks-rank{r}.safetensors") for r in range(saved_world)]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise ValueError(f"{path!r} lacks {[os.path.basename(f) for f in missing]} (saved by {saved_world} ranks)")
    saved: dict[str, torch.Tensor] = {}
    for file in files:
        for key, mask in load_file(file).items():
            if key in saved and not torch.equal(saved[key], mask):
                raise ValueError(f"{path!r}: mask {key!r} differs between rank files")
            saved[key] = mask
    return saved, record


def masks_differ(path: str, model: nn.Module) -> list[str]:
    """Keys of ``model``'s masks (this rank's) that are absent from, or differ from, the partition saved in ``path``;
    the model is not changed (a compacted layer's masks cannot be set again)."""
    saved, _ = read_partition(path)
    differ = []
    for name, module in MaskLayout(model).modules:
        for mask_name, current in module.masks().items():
            key = f"{name}::{mask_name}"
            if key not in saved or not torch.equal(saved[key], current.detach().to("cpu", torch.bool)):
                differ.append(key)
    return differ


def load_partition(path: str, model: nn.Module) -> dict:
    """Set the masks of ``model`` from a folder written by ``save_partition``; return the record.

    A record with method 'moe_p' also drops the static part again (λs = 0), which is not part of the model's state.
    """
    saved, record = read_partition(path)
    layout = MaskLayout(model)
    _check_known(path, saved, layout)
    new_masks = []
    for name, module in layout.modules:
        masks = {}
        for mask_name, current in module.masks().items():
            key = f"{name}::{mask_name}"
            if key not in saved:
                raise ValueError(f"{path!r} has no mask {key!r} (saved from a different model or layout?)")
            if tuple(saved[key].shape) != tuple(current.shape):
                raise ValueError(f"{path!r}: mask {key!r} has shape {tuple(saved[key].shape)}, the model's is "
                                 f"{tuple(current.shape)}")
            if saved[key].dtype != torch.bool:
                raise ValueError(f"{path!r}: mask {key!r} is {saved[key].dtype}, expected torch.bool")
            masks[mask_name] = saved[key]
        new_masks.append(masks)
    for (_, module), masks in zip(layout.modules, new_masks, strict=True):
        module.set_masks(masks)
        if record.get("method") == "moe_p":
            module.drop_static()
    return record


def _check_known(path: str, saved: dict[str, torch.Tensor], layout: MaskLayout) -> None:
    """Every saved key must name a PAD module of the model and one of its mask names (any expert id)."""
    bases = {name: {_EXPERT_PREFIX.sub("", n, count=1) if n in module.expert_parallel_masks() else n
                    for n in module.masks()} for name, module in layout.modules}
    sharded = {name: bool(module.expert_parallel_masks()) for name, module in layout.modules}
    for key in saved:
        module_name, _, mask_name = key.partition("::")
        if module_name not in bases:
            raise ValueError(f"{path!r}: saved mask {key!r} belongs to no PAD module of the model "
                             f"(modules: {sorted(bases)})")
        base = _EXPERT_PREFIX.sub("", mask_name, count=1) if sharded[module_name] else mask_name
        if base not in bases[module_name]:
            raise ValueError(f"{path!r}: saved mask {key!r} is not a mask of PAD module {module_name!r} "
                             f"(its masks: {sorted(bases[module_name])})")


def _rank_files(path: str) -> list[tuple[int, str]]:
    """(rank, path) of every rank file in the folder."""
    found = []
    for file in glob.glob(os.path.join(path, MASK_FILES)):
        match = re.fullmatch(r"masks-rank(\d+)\.safetensors", os.path.basename(file))
        if match:
            found.append((int(match.group(1)), file))
    return sorted(found)


def _atomic(path: str, write) -> None:
    tmp = path + ".tmp"
    write(tmp)
    os.replace(tmp, path)
