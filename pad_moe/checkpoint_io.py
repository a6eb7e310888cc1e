"""Loading DeepSpeed checkpoint files safely: ``torch.load(weights_only=True)`` with an explicit allowlist.

Used by the trainer's engine (every file DeepSpeed's own load path reads) and by ``pad_moe.deploy`` (export,
consolidate, reshard), so that a tampered checkpoint can never run code.
"""

from __future__ import annotations

import torch

from pad_moe.errors import UsageError


def checkpoint_safe_globals() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (loss scaler, ZeRO stage, fragment addresses):
    the allowlist of every ``torch.load(weights_only=True)`` of a DeepSpeed checkpoint."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def weights_only_load(path: str, map_location=None):
    """torch.load of a DeepSpeed checkpoint file with ``weights_only=True`` and only ``checkpoint_safe_globals``."""
    try:
        with torch.serialization.safe_globals(checkpoint_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling, zip and EOF errors all mean: not a safe checkpoint file
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise UsageError(f"checkpoint file {path} cannot be loaded safely (torch.load weights_only=True: "
                         f"{type(err).__name__}: {first}); resume from another checkpoint or start a new run") from None
