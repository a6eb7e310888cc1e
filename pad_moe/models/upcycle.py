"""Upcycling: replace the FFN blocks of a Hugging Face encoder or decoder LM by static / MoE / PAD-MoE blocks
(paper §5.1).

Every expert (and, for PAD, the static weight) starts as a copy of the pretrained FFN, so with top-2 routing and no
dropped tokens the upcycled model computes exactly the original function: the two gate values of a token are
renormalised to sum to 1 and both experts are equal. With ``k=1`` DeepSpeed scales the expert output by the router
probability p(x), so a top-1 model starts as p(x)·FFN(x), not FFN(x). ``drop_tokens`` defaults to False here (dropless);
with ``drop_tokens=True`` tokens over capacity lose their route and the equality no longer holds.

Supported layouts (BERT-style and ALBERT encoders, gated decoder MLPs of Llama / Mistral / Qwen2 / Qwen3, GPT-2's
Conv1D MLP) are the site kinds registered in :mod:`pad_moe.models.ffn_sites`, which also says how each block is put in
place. Before anything is replaced, each chosen FFN computed by the model's own modules is compared with the formula
the block will compute on a probe input, so a layout that only looks like a known one is refused.

FFN blocks are numbered in module order, each distinct module once (ALBERT's shared layer is block 0 however deep
the model is); ``every=N`` replaces the blocks whose number i has ``i % N == N - 1`` (N=2: blocks 1, 3, 5, ... as in
Switch).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import nn

from pad_moe.models.ffn_sites import FFNSite, find_ffn_sites, supported_layouts
from pad_moe.moe.ffn import get_activation
from pad_moe.moe.layer import MODES, ffn_block_from_dense, ffn_block_from_gated

HF_ACTIVATIONS = {
    "gelu": "gelu", "gelu_python": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh", "relu": "relu", "silu": "silu", "swish": "silu",
}
"""config.hidden_act of Hugging Face -> pad_moe activation name (checked numerically against the layer's function)."""

BLOCK_KWARGS = ("capacity_factor", "eval_capacity_factor", "min_capacity", "drop_tokens", "dispatch", "noisy_gate_policy",
                "use_rts", "second_expert_sampling", "seed", "granularity", "mask_sharing", "scale_mode")
"""Keyword arguments ``upcycle`` passes through to the blocks (see ``pad_moe.moe.layer``)."""

_UPCYCLE_FIELDS = ("mode", "num_experts", "k", "every", "capacity_factor", "eval_capacity_factor", "min_capacity",
                   "drop_tokens", "dispatch", "noisy_gate_policy", "use_rts", "second_expert_sampling", "granularity",
                   "mask_sharing", "scale_mode")


@dataclass
class UpcycleInfo:
    """How a model was upcycled; kept on the model as ``model.pad_moe_upcycle`` (a plain attribute)."""

    mode: str
    num_experts: int
    k: int
    every: int
    ep_size: int
    ep_rank: int
    block_kwargs: dict
    activation: str
    replaced: list = field(default_factory=list)
    moe_config: Optional[dict] = None

    def upcycle_kwargs(self) -> dict:
        """Arguments that rebuild the same structure with ``upcycle`` (ep_size / ep_rank excluded)."""
        return {"mode": self.mode, "num_experts": self.num_experts, "k": self.k, "every": self.every,
                **self.block_kwargs}


class UpcycledFFN(nn.Module):
    """Runs an FFN block (static / moe / pad) in place of a Hugging Face FFN and returns only its output.

    The auxiliary loss and expert counts of every call since the model's latest top-level forward are kept in
    ``aux_history`` / ``count_history`` (an ALBERT layer shared across depth is called once per depth). Read them
    between forward and backward: activation checkpointing re-runs the block in backward and appends again.
    """

    def __init__(self, block: nn.Module, index: int):
        super().__init__()
        self.block = block
        self.index = index  # FFN block number in the model (see module docstring)
        self.aux_history: list[torch.Tensor] = []
        self.count_history: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden); padding tokens are routed like any other token."""
        out, l_aux, counts = self.block(x)  # out (batch, seq, hidden), l_aux (), counts (num_experts,) or None
        self.aux_history.append(l_aux)
        if counts is not None:
            self.count_history.append(counts)
        return out

    def reset_stats(self) -> None:
        self.aux_history.clear()
        self.count_history.clear()


# -- finding FFN blocks ----------------------------------------------------------------------------------------------
def upcycled_ffns(model: nn.Module) -> dict[str, UpcycledFFN]:
    """{qualified name: UpcycledFFN} of an upcycled model, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, UpcycledFFN)}


def _activation_name(model: nn.Module, site: FFNSite) -> str:
    key = site.kind.act_config
    hidden_act = getattr(getattr(model, "config", None), key, None)
    if not isinstance(hidden_act, str) or hidden_act not in HF_ACTIVATIONS:
        raise ValueError(f"activation {key}={hidden_act!r} of {type(model).__name__} is not supported; "
                         f"supported: {', '.join(HF_ACTIVATIONS)}")
    ours = HF_ACTIVATIONS[hidden_act]
    x = torch.linspace(-6, 6, 241)
    with torch.no_grad():
        theirs = site.act_fn(x)
    if not torch.allclose(theirs, get_activation(ours)(x), atol=1e-5, rtol=0):
        raise ValueError(f"the FFN activation of {site.name!r} does not compute {hidden_act!r} as config.{key} "
                         "says; this model's activation is not supported")
    return ours


def _check_formula(site: FFNSite, activation: str) -> None:
    """The site's FFN, computed by the model's own modules, equals what the upcycled block will compute."""
    w = site.linears[0].weight
    if w.device.type == "meta":
        return
    x = torch.randn(2, 3, w.shape[1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    act = get_activation(activation)
    with torch.no_grad():
        theirs = site.kind.original(site.module, x)
        if site.kind.expert_type == "glu":
            gate, up, down = site.linears
            ours = down(act(gate(x)) * up(x))
        else:
            ours = site.linears[-1](act(site.linears[0](x)))
    tol = 1e-4 if w.dtype in (torch.float32, torch.float64) else 5e-2
    if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours.float(), rtol=tol, atol=tol):
        raise ValueError(f"{site.name!r} looks like a {site.kind.name} FFN but does not compute one; this layout of "
                         f"{type(site.module).__name__} is not supported")


_BUILDERS = {"mlp": ffn_block_from_dense, "glu": ffn_block_from_gated}


# -- upcycling -------------------------------------------------------------------------------------------------------
def upcycle(hf_model: nn.Module, *, mode: str = "pad", num_experts: int = 8, k: int = 2, every: int = 1,
            ep_size: int = 1, ep_rank: int = 0, **block_kwargs) -> nn.Module:
    """Replace every ``every``-th FFN block of ``hf_model`` in place by the ``mode`` block, initialised from it.

    ``block_kwargs``: any of :data:`BLOCK_KWARGS` (``drop_tokens`` defaults to False, ``dispatch`` to ``dropless``
    when no token is dropped and the gate has no noise, else ``capacity``). Returns ``hf_model``.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; allowed: {', '.join(MODES)}")
    unknown = sorted(set(block_kwargs) - set(BLOCK_KWARGS))
    if unknown:
        hint = " (the activation comes from the model's config.hidden_act)" if "activation" in unknown else ""
        raise ValueError(f"upcycle got unknown argument {unknown[0]!r}{hint}; allowed: {', '.join(BLOCK_KWARGS)}")
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"every={every!r} must be an integer >= 1")
    if not isinstance(hf_model, nn.Module):
        raise ValueError(f"upcycle needs a torch nn.Module, got {type(hf_model).__name__}")
    if upcycled_ffns(hf_model):
        raise ValueError(f"{type(hf_model).__name__} is already upcycled; upcycle the original model once")
    sites = find_ffn_sites(hf_model)
    if not sites:
        raise ValueError(f"{type(hf_model).__name__} has no recognisable FFN block; supported: {supported_layouts()}")
    chosen = [(i, s) for i, s in enumerate(sites) if i % every == every - 1]
    if not chosen:
        raise ValueError(f"every={every} replaces none of the {len(sites)} FFN blocks of {type(hf_model).__name__}; "
                         f"use every <= {len(sites)}")
    activations = {s.name: _activation_name(hf_model, s) for _, s in chosen}
    activation = activations[chosen[0][1].name]
    if len(set(activations.values())) > 1:
        raise ValueError(f"the FFN blocks of {type(hf_model).__name__} use different activations {activations}; "
                         "upcycling needs one")
    for _, site in chosen:
        _check_formula(site, activation)
    block_kwargs = {"drop_tokens": False, **block_kwargs}
    if block_kwargs.get("dispatch") is None:
        noisy = block_kwargs.get("noisy_gate_policy") not in (None, "None")
        block_kwargs["dispatch"] = "capacity" if block_kwargs["drop_tokens"] or noisy else "dropless"
    seed = block_kwargs.get("seed", 0)
    blocks = []  # build every block before touching the model, so a bad argument leaves it unchanged
    for index, site in chosen:
        build = _BUILDERS[site.kind.expert_type]
        block = build(mode, *site.linears, num_experts=num_experts, k=k, ep_size=ep_size, ep_rank=ep_rank,
                      activation=activation, **block_kwargs)
        if mode != "static":  # router init independent of the global RNG: same model at any rank and ep_size
            gate = block.gate_weight  # (num_experts, hidden)
            bound = gate.shape[1] ** -0.5
            with torch.no_grad():
                gate.uniform_(-bound, bound, generator=torch.Generator().manual_seed(seed * 1_000_003 + 31 * index))
        weight = site.linears[0].weight
        blocks.append(block.to(device=weight.device, dtype=weight.dtype))  # masks stay bool
    for (index, site), block in zip(chosen, blocks, strict=True):
        site.kind.install(hf_model, site.module, UpcycledFFN(block, index))
    hf_model.pad_moe_upcycle = UpcycleInfo(mode, num_experts, k, every, ep_size, ep_rank, dict(block_kwargs),
                                           activation, list(upcycled_ffns(hf_model)))
    hf_model.register_forward_pre_hook(_reset_stats_hook)
    return hf_model


def upcycle_from_config(hf_model: nn.Module, moe_cfg, ep_rank: int = 0, seed: int = 0) -> nn.Module:
    """``upcycle`` with the fields of a ``pad_moe.config.MoEConfig``. An unset ``drop_tokens`` (None) is dropless, as
    for every upcycled model (``MoEConfig.resolve_drop_tokens``); capacity dispatch needs ``drop_tokens=True``.
    ``seed`` seeds the routers (the run's ``train.seed``, so that seeds vary the router initialisation too)."""
    kwargs = {name: getattr(moe_cfg, name) for name in _UPCYCLE_FIELDS}
    kwargs["seed"] = seed
    kwargs["drop_tokens"] = moe_cfg.resolve_drop_tokens(upcycled=True)
    kwargs["dispatch"] = moe_cfg.resolve_dispatch(upcycled=True)
    upcycle(hf_model, ep_size=moe_cfg.ep_size, ep_rank=ep_rank, **kwargs)
    hf_model.pad_moe_upcycle.moe_config = {**asdict(moe_cfg), "drop_tokens": kwargs["drop_tokens"],
                                           "dispatch": kwargs["dispatch"]}
    return hf_model


def reset_stats(model: nn.Module) -> None:
    """Forget the auxiliary losses and counts of the previous forward (a wrapper that bypasses the upcycled model's
    own forward, e.g. a custom pooling head, calls this at the start of its forward)."""
    for m in model.modules():
        if isinstance(m, UpcycledFFN):
            m.reset_stats()


def _reset_stats_hook(module: nn.Module, _args) -> None:
    reset_stats(module)  # a top-level forward starts


class MeanPoolClassifier(nn.Module):
    """A Hugging Face sequence classifier that pools by the mean of the real tokens' last hidden states instead of
    its [CLS] pooler: how sentence encoders such as all-MiniLM-L6-v2 were trained. The unused pooler is frozen."""

    def __init__(self, hf_model: nn.Module):
        super().__init__()
        if not isinstance(getattr(hf_model, "classifier", None), nn.Linear):
            raise ValueError(f"model.pooling=mean needs a classifier that is one nn.Linear on the pooled vector; "
                             f"{type(hf_model).__name__} has another head: use model.pooling=cls")
        self.hf = hf_model
        pooler = getattr(hf_model.base_model, "pooler", None)
        for p in pooler.parameters() if pooler is not None else ():
            p.requires_grad_(False)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        reset_stats(self.hf)  # the upcycled model's own forward (which resets them) is bypassed
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        h_BTH = self.hf.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        w_BT1 = attention_mask.unsqueeze(-1).to(h_BTH.dtype)
        pooled = (h_BTH * w_BT1).sum(1) / w_BT1.sum(1).clamp_min(1)
        head = self.hf.classifier
        return head(self.hf.dropout(pooled)) if hasattr(self.hf, "dropout") else head(pooled)


# -- auxiliary loss and expert load ----------------------------------------------------------------------------------
def aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the load-balancing losses of all replaced blocks in the latest forward (0 for static / no forward).

    Add ``coef * aux_loss(model)`` to the task loss. A block called several times (ALBERT) counts every call.
    """
    terms = [aux for ffn in upcycled_ffns(model).values() for aux in ffn.aux_history]
    if not terms:
        return torch.zeros(())
    return torch.stack([t.float().to(terms[0].device) for t in terms]).sum()


def expert_counts(model: nn.Module) -> dict[str, torch.Tensor]:
    """{block name: tokens routed to each expert (num_experts,)} in the latest forward, summed over calls.

    Counts are this rank's routing decisions (top-k counts each route); all-reduce them for the global load.
    """
    ffns = upcycled_ffns(model).items()
    return {name: torch.stack(ffn.count_history).sum(0) for name, ffn in ffns if ffn.count_history}


def upcycle_info(model: nn.Module) -> UpcycleInfo:
    """The ``UpcycleInfo`` of ``model`` or of the upcycled submodule inside it (one-line ValueError if none)."""
    for m in model.modules():
        info = getattr(m, "pad_moe_upcycle", None)
        if isinstance(info, UpcycleInfo):
            return info
    raise ValueError(f"{type(model).__name__} is not upcycled; call pad_moe.models.upcycle(model, ...) first")
