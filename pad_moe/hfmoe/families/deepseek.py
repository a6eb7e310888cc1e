"""DeepSeek-V2, DeepSeek-V3 (the architecture of Kimi-K2 and many 2025–26 MoEs) and GLM-4.5: fine-grained routed
experts, shared experts, group-limited top-k, ``routed_scaling_factor``, the first ``first_k_dense_replace`` layers
dense. V3 and GLM-4.5 score with a sigmoid and choose with ``scores + e_score_correction_bias`` (the router's bias
buffer, one entry per expert: kept by import, compress and drop)."""

from pad_moe.hfmoe.families.registry import FamilySpec, register_family

SHARED = "shared_experts (n_shared_experts × moe_intermediate_size)"
DENSE = "the first first_k_dense_replace"
V2_TOPK = ("greedy", "group_limited_greedy")


def _ungrouped(config, keep: int) -> dict:
    """Fewer experts than the source: the groups of the group-limited top-k no longer exist, so the copy routes over
    all its experts (n_group = topk_group = 1); with every expert kept the config stays the source's."""
    if keep == config.n_routed_experts:
        return {}
    return {"n_group": 1, "topk_group": 1}


def _sigmoid_grouped(config, keep: int) -> dict:
    if keep < 2 <= config.n_routed_experts:  # a group's score is the sum of its top-2 choice scores
        raise ValueError(f"{config.model_type} scores a group by its top-2 experts: --method drop must keep at least 2 "
                         f"experts per block (it would keep {keep}); raise --kappa")
    return _ungrouped(config, keep)


def _check_v2(config) -> None:
    method = getattr(config, "topk_method", "greedy")
    if method not in V2_TOPK:
        raise ValueError(f"deepseek_v2 with topk_method={method!r} is not supported (transformers' DeepSeek-V2 router "
                         f"implements {', '.join(V2_TOPK)})")


register_family(FamilySpec(
    "deepseek_v2", "DeepSeek-V2", "n_routed_experts", aux_loss=False,
    routing="softmax, top-k (greedy or group_limited_greedy), × routed_scaling_factor", shared=SHARED,
    dense_layers=DENSE, drop_config=_ungrouped, check=_check_v2))
register_family(FamilySpec(
    "deepseek_v3", "DeepSeek-V3 / Kimi-K2 architecture", "n_routed_experts",
    router_tensors=("weight", "e_score_correction_bias"), aux_loss=False,
    routing="sigmoid; top-k of score + e_score_correction_bias within the topk_group best of n_group groups; "
            "norm_topk_prob; × routed_scaling_factor", shared=SHARED, dense_layers=DENSE,
    drop_config=_sigmoid_grouped))
register_family(FamilySpec(
    "glm4_moe", "GLM-4.5 / GLM-4.5-Air", "n_routed_experts", router_tensors=("weight", "e_score_correction_bias"),
    aux_loss=False, routing="as DeepSeek-V3 (sigmoid + e_score_correction_bias, groups, routed_scaling_factor)",
    shared=SHARED, dense_layers=DENSE, drop_config=_sigmoid_grouped))
