"""The softmax-routed families pad_moe imported first: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE."""

from pad_moe.hfmoe.families.registry import FamilySpec, register_family

SOFTMAX = "softmax over the experts, top-k"

register_family(FamilySpec("mixtral", "Mixtral", "num_local_experts", routing=f"{SOFTMAX}, renormalised"))
register_family(FamilySpec("qwen2_moe", "Qwen2-MoE / Qwen1.5-MoE", "num_experts",
                           routing=f"{SOFTMAX} (norm_topk_prob)", shared="shared_expert × σ(shared_expert_gate)",
                           dense_layers="mlp_only_layers; decoder_sparse_step"))
register_family(FamilySpec("qwen3_moe", "Qwen3-MoE", "num_experts", routing=f"{SOFTMAX} (norm_topk_prob)",
                           dense_layers="mlp_only_layers; decoder_sparse_step"))
register_family(FamilySpec("olmoe", "OLMoE", "num_experts", routing=f"{SOFTMAX} (norm_topk_prob)"))
