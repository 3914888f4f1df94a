"""Any training state: ``save``/``load`` (``state``), restoring into existing objects
(``restore``), and the general checkpoint of the tutorials (``general``)."""

from torchkeep.checkpoint.general import Checkpoint, load_checkpoint, save_checkpoint
from torchkeep.checkpoint.state import check_metadata, load, load_from, save

__all__ = [
    "Checkpoint",
    "check_metadata",
    "load",
    "load_checkpoint",
    "load_from",
    "save",
    "save_checkpoint",
]
