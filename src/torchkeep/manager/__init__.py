"""The training-loop manager: one checkpoint directory per step, retention, async saves and
preemption.

A root holds ``step_000001000/`` directories, each a torchkeep directory save committed by its
manifest (written last, the directory then renamed into place). The manager lists only
committed steps, deletes old ones only after a newer one is durable (and never the newest, nor
one being written), and on opening removes the temporary directories a crash left behind. The
step, its time and its metrics are kept in each step's manifest, so retention by best metric
survives restarts.

``core`` holds the ``CheckpointManager`` facade; ``steps`` the step directories (names,
listing, the writer lock, deletion through the storage); ``records`` what each step's manifest
keeps for the manager (step, time, metrics); ``background`` the asynchronous saves (one in
flight); ``preemption`` the signal handling.
"""

from torchkeep.manager.background import BACKGROUND_NICE
from torchkeep.manager.core import CheckpointManager
from torchkeep.manager.records import METADATA_KEY
from torchkeep.manager.steps import LOCK_FILE, STEP_DIGITS

__all__ = [
    "BACKGROUND_NICE",
    "LOCK_FILE",
    "METADATA_KEY",
    "STEP_DIGITS",
    "CheckpointManager",
]
