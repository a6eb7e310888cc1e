"""gpt-oss: a router with a bias, experts with biases, gate and up interleaved in an (E, H, 2F) layout, the clamped
SwiGLU (``swiglu_alpha``, ``swiglu_limit``); every layer sparse."""

from pad_moe.hfmoe.families.registry import FamilySpec, register_family

register_family(FamilySpec(
    "gpt_oss", "gpt-oss", "num_local_experts", router="router", router_tensors=("weight", "bias"), layout="gpt_oss",
    routing="top-k of the logits (router bias), softmax over those k"))
