"""Hugging Face encoders and decoder LMs upcycled to static / MoE / PAD-MoE FFN blocks, their save format and the
offline MiniLM."""

from pad_moe.models.ffn_sites import SITE_KINDS, FFNSite, SiteKind, register_site_kind
from pad_moe.models.minilm import minilm_dir
from pad_moe.models.saving import global_expert_state_dict, load_upcycled, read_upcycled_meta, save_upcycled
from pad_moe.models.upcycle import (
    BLOCK_KWARGS,
    HF_ACTIVATIONS,
    UpcycledFFN,
    UpcycleInfo,
    aux_loss,
    expert_counts,
    find_ffn_sites,
    upcycle,
    upcycle_from_config,
    upcycle_info,
    upcycled_ffns,
)

__all__ = ["BLOCK_KWARGS", "FFNSite", "HF_ACTIVATIONS", "SITE_KINDS", "SiteKind", "UpcycleInfo", "UpcycledFFN",
           "aux_loss", "expert_counts", "find_ffn_sites", "global_expert_state_dict", "load_upcycled", "minilm_dir",
           "read_upcycled_meta", "register_site_kind", "save_upcycled", "upcycle", "upcycle_from_config", "upcycle_info",
           "upcycled_ffns"]
