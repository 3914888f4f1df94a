"""Reading what other tools wrote, running none of their code.

``unpickler`` is the restricted unpickler every pickle goes through, ``rebuild`` its stand-ins
for torch's tensor-rebuilding functions (``sparse_quantized`` those of sparse and quantized
tensors); ``torch_zip`` the one validated table of a ``torch.save`` zip archive, whole or inside
a DCP file; ``torch_save`` reads ``torch.save`` files (zip and pre-1.6 streams); ``dcp_metadata``
and ``dcp`` read torch.distributed.checkpoint directories; ``huggingface`` reads and writes
Hugging Face model directories; ``model_weights`` finds a model's weights in what was read;
``pickle_scan`` lists what a pickle would run.
"""

from torchkeep.legacy.dcp import is_dcp_dir, load_dcp
from torchkeep.legacy.huggingface import (
    MAX_INDEX_BYTES,
    WeightsFile,
    load_huggingface,
    weights_files,
    write_huggingface,
)
from torchkeep.legacy.model_weights import MODEL_KEYS, stored_weights, weight_names, weights_in
from torchkeep.legacy.pickle_scan import ScanReport, scan
from torchkeep.legacy.torch_save import (
    LEGACY_MAGIC,
    LEGACY_PROTOCOL,
    MAX_SCANNED_BYTES,
    READ_CHUNK,
    PendingLoad,
    load_pickle_file,
)
from torchkeep.legacy.torch_zip import carries_crcs

__all__ = [
    "LEGACY_MAGIC",
    "LEGACY_PROTOCOL",
    "MAX_INDEX_BYTES",
    "MAX_SCANNED_BYTES",
    "MODEL_KEYS",
    "READ_CHUNK",
    "PendingLoad",
    "ScanReport",
    "WeightsFile",
    "carries_crcs",
    "is_dcp_dir",
    "load_dcp",
    "load_huggingface",
    "load_pickle_file",
    "scan",
    "stored_weights",
    "weight_names",
    "weights_files",
    "weights_in",
    "write_huggingface",
]
