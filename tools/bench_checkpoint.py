"""Cost of pad_moe's crash-safe checkpoint bookkeeping on a real checkpoint folder: writing the manifest (size + sha256
of every file, rank 0, once per save) and verifying it (every rank, once per --resume), against the folder's size.

    python tools/bench_checkpoint.py runs/<run>/checkpoints/step40 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

from pad_moe.train.checkpoints import MANIFEST, verify, write_manifest


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tag_dir", help="a checkpoint folder (RUN_DIR/checkpoints/stepN)")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    if not os.path.isfile(os.path.join(args.tag_dir, "mp_rank_00_model_states.pt")):
        p.error(f"{args.tag_dir} is not a DeepSpeed checkpoint folder (no mp_rank_00_model_states.pt)")
    with tempfile.TemporaryDirectory() as tmp:  # a copy: the run's own manifest is never rewritten
        copy = shutil.copytree(args.tag_dir, os.path.join(tmp, "step"))
        size = sum(os.path.getsize(os.path.join(copy, f)) for f in os.listdir(copy) if f != MANIFEST)
        write_s, verify_s = [], []
        for _ in range(args.rounds):
            t = time.perf_counter()
            write_manifest(copy, 0, 1)
            write_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            manifest, why = verify(copy)
            verify_s.append(time.perf_counter() - t)
            assert manifest is not None, why
    out = {"bytes": size, "write_manifest_s": statistics.median(write_s), "verify_s": statistics.median(verify_s),
           "MiB_per_s": size / 2**20 / statistics.median(write_s), "rounds": args.rounds}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
