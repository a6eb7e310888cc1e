"""The PAD formula (paper Eq. 3-4) as pure functions.

    Θ = λs · (1 − M) ⊙ W_static + λd · M ⊙ W_dyn

M is a mask of the shape of one weight: True (1) marks a *dynamic* entry, False (0) a *static* one. During Iterative Mode
Partition M is relaxed to a real-valued tensor so that ∂L/∂M exists; the same function handles both cases.
"""

from __future__ import annotations

import torch
from torch import nn

SCALE_MODES = ("none", "static", "dynamic", "both", "unconstrained")
"""Scale-factor modes of paper Table 4: fixed λs=λd=1; only λs trained; only λd trained; both with λs+λd=2; both free."""


def pad_mix(w_static: torch.Tensor, w_dyn: torch.Tensor, mask: torch.Tensor, lam_s, lam_d) -> torch.Tensor:
    """λs·(1−M)⊙W_static + λd·M⊙W_dyn.

    A bool mask selects entries with ``torch.where``, so the unselected side gets an exactly zero gradient and no
    floating-point blend error. A real-valued mask (IMP's relaxation) blends arithmetically and is differentiable in M.
    ``w_dyn`` may carry leading dimensions (experts, kernels) that broadcast against ``w_static`` and ``mask``.
    """
    if mask.dtype == torch.bool:
        return torch.where(mask, lam_d * w_dyn, lam_s * w_static)
    mask = mask.to(w_dyn.dtype)
    return lam_s * (1 - mask) * w_static + lam_d * mask * w_dyn


def scale_factors_from_phi(phi: torch.Tensor | None, mode: str) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(λs, λd) from the trainable φ of a layer.

    both: λd = 2·sigmoid(φ), λs = 2 − λd (φ=0 gives 1, 1); static / dynamic: only that factor is 2·sigmoid(φ), the other
    is 1; none: both fixed at 1; unconstrained: φ has two entries and λs = 1 + φ[0], λd = 1 + φ[1] (no sum constraint).
    """
    if mode == "none":
        return 1.0, 1.0
    if mode == "both":
        lam_d = 2 * torch.sigmoid(phi)
        return 2 - lam_d, lam_d
    if mode == "static":
        return 2 * torch.sigmoid(phi), 1.0
    if mode == "dynamic":
        return 1.0, 2 * torch.sigmoid(phi)
    if mode == "unconstrained":
        return 1 + phi[0:1], 1 + phi[1:2]
    raise ValueError(f"scale_mode={mode!r} is unknown; allowed: {', '.join(SCALE_MODES)}")


def make_phi(mode: str) -> nn.Parameter | None:
    """The trainable φ for a scale mode, initialised so that λs = λd = 1 (None for mode 'none')."""
    if mode not in SCALE_MODES:
        raise ValueError(f"scale_mode={mode!r} is unknown; allowed: {', '.join(SCALE_MODES)}")
    if mode == "none":
        return None
    # Shape (1,), not (): DeepSpeed broadcasts parameters through a byte view, which 0-dim tensors cannot take.
    return nn.Parameter(torch.zeros(2 if mode == "unconstrained" else 1))


def as_float(value) -> float:
    """A scale factor (tensor or float) as a Python float, for logging and export."""
    return float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
