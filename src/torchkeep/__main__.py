"""``python -m torchkeep``: the command line."""

import sys

from torchkeep.cli import main

sys.exit(main())
