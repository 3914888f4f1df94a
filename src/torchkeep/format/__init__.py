"""The on-disk contract: safetensors headers, the manifest, names and their validation.

This package is the only code that knows the layout of a file. A torchkeep file is a standard
safetensors file: an 8-byte little-endian header length, a JSON header, then the tensor bytes,
packed without gaps. The header's ``__metadata__`` entry ``torchkeep`` holds the manifest as JSON
text. A torchkeep directory holds ``manifest.json`` plus safetensors shards.

Everything read from a file is validated here before anything is allocated from it.
"""

from __future__ import annotations

from torchkeep.format.header import (
    DTYPE_NAMES,
    DTYPES,
    ITEMSIZES,
    Header,
    TensorEntry,
    dtype_name,
    encode_header,
    entry_if_valid,
    is_int,
    load_json,
    parse_header,
    parse_tensor_spec,
    read_header_length,
)
from torchkeep.format.manifest import (
    FileEntry,
    Manifest,
    body_checksum,
    check_against_header,
    manifest_from_json,
    manifest_to_json,
    signed_manifest_text,
)
from torchkeep.format.names import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_CHUNK,
    DISTRIBUTED_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER_ALIGN,
    MANIFEST_FILE,
    MANIFEST_KEY,
    MAX_HEADER_BYTES,
    MAX_MANIFEST_BYTES,
    MAX_RANK,
    PICKLE_SUFFIXES,
    SAVE_ID,
    SHARD_NAME,
    check_member_name,
    check_target_name,
    is_single_file,
    pickle_kind,
)
from torchkeep.format.sections import (
    MAX_GRID_CELLS,
    MAX_TREE_DEPTH,
    Chunk,
    Sharded,
    check_tree,
    model_section_problem,
    parse_distributed,
)

__all__ = [
    "CHECKSUM_ALGORITHM",
    "CHECKSUM_CHUNK",
    "DISTRIBUTED_FORMAT_VERSION",
    "DTYPES",
    "DTYPE_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "HEADER_ALIGN",
    "ITEMSIZES",
    "MANIFEST_FILE",
    "MANIFEST_KEY",
    "MAX_GRID_CELLS",
    "MAX_HEADER_BYTES",
    "MAX_MANIFEST_BYTES",
    "MAX_RANK",
    "MAX_TREE_DEPTH",
    "PICKLE_SUFFIXES",
    "SAVE_ID",
    "SHARD_NAME",
    "Chunk",
    "FileEntry",
    "Header",
    "Manifest",
    "Sharded",
    "TensorEntry",
    "body_checksum",
    "check_against_header",
    "check_member_name",
    "check_target_name",
    "check_tree",
    "dtype_name",
    "encode_header",
    "entry_if_valid",
    "is_int",
    "is_single_file",
    "load_json",
    "manifest_from_json",
    "manifest_to_json",
    "model_section_problem",
    "parse_distributed",
    "parse_header",
    "parse_tensor_spec",
    "pickle_kind",
    "read_header_length",
    "signed_manifest_text",
]
