"""The exceptions torchkeep raises.

Every error derives from ``TorchkeepError``; where a builtin describes the same failure, the error
also derives from it, so ``except FileNotFoundError`` and ``except OSError`` keep working::

    TorchkeepError
    ├── CheckpointNotFoundError      (also FileNotFoundError)
    ├── IncompleteCheckpointError    a save that never committed
    ├── CorruptCheckpointError       checksums, sizes or headers that do not add up
    ├── UnsupportedFormatError       a file or target torchkeep does not read or write
    ├── UnsafeFileError              a file that would run code if loaded
    ├── UnsupportedObjectError       (also TypeError) a value torchkeep cannot store
    ├── StateMismatchError           keys or shapes that do not fit the destination
    ├── StorageError                 (also OSError) the disk or store failed
    └── MissingDependencyError       (also ImportError) an optional extra is not installed
"""

from __future__ import annotations


class TorchkeepError(Exception):
    """Base class of every error torchkeep raises."""


class CheckpointNotFoundError(TorchkeepError, FileNotFoundError):
    """The path holds no checkpoint."""


class IncompleteCheckpointError(TorchkeepError):
    """The path holds a save that never committed (no manifest was written)."""


class CorruptCheckpointError(TorchkeepError):
    """The data does not match its manifest: a flipped bit, a truncation, a malformed header."""


class UnsupportedFormatError(TorchkeepError):
    """The file or target is of a format torchkeep does not read or write."""


class UnsafeFileError(TorchkeepError):
    """Loading the file would import or call code."""


class UnsupportedObjectError(TorchkeepError, TypeError):
    """A value in the object to save has no safe representation."""


class StateMismatchError(TorchkeepError):
    """The saved state does not fit the destination: missing, unexpected or mis-shaped keys."""


class StorageError(TorchkeepError, OSError):
    """Reading from or writing to storage failed."""


class MissingDependencyError(TorchkeepError, ImportError):
    """An optional dependency is needed and not installed."""
