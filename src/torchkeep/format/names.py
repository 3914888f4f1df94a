"""Every on-disk name and constant of the format: its name and version, the manifest's file and
key, shard names, the checksum's parameters and limits, pickle suffixes and the recognition of
pickles, and the checks of target and member names.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError

FORMAT_NAME = "torchkeep"
FORMAT_VERSION = 4
# A save is written as the lowest version that holds it, so that older torchkeeps read what they
# can and refuse the rest by its version. Version 2 added the "distributed" section (tensors
# sharded across the ranks of a distributed save); version 3 the version records of state dicts
# in the tree (Tag.METADATA), sparse and quantized tensors (Tag.SPARSE, Tag.QUANTIZED), complex
# tensors of dtypes safetensors has no name for (Tag.COMPLEX) and the dtypes of
# header.VERSION_3_DTYPES; version 4 the "shared" section (shards of an earlier save that an
# incremental save holds as they are, for the tensors that did not change).
DISTRIBUTED_FORMAT_VERSION = 2
EXTENDED_FORMAT_VERSION = 3
SHARED_FORMAT_VERSION = 4
MANIFEST_KEY = "torchkeep"
MANIFEST_FILE = "manifest.json"
# The one file in the directory the Lightning plugin saves a checkpoint as (its path is the
# directory, as Lightning names it: ``epoch=1-step=100.ckpt``).
LIGHTNING_CHECKPOINT_FILE = "checkpoint.safetensors"
CHECKSUM_ALGORITHM = "xxh3_64"
# Tensors larger than this are hashed in pieces (in parallel); their checksum is the hash of the
# pieces' digests. Recorded in every manifest, so a reader never guesses it.
CHECKSUM_CHUNK = 16 << 20
HEADER_ALIGN = 64
MAX_HEADER_BYTES = 100 << 20
MAX_RANK = 64
SAVE_ID = re.compile(r"[0-9a-f]{32}")
MAX_MANIFEST_BYTES = 256 << 20
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")

# A whole model (tk.save_model): the manifest's kind, and the member file holding the model
# exported by torch.export.
MODEL_KIND = "model"
PROGRAM_FILE = "program.pt2"

# Other writers' names, by which their directories are recognised.
DCP_METADATA_FILE = ".metadata"  # torch.distributed.checkpoint's commit marker
HF_SAFETENSORS_INDEX = "model.safetensors.index.json"
HF_INDEX_FILES = (HF_SAFETENSORS_INDEX, "pytorch_model.bin.index.json")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_CONFIG_FILE = "config.json"
HF_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors|pytorch_model-\d{5}-of-\d{5}\.bin")

# Opcodes a pickle of protocol 0 or 1 (no PROTO opcode) starts with: GLOBAL, MARK, the empty
# containers, None and the scalars.
_OLD_PICKLE_STARTS = b"c(}]).NILFSVXKJMUTG"


def pickle_kind(head: bytes) -> str | None:
    """Return ``"zip"`` or ``"torch-legacy"`` for the first bytes of a ``torch.save`` file or
    another pickle, None for anything else (a safetensors file's header starts with ``{`` at
    byte 8)."""
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] and head[:1] in b"\x80" + _OLD_PICKLE_STARTS and head[8:9] != b"{":
        return "torch-legacy"
    return None


def check_member_name(name: Any, *, where: str) -> str:
    """Return ``name`` if it is a plain file name inside a checkpoint directory, else raise."""
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or "\\" in name
        or name in (".", "..")
        or "\x00" in name
    ):
        raise CorruptCheckpointError(
            f"{where}: the manifest names a file {name!r} outside the checkpoint directory; "
            "refusing to read it"
        )
    return name


def check_target_name(path: str) -> None:
    """Refuse targets named like pickle files (users migrating from torch.save type them)."""
    lowered = path.lower().rstrip("/")
    for suffix in PICKLE_SUFFIXES:
        if lowered.endswith(suffix):
            suggestion = path.rstrip("/")[: -len(suffix)] + ".safetensors"
            raise UnsupportedFormatError(
                f"{path}: torchkeep writes safetensors, never pickle; name the file "
                f"'{suggestion}' (or give a directory path without a suffix)"
            )


# The data files of a directory save: "shard-00000.safetensors", or with the save's id where
# the save was built in place (object stores) or by the ranks of a distributed save.
SHARD_NAME = re.compile(r"shard-\d{5}(-[0-9a-f]{12})?\.safetensors")
# The one metadata entry of a shard's header: the id of the save it belongs to.
SHARD_SAVE_KEY = "torchkeep_save"


def shard_name(index: int, save_id: str = "") -> str:
    """The name of a directory save's data file ``index`` (a rank's, in a distributed save),
    tagged with the save's id when given."""
    tag = f"-{save_id[:12]}" if save_id else ""
    return f"shard-{index:05d}{tag}.safetensors"


def hf_shard_name(index: int, count: int) -> str:
    """The name transformers gives shard ``index`` (from 0) of ``count`` in a sharded safetensors
    directory: ``model-00001-of-00003.safetensors``."""
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def chunk_name(name: str, offsets: Iterable[int]) -> str:
    """The stored name of the chunk of sharded tensor ``name`` that starts at ``offsets``."""
    return f"{name}@{','.join(map(str, offsets))}"


def is_single_file(path: str) -> bool:
    """Return whether ``path`` names one safetensors file (else it names a directory)."""
    return path.lower().endswith(".safetensors")
