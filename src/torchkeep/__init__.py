"""torchkeep: save and load PyTorch models and training state, safely, atomically, verified.

Example:
    ```python
    import torchkeep as tk
    tk.save_weights(model, "model.safetensors")
    tk.load_weights(model, "model.safetensors")
    ```
"""

from torchkeep._version import __version__
from torchkeep.checkpoint import Checkpoint, load, load_checkpoint, save, save_checkpoint
from torchkeep.container import SaveInfo
from torchkeep.convert import convert
from torchkeep.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
    MissingDependencyError,
    StateMismatchError,
    StorageError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.inspect import (
    Change,
    Description,
    Diff,
    TensorInfo,
    VerifyReport,
    describe,
    diff,
    verify,
)
from torchkeep.legacy import ScanReport, scan
from torchkeep.manager import CheckpointManager
from torchkeep.model import capture, load_model, save_model
from torchkeep.retention import Policy, Record
from torchkeep.sampler import ResumableSampler
from torchkeep.tree import RNGState, Stateful
from torchkeep.weights import LoadResult, load_state_dict, load_weights, save_weights

__all__ = [
    "Change",
    "Checkpoint",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CorruptCheckpointError",
    "Description",
    "Diff",
    "IncompleteCheckpointError",
    "LoadResult",
    "MissingDependencyError",
    "Policy",
    "RNGState",
    "Record",
    "ResumableSampler",
    "SaveInfo",
    "ScanReport",
    "StateMismatchError",
    "Stateful",
    "StorageError",
    "TensorInfo",
    "TorchkeepError",
    "UnsafeFileError",
    "UnsupportedFormatError",
    "UnsupportedObjectError",
    "VerifyReport",
    "__version__",
    "capture",
    "convert",
    "describe",
    "diff",
    "load",
    "load_checkpoint",
    "load_model",
    "load_state_dict",
    "load_weights",
    "save",
    "save_checkpoint",
    "save_model",
    "save_weights",
    "scan",
    "verify",
]
