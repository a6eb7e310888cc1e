"""This rank's experts of one MoE layer as one grouped tensor per matrix: the store every pad_moe MoE layer computes on.

``GroupedExperts`` holds, for each linear map of the expert FFN (mlp: fc1, fc2; glu: gate_proj, up_proj, down_proj),
one parameter ``(E_local, out, in)`` in nn.Linear layout and, with biases, one ``(E_local, out)``. The grouped GEMMs of
dropless dispatch and the batched GEMMs of capacity dispatch read them as they are: no per-forward stacking of
per-expert modules, no second weight-sized copy and no gradient split (torchtitan's ``GroupedExperts``, DeepSpeed
AutoEP's ``ep_experts``). PAD's mixing (``PadMoE``) turns them into the effective weights once per forward and hands
those in through ``computing_with``.

DeepSpeed sees a drop-in for its ``Experts``: it sits at ``MoE.deepspeed_moe.experts``, its parameters carry
``allreduce=False`` and the expert ``group_name`` (ZeRO-1/2 reduce them over the expert-data-parallel group), it maps
DeepSpeed's dispatched ``(ep, E_local, C, H)`` to the same shape, and its state dict keeps DeepSpeed's per-expert layout
``deepspeed_experts.{i}.{linear}.{weight|bias}``: DeepSpeed writes one file per global expert as before, and the weights
of checkpoints and exports written before the store load unchanged. Per-expert PAD masks live on ``slots[i]`` (registered as
``deepspeed_experts``), so their keys keep that layout too.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Optional

import torch
from torch import nn

from pad_moe.moe.ffn import FFN_CLASSES, check_expert_type, get_activation

STORE_VERSION = 2
"""Checkpoints of pad_moe's own MoE layers record it (``expert_store`` in the manifest); 1 is the per-expert
ModuleList, whose ZeRO optimizer state is laid out expert by expert and cannot resume the grouped store."""

_SLOTS = "deepspeed_experts"


class _ExpertSlot(nn.Module):
    """Expert i's own buffers (per-expert PAD masks); its weights are slices of the grouped parameters."""


class GroupedExperts(nn.Module):
    def __init__(self, expert_type: str, num_local_experts: int, hidden_size: int, ffn_size: int, activation: str,
                 bias: bool = True, *, group_name: Optional[str] = None, output_bias: Optional[bool] = None):
        """``output_bias`` (default: ``bias``): whether the output projection has a bias; a compacted PAD layer's
        experts have none (the static part carries it)."""
        super().__init__()
        check_expert_type(expert_type, activation)
        if num_local_experts < 1 or hidden_size < 1 or ffn_size < 0:
            raise ValueError(f"num_local_experts={num_local_experts}, hidden_size={hidden_size} and "
                             f"ffn_size={ffn_size} must be >= 1 (ffn_size >= 0)")
        self.expert_type, self.activation, self._act = expert_type, activation, get_activation(activation)
        self.linear_names = FFN_CLASSES[expert_type].linear_names
        self.num_local_experts, self.hidden_size, self.ffn_size = num_local_experts, hidden_size, ffn_size
        self.group_name = group_name
        output_bias = bias if output_bias is None else output_bias
        *inputs, output = self.linear_names
        for name in self.linear_names:
            out_f, in_f = (hidden_size, ffn_size) if name == output else (ffn_size, hidden_size)
            self.register_parameter(f"{name}_weight", nn.Parameter(torch.empty(num_local_experts, out_f, in_f)))
            has_bias = output_bias if name == output else bias
            self.register_parameter(f"{name}_bias",
                                    nn.Parameter(torch.zeros(num_local_experts, out_f)) if has_bias else None)
        # registered under DeepSpeed's name so that the slots' keys (per-expert masks) keep its layout
        self.deepspeed_experts = nn.ModuleList(_ExpertSlot() for _ in range(num_local_experts))
        self.tag_parameters(group_name)
        self._weights: Optional[dict[str, torch.Tensor]] = None

    @property
    def slots(self) -> nn.ModuleList:
        """One module per local expert, for what it holds alone (per-expert PAD masks)."""
        return self.deepspeed_experts

    def tag_parameters(self, group_name: Optional[str]) -> None:
        """DeepSpeed's expert tagging (what its ``Experts`` does): reduced over the expert-data-parallel group."""
        self.group_name = group_name
        for p in self.parameters(recurse=False):
            p.allreduce = False
            p.group_name = group_name

    # -- tensors --------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """Grouped tensors by their nn.Linear names: ``fc1.weight`` (E, F, H), ``fc1.bias`` (E, F), ..."""
        out = {}
        for name in self.linear_names:
            out[f"{name}.weight"] = getattr(self, f"{name}_weight")
            bias = getattr(self, f"{name}_bias")
            if bias is not None:
                out[f"{name}.bias"] = bias
        return out

    def expert_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Local expert i's weights (views), named as an nn.Linear FFN's ``named_parameters``."""
        return {name: t[i] for name, t in self.tensors().items()}

    def expert(self, i: int) -> "ExpertView":
        """Local expert i as an FFN-shaped view (``fc1.weight``, ``named_parameters()``, ...) of the grouped tensors:
        writes go to the store; gradients are the grouped parameters' (``expert_grads``)."""
        return ExpertView(self, i)

    def expert_grads(self, i: int) -> dict[str, Optional[torch.Tensor]]:
        """Local expert i's gradients (slices of the grouped parameters' ``.grad``; None before a backward)."""
        out = {}
        for name in self.linear_names:
            for kind in ("weight", "bias"):
                p = getattr(self, f"{name}_{kind}")
                if p is not None:
                    out[f"{name}.{kind}"] = None if p.grad is None else p.grad[i]
        return out

    def reset_expert_(self, i: int, generator: Optional[torch.Generator] = None) -> None:
        """nn.Linear's default initialisation of local expert i, linear by linear (weight, then bias), from
        ``generator``: the values a per-expert FFN's ``reset_parameters(generator)`` draws."""
        with torch.no_grad():
            for name in self.linear_names:
                w, b = getattr(self, f"{name}_weight")[i], getattr(self, f"{name}_bias")
                bound = 1 / math.sqrt(w.shape[1]) if w.shape[1] else 0.0
                w.uniform_(-bound, bound, generator=generator)
                if b is not None:
                    b[i].uniform_(-bound, bound, generator=generator)

    def load_expert_(self, i: int, linears) -> None:
        """Copy nn.Linear modules (in ``linear_names`` order) into local expert i."""
        if len(linears) != len(self.linear_names):
            raise ValueError(f"a {self.expert_type} expert takes {len(self.linear_names)} linears "
                             f"({', '.join(self.linear_names)}), got {len(linears)}")
        with torch.no_grad():
            for name, src in zip(self.linear_names, linears):
                getattr(self, f"{name}_weight")[i].copy_(src.weight)
                bias = getattr(self, f"{name}_bias")
                if bias is not None:
                    bias[i].copy_(src.bias)

    def narrowed(self, units: torch.Tensor) -> "GroupedExperts":
        """A copy restricted to hidden ``units`` (rows of the input projections, columns of the output projection),
        without an output bias: the experts of a compacted PAD layer. Each new parameter records where it came from
        (``_compacted_from``: dim, kept units) for the optimizer state of an engine rebuilt around it."""
        out = GroupedExperts(self.expert_type, self.num_local_experts, self.hidden_size, len(units), self.activation,
                             bias=getattr(self, f"{self.linear_names[0]}_bias") is not None, output_bias=False,
                             group_name=self.group_name)
        *inputs, output = self.linear_names
        idx = units.to(getattr(self, f"{output}_weight").device)
        with torch.no_grad():
            for name in inputs:
                w, dst = getattr(self, f"{name}_weight"), getattr(out, f"{name}_weight")
                dst.data = w.index_select(1, idx).clone()
                dst._compacted_from = (1, units)
                b = getattr(self, f"{name}_bias")
                if b is not None:
                    dst_b = getattr(out, f"{name}_bias")
                    dst_b.data = b.index_select(1, idx).clone()
                    dst_b._compacted_from = (1, units)
            dst = getattr(out, f"{output}_weight")
            dst.data = getattr(self, f"{output}_weight").index_select(2, idx).clone()
            dst._compacted_from = (2, units)
        out.deepspeed_experts = self.deepspeed_experts
        return out

    # -- compute --------------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def computing_with(self, weights: Optional[dict[str, torch.Tensor]]) -> Iterator[None]:
        """For the block, forward computes with ``weights`` (grouped, named as ``tensors()``; PAD's effective
        weights) instead of the parameters."""
        saved, self._weights = self._weights, weights
        try:
            yield
        finally:
            self._weights = saved

    def current_weights(self) -> dict[str, torch.Tensor]:
        return self._weights if self._weights is not None else self.tensors()

    def forward(self, dispatched: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's capacity dispatch: (ep, E_local, C, H) -> (ep, E_local, C, H), every local expert on its slots
        of every source rank in one batched GEMM per matrix (zero-padded slots included, as DeepSpeed's experts)."""
        ep, E, C, H = dispatched.shape
        x = dispatched.transpose(0, 1).reshape(E, ep * C, H)
        y = batched_ffn(x, self.current_weights(), self.expert_type, self._act)
        return y.reshape(E, ep, C, H).transpose(0, 1)

    # -- DeepSpeed's per-expert state-dict layout -----------------------------------------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, t in self.tensors().items():
            for i in range(self.num_local_experts):
                destination[f"{prefix}{_SLOTS}.{i}.{name}"] = t[i] if keep_vars else t[i].detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        with torch.no_grad():
            for name, t in self.tensors().items():
                for i in range(self.num_local_experts):
                    key = f"{prefix}{_SLOTS}.{i}.{name}"
                    if key not in state_dict:
                        missing_keys.append(key)
                        continue
                    value = state_dict.pop(key)  # consumed here: the slot holding expert i's masks does not see it
                    if tuple(value.shape) != tuple(t.shape[1:]):
                        error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                          f"{tuple(value.shape)}, the model has {tuple(t.shape[1:])}")
                        continue
                    t[i].copy_(value)
        if strict:
            for key in state_dict:
                rest = key[len(prefix):] if key.startswith(prefix) else None
                if rest is not None and rest.split(".", 1)[0] not in self._modules:
                    unexpected_keys.append(key)


class _LinearView:
    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape


class ExpertView:
    """One local expert of a ``GroupedExperts``, read and written through views of its grouped tensors."""

    def __init__(self, store: GroupedExperts, i: int):
        self._tensors = store.expert_tensors(i)
        self.linear_names, self.expert_type = store.linear_names, store.expert_type
        for name in self.linear_names:
            setattr(self, name, _LinearView(self._tensors[f"{name}.weight"], self._tensors.get(f"{name}.bias")))

    def named_parameters(self):
        return iter(self._tensors.items())

    def parameters(self):
        return iter(self._tensors.values())


def batched_ffn(x: torch.Tensor, weights: dict[str, torch.Tensor], expert_type: str, act) -> torch.Tensor:
    """x (E, N, H) -> (E, N, H): expert e's FFN on x[e], weights grouped (E, out, in) / biases (E, out)."""

    def linear(name: str, inputs: torch.Tensor) -> torch.Tensor:
        w, b = weights[f"{name}.weight"], weights.get(f"{name}.bias")
        if b is None:
            return torch.bmm(inputs, w.transpose(1, 2))
        return torch.baddbmm(b.unsqueeze(1), inputs, w.transpose(1, 2))

    if expert_type == "mlp":
        return linear("fc2", act(linear("fc1", x)))
    return linear("down_proj", act(linear("gate_proj", x)) * linear("up_proj", x))


def mix_grouped(static: dict[str, torch.Tensor], grouped: dict[str, torch.Tensor], masks: dict[str, torch.Tensor],
                lam_s, lam_d) -> dict[str, torch.Tensor]:
    """PAD's effective expert weights, the one formula every PAD experts path computes with (pad_moe's MoE layers,
    AutoEP, HF MoE import): W_eff[e] = λs(1−M)⊙W_s + λd M⊙W[e] per name of ``grouped`` (E, out, in), ``static``
    (out, in), ``masks`` layer-shared (broadcastable to W_s) or per expert (E, ...); relaxed (real) masks while IMP
    scores."""
    from pad_moe.moe.ffn import mix_stacked, scaled

    return {n: mix_stacked(scaled(static[n], lam_s).to(w.dtype), w, masks[n], lam_d) for n, w in grouped.items()}


def magnitude_per_weight(static: dict[str, torch.Tensor], grouped: dict[str, torch.Tensor], lam_s, lam_d, *,
                         per_expert: bool) -> dict[str, torch.Tensor]:
    """|λd·W[e] − λs·W_s| per weight name: summed over the experts (layer-shared masks, weight-shaped) or kept per
    expert (E, out, in); the granularity then sums it onto the mask entries."""
    with torch.no_grad():
        out = {}
        for n, w in grouped.items():
            diff = (lam_d * w - lam_s * static[n]).abs()
            out[n] = diff if per_expert else diff.sum(0)
        return out
