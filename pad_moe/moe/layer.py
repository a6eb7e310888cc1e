"""FFN blocks that share one forward contract, ``(output, l_aux, exp_counts)``, selected by ``mode``:

- ``static``: a dense FFN (``DenseFFNBlock``);
- ``moe``: a fully dynamic MoE, DeepSpeed's ``MoE`` with FFN experts (``MoEFFN``);
- ``pad``: PAD-MoE, DeepSpeed's ``MoE`` with PAD experts plus one static FFN (``PadMoE``).

Each takes ``expert_type``: ``mlp`` (fc1, fc2; upcycled with ``from_dense``) or ``glu`` (gate_proj, up_proj, down_proj;
upcycled with ``from_gated`` from a Llama/Mistral/Qwen-style gated MLP).

``dispatch``: ``capacity`` runs DeepSpeed's MoE forward (gate, capacity, all-to-all) as it is; ``dropless`` keeps the same
DeepSpeed modules and parameters (gate weight, expert-tagged experts, expert-parallel group, checkpoints) but routes
every token through ``pad_moe.moe.dropless`` (grouped GEMM, variable all-to-all). ``drop_tokens`` unset follows the
dispatch (capacity drops, dropless does not); ``from_dense`` / ``from_gated`` are dropless, so exact, unless told to
drop (``upcycling_routing``). Nothing here imports ``torch.distributed``. A layer built for ``ep_size > 1`` holds
``num_experts / ep_size`` local experts and needs the process groups that ``deepspeed.initialize`` attaches; pass
``ep_rank`` so local experts get their global ids.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn.functional as F
from deepspeed.moe import sharded_moe
from deepspeed.moe.layer import MoE
from torch import nn

from pad_moe.moe.dropless import DISPATCHES, check_dropless_args, dispatch_and_combine, expert_ffn, route
from pad_moe.moe.ffn import check_expert_type, make_ffn, scaled
from pad_moe.moe.store import GroupedExperts, magnitude_per_weight, mix_grouped
from pad_moe.pad.protocol import PadMaskMixin

MODES = ("static", "moe", "pad")
MASK_SHARING = ("layer", "expert")
NOISY_GATE_POLICIES = (None, "None", "Jitter", "RSample")


@contextlib.contextmanager
def eval_routing(gate: nn.Module):
    """Deterministic routing while DeepSpeed's ``TopKGate`` is in eval mode; in training mode nothing changes.

    DeepSpeed samples in two places whatever the mode: the second expert of top-2 (Gumbel noise,
    ``top2_2nd_expert_sampling``) and, when a top-1 expert overflows, the tokens it keeps (``use_rts``; without it
    ``torch.topk`` breaks the ties in no specified order). Its Jitter and RSample noise already follow
    ``gate.training``. In eval mode the second expert is the argmax of the remaining logits and an overflowing top-1
    expert keeps its first tokens in order (top-2 drops are in order already): the routing of the deploy router
    (``pad_moe.deploy.compact.Router``). The gate's own flags are the configuration and are restored on exit.
    """
    if gate.training:
        yield
        return
    saved = gate.use_rts, gate.top2_2nd_expert_sampling
    cache = sharded_moe.exp_selection_uniform_map  # device -> the sampler RTS multiplies the (S, E) route mask by
    device = gate.wg.weight.device  # the device of the logits, the cache's key
    previous = cache.get(device)

    def first_tokens_first(shape):  # (S, E): S, S-1, ..., 1 down the tokens, distinct, so topk keeps the earliest
        return torch.arange(shape[0], 0, -1, dtype=torch.float32, device=device).unsqueeze(1).expand(shape)

    gate.top2_2nd_expert_sampling = False
    gate.use_rts = gate.k == 1
    if gate.k == 1:
        cache[device] = first_tokens_first
    try:
        yield
    finally:
        gate.use_rts, gate.top2_2nd_expert_sampling = saved
        if gate.k == 1:
            if previous is None:
                cache.pop(device, None)
            else:
                cache[device] = previous


class _Removable:
    def __init__(self, remove):
        self.remove = remove


class DenseFFNBlock(nn.Module):
    """mode='static': the dense FFN with the MoE forward contract (zero auxiliary loss, no expert counts)."""

    def __init__(self, hidden_size: int, ffn_size: int, *, activation: str = "gelu", bias: bool = True,
                 expert_type: str = "mlp", **_unused):
        super().__init__()
        self.ffn = make_ffn(expert_type, hidden_size, ffn_size, activation, bias)

    @classmethod
    def from_dense(cls, fc1: nn.Linear, fc2: nn.Linear, *, activation: str = "gelu", **kwargs) -> "DenseFFNBlock":
        hidden, ffn_size = _check_dense_pair(fc1, fc2)
        block = cls(hidden, ffn_size, activation=activation, bias=fc1.bias is not None)
        _load_linears_(block.ffn, (fc1, fc2))
        return block

    @classmethod
    def from_gated(cls, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, *, activation: str,
                   **kwargs) -> "DenseFFNBlock":
        """The block of a gated MLP down(act(gate_proj(x)) ⊙ up_proj(x)), weights copied."""
        hidden, ffn_size = _check_gated(gate_proj, up_proj, down_proj)
        block = cls(hidden, ffn_size, activation=activation, bias=gate_proj.bias is not None, expert_type="glu")
        _load_linears_(block.ffn, (gate_proj, up_proj, down_proj))
        return block

    def forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        return self.ffn(x), x.new_zeros((), dtype=torch.float32), None


class MoEFFN(nn.Module):
    """mode='moe': DeepSpeed's MoE with whole-FFN experts (mlp or glu), experts seeded by their global id.

    The experts are one ``GroupedExperts`` store (``self.experts``: one (E_local, out, in) parameter per matrix) in
    the place of DeepSpeed's per-expert ``Experts``: DeepSpeed's gate, capacity dispatch, all-to-all, expert tagging
    and per-expert checkpoint files work on it unchanged; dropless dispatch hands its tensors to the grouped GEMMs.
    """

    def __init__(self, hidden_size: int, ffn_size: int, *, num_experts: int = 8, k: int = 2, ep_size: int = 1,
                 ep_rank: int = 0, activation: str = "gelu", bias: bool = True, expert_type: str = "mlp",
                 capacity_factor: float = 1.0, eval_capacity_factor: float = 1.0, min_capacity: int = 4,
                 drop_tokens: Optional[bool] = None, noisy_gate_policy: Optional[str] = None, use_rts: bool = True,
                 second_expert_sampling: bool = True, seed: int = 0, dispatch: str = "capacity"):
        """``drop_tokens``: None takes the dispatch's own behaviour (capacity: drop routes over capacity, dropless:
        compute them all); False with capacity pads every expert to the busiest one; True with dropless is refused."""
        super().__init__()
        _validate_moe_args(hidden_size, ffn_size, num_experts, k, ep_size, ep_rank, capacity_factor,
                           eval_capacity_factor, min_capacity, noisy_gate_policy)
        check_expert_type(expert_type, activation)
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch={dispatch!r} is unknown; allowed: {', '.join(DISPATCHES)}")
        if dispatch == "dropless":
            check_dropless_args(noisy_gate_policy, drop_tokens)
        if drop_tokens is None:
            drop_tokens = dispatch == "capacity"
        self.dispatch = dispatch
        self.keep_router_logits = False  # dropless: keep the latest (S, E) fp32 logits (Switch's z-loss reads them)
        self._route_observers: list = []
        self.router_logits: Optional[torch.Tensor] = None
        self.hidden_size, self.ffn_size, self.activation = hidden_size, ffn_size, activation
        self.expert_type, self.bias = expert_type, bias
        self.num_experts, self.k, self.ep_size, self.ep_rank = num_experts, k, ep_size, ep_rank
        self.num_local_experts = num_experts // ep_size
        # DeepSpeed's MoE around a parameterless template; its per-expert Experts is then replaced by the store
        self.moe = MoE(hidden_size, nn.Identity(), num_experts=num_experts, ep_size=ep_size, k=k,
                       capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                       min_capacity=min_capacity, noisy_gate_policy=noisy_gate_policy, drop_tokens=drop_tokens,
                       use_rts=use_rts, top2_2nd_expert_sampling=second_expert_sampling)
        self.moe.deepspeed_moe.experts = GroupedExperts(expert_type, self.num_local_experts, hidden_size, ffn_size,
                                                        activation, bias, group_name=self.moe.expert_group_name)
        self.reset_experts(seed)

    # -- experts ----------------------------------------------------------------------------------------------------
    @property
    def experts(self) -> GroupedExperts:
        """This rank's experts: the grouped store (at DeepSpeed's ``deepspeed_moe.experts``)."""
        return self.moe.deepspeed_moe.experts

    @property
    def local_experts(self) -> list:
        """Each local expert as an FFN-shaped view of the store (``fc1.weight``, ``named_parameters()``)."""
        return [self.experts.expert(i) for i in range(self.num_local_experts)]

    @property
    def global_expert_ids(self) -> list[int]:
        first = self.ep_rank * self.num_local_experts
        return list(range(first, first + self.num_local_experts))

    @property
    def expert_group_name(self) -> str:
        return self.moe.expert_group_name

    @property
    def gate_weight(self) -> torch.Tensor:
        return self.moe.deepspeed_moe.gate.wg.weight

    def reset_experts(self, seed: int) -> None:
        """Independent initialisation per expert, reproducible from (seed, global expert id) at any ep_size."""
        for i, gid in enumerate(self.global_expert_ids):
            self.experts.reset_expert_(i, torch.Generator().manual_seed(seed * 1_000_003 + 7919 * gid + 1))

    def load_experts_from_dense(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        self._load_experts((fc1, fc2))

    def load_experts_from_gated(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> None:
        self._load_experts((gate_proj, up_proj, down_proj))

    def _load_experts(self, linears: tuple[nn.Linear, ...]) -> None:
        for i in range(self.num_local_experts):
            self.experts.load_expert_(i, linears)

    @classmethod
    def from_dense(cls, fc1: nn.Linear, fc2: nn.Linear, **kwargs):
        """Upcycling: every expert (and, for PAD, the static FFN) starts as a copy of the dense FFN (fc1, fc2).

        Exact by default: with ``dispatch`` and ``drop_tokens`` unset the layer is dropless (top-2: it computes the
        dense FFN at init); ``drop_tokens=True`` or gate noise chooses capacity dispatch (``upcycling_routing``)."""
        hidden, ffn_size = _check_dense_pair(fc1, fc2)
        if kwargs.get("expert_type", "mlp") != "mlp":
            raise ValueError(f"from_dense builds expert_type='mlp', got expert_type={kwargs['expert_type']!r}; "
                             "use from_gated for a gated MLP")
        layer = cls(hidden, ffn_size, bias=fc1.bias is not None, **upcycling_routing(kwargs))
        layer.load_experts_from_dense(fc1, fc2)
        return layer

    @classmethod
    def from_gated(cls, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, *, activation: str,
                   **kwargs):
        """Upcycling a gated MLP down(act(gate_proj(x)) ⊙ up_proj(x)) (Llama, Mistral, Qwen): every expert (and, for
        PAD, the static FFN) starts as a copy of it. ``activation``: silu (SwiGLU) or gelu / gelu_tanh (GEGLU).
        Dropless (exact) unless ``drop_tokens=True``, gate noise or ``dispatch`` say otherwise, as ``from_dense``."""
        hidden, ffn_size = _check_gated(gate_proj, up_proj, down_proj)
        if kwargs.pop("expert_type", "glu") != "glu":
            raise ValueError("from_gated builds expert_type='glu'; use from_dense for a two-matrix FFN")
        layer = cls(hidden, ffn_size, bias=gate_proj.bias is not None, activation=activation, expert_type="glu",
                    **upcycling_routing(kwargs))
        layer.load_experts_from_gated(gate_proj, up_proj, down_proj)
        return layer

    def forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        """x (..., hidden) -> (output (..., hidden), l_aux scalar, exp_counts (num_experts,))."""
        return self._moe(x, used_token)

    def _moe(self, x: torch.Tensor, used_token: Optional[torch.Tensor]):
        """DeepSpeed's MoE, with the gate's sampling in training mode only (see ``eval_routing``), or dropless."""
        if self.dispatch == "dropless":
            return self._dropless(x, used_token)
        with eval_routing(self.moe.deepspeed_moe.gate):
            return self.moe(x, used_token)

    def _dropless(self, x: torch.Tensor, used_token: Optional[torch.Tensor]):
        if used_token is not None:
            raise ValueError("used_token is not supported with dispatch='dropless' (every token is routed); mask the "
                             "tokens out of the input, or use dispatch='capacity'")
        gate = self.moe.deepspeed_moe.gate
        flat = x.reshape(-1, x.shape[-1])
        logits = F.linear(flat.float(), gate.wg.weight.float())  # fp32 like DeepSpeed's gate
        if self.keep_router_logits:
            self.router_logits = logits
        routes = route(logits, self.k, sample_second=gate.training and self.k == 2 and gate.top2_2nd_expert_sampling)
        self._on_routes(routes)
        for observe in self._route_observers:
            observe(routes.experts, routes.weights)
        # where DeepSpeed's MOELayer keeps them, for readers of its attributes (the trainer's expert-load scalars)
        self.moe.deepspeed_moe.l_aux, self.moe.deepspeed_moe.exp_counts = routes.l_aux, routes.exp_counts
        weights = self.expert_weights()
        act = self.experts._act
        out = dispatch_and_combine(flat, routes, lambda rows, counts: expert_ffn(rows, counts, weights,
                                                                                  self.expert_type, act),
                                   ep_size=self.ep_size, group=self.moe.deepspeed_moe.ep_group)
        return out.reshape(x.shape), routes.l_aux, routes.exp_counts

    def _on_routes(self, routes) -> None:
        """Dropless: what a subclass needs from the routing (PAD's compacted layers: each token's gate mass)."""

    def observe_routes(self, fn):
        """Call ``fn(experts, weights)`` after every routing of this layer, whatever the dispatch: experts (S, k) int64
        (-1 for a route capacity dispatch dropped), weights (S, k) the combine weights. Returns a handle (``remove()``)."""
        if self.dispatch == "dropless":
            self._route_observers.append(fn)
            return _Removable(lambda: self._route_observers.remove(fn))

        def from_gate(_module, _inputs, out):  # DeepSpeed's sparse gate output: indices (k, S), gates (k, S) at 3, 5
            fn(out[3].long().t(), out[5].t())

        return self.moe.deepspeed_moe.gate.register_forward_hook(from_gate)

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """The weights the local experts compute with, grouped (E_local, ...) per name: the store's parameters."""
        return self.experts.tensors()


class PadMoE(PadMaskMixin, MoEFFN):
    """mode='pad': PAD-MoE. Expert k computes FFN(x; λs(1−M)⊙W_s + λd M⊙W_k).

    The static FFN (``static.fc1``, ``static.fc2``; for glu ``static.gate_proj``, ``static.up_proj``,
    ``static.down_proj``) is registered once on this layer, outside DeepSpeed's experts, so it is replicated and
    all-reduced like any dense weight; the W_k are the grouped store's (``self.experts``). Masks are shared by all
    experts of the layer (``mask_sharing='layer'``, the paper) or held by each expert (``'expert'``: on the store's
    slot of the expert, sharded with the experts). Every forward mixes the effective weights of all local experts
    once (one masked mix per matrix) and both dispatches compute with them. With ``granularity='neuron'`` a
    partitioned layer can be compacted (``compact_``): static hidden units then run once per token as a dense FFN and
    the experts keep only their dynamic units.
    """

    expert_group_name = MoEFFN.expert_group_name  # the mixin's default (None) is for modules without experts

    def __init__(self, hidden_size: int, ffn_size: int, *, granularity: str = "element", mask_sharing: str = "layer",
                 scale_mode: str = "both", **kwargs):
        if mask_sharing not in MASK_SHARING:
            raise ValueError(f"mask_sharing={mask_sharing!r} is unknown; allowed: {', '.join(MASK_SHARING)}")
        super().__init__(hidden_size, ffn_size, **kwargs)
        self.static = make_ffn(self.expert_type, hidden_size, ffn_size, self.activation, bias=self.bias)
        self.static.reset_parameters(torch.Generator().manual_seed(kwargs.get("seed", 0) * 1_000_003))
        self.mask_sharing = mask_sharing
        weight_shapes = {n: tuple(p.shape) for n, p in self.static.named_parameters()}
        holders = None
        if mask_sharing == "expert":
            holders = {f"e{gid}.": slot for gid, slot in zip(self.global_expert_ids, self.experts.slots)}
        self.init_pad(weight_shapes, granularity=granularity, scale_mode=scale_mode, holders=holders,
                      expert_parallel=mask_sharing == "expert")
        self.compacted = False
        self._gate_mass: Optional[torch.Tensor] = None
        self._gate_hook = None

    def _load_experts(self, linears: tuple[nn.Linear, ...]) -> None:
        if self.compacted:
            raise ValueError("cannot upcycle into a compacted PadMoE; build, load, then compact_()")
        super()._load_experts(linears)
        _load_linears_(self.static, linears)

    # -- protocol extras ------------------------------------------------------------------------------------------
    def magnitude_scores(self) -> dict[str, torch.Tensor]:
        """|λd·W_k − λs·W_s| summed over this rank's experts (and over each mask entry's weights), per mask."""
        lam_s, lam_d = self.scale_factors()
        per_expert = self.mask_sharing == "expert"
        diff = magnitude_per_weight(dict(self.static.named_parameters()), self.experts.tensors(), lam_s, lam_d,
                                    per_expert=per_expert)
        if not per_expert:
            return self._reduce_to_masks(diff)
        scores = {}
        for i, gid in enumerate(self.global_expert_ids):
            reduced = self._reduce_to_masks({n: d[i] for n, d in diff.items()})
            scores.update({f"e{gid}.{k}": v for k, v in reduced.items()})
        return scores

    def _reduce_to_masks(self, per_weight: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum weight-shaped scores onto the partition-mask entries that cover them."""
        return self.granularity.reduce(per_weight, self._weight_shapes)

    def _on_masks_changed(self) -> None:
        if self.compacted:
            raise ValueError("masks of a compacted PadMoE are fixed; set them before compact_()")

    # -- forward ----------------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, used_token: Optional[torch.Tensor] = None):
        if self.dispatch == "dropless":  # the grouped GEMMs take expert_weights() (see _dropless)
            out, l_aux, exp_counts = self._moe(x, used_token)
        else:
            with self.experts.computing_with(self.expert_weights()):
                out, l_aux, exp_counts = self._moe(x, used_token)
        if not self.compacted:
            return out, l_aux, exp_counts
        # Static units run once per token, weighted by the token's total gate value, so that the sum matches
        # Σ_k g_k·FFN(x; W_k_eff) exactly (top-1 and dropped routes too).
        static_out = self.static.scaled_forward(x, self.scale_factors()[0])
        mass = self._gate_mass.reshape(x.shape[:-1] + (1,)).to(static_out.dtype)
        self._gate_mass = None
        return out + mass * static_out, l_aux, exp_counts

    def _on_routes(self, routes) -> None:
        if self.compacted:
            self._gate_mass = routes.weights.sum(1)

    def expert_weights(self) -> dict[str, torch.Tensor]:
        """W_k_eff = λs(1−M)⊙W_s + λd M⊙W_k for all local experts at once: one masked mix per weight and forward
        (IMP's relaxed masks while it scores); a compacted layer's experts hold only dynamic units: λd·W_k."""
        grouped = self.experts.tensors()
        lam_s, lam_d = self.scale_factors()
        if self.compacted:
            return {name: scaled(w, lam_d) for name, w in grouped.items()}
        if self.mask_sharing == "layer":
            masks = self.weight_masks()
        else:
            per_expert = [self.weight_masks(f"e{gid}.") for gid in self.global_expert_ids]
            masks = {n: torch.stack([m[n] for m in per_expert]) for n in grouped}
        return mix_grouped(dict(self.static.named_parameters()), grouped, masks, lam_s, lam_d)

    def _capture_gate_mass(self, _module, _inputs, output) -> None:
        # DeepSpeed's sparse gate output: (l_aux, capacity, E, indices (k,S), locations (k,S), gates (k,S), counts);
        # the gate of a dropped route is zero.
        self._gate_mass = output[5].sum(0)

    # -- neuron compaction ------------------------------------------------------------------------------------------
    def compact_(self) -> "PadMoE":
        """Shrink to the partition in place (neuron granularity, layer-shared masks): static units become a narrow
        dense FFN (for glu a narrow dense GLU), the store keeps only the experts' dynamic units. Do this before
        building the optimizer / DeepSpeed engine (or rebuild it: ``pad_moe.train.compaction``).
        """
        if self.compacted:
            return self
        if self.granularity.name != "neuron" or self.mask_sharing != "layer":
            raise ValueError(f"compact_ needs granularity='neuron' and mask_sharing='layer', got "
                             f"granularity={self.granularity.name!r}, mask_sharing={self.mask_sharing!r}")
        if self._relaxed is not None:
            raise ValueError("compact_ called while IMP relaxed masks are set; finish the partition first")
        units = self.masks()["units"]
        dyn, sta = units.nonzero().squeeze(1), (~units).nonzero().squeeze(1)
        self.static = _narrow_ffn(self.static, sta, keep_fc2_bias=True)
        self.moe.deepspeed_moe.experts = self.experts.narrowed(dyn)
        self.compacted = True
        self._gate_hook = self.moe.deepspeed_moe.gate.register_forward_hook(self._capture_gate_mass)
        return self


def upcycling_routing(kwargs: dict) -> dict:
    """``kwargs`` with the routing of an upcycled layer resolved as the config path does (``MoEConfig``): drop_tokens
    unset is False (nothing dropped, so the layer starts as its dense original); dispatch unset is dropless unless
    tokens are dropped or the gate is noisy, then capacity."""
    drop_tokens = kwargs.get("drop_tokens")
    drop_tokens = False if drop_tokens is None else drop_tokens
    dispatch = kwargs.get("dispatch")
    if dispatch is None:
        noisy = kwargs.get("noisy_gate_policy") not in (None, "None")
        dispatch = "capacity" if drop_tokens or noisy else "dropless"
    return {**kwargs, "drop_tokens": drop_tokens, "dispatch": dispatch}


def build_ffn_block(mode: str, hidden_size: int, ffn_size: int, **kwargs) -> nn.Module:
    """The FFN block for ``mode`` ('static', 'moe' or 'pad'); PAD-only arguments are ignored by the others."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    return _BLOCKS[mode](hidden_size, ffn_size, **_args_for(mode, kwargs))


def ffn_block_from_dense(mode: str, fc1: nn.Linear, fc2: nn.Linear, **kwargs) -> nn.Module:
    """Upcycle a dense FFN (fc1, fc2) into the block for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    return _BLOCKS[mode].from_dense(fc1, fc2, **_args_for(mode, kwargs))


def ffn_block_from_gated(mode: str, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, *,
                         activation: str, **kwargs) -> nn.Module:
    """Upcycle a gated MLP (gate_proj, up_proj, down_proj) into the glu block for ``mode``."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    return _BLOCKS[mode].from_gated(gate_proj, up_proj, down_proj, activation=activation, **_args_for(mode, kwargs))


_BLOCKS = {"static": DenseFFNBlock, "moe": MoEFFN, "pad": PadMoE}
_PAD_ONLY = ("granularity", "mask_sharing", "scale_mode")


def _args_for(mode: str, kwargs: dict) -> dict:
    if mode == "static":
        return {k: v for k, v in kwargs.items() if k in ("activation", "bias", "expert_type")}
    if mode == "moe":
        return {k: v for k, v in kwargs.items() if k not in _PAD_ONLY}
    return dict(kwargs)


def _narrow_ffn(ffn: nn.Module, units: torch.Tensor, keep_fc2_bias: bool) -> nn.Module:
    """A copy of ffn (mlp or glu) restricted to hidden ``units``: rows (and bias entries) of the input projections,
    columns of the output projection, whose bias is kept only with ``keep_fc2_bias``."""
    *inputs, output = ffn.linear_names
    first = getattr(ffn, inputs[0])
    hidden = first.in_features
    out = make_ffn(ffn.expert_type, hidden, len(units), ffn.activation, bias=first.bias is not None)
    if not keep_fc2_bias:
        setattr(out, output, nn.Linear(len(units), hidden, bias=False))
    with torch.no_grad():
        for name in inputs:
            src, dst = getattr(ffn, name), getattr(out, name)
            dst.weight.copy_(src.weight[units])
            if src.bias is not None:
                dst.bias.copy_(src.bias[units])
        src, dst = getattr(ffn, output), getattr(out, output)
        dst.weight.copy_(src.weight[:, units])
        if keep_fc2_bias and src.bias is not None:
            dst.bias.copy_(src.bias)
    out = out.to(first.weight.device, first.weight.dtype)
    # Where each narrowed parameter came from (dim, kept units): an engine rebuilt after an in-place compaction takes
    # the kept entries of the optimizer state with it (pad_moe.train.compaction).
    for name in inputs:
        for param in getattr(out, name).parameters():
            param._compacted_from = (0, units)
    getattr(out, output).weight._compacted_from = (1, units)
    return out


def _check_dense_pair(fc1: nn.Linear, fc2: nn.Linear) -> tuple[int, int]:
    if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
        raise ValueError(f"from_dense needs two nn.Linear, got {type(fc1).__name__} and {type(fc2).__name__}")
    if fc1.out_features != fc2.in_features or fc2.out_features != fc1.in_features:
        raise ValueError(f"fc1 ({fc1.in_features}->{fc1.out_features}) and fc2 ({fc2.in_features}->"
                         f"{fc2.out_features}) do not chain as hidden->ffn->hidden")
    if (fc1.bias is None) != (fc2.bias is None):
        raise ValueError("fc1 and fc2 must both have biases or both have none")
    return fc1.in_features, fc1.out_features


def _check_gated(gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear) -> tuple[int, int]:
    linears = (gate_proj, up_proj, down_proj)
    if not all(isinstance(m, nn.Linear) for m in linears):
        raise ValueError("from_gated needs three nn.Linear, got " + ", ".join(type(m).__name__ for m in linears))
    if (gate_proj.in_features, gate_proj.out_features) != (up_proj.in_features, up_proj.out_features):
        raise ValueError(f"gate_proj ({gate_proj.in_features}->{gate_proj.out_features}) and up_proj "
                         f"({up_proj.in_features}->{up_proj.out_features}) must have the same shape")
    _check_dense_pair(gate_proj, down_proj)
    if (gate_proj.bias is None) != (up_proj.bias is None):
        raise ValueError("gate_proj, up_proj and down_proj must all have biases or all have none")
    return gate_proj.in_features, gate_proj.out_features


def _load_linears_(ffn: nn.Module, linears: tuple[nn.Linear, ...]) -> None:
    """Copy ``linears`` into ffn's nn.Linear children, in the order of its ``linear_names``."""
    if len(linears) != len(ffn.linear_names):
        raise ValueError(f"a {ffn.expert_type} FFN takes {len(ffn.linear_names)} linears "
                         f"({', '.join(ffn.linear_names)}), got {len(linears)}")
    for name, src in zip(ffn.linear_names, linears):
        _copy_linear_(getattr(ffn, name), src)


def _copy_linear_(dst: nn.Linear, src: nn.Linear) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if dst.bias is not None:
            dst.bias.copy_(src.bias)


def _validate_moe_args(hidden_size, ffn_size, num_experts, k, ep_size, ep_rank, capacity_factor,
                       eval_capacity_factor, min_capacity, noisy_gate_policy) -> None:
    if hidden_size < 1 or ffn_size < 1:
        raise ValueError(f"hidden_size={hidden_size} and ffn_size={ffn_size} must be >= 1")
    if num_experts < 1 or ep_size < 1:
        raise ValueError(f"num_experts={num_experts} and ep_size={ep_size} must be >= 1")
    if num_experts % ep_size:
        raise ValueError(f"num_experts={num_experts} is not divisible by ep_size={ep_size}; pick an ep_size that "
                         "divides the number of experts")
    if not 0 <= ep_rank < ep_size:
        raise ValueError(f"ep_rank={ep_rank} is outside [0, ep_size={ep_size})")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k={k} must be in [1, num_experts={num_experts}]")
    if capacity_factor <= 0 or eval_capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor} and eval_capacity_factor={eval_capacity_factor} "
                         "must be > 0")
    if min_capacity < 0:
        raise ValueError(f"min_capacity={min_capacity} must be >= 0")
    if noisy_gate_policy not in NOISY_GATE_POLICIES:
        raise ValueError(f"noisy_gate_policy={noisy_gate_policy!r} is unknown; allowed: None, 'Jitter', 'RSample'")
