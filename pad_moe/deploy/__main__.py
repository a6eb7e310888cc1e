"""``python -m pad_moe.deploy count|export|consolidate|reshard ...`` (the same as ``padmoe COMMAND ...``)."""

import os
import sys

from pad_moe.deploy import MAINS


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not argv or argv[0] not in MAINS:
        print(f"usage: python -m pad_moe.deploy {{{','.join(MAINS)}}} ...", file=sys.stderr)
        return 2
    return MAINS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
