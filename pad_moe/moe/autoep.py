"""PAD-MoE on DeepSpeed AutoEP: HF MoE models (Mixtral, Qwen2/Qwen3-MoE, DeepSeek, ...) with PAD experts, under
DeepSpeed's own dropless expert-parallel layer, ZeRO 0-3 and universal checkpoints.

AutoEP swaps each HF MoE block for ``AutoEPMoELayer`` at ``deepspeed.initialize`` (router copied, this rank's experts
as ``GroupedExperts`` w1 gate / w3 up ``(E_local, F, H)``, w2 down ``(E_local, H, F)``, no biases, dropless
all-to-all and grouped GEMM). ``pad_autoep_layers(...)`` makes it build ``PadAutoEPLayer`` instead: the same layer
plus, on the layer and outside ``.experts`` (DeepSpeed reduces anything under ``.experts`` over the expert-data-parallel
group only), the static weights W_s, one mask per weight shared by all experts (replicated, full size: AutoEP
checkpoints only w1/w2/w3 expert-parallel-aware) and φ. The experts compute with W_eff = where(M, λd·W_k, λs·W_s),
mixed once per forward on the stacked weights, through DeepSpeed's own grouped runners. All masks one and φ = 0 give
the original model exactly; W_s starts as the mean of the layer's experts (``static_init``).

Private DeepSpeed pieces relied on (pinned by pyproject's deepspeed range, covered by tests/test_autoep.py): the
``AutoEPMoELayer`` constructor signature, its ``experts`` attribute and ``GroupedExperts`` flags, the module attribute
``deepspeed.module_inject.auto_ep_layer.AutoEPMoELayer`` that AutoEP instantiates, ``repack_expert_weights`` and the
``_run_experts_*`` runners.
"""

from __future__ import annotations

import contextlib
import numbers
import weakref
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
from deepspeed.module_inject import auto_ep_layer
from deepspeed.moe import ep_experts
from deepspeed.moe.ep_experts import GroupedExperts
from deepspeed.moe.ep_repack import repack_expert_weights
from deepspeed.runtime.zero import GatheredParameters
from torch import nn

from pad_moe.moe.store import magnitude_per_weight, mix_grouped
from pad_moe.pad.protocol import PadMaskMixin

# HF model_type -> the AutoEP preset that converts it exactly (checked at all-ones masks in tests/test_autoep.py).
AUTOEP_PRESETS = {"mixtral": "mixtral", "qwen2_moe": "qwen3_moe", "qwen3_moe": "qwen3_moe", "olmoe": "qwen3_moe",
                  "deepseek_v2": "deepseek_v2", "deepseek_v3": "deepseek_v3"}
# DeepSeek-V3's router bias e_score_correction_bias is copied by AutoEP onto its router as a buffer; with
# load_balance_coeff None (autoep_section) nothing updates it: PAD training keeps it (tests/test_hf_families.py).

# AutoEP's grouped weights and the glu FFN weight names the PAD mask machinery (granularities) knows them by.
GROUPED_TO_GLU = {"w1": "gate_proj.weight", "w3": "up_proj.weight", "w2": "down_proj.weight"}
STATIC_INITS = ("mean", "first")
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts")  # Mixtral's name first; Qwen-MoE / OLMoE use the second
SCALE_MODES = ("both", "static", "dynamic", "none", "unconstrained")


@dataclass(frozen=True)
class PadAutoEPOptions:
    granularity: str = "element"
    scale_mode: str = "both"
    static_init: str = "mean"  # W_s from the experts: their mean, or expert 0 (documented choice, see module doc)

    def __post_init__(self):
        if self.static_init not in STATIC_INITS:
            raise ValueError(f"static_init={self.static_init!r} is unknown; allowed: {', '.join(STATIC_INITS)}")
        if self.scale_mode not in SCALE_MODES:
            raise ValueError(f"scale_mode={self.scale_mode!r} is unknown; allowed: {', '.join(SCALE_MODES)}")


class PadGroupedExperts(GroupedExperts):
    """AutoEP's grouped experts computing with the owning layer's PAD-mixed weights (no parameters of its own added)."""

    def forward(self, x: torch.Tensor, num_tokens_per_expert: torch.Tensor) -> torch.Tensor:
        w1, w2, w3 = self._pad_owner().effective_expert_weights(self.w1, self.w2, self.w3)
        act = (self.activation, self.activation_alpha, self.activation_limit)
        if self.use_triton_grouped_mm:
            run = ep_experts._run_experts_triton_grouped_mm
        elif self.use_grouped_mm:
            run = (ep_experts._run_experts_grouped_mm_fused_gate_up if self.gate_up_impl == "fused"
                   else ep_experts._run_experts_grouped_mm)
        else:
            run = ep_experts._run_experts_for_loop
        return run(w1, w2, w3, x, num_tokens_per_expert, *act)


class PadAutoEPLayer(PadMaskMixin, auto_ep_layer.AutoEPMoELayer):
    """``AutoEPMoELayer`` with PAD experts; built by AutoEP inside ``pad_autoep_layers`` (options on the class)."""

    pad_options: ClassVar[PadAutoEPOptions] = PadAutoEPOptions()

    def __init__(self, spec, source_module: nn.Module, ep_size: int, ep_rank: int, config, deepep_scope=None):
        super().__init__(spec, source_module, ep_size, ep_rank, config, deepep_scope=deepep_scope)
        if spec.has_shared_experts and self.shared_experts is None:
            raise ValueError(f"{spec.moe_module_name}: shared experts announced but not found")
        options = self.pad_options
        self.experts.__class__ = PadGroupedExperts
        self.experts._pad_owner = weakref.ref(self)  # a plain reference, not a submodule (no cycle in the tree)
        full = repack_expert_weights(getattr(source_module, spec.experts_name), spec, ep_rank=0, ep_size=1)
        for grouped, weight in zip(("w1", "w2", "w3"), full):
            weight = weight.detach()
            init = weight.float().mean(0) if options.static_init == "mean" else weight[0].float()
            # Direct parameters of the layer: ZeRO-3 gathers them for the layer's forward, experts included.
            self.register_parameter(f"static_{grouped}", nn.Parameter(init.to(weight.dtype).contiguous()))
        shapes = {GROUPED_TO_GLU[g]: tuple(getattr(self, f"static_{g}").shape) for g in GROUPED_TO_GLU}
        self.init_pad(shapes, granularity=options.granularity, scale_mode=options.scale_mode)
        self.mask_sharing = "layer"

    @property
    def expert_group_name(self) -> str:  # layer-shared masks: magnitude scores are summed over this group
        return self.ep_group_name

    def static_weight(self, grouped: str) -> torch.Tensor:
        return getattr(self, f"static_{grouped}")

    def effective_expert_weights(self, w1, w2, w3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(w1, w2, w3) of the local experts mixed with the static weights under the current (or relaxed) masks."""
        lam_s, lam_d = self.scale_factors()  # λs = 0 once the static part is dropped (MoE-P)
        masks = self.weight_masks()
        mixed = mix_grouped({g: self.static_weight(g) for g in GROUPED_TO_GLU}, {"w1": w1, "w2": w2, "w3": w3},
                            {g: masks[GROUPED_TO_GLU[g]] for g in GROUPED_TO_GLU}, lam_s, lam_d)
        return mixed["w1"], mixed["w2"], mixed["w3"]

    def magnitude_scores(self) -> dict[str, torch.Tensor]:
        """|λd·W_k − λs·W_s| summed over this rank's experts (and each mask entry's weights), per mask. Under ZeRO-3
        the weights and φ are gathered for it (outside a forward they are empty placeholders); a collective, so every
        rank calls it, as IMP does."""
        params = [getattr(self.experts, g) for g in GROUPED_TO_GLU] + [self.static_weight(g) for g in GROUPED_TO_GLU]
        params += [self.phi] if self.phi is not None else []
        with GatheredParameters(params, modifier_rank=None), torch.no_grad():  # a no-op without ZeRO-3
            lam_s, lam_d = self.scale_factors()
            diff = magnitude_per_weight({g: self.static_weight(g) for g in GROUPED_TO_GLU},
                                        {g: getattr(self.experts, g) for g in GROUPED_TO_GLU}, lam_s, lam_d,
                                        per_expert=False)
            per_weight = {GROUPED_TO_GLU[g]: d for g, d in diff.items()}
            return self.granularity.reduce(per_weight, self._weight_shapes)


@contextlib.contextmanager
def pad_autoep_layers(options: PadAutoEPOptions | None = None) -> Iterator[type]:
    """Inside the block, AutoEP (``deepspeed.initialize`` with ``expert_parallel.enabled``) builds PAD layers."""
    options = options or PadAutoEPOptions()
    layer_class = type("PadAutoEPLayer", (PadAutoEPLayer,), {"pad_options": options})
    original = auto_ep_layer.AutoEPMoELayer
    auto_ep_layer.AutoEPMoELayer = layer_class
    try:
        with transformers_output_recorder_shim():
            yield layer_class
    finally:
        auto_ep_layer.AutoEPMoELayer = original


def autoep_section(model: nn.Module, ep_size: int) -> dict:
    """The DeepSpeed config's ``expert_parallel`` section for an HF MoE model of a family in ``AUTOEP_PRESETS``
    (no load-balancing bias: PAD keeps the checkpoint's router as it is); ValueError naming the family otherwise, or
    naming ``ep_size`` unless it is a whole number dividing the model's expert count."""
    family = getattr(getattr(model, "config", None), "model_type", None)
    if family not in AUTOEP_PRESETS:
        raise ValueError(f"model_type={family!r} is not an HF MoE family pad_moe converts through AutoEP; supported: "
                         f"{', '.join(AUTOEP_PRESETS)}")
    experts = next((n for n in (getattr(model.config, a, None) for a in EXPERT_COUNT_KEYS)
                    if isinstance(n, int) and not isinstance(n, bool) and n >= 1), None)
    if experts is None:
        raise ValueError(f"the {family} config gives no expert count ({' / '.join(EXPERT_COUNT_KEYS)}); AutoEP needs "
                         "it to split the experts")
    divisors = [d for d in range(1, experts + 1) if experts % d == 0]
    if not isinstance(ep_size, numbers.Integral) or isinstance(ep_size, bool) or ep_size not in divisors:
        raise ValueError(f"ep_size={ep_size!r} must be a whole number >= 1 dividing the model's {experts} experts; "
                         f"choose one of {', '.join(map(str, divisors))}")
    return {"enabled": True, "autoep_size": int(ep_size), "preset_model": AUTOEP_PRESETS[family],
            "load_balance_coeff": None}


def pad_autoep_modules(model: nn.Module) -> list[tuple[str, PadAutoEPLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PadAutoEPLayer)]


# -- transformers 5.24 ----------------------------------------------------------------------------------------------
class _KeyedRecordRegistry(dict):
    """transformers 5.24's ``_CanRecordRegistry`` (get(model), set by model) that also takes the class-name keys and
    the ``get(key, default)`` DeepSpeed 0.19.8's AutoEP uses (``auto_ep_presets/base.py``)."""

    _MISSING = object()

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key if isinstance(key, str) else str(key.__class__), value)

    def get(self, key, default=_MISSING):
        if isinstance(key, str):
            return dict.get(self, key, None if default is self._MISSING else default)
        found = dict.get(self, str(key.__class__))
        return found or ({} if default is self._MISSING else default)


@contextlib.contextmanager
def transformers_output_recorder_shim():
    """AutoEP retargets transformers' output recorders through a registry whose API transformers 5.24 changed
    (``TypeError: _CanRecordRegistry.get() takes 2 positional arguments but 3 were given``); for the block, the
    registry instance answers both APIs (same entries, same storage)."""
    try:
        from transformers.utils import output_capturing
    except ImportError:
        yield
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    original = type(registry)
    if not isinstance(registry, dict) or original is dict or original is _KeyedRecordRegistry:
        yield
        return
    registry.__class__ = type("_CanRecordRegistryCompat", (_KeyedRecordRegistry, original), {})  # ours first in the MRO
    try:
        yield
    finally:
        registry.__class__ = original
