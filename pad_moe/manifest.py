"""Size-and-sha256 manifests of a folder's files (no heavy imports): a training checkpoint
(``pad_moe.train.checkpoints``) and a compact HF MoE export (``pad_moe.hfmoe.deployed``) are verified against theirs
before anything in them is loaded."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Optional

MANIFEST = "pad_moe_manifest.json"
FORMAT_VERSION = 1


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_entries(folder: str) -> dict[str, dict]:
    """name -> {"bytes", "sha256"} of every plain file in ``folder`` but the manifest and temporary (``.tmp``) files."""
    files = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name != MANIFEST and os.path.isfile(path) and ".tmp" not in name:
            files[name] = {"bytes": os.path.getsize(path), "sha256": sha256_of(path)}
    return files


def check_files(folder: str, files) -> str:
    """"" when every file of ``files`` (a manifest's ``files``) is in ``folder`` with its size and checksum; else why
    not, in a few words."""
    if not isinstance(files, dict) or not files:
        return "its manifest lists no files"
    for name, meta in sorted(files.items()):
        if not isinstance(name, str) or os.path.basename(name) != name or name in ("", ".", ".."):
            return f"its manifest names {name!r}, not a file of the folder"
        if not isinstance(meta, dict):
            return f"its manifest entry of {name} is not a size and a checksum"
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) != meta.get("bytes"):
            return f"{name} has {os.path.getsize(file)} bytes, the manifest says {meta.get('bytes')}"
        if sha256_of(file) != meta.get("sha256"):
            return f"{name} does not match its checksum"
    return ""


def write_manifest(folder: str, **fields) -> None:
    """Write ``folder``'s manifest (``fields`` first, then every file's size and sha256), atomically: call it once
    every other file of the folder is written."""
    manifest = {"format_version": FORMAT_VERSION, **fields, "files": file_entries(folder)}
    path = os.path.join(folder, MANIFEST)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def verify_folder(folder: str) -> tuple[Optional[dict], str]:
    """(the manifest's files, "") for a folder whose files all match its manifest; (None, why) otherwise."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None, f"it has no {MANIFEST}"
    try:
        with open(path) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"its manifest is unreadable ({type(err).__name__})"
    why = check_files(folder, files)
    return (None, why) if why else (files, "")
