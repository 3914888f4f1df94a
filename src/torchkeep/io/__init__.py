"""The engine: parallel positional writes and reads straight from and into tensor memory.

It knows byte spans, checksums and threads; nothing about trees, manifests or models.
"""

from torchkeep.io.reader import ReadItem, read_tensors
from torchkeep.io.writer import WriteItem, write_tensors

__all__ = ["ReadItem", "WriteItem", "read_tensors", "write_tensors"]
