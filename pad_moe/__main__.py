import sys

from pad_moe.cli import main

sys.exit(main())
