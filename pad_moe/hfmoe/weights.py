"""Checks of a Hugging Face model folder's weight files before anything loads them, so that a truncated download or a
pickle that is more than tensors is one line naming the file (``from_pretrained`` raises safetensors' or torch's own
errors, or advises unsafe loading, after seconds to minutes of work)."""

from __future__ import annotations

import json
import os

from pad_moe.errors import UsageError

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def weight_files(folder: str) -> list[str]:
    """The files ``from_pretrained`` would read, in its order of preference: safetensors, then PyTorch pickles."""
    for single, index in ((SAFETENSORS, SAFETENSORS_INDEX), (PICKLE, PICKLE_INDEX)):
        if os.path.isfile(os.path.join(folder, single)):
            return [os.path.join(folder, single)]
        path = os.path.join(folder, index)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
                raise UsageError(f"{path} is corrupt ({type(err).__name__}); copy the model folder again") from None
            missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
            if missing or not shards:
                raise UsageError(f"{folder}: the shard {missing[0] if missing else '(none)'} that {index} names is "
                                 "missing; copy the model folder again")
            return [os.path.join(folder, s) for s in shards]
    raise UsageError(f"{folder} holds no model weights ({SAFETENSORS} or {PICKLE}); pass a folder saved with "
                     "save_pretrained")


def check_weight_files(folder: str) -> None:
    """One line for a weights file that cannot be loaded: a truncated or corrupt safetensors file (its header does not
    cover the file), or a PyTorch pickle that holds Python objects besides tensors (refused: tensors only)."""
    import pickle

    import torch
    from safetensors import safe_open

    for path in weight_files(folder):
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt") as f:
                    f.keys()
            except Exception as err:  # noqa: BLE001 - safetensors raises its own error type
                reason = " ".join(str(err).split())[:160]
                raise UsageError(f"{path} is truncated or corrupt ({reason}); copy or download the model "
                                 "again") from None
            continue
        try:
            try:  # mmap: reads the pickle only, not the tensor data
                torch.load(path, map_location="meta", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                raise
            except Exception:  # noqa: BLE001 - a legacy (non-zip) file cannot be mapped: read it whole
                torch.load(path, map_location="meta", weights_only=True)
        except pickle.UnpicklingError:
            raise UsageError(f"{path} holds pickled Python objects besides tensors, which pad_moe does not load; use "
                             f"the model's safetensors weights ({SAFETENSORS})") from None
        except Exception as err:  # noqa: BLE001 - truncated zip, bad magic number...
            raise UsageError(f"{path} is truncated or corrupt ({type(err).__name__}); copy or download the model "
                             "again") from None
