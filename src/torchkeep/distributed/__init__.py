"""torch.distributed: state sharded as DTensors, saved by every rank at once, loaded resharded.

A distributed save is a directory save whose manifest has a ``distributed`` section: for each
sharded tensor its dtype, global shape and chunks, each chunk an ordinary stored tensor named
``<name>@<offsets>`` in the file of the rank that wrote it (``shard-<rank>-<save id>``). A chunk
replicated over several ranks is written once, by the first of them; plain tensors and values
are written by rank 0.

Saving: rank 0 prepares the staging directory (on a file system every rank sees) and broadcasts
it; every rank writes its file; rank 0 gathers each rank's outcome and commits the manifest only
if all succeeded, then broadcasts the result, so that every rank returns or raises alike.

Loading: each rank reads only the chunks that overlap its own part of each destination DTensor
(a chunk is read whole, so that its checksum is verified), straight into the destination where
the chunk is exactly its part. Without destinations, or without a process group, sharded tensors
come back whole.

``group`` is this process as a rank (the collectives, the failures that cross ranks), ``saving``
the save in its named phases, ``loading`` the resharded reads and the placement of an optimizer's
state.
"""

from torchkeep.distributed.group import Box, active, agree, local_box
from torchkeep.distributed.loading import (
    fill_local,
    fill_module,
    place_optimizer_state,
    plan_optimizer,
    read_sharded,
)
from torchkeep.distributed.saving import holds_dtensor, save
from torchkeep.distributed.sharing import ShardedInfo, Sharing

__all__ = [
    "Box",
    "ShardedInfo",
    "Sharing",
    "active",
    "agree",
    "fill_local",
    "fill_module",
    "holds_dtensor",
    "local_box",
    "place_optimizer_state",
    "plan_optimizer",
    "read_sharded",
    "save",
]
