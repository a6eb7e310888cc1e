"""``python -m pad_moe.data [--cache-dir DIR] [--archive PATH]``: fetch (or install) the offline VADER corpora now."""

import sys

from pad_moe.data.vader import main

sys.exit(main())
