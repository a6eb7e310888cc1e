"""Compact inference form of a PAD-DyConv layer (``pad_moe.vision.layers.PadDynamicConv2d``).

Stored, λ folded in: the kernel mask M as packed bits, the static kernel's values where M=0 (λs·W_s[~M]), the K
kernels' values where M=1 (λd·W_k[M], one row per kernel), the attention (FC1, FC2) and, in the spec, the geometry and
the softmax temperature τ in effect at export (τ is a plain attribute, not saved in a state dict).

Forward: π(x) = softmax(FC2(ReLU(FC1(GAP(x)))) / τ); the per-sample kernel is the static kernel with the entries at M
replaced by Σ_k π_k(x)·λd W_k — PAD-Net Eq. 4, using the vision package's convolution paths.
"""

from __future__ import annotations

import torch
from torch import nn

from pad_moe.deploy.compact import KINDS, pack_bits, packed_size, unpack_bits
from pad_moe.pad.mixing import as_float


class DeployPadDyConv(nn.Module):
    """kind='pad-dyconv'. forward(x (B, C, H, W)) -> (B, O, H', W')."""

    kind = "pad-dyconv"

    def __init__(self, spec: dict):
        from pad_moe.vision.kernels import ConvGeometry

        super().__init__()
        self.spec = dict(spec)
        shape, K = tuple(spec["kernel_shape"]), spec["num_kernels"]
        self.geometry = ConvGeometry(tuple(spec["stride"]), tuple(spec["padding"]), tuple(spec["dilation"]),
                                     spec["groups"])
        self.register_buffer("mask_weight", torch.zeros(packed_size(shape), dtype=torch.uint8))
        n_dyn = spec["dynamic_entries"]
        if spec["static"]:
            self.register_buffer("static_values", torch.zeros(_numel(shape) - n_dyn))
        self.register_buffer("dynamic_values", torch.zeros(K, n_dyn))
        hidden = spec["attention_hidden"]
        self.fc1 = nn.Linear(spec["in_channels"], hidden, bias=False)
        self.fc2 = nn.Linear(hidden, K)
        self._static_full: torch.Tensor | None = None
        self._index: torch.Tensor | None = None

    def materialize(self) -> "DeployPadDyConv":
        shape = tuple(self.spec["kernel_shape"])
        mask = unpack_bits(self.mask_weight, shape)
        static = torch.zeros(shape, dtype=self.dynamic_values.dtype)
        if self.spec["static"]:
            static[~mask] = self.static_values
        self._static_full = static.reshape(-1)
        self._index = mask.reshape(-1).nonzero().squeeze(1)
        return self

    def compact_params(self) -> int:
        return sum(t.numel() for n, t in self.state_dict().items() if not n.startswith("mask") and t.is_floating_point())

    def forward(self, x_BCHW: torch.Tensor) -> torch.Tensor:
        from pad_moe.vision.kernels import conv_bmm, conv_grouped, pick_impl

        if self._static_full is None:
            self.materialize()
        z_BK = self.fc2(torch.relu(self.fc1(x_BCHW.mean((2, 3)))))
        coef_BK = torch.softmax(z_BK / self.spec["temperature"], dim=-1)
        B = x_BCHW.shape[0]
        dyn_BD = coef_BK.to(self.dynamic_values.dtype) @ self.dynamic_values  # (B, K) @ (K, n_dyn)
        w_BN = self._static_full.expand(B, -1).scatter(1, self._index.expand(B, -1), dyn_BD)
        w = w_BN.reshape(B, *self.spec["kernel_shape"])
        ks = tuple(self.spec["kernel_shape"][2:])
        if pick_impl("auto", ks, self.geometry, x_BCHW.device, True) == "bmm":
            return conv_bmm(x_BCHW, w[..., 0, 0], self.geometry)
        return conv_grouped(x_BCHW, w, self.geometry)


def compact_dyconv(layer) -> DeployPadDyConv:
    """The deploy form of a PadDynamicConv2d with a bool mask (after partition)."""
    mask = layer.weight_masks()["weight"]
    if mask.dtype != torch.bool:
        raise ValueError("compact_dyconv needs the partition's bool mask, not IMP's relaxed one")
    lam_s, lam_d = (as_float(v) for v in layer.scale_factors())
    g = layer.geometry
    att = layer.attention
    spec = {"kind": DeployPadDyConv.kind, "in_channels": layer.in_channels, "out_channels": layer.out_channels,
            "kernel_shape": list(layer.kernel_shape), "num_kernels": layer.num_kernels, "stride": list(g.stride),
            "padding": list(g.padding), "dilation": list(g.dilation), "groups": g.groups,
            "attention_hidden": att.fc1.out_features, "temperature": float(att.temperature),
            "lambda_s": lam_s, "lambda_d": lam_d, "static": lam_s != 0.0, "dynamic_entries": int(mask.sum())}
    out = DeployPadDyConv(spec)
    with torch.no_grad():
        mask = mask.cpu()
        out.mask_weight.copy_(pack_bits(mask))
        if spec["static"]:
            out.static_values.copy_(lam_s * layer.static_weight.detach().float().cpu()[~mask])
        w = layer.weight.detach().float().cpu()  # (K, O, C/g, kh, kw)
        out.dynamic_values.copy_(lam_d * w[:, mask])
        out.fc1.weight.copy_(att.fc1.weight)
        out.fc2.weight.copy_(att.fc2.weight)
        out.fc2.bias.copy_(att.fc2.bias)
    return out.materialize()


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


KINDS[DeployPadDyConv.kind] = DeployPadDyConv
