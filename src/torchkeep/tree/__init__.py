"""State trees: flattening nested objects into named tensors plus a typed-JSON skeleton
(``flatten``), rebuilding them (``decode``), sparse and quantized tensors as parts plus a recipe
(``composite``), moving and casting what was loaded (``cast``), the random generators as one
Stateful object (``rng``) and recognising DTensors (``dtensor``).
"""

from torchkeep.tree.cast import cast_dtype, convert, convert_tree
from torchkeep.tree.composite import kept_dtype, parts_of, rebuild, stored_shape
from torchkeep.tree.decode import decode
from torchkeep.tree.dtensor import is_dtensor
from torchkeep.tree.flatten import (
    METADATA,
    STATEFUL,
    TENSOR,
    Flat,
    Stateful,
    dedupe,
    flatten,
    path_name,
)
from torchkeep.tree.rng import RNGState

__all__ = [
    "METADATA",
    "STATEFUL",
    "TENSOR",
    "Flat",
    "RNGState",
    "Stateful",
    "cast_dtype",
    "convert",
    "convert_tree",
    "decode",
    "dedupe",
    "flatten",
    "is_dtensor",
    "kept_dtype",
    "parts_of",
    "path_name",
    "rebuild",
    "stored_shape",
]
