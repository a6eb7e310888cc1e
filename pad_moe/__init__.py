"""pad_moe: partially dynamic Mixture-of-Experts (PAD-Net) on DeepSpeed."""

from pad_moe.moe.layer import DenseFFNBlock, MoEFFN, PadMoE, build_ffn_block, ffn_block_from_dense
from pad_moe.pad.mixing import pad_mix, scale_factors_from_phi
from pad_moe.pad.protocol import PadMaskMixin, PadModule, pad_modules
from pad_moe.models import aux_loss, expert_counts, load_upcycled, save_upcycled, upcycle

__all__ = ["DenseFFNBlock", "MoEFFN", "PadMoE", "build_ffn_block", "ffn_block_from_dense", "pad_mix",
           "scale_factors_from_phi", "PadMaskMixin", "PadModule", "pad_modules", "upcycle", "aux_loss",
           "expert_counts", "save_upcycled", "load_upcycled"]
__version__ = "0.1.0"
