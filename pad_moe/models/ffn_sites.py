"""Where the dense FFNs of a Hugging Face model live: a small registry of FFN site kinds.

A site kind recognises one module layout (``match``), says which linears make the FFN (input projections first, the
output projection last, all ``nn.Linear``), which activation module it applies and which config attribute names that
activation, computes the FFN with the model's own modules (``original``, checked against our formula before anything
is replaced) and puts the upcycled block in place (``install``). Registered kinds:

- ``bert``: BERT-style encoder layers (BERT, RoBERTa, ELECTRA, MiniLM, ...): ``layer.intermediate`` (``dense`` +
  ``intermediate_act_fn``) and ``layer.output`` (``dense``, dropout, ``LayerNorm``) used by ``feed_forward_chunk``.
  ``intermediate`` becomes the block (returning the FFN output, hidden size) and ``output.dense`` an ``nn.Identity``,
  so HF's own forward (dropout, residual, LayerNorm) runs unchanged.
- ``albert``: ALBERT layers, ``layer.ffn`` / ``layer.activation`` / ``layer.ffn_output`` used by ``ff_chunk``. ``ffn``
  becomes the block, the other two ``nn.Identity``. A layer shared across depth is one module, replaced once.
- ``gated_mlp``: gated decoder MLPs (Llama, Mistral, Qwen2, Qwen3, ...): a module with ``gate_proj`` / ``up_proj`` /
  ``down_proj`` (``nn.Linear``) and ``act_fn`` computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``. The whole
  module is replaced (wherever it is referenced) by the block: (batch, seq, hidden) -> (batch, seq, hidden).
- ``gpt2_mlp``: GPT-2-style MLPs, ``c_fc`` / ``act`` / ``c_proj`` as transformers' ``Conv1D`` (weight stored (in,
  out)) followed by ``dropout``. The Conv1D weights are converted to ``nn.Linear`` (transposed, exactly); ``c_fc``
  becomes the block and ``act`` / ``c_proj`` ``nn.Identity``, so the MLP's own dropout still runs.

A new layout registers a :class:`SiteKind` with :func:`register_site_kind`; ``upcycle`` and the save format name none
of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

MatchFn = Callable[[nn.Module], Optional[tuple[tuple[nn.Linear, ...], object]]]


@dataclass(frozen=True)
class SiteKind:
    """One FFN layout of Hugging Face models."""

    name: str
    """Registry key."""
    description: str
    """The models it covers, for error messages."""
    expert_type: str
    """'mlp' (fc1, fc2) or 'glu' (gate, up, down): the block type built from its linears."""
    act_config: str
    """The config attribute naming the activation (``hidden_act``, ``activation_function``)."""
    match: MatchFn
    """module -> (linears, activation module) when the module is a site of this kind, else None."""
    original: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    """(module, x) -> the FFN computed by the model's own modules (no dropout), before replacement."""
    install: Callable[[nn.Module, nn.Module, nn.Module], None]
    """(model, module, block) puts the block in place of the FFN of ``module`` inside ``model``."""


@dataclass
class FFNSite:
    """One dense FFN found in a model."""

    name: str  # qualified name of the module the kind matched
    module: nn.Module
    kind: SiteKind
    linears: tuple[nn.Linear, ...]  # input projections first, output projection last
    act_fn: object

    @property
    def fc1(self) -> nn.Linear:
        return self.linears[0]

    @property
    def fc2(self) -> nn.Linear:
        return self.linears[-1]


SITE_KINDS: dict[str, SiteKind] = {}
"""Registered site kinds, tried in registration order."""


def register_site_kind(kind: SiteKind) -> SiteKind:
    if kind.name in SITE_KINDS:
        raise ValueError(f"FFN site kind {kind.name!r} is already registered")
    SITE_KINDS[kind.name] = kind
    return kind


def find_ffn_sites(model: nn.Module) -> list[FFNSite]:
    """The dense FFN blocks of ``model`` in module order, each distinct module once (nothing inside a site is
    searched again)."""
    sites: list[FFNSite] = []
    for name, module in model.named_modules():  # named_modules yields a shared module once
        if any(s.name == "" or name.startswith(s.name + ".") for s in sites):
            continue
        for kind in SITE_KINDS.values():
            found = kind.match(module)
            if found is not None:
                linears, act_fn = found
                sites.append(FFNSite(name, module, kind, tuple(linears), act_fn))
                break
    return sites


def supported_layouts() -> str:
    return "; ".join(k.description for k in SITE_KINDS.values())


# -- helpers ---------------------------------------------------------------------------------------------------------
def _is_linear(m) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m) -> bool:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(m, Conv1D)


def linear_from_conv1d(conv: nn.Module) -> nn.Linear:
    """transformers' Conv1D (x @ W + b, W (in, out)) as the equal nn.Linear (W stored transposed, (out, in))."""
    n_in, n_out = conv.weight.shape
    linear = nn.Linear(n_in, n_out, bias=conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
    return linear


def replace_module_(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` wherever ``old`` is a child inside ``model`` (a module shared by several parents is replaced in
    all of them)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, child_name, new)


# -- the registered kinds --------------------------------------------------------------------------------------------
def _match_bert(layer: nn.Module):
    inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if (hasattr(layer, "feed_forward_chunk") and _is_linear(getattr(inter, "dense", None))
            and hasattr(inter, "intermediate_act_fn") and _is_linear(getattr(out, "dense", None))
            and hasattr(out, "LayerNorm")):
        return (inter.dense, out.dense), inter.intermediate_act_fn
    return None


def _install_bert(_model, layer, block) -> None:
    layer.intermediate = block
    layer.output.dense = nn.Identity()


def _match_albert(layer: nn.Module):
    if (hasattr(layer, "ff_chunk") and _is_linear(getattr(layer, "ffn", None))
            and _is_linear(getattr(layer, "ffn_output", None)) and callable(getattr(layer, "activation", None))):
        return (layer.ffn, layer.ffn_output), layer.activation
    return None


def _install_albert(_model, layer, block) -> None:
    layer.ffn = block
    layer.activation = nn.Identity()
    layer.ffn_output = nn.Identity()


def _match_gated(mlp: nn.Module):
    linears = tuple(getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    if all(_is_linear(m) for m in linears) and callable(getattr(mlp, "act_fn", None)):
        return linears, mlp.act_fn
    return None


def _install_gated(model, mlp, block) -> None:
    if mlp is model:
        raise ValueError(f"{type(mlp).__name__} is a bare MLP; upcycle the model that holds it")
    replace_module_(model, mlp, block)


def _match_gpt2(mlp: nn.Module):
    c_fc, c_proj = getattr(mlp, "c_fc", None), getattr(mlp, "c_proj", None)
    if (_is_conv1d(c_fc) and _is_conv1d(c_proj) and callable(getattr(mlp, "act", None))
            and isinstance(getattr(mlp, "dropout", None), nn.Dropout)):
        return (linear_from_conv1d(c_fc), linear_from_conv1d(c_proj)), mlp.act
    return None


def _install_gpt2(_model, mlp, block) -> None:
    mlp.c_fc = block  # GPT2MLP.forward: c_fc -> act -> c_proj -> dropout; the block is the first three
    mlp.act = nn.Identity()
    mlp.c_proj = nn.Identity()


register_site_kind(SiteKind(
    "bert", "BERT-style encoders (BERT, RoBERTa, ELECTRA, MiniLM)", "mlp", "hidden_act", _match_bert,
    lambda layer, x: layer.output.dense(layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))),
    _install_bert))
register_site_kind(SiteKind(
    "albert", "ALBERT", "mlp", "hidden_act", _match_albert,
    lambda layer, x: layer.ffn_output(layer.activation(layer.ffn(x))), _install_albert))
register_site_kind(SiteKind(
    "gated_mlp", "gated decoder MLPs gate_proj/up_proj/down_proj (Llama, Mistral, Qwen2, Qwen3)", "glu", "hidden_act",
    _match_gated, lambda mlp, x: mlp(x), _install_gated))
register_site_kind(SiteKind(
    "gpt2_mlp", "GPT-2-style Conv1D MLPs c_fc/c_proj", "mlp", "activation_function", _match_gpt2,
    lambda mlp, x: mlp.c_proj(mlp.act(mlp.c_fc(x))), _install_gpt2))
