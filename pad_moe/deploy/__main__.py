"""``python -m pad_moe.deploy count|export|consolidate|reshard ...`` (the same as ``padmoe COMMAND ...``)."""

import sys

from pad_moe.cli import main
from pad_moe.deploy import COMMANDS

if __name__ == "__main__":
    sys.exit(main(registrations=COMMANDS))
