"""Llama 4, text model (``llama4_text``, ``Llama4ForCausalLM``): top-k of the router logits, the picked expert's input
scaled by σ(logit) (every expert runs on every token's copy, an unpicked one on zeros), a shared expert, MoE layers
every ``interleave_moe_layer_step`` (``moe_layers``). The multimodal checkpoint (``llama4``: vision encoder and
projector around the text model) is refused."""

from pad_moe.hfmoe.families.registry import FamilySpec, refuse_family, register_family

register_family(FamilySpec(
    "llama4_text", "Llama 4 (text)", "num_local_experts", router="router", layout="llama4", aux_loss=False,
    routing="top-k of the logits, σ(logit) scales the expert's input", shared="shared_expert",
    dense_layers="those not in moe_layers (interleave_moe_layer_step)"))
refuse_family("llama4", "Llama 4 with its vision encoder is not an MoE family pad_moe imports; it imports the text "
              "model: save Llama4ForCausalLM (model_type llama4_text, the checkpoint's text_config and language_model "
              "weights) and pass that folder")
