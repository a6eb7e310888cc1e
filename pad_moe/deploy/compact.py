"""Compact inference blocks: what a deployed PAD-MoE / MoE FFN stores and how it runs, in plain torch.

Stored (``state_dict``), λs and λd folded into the values:

- ``pad-element`` (element masks): the mask as packed bits, the static weight's values only where M=0
  (λs·W_s[~M], one flat vector per weight) and each expert's values only where M=1 (λd·W_k[M]). The mask is the index
  of both value vectors (packed index/value form). With per-expert masks, the static values are kept where any
  expert's mask is 0. For inference every expert's effective weight is rebuilt once (``materialize``) — element masks
  save storage, not time, without sparse kernels (paper §5.4).
- ``pad-neuron`` (whole hidden units, layer-shared mask): the unit mask as packed bits, the static units as one narrow
  dense FFN (λs-folded, with the shared fc2 bias) and each expert's dynamic units as a narrow FFN without fc2 bias
  (λd-folded). The static FFN runs once per token, weighted by the token's total gate value.
- ``moe``: router and every expert, unchanged.

Routing mirrors DeepSpeed's gate in eval mode (softmax top-1 / top-2, capacity from ``eval_capacity_factor`` and
``min_capacity`` when ``drop_tokens``, gates of the surviving top-2 routes renormalised) but is deterministic: no Gumbel
sampling of the second expert and no random token selection; top-1 drops keep tokens in order. Blocks return
``(output, l_aux=0, expert_counts)``, the contract of pad_moe's FFN blocks.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pad_moe.moe.dropless import route
from pad_moe.moe.ffn import get_activation
from pad_moe.pad.mixing import as_float

WEIGHTS = ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")


def _key(weight: str) -> str:
    return weight.replace(".", "_")


# -- packed bits ----------------------------------------------------------------------------------------------------
def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool tensor -> uint8 (ceil(numel / 8),), most significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros((-flat.numel()) % 8)]).reshape(-1, 8)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    return (flat << shifts).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape) -> torch.Tensor:
    n = math.prod(shape)
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8)
    bits = (packed.reshape(-1, 1) >> shifts) & 1
    return bits.reshape(-1)[:n].bool().reshape(shape)


def packed_size(shape) -> int:
    return -(-math.prod(shape) // 8)


# -- routing --------------------------------------------------------------------------------------------------------
class Router(nn.Module):
    """Top-k softmax gate with DeepSpeed's eval-mode capacity rule (k = 1 or 2 when tokens are dropped; any k when
    not: the dropless routing of ``pad_moe.moe.dropless.route``). forward(x (S, H)) -> (experts (k, S) long, -1 where
    the route was dropped; gates (k, S) fp32, 0 where dropped)."""

    def __init__(self, hidden: int, num_experts: int, k: int, capacity_factor: float = 1.0, min_capacity: int = 0,
                 drop_tokens: bool = True):
        super().__init__()
        if drop_tokens and k not in (1, 2):
            raise ValueError(f"k={k} with capacity drops is not supported by the deploy router (1 or 2; any k "
                             "without drops)")
        if not 1 <= k <= num_experts:
            raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden), requires_grad=False)
        self.num_experts, self.k = num_experts, k
        self.capacity_factor, self.min_capacity, self.drop_tokens = capacity_factor, min_capacity, drop_tokens

    def forward(self, x_SH: torch.Tensor):
        logits_SE = F.linear(x_SH.float(), self.weight.float())
        if not self.drop_tokens:
            routes = route(logits_SE, self.k)  # the dropless training path's own routing, deterministic
            return routes.experts.t(), routes.weights.t()
        gates_SE = F.softmax(logits_SE, dim=1)
        S, E = gates_SE.shape
        first_S = gates_SE.argmax(1)
        mask1_SE = F.one_hot(first_S, E)
        masks, idx = [mask1_SE], [first_S]
        if self.k == 2:
            second_S = logits_SE.masked_fill(mask1_SE.bool(), float("-inf")).argmax(1)
            masks.append(F.one_hot(second_S, E))
            idx.append(second_S)
        if self.drop_tokens:
            capacity = max(math.ceil(S / E * self.capacity_factor * self.k), self.min_capacity)
            before = torch.zeros(1, E, dtype=mask1_SE.dtype)
            for i, m in enumerate(masks):
                loc_SE = torch.cumsum(m, 0) - 1 + before
                before = before + m.sum(0, keepdim=True)
                masks[i] = m * (loc_SE < capacity)
        gates = [(gates_SE * m).sum(1) for m in masks]
        if self.k == 2:
            denom = torch.clamp(gates[0] + gates[1], min=torch.finfo(torch.float32).eps)
            gates = [g / denom for g in gates]
        experts_KS = torch.stack([torch.where(m.any(1), i, torch.full_like(i, -1)) for m, i in zip(masks, idx)])
        return experts_KS, torch.stack(gates)


def combine(x_SH: torch.Tensor, experts_KS: torch.Tensor, gates_KS: torch.Tensor, num_experts: int, run_expert):
    """Σ over routes of gate · run_expert(e, tokens of e), accumulated in fp32; also the tokens per expert."""
    out_SH = torch.zeros(x_SH.shape, dtype=torch.float32, device=x_SH.device)
    counts = torch.zeros(num_experts, dtype=torch.long)
    for e in range(num_experts):
        hit_KS = experts_KS == e
        tokens = hit_KS.any(0).nonzero().squeeze(1)
        counts[e] = tokens.numel()
        if tokens.numel() == 0:
            continue
        g = (gates_KS * hit_KS).sum(0).index_select(0, tokens)
        y = run_expert(e, x_SH.index_select(0, tokens))
        out_SH.index_add_(0, tokens, y.float() * g.unsqueeze(1))
    return out_SH.to(x_SH.dtype), counts


def _ffn(x, w1, b1, w2, b2, act):
    return F.linear(act(F.linear(x, w1, b1)), w2, b2)


class _Holder(nn.Module):
    """A plain container of named buffers (one expert's or the static part's stored tensors)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)


class DeployBlock(nn.Module):
    """Shared parts: the router, the activation, the block spec (a JSON-able dict that rebuilds an empty block)."""

    kind = "?"

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = dict(spec)
        self.router = Router(spec["hidden"], spec["num_experts"], spec["k"], spec["capacity_factor"],
                             spec["min_capacity"], spec["drop_tokens"])
        self._act = get_activation(spec["activation"])

    def forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        x_SH = x.reshape(-1, x.shape[-1])
        experts_KS, gates_KS = self.router(x_SH)
        out_SH, counts = self._run(x_SH, experts_KS, gates_KS)
        return out_SH.reshape(x.shape), x.new_zeros((), dtype=torch.float32), counts

    def materialize(self) -> "DeployBlock":
        """Prepare run-time tensors from the stored ones (after loading)."""
        return self

    def compact_params(self) -> int:
        return sum(b.numel() for n, b in self.state_dict().items() if "mask" not in n and b.is_floating_point())


class DeployMoE(DeployBlock):
    """kind='moe': a plain MoE block, every expert's full FFN."""

    kind = "moe"

    def __init__(self, spec: dict):
        super().__init__(spec)
        H, Fs, bias = spec["hidden"], spec["ffn"], spec["bias"]
        self.experts = nn.ModuleList(_Holder(_ffn_tensors(H, Fs, bias, True)) for _ in range(spec["num_experts"]))

    def _run(self, x_SH, experts_KS, gates_KS):
        def run(e, x):
            w = self.experts[e]
            return _ffn(x, w.fc1_weight, getattr(w, "fc1_bias", None), w.fc2_weight, getattr(w, "fc2_bias", None),
                        self._act)

        return combine(x_SH, experts_KS, gates_KS, self.spec["num_experts"], run)


class DeployPadElement(DeployBlock):
    """kind='pad-element': packed masks, static values where M=0, expert values where M=1 (see module docstring)."""

    kind = "pad-element"

    def __init__(self, spec: dict):
        super().__init__(spec)
        shapes, E = _shapes(spec), spec["num_experts"]
        per_expert = spec["mask_sharing"] == "expert"
        counts = spec["counts"]  # weight -> {"static": n, "experts": [n_0, ...]}
        masks = lambda: {f"mask_{_key(w)}": torch.zeros(packed_size(s), dtype=torch.uint8)  # noqa: E731
                         for w, s in shapes.items()}
        if not per_expert:
            for name, t in masks().items():
                self.register_buffer(name, t)
        if spec["static"]:
            self.static = _Holder({_key(w): torch.zeros(counts[w]["static"]) for w in shapes})
        self.experts = nn.ModuleList(
            _Holder({**{_key(w): torch.zeros(counts[w]["experts"][e]) for w in shapes},
                     **(masks() if per_expert else {})}) for e in range(E))
        self._dense: dict[str, torch.Tensor] = {}

    def masks(self, expert: int) -> dict[str, torch.Tensor]:
        holder = self.experts[expert] if self.spec["mask_sharing"] == "expert" else self
        return {w: unpack_bits(getattr(holder, f"mask_{_key(w)}"), s) for w, s in _shapes(self.spec).items()}

    def materialize(self) -> "DeployPadElement":
        E, shapes = self.spec["num_experts"], _shapes(self.spec)
        masks = [self.masks(e) for e in range(E)]
        dense = {}
        for w, shape in shapes.items():
            static = None
            if self.spec["static"]:
                where = ~torch.stack([m[w] for m in masks]).all(0)  # static stored wherever some expert is static
                static = torch.zeros(shape)
                static[where] = getattr(self.static, _key(w))
            per = []
            for e in range(E):
                eff = static.clone() if static is not None else torch.zeros(shape)
                eff[masks[e][w]] = getattr(self.experts[e], _key(w))
                per.append(eff)
            dense[w] = torch.stack(per)  # (E, *shape)
        self._dense = dense
        return self

    def _run(self, x_SH, experts_KS, gates_KS):
        if not self._dense:
            self.materialize()
        d = self._dense
        run = lambda e, x: _ffn(x, d["fc1.weight"][e], d["fc1.bias"][e] if "fc1.bias" in d else None,  # noqa: E731
                                d["fc2.weight"][e], d["fc2.bias"][e] if "fc2.bias" in d else None, self._act)
        return combine(x_SH, experts_KS, gates_KS, self.spec["num_experts"], run)


class DeployPadNeuron(DeployBlock):
    """kind='pad-neuron': narrow static FFN once per token (× total gate) + narrow dynamic experts."""

    kind = "pad-neuron"

    def __init__(self, spec: dict):
        super().__init__(spec)
        H, Fs, bias = spec["hidden"], spec["ffn"], spec["bias"]
        n_d = spec["dynamic_units"]
        self.register_buffer("mask_units", torch.zeros(packed_size((Fs,)), dtype=torch.uint8))
        if spec["static"]:
            self.static = _Holder(_ffn_tensors(H, Fs - n_d, bias, True))
        self.experts = nn.ModuleList(_Holder(_ffn_tensors(H, n_d, bias, False)) for _ in range(spec["num_experts"]))

    def _run(self, x_SH, experts_KS, gates_KS):
        def run(e, x):
            w = self.experts[e]
            return _ffn(x, w.fc1_weight, getattr(w, "fc1_bias", None), w.fc2_weight, None, self._act)

        out_SH, counts = combine(x_SH, experts_KS, gates_KS, self.spec["num_experts"], run)
        if self.spec["static"]:
            s = self.static
            static_SH = _ffn(x_SH, s.fc1_weight, getattr(s, "fc1_bias", None), s.fc2_weight,
                             getattr(s, "fc2_bias", None), self._act)
            out_SH = out_SH + gates_KS.sum(0).unsqueeze(1).to(static_SH.dtype) * static_SH
        return out_SH, counts


KINDS = {c.kind: c for c in (DeployMoE, DeployPadElement, DeployPadNeuron)}


def _ffn_tensors(H: int, Fs: int, bias: bool, fc2_bias: bool) -> dict[str, torch.Tensor]:
    out = {"fc1_weight": torch.zeros(Fs, H), "fc2_weight": torch.zeros(H, Fs)}
    if bias:
        out["fc1_bias"] = torch.zeros(Fs)
        if fc2_bias:
            out["fc2_bias"] = torch.zeros(H)
    return out


def _shapes(spec: dict) -> dict[str, tuple]:
    H, Fs = spec["hidden"], spec["ffn"]
    shapes = {"fc1.weight": (Fs, H), "fc2.weight": (H, Fs)}
    if spec["bias"]:
        shapes.update({"fc1.bias": (Fs,), "fc2.bias": (H,)})
    return dict(sorted(shapes.items()))


def block_from_spec(spec: dict) -> DeployBlock:
    if spec.get("kind") not in KINDS:
        raise ValueError(f"deploy block kind {spec.get('kind')!r} is unknown; known: {', '.join(KINDS)}")
    return KINDS[spec["kind"]](spec)


# -- from the training form -----------------------------------------------------------------------------------------
def compact_block(block: nn.Module) -> DeployBlock:
    """The deploy block of a training-form MoEFFN / PadMoE (ep_size=1: every expert local), λ folded in."""
    from pad_moe.moe.layer import PadMoE

    if block.ep_size != 1:
        raise ValueError(f"compact_block needs an ep_size=1 block with all experts, got ep_size={block.ep_size}")
    if getattr(block, "expert_type", "mlp") != "mlp":
        raise ValueError(f"compact_block exports expert_type='mlp' blocks (fc1, fc2), got "
                         f"expert_type={block.expert_type!r}; gated experts have no deploy form yet")
    gate = block.moe.deepspeed_moe.gate
    experts = block.local_experts
    H = block.hidden_size
    spec = {"hidden": H, "ffn": block.ffn_size, "num_experts": block.num_experts, "k": block.k,
            "activation": block.activation, "bias": experts[0].fc1.bias is not None,
            "capacity_factor": float(gate.eval_capacity_factor), "min_capacity": int(gate.min_capacity),
            "drop_tokens": bool(gate.drop_tokens)}
    with torch.no_grad():
        if not isinstance(block, PadMoE):
            out = DeployMoE({**spec, "kind": "moe"})
            for e, expert in enumerate(experts):
                for w, t in expert.named_parameters():
                    getattr(out.experts[e], _key(w)).copy_(t.float())
        else:
            out = _compact_pad(block, spec)
        out.router.weight.copy_(gate.wg.weight.float())
    return out.materialize()


def _compact_pad(block, spec: dict) -> DeployBlock:
    lam_s, lam_d = (as_float(v) for v in block.scale_factors())
    static_on = lam_s != 0.0
    spec = {**spec, "lambda_s": lam_s, "lambda_d": lam_d, "static": static_on, "mask_sharing": block.mask_sharing}
    E = block.num_experts
    if block.granularity.name == "neuron" and block.mask_sharing == "layer":
        units = block.masks()["units"].cpu()
        dyn, sta = units.nonzero().squeeze(1), (~units).nonzero().squeeze(1)
        out = DeployPadNeuron({**spec, "kind": "pad-neuron", "granularity": "neuron", "dynamic_units": len(dyn)})
        out.mask_units.copy_(pack_bits(units))
        if block.compacted:  # already narrow: static = static units, experts = dynamic units
            static_src, expert_src = _tensors(block.static), [_tensors(e) for e in block.local_experts]
        else:
            static_src = _narrow(_tensors(block.static), sta, keep_fc2_bias=True)
            expert_src = [_narrow(_tensors(e), dyn, keep_fc2_bias=False) for e in block.local_experts]
        if static_on:
            for name, t in static_src.items():
                getattr(out.static, name).copy_(lam_s * t.float())
        for e in range(E):
            for name, t in expert_src[e].items():
                getattr(out.experts[e], name).copy_(lam_d * t.float())
        return out
    # element granularity (or neuron masks held per expert): per-weight masks
    prefix = {gid: f"e{gid}." for gid in block.global_expert_ids}
    per_expert = block.mask_sharing == "expert"
    weight_masks = [block.weight_masks(prefix[g] if per_expert else "") for g in range(E)]
    static_w = _tensors(block.static)
    shapes = {w: tuple(t.shape) for w, t in sorted(block.static.named_parameters())}
    masks = [{w: torch.broadcast_to(m[w], shapes[w]).bool().cpu() for w in shapes} for m in weight_masks]
    counts = {}
    for w in shapes:
        any_static = ~torch.stack([m[w] for m in masks]).all(0)
        counts[w] = {"static": int(any_static.sum()) if static_on else 0,
                     "experts": [int(m[w].sum()) for m in masks]}
    out = DeployPadElement({**spec, "kind": "pad-element", "granularity": block.granularity.name, "counts": counts})
    for w in shapes:
        if static_on:
            any_static = ~torch.stack([m[w] for m in masks]).all(0)
            getattr(out.static, _key(w)).copy_(lam_s * static_w[_key(w)].float()[any_static])
        for e, expert in enumerate(block.local_experts):
            getattr(out.experts[e], _key(w)).copy_(lam_d * _tensors(expert)[_key(w)].float()[masks[e][w]])
            holder = out.experts[e] if per_expert else out
            getattr(holder, f"mask_{_key(w)}").copy_(pack_bits(masks[e][w]))
    return out


def _tensors(ffn: nn.Module) -> dict[str, torch.Tensor]:
    return {_key(n): p.detach().cpu() for n, p in ffn.named_parameters()}


def _narrow(t: dict, units: torch.Tensor, keep_fc2_bias: bool) -> dict:
    out = {"fc1_weight": t["fc1_weight"][units], "fc2_weight": t["fc2_weight"][:, units]}
    if "fc1_bias" in t:
        out["fc1_bias"] = t["fc1_bias"][units]
        if keep_fc2_bias:
            out["fc2_bias"] = t["fc2_bias"]
    return out
