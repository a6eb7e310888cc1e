"""Qwen3-Next: Qwen3-MoE's router over many small experts, a gated shared expert, and a hybrid of Gated DeltaNet
(linear attention) and full attention layers. The token mixers are the model's own (PAD touches only the routed
experts), so both kinds of layer import as they are; on CPU transformers runs the linear attention's reference
PyTorch kernels (slow, and it says so once)."""

from pad_moe.hfmoe.families.registry import FamilySpec, register_family

register_family(FamilySpec(
    "qwen3_next", "Qwen3-Next", "num_experts", routing="softmax over the experts, top-k (norm_topk_prob)",
    shared="shared_expert × σ(shared_expert_gate)", dense_layers="mlp_only_layers; decoder_sparse_step"))
