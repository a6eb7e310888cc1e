"""HF MoE families as plugins: one registered ``FamilySpec`` per transformers model type (``registry``), each with an
expert layout (``layouts``). Importing this package registers the built-in families; a new family is one module
calling ``register_family`` (``refuse_family``, ``registered``: ``registry``)."""

from pad_moe.hfmoe.families import classic, deepseek, gpt_oss, llama4, qwen3_next  # noqa: F401 - they register
from pad_moe.hfmoe.families.layouts import LAYOUTS, ExpertLayout, layout_named
from pad_moe.hfmoe.families.registry import FamilySpec, FamilyTable, family_spec, lookup, refusal, register_family

__all__ = ["LAYOUTS", "ExpertLayout", "FamilySpec", "FamilyTable", "family_spec", "layout_named", "lookup",
           "refusal", "register_family"]
