"""``python -m torchkeep.cli``: the command line (the demo starts its workers this way)."""

import sys

from torchkeep.cli import main

sys.exit(main())
