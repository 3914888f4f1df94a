"""``python -m torchkeep``: the command line."""

from torchkeep.cli import _run

_run()
