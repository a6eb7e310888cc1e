"""Hugging Face SwitchTransformers with its sparse MLPs replaced by pad_moe FFN blocks on DeepSpeed MoE.

The attention, dense FFNs, norms, embeddings and LM head stay Hugging Face's modules. Each sparse MLP becomes a
``SwitchSparseFFN`` holding ``build_ffn_block(mode, ...)``: a PAD-MoE (``pad``), a plain MoE (``moe``) or a dense FFN
(``static``), with top-1 routing and expert parallelism through DeepSpeed.

How DeepSpeed's top-1 MoE relates to Hugging Face's router (``SwitchTransformersTop1Router``):

- Same: fp32 router without bias (``gate.wg`` = ``router.classifier``), softmax, argmax, expert output multiplied by
  the chosen expert's probability, a dropped token's FFN output is zero (the residual carries it), expert FFN
  ``wo(relu(wi x))`` without biases.
- Capacity: HF counts ``expert_capacity`` tokens per expert *per sequence* in sequence order; DeepSpeed counts
  ``ceil(tokens/E · capacity_factor)`` per expert over the rank's whole micro-batch and picks survivors at random
  (``use_rts``). With no token dropped (``drop_tokens=False``, or capacity ≥ tokens) both compute the same function.
- Jitter: HF multiplies the router input by U(1−ε, 1+ε) in training; DeepSpeed's ``noisy_gate_policy='Jitter'`` does
  the same with ε = 0.01 (HF's default); other ε have no DeepSpeed equivalent.
- Load-balancing loss: DeepSpeed's ``l_aux = E · Σ_e mean_tokens(p_e) · frac_tokens(e)`` per layer over the rank's
  tokens, summed over sparse layers (as the rest of pad_moe does); HF computes E² · mean over (sequence, expert) of the
  same product with the sparse layers of a stack concatenated per sequence. They differ in grouping, not in intent.
- Router z-loss: HF's definition, ``mean_tokens(logsumexp(logits)²)`` per stack (tokens of all its sparse layers),
  encoder + decoder. Computed here from the un-jittered logits of the gate's input.
- HF applies dropout inside each expert (between ``relu`` and ``wo``); pad_moe experts have none.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from pad_moe.moe.ffn import GatedFFN
from pad_moe.moe.layer import build_ffn_block
from pad_moe.switch.presets import SwitchArch, arch_from_hf_config, hf_config

STACKS = ("encoder", "decoder")


def jitter_policy(jitter_noise: float) -> Optional[str]:
    """DeepSpeed's gate noise policy for HF's ``router_jitter_noise``."""
    if jitter_noise == 0:
        return None
    if abs(jitter_noise - 0.01) < 1e-12:
        return "Jitter"
    raise ValueError(f"router_jitter_noise={jitter_noise} has no DeepSpeed equivalent (its Jitter policy uses 0.01); "
                     "set it to 0 or 0.01")


class SwitchSparseFFN(nn.Module):
    """Drop-in for HF's ``SwitchTransformersSparseMLP``: (B, T, H) -> (B, T, H). The block's load-balancing loss and the
    router z-loss of the latest forward are kept on the module (``l_aux``, ``z_loss``) for the model to collect."""

    def __init__(self, block: nn.Module, stack: str, z_loss: bool = True):
        super().__init__()
        self.block = block
        self.stack = stack
        self.l_aux: Optional[torch.Tensor] = None
        self.z_loss: Optional[torch.Tensor] = None
        moe = getattr(block, "moe", None)
        self.gate = None if moe is None else moe.deepspeed_moe.gate
        self.z_enabled = z_loss
        block.keep_router_logits = z_loss and getattr(block, "dispatch", "capacity") == "dropless"
        if self.gate is not None and z_loss:
            self.gate.register_forward_hook(self._router_z_loss)

    def _router_z_loss(self, gate, inputs, _output) -> None:
        x_SH = inputs[0]
        logits_SE = F.linear(x_SH.float(), gate.wg.weight.float())
        self.z_loss = torch.logsumexp(logits_SE, dim=-1).pow(2).mean()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out, l_aux, _ = self.block(hidden_states)
        self.l_aux = l_aux
        logits = getattr(self.block, "router_logits", None)
        if logits is not None:  # dropless dispatch does not run the gate module: its logits are kept on the block
            if self.z_enabled:
                self.z_loss = torch.logsumexp(logits, dim=-1).pow(2).mean()
            self.block.router_logits = None
        return out


class SwitchModel(nn.Module):
    """forward(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> (logits (B, T_dec, V), aux).

    ``aux = Σ_layers l_aux + z_weight · z_loss`` with ``z_weight = router_z_loss_coef / aux_loss_coef``, so that a
    trainer adding ``aux_loss_coef · aux`` adds both losses with their own coefficients. The parts of the latest
    forward are in ``last_losses``.
    """

    def __init__(self, hf_model: nn.Module, arch: SwitchArch, mode: str, z_weight: float = 0.0):
        super().__init__()
        self.hf = hf_model
        self.arch, self.mode, self.z_weight = arch, mode, float(z_weight)
        self.last_losses: dict[str, float] = {}

    def sparse_ffns(self) -> list[SwitchSparseFFN]:
        return [m for m in self.hf.modules() if isinstance(m, SwitchSparseFFN)]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                decoder_input_ids: Optional[torch.Tensor] = None,
                decoder_attention_mask: Optional[torch.Tensor] = None):
        if decoder_input_ids is None:
            raise ValueError("SwitchModel needs decoder_input_ids (the targets shifted right, starting with pad=0)")
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids,
                      decoder_attention_mask=decoder_attention_mask, use_cache=False, return_dict=True)
        sparse = self.sparse_ffns()
        l_aux = sum((m.l_aux for m in sparse if m.l_aux is not None), out.logits.new_zeros((), dtype=torch.float32))
        z = out.logits.new_zeros((), dtype=torch.float32)
        for stack in STACKS:
            zs = [m.z_loss for m in sparse if m.stack == stack and m.z_loss is not None]
            if zs:
                z = z + torch.stack(zs).mean()
        for m in sparse:
            m.l_aux = m.z_loss = None
        self.last_losses = {"l_aux": float(l_aux.detach()), "z_loss": float(z.detach())}
        return out.logits, l_aux + self.z_weight * z


def _hf_shell(arch: SwitchArch, dropout: Optional[float]):
    """A Hugging Face model of ``arch`` whose sparse MLPs have one expert (they are replaced right away)."""
    from transformers import SwitchTransformersForConditionalGeneration

    hf = SwitchTransformersForConditionalGeneration(hf_config(arch, num_experts=1, dropout=dropout,
                                                              router_jitter_noise=0.0))
    return tie_input_embeddings(hf)


def tie_input_embeddings(hf):
    """Encoder and decoder read the one ``shared`` embedding (T5; transformers 5 unties them too when the LM head is
    untied)."""
    hf.set_input_embeddings(hf.shared)
    return hf


def _sparse_slots(hf_model) -> list[tuple[str, nn.Module]]:
    """(stack, LayerFF) of every sparse FFN, in encoder then decoder order."""
    slots = []
    for stack in STACKS:
        for block in getattr(hf_model, stack).block:
            ff = block.layer[-1]
            if ff.is_sparse:
                slots.append((stack, ff))
    return slots


def block_kwargs(arch: SwitchArch, *, ep_size: int = 1, ep_rank: int = 0, k: int = 1, capacity_factor: float = 1.25,
                 eval_capacity_factor: float = 2.0, min_capacity: int = 4, drop_tokens: bool = True,
                 dispatch: str = "capacity", noisy_gate_policy: Optional[str] = None, use_rts: bool = True,
                 granularity: str = "element",
                 mask_sharing: str = "layer", scale_mode: str = "both", seed: int = 0) -> dict:
    """build_ffn_block keyword arguments of a Switch sparse FFN (top-1 by default, no biases; ReLU mlp experts, or
    GEGLU glu experts for a gated preset)."""
    return dict(num_experts=arch.num_experts, k=k, ep_size=ep_size, ep_rank=ep_rank, activation=arch.activation,
                bias=False, expert_type=arch.expert_type,
                capacity_factor=capacity_factor, eval_capacity_factor=eval_capacity_factor,
                min_capacity=min_capacity, drop_tokens=drop_tokens, dispatch=dispatch,
                noisy_gate_policy=noisy_gate_policy,
                use_rts=use_rts, second_expert_sampling=False, granularity=granularity, mask_sharing=mask_sharing,
                scale_mode=scale_mode, seed=seed)


def build_switch(arch: SwitchArch, mode: str = "pad", *, z_loss_coef: float = 0.001, aux_loss_coef: float = 0.01,
                 dropout: Optional[float] = None, seed: int = 0, **kwargs) -> SwitchModel:
    """A Switch model of ``arch`` from scratch: HF's init for the dense parts (seeded by ``seed``), pad_moe's for the
    sparse FFNs (experts seeded by global expert id, so any ep_size builds the same model). ``kwargs`` go to
    ``block_kwargs`` (ep_size, ep_rank, capacity, granularity, ...). Works under ``torch.device('meta')``.
    A gated preset (``arch.expert_type='glu'``, Switch-XXL) has GEGLU dense FFNs too: pad_moe's ``GatedFFN``
    (nn.Linear's init, no dropout inside the FFN) replaces each of HF's two-matrix dense FFNs."""
    torch.manual_seed(seed)
    hf = _hf_shell(arch, dropout)
    if arch.expert_type == "glu":
        for stack in STACKS:
            for layer in getattr(hf, stack).block:
                ff = layer.layer[-1]
                if not ff.is_sparse:
                    ff.mlp = GatedFFN(arch.d_model, arch.d_ff, arch.activation, bias=False)
    bk = block_kwargs(arch, seed=seed, **kwargs)
    for i, (stack, ff) in enumerate(_sparse_slots(hf)):
        block = build_ffn_block(mode, arch.d_model, arch.d_ff, **{**bk, "seed": seed * 131 + i})
        ff.mlp = SwitchSparseFFN(block, stack, z_loss=z_loss_coef > 0)
    return SwitchModel(hf, arch, mode, z_weight=_z_weight(z_loss_coef, aux_loss_coef))


def _z_weight(z_loss_coef: float, aux_loss_coef: float) -> float:
    if z_loss_coef == 0:
        return 0.0
    if aux_loss_coef <= 0:
        raise ValueError(f"router_z_loss_coef={z_loss_coef} needs moe.aux_loss_coef > 0 (the z-loss rides on the "
                         "auxiliary loss the trainer scales by it); set moe.aux_loss_coef or the z-loss coef to 0")
    return z_loss_coef / aux_loss_coef


def from_hf(hf_model, mode: str = "pad", *, aux_loss_coef: float = 0.01, z_loss_coef: Optional[float] = None,
            **kwargs) -> SwitchModel:
    """Convert a loaded HF ``SwitchTransformersForConditionalGeneration`` in place: each sparse MLP becomes a pad_moe
    block holding the router and this rank's experts (``ep_rank`` of ``ep_size``). PAD's static FFN starts as the
    mean of all experts of the layer (masks all ones, λs = λd = 1: the converted model computes HF's function);
    ``static`` mode replaces the sparse MLP by that mean FFN. Jitter follows ``config.router_jitter_noise``."""
    config = hf_model.config
    arch = arch_from_hf_config(config)
    if config.dense_act_fn != "relu":
        raise ValueError(f"dense_act_fn={config.dense_act_fn!r}: pad_moe's Switch experts use relu")
    kwargs.setdefault("noisy_gate_policy", jitter_policy(config.router_jitter_noise))
    bk = block_kwargs(arch, **kwargs)
    z_coef = config.router_z_loss_coef if z_loss_coef is None else z_loss_coef
    ep_size, ep_rank = bk["ep_size"], bk["ep_rank"]
    local = arch.num_experts // ep_size
    for stack, ff in _sparse_slots(hf_model):
        old = ff.mlp
        wi_EFH = torch.stack([old.experts[f"expert_{e}"].wi.weight.detach() for e in range(arch.num_experts)])
        wo_EHF = torch.stack([old.experts[f"expert_{e}"].wo.weight.detach() for e in range(arch.num_experts)])
        block = build_ffn_block(mode, arch.d_model, arch.d_ff, **bk)
        with torch.no_grad():
            if mode == "static":
                block.ffn.fc1.weight.copy_(wi_EFH.mean(0))
                block.ffn.fc2.weight.copy_(wo_EHF.mean(0))
            else:
                block.moe.deepspeed_moe.gate.wg.weight.copy_(old.router.classifier.weight)
                for j, expert in enumerate(block.local_experts):
                    expert.fc1.weight.copy_(wi_EFH[ep_rank * local + j])
                    expert.fc2.weight.copy_(wo_EHF[ep_rank * local + j])
                if mode == "pad":
                    block.static.fc1.weight.copy_(wi_EFH.mean(0))
                    block.static.fc2.weight.copy_(wo_EHF.mean(0))
        ff.mlp = SwitchSparseFFN(block, stack, z_loss=z_coef > 0)
    hf_model.config._attn_implementation = "eager"
    tie_input_embeddings(hf_model)
    return SwitchModel(hf_model, arch, mode, z_weight=_z_weight(z_coef, aux_loss_coef))


def load_hf_switch(path: str, mode: str = "pad", **kwargs) -> SwitchModel:
    """Load a local HF Switch checkpoint directory (config.json + weights, e.g. switch-base-8) and convert it."""
    import os

    from transformers import SwitchTransformersForConditionalGeneration

    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(f"{path!r} is not a Hugging Face checkpoint directory (no config.json); pass the folder "
                         "that holds config.json and the weights")
    hf = SwitchTransformersForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    return from_hf(hf, mode, **kwargs)
