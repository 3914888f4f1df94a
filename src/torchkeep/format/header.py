"""safetensors headers: the dtype table, encoding a header, and parsing one back with every
field validated before anything is allocated from it; strict JSON.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.errors import (
    CorruptCheckpointError,
    UnsupportedFormatError,
    UnsupportedObjectError,
)
from torchkeep.format.names import HEADER_ALIGN, MAX_HEADER_BYTES, MAX_RANK, pickle_kind

DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.uint16: "U16",
    torch.uint32: "U32",
    torch.uint64: "U64",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.complex64: "C64",
}
# Dtypes of later torch versions than the oldest supported, by their torch and safetensors names.
_LATER_DTYPES = {"float8_e8m0fnu": "F8_E8M0", "float4_e2m1fn_x2": "F4"}
DTYPE_NAMES.update(
    (getattr(torch, attribute), name)
    for attribute, name in _LATER_DTYPES.items()
    if isinstance(getattr(torch, attribute, None), torch.dtype)
)
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}
ITEMSIZES: dict[str, int] = {
    name: dtype.itemsize for dtype, name in DTYPE_NAMES.items()
}
# The dtypes that format version 3 added (a save holding one is written as version 3).
VERSION_3_DTYPES = frozenset({"F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64", *_LATER_DTYPES.values()})
# Sub-byte dtypes: the header counts their elements, torch packs this many into one item of
# the last dimension (F4 is torch's float4_e2m1fn_x2, two values to a byte).
PACKED: dict[str, int] = {"F4": 2} if "F4" in DTYPES else {}
# safetensors dtypes that torch has no dtype for: files holding them are valid, but unreadable.
WITHOUT_TORCH_DTYPE = frozenset({"F6_E2M3", "F6_E3M2", *_LATER_DTYPES.values()}) - set(DTYPES)


def file_shape(dtype: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a header records for a tensor of torch shape ``shape``: a packed dtype counts
    its elements, not torch's items, along the last dimension."""
    per_item = PACKED.get(dtype)
    if per_item is None or not shape:
        return shape
    return (*shape[:-1], shape[-1] * per_item)


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file (a shard name, or None for the file itself), dtype, shape,
    byte span relative to the file's data section, and checksum (None in foreign files)."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int
    checksum: str | None = None
    file: str | None = None

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


def dtype_name(
    dtype: torch.dtype, *, where: str, shape: tuple[int, ...] | None = None
) -> str:
    """Return the safetensors name of ``dtype``, or raise naming ``where`` it was found (also
    for a tensor of ``shape`` that its safetensors dtype cannot describe)."""
    name = DTYPE_NAMES.get(dtype)
    if name is not None:
        if name in PACKED and shape == ():
            raise UnsupportedObjectError(
                f"{where}: a 0-dimensional {str(dtype).removeprefix('torch.')} tensor; "
                f"safetensors' {name} counts values along the last dimension, which this "
                "tensor lacks: store t.reshape(1)"
            )
        return name
    torch_name = str(dtype).removeprefix("torch.")
    advice = (
        f"store torch.view_as_real(t) ({str(dtype.to_real()).removeprefix('torch.')} pairs in "
        "a last dimension of 2) and rebuild it with torch.view_as_complex"
        if dtype.is_complex
        else "convert it to one of: "
        + ", ".join(str(d).removeprefix("torch.") for d in DTYPE_NAMES)
    )
    raise UnsupportedObjectError(
        f"{where}: torchkeep does not store tensors of dtype {torch_name}: safetensors has no "
        f"name for it; {advice}"
    )


def encode_header(
    tensors: Mapping[str, TensorEntry], metadata: Mapping[str, str]
) -> bytes:
    """Return the 8-byte length prefix and the JSON header, padded so the data is aligned."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, entry in tensors.items():
        header[name] = {
            "dtype": entry.dtype,
            "shape": list(file_shape(entry.dtype, entry.shape)),
            "data_offsets": [entry.begin, entry.end],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = -(-(8 + len(text)) // HEADER_ALIGN) * HEADER_ALIGN - 8
    text += b" " * (padded - len(text))
    return struct.pack("<Q", len(text)) + text


def read_header_length(prefix: bytes, *, file_size: int, where: str) -> int:
    """Validate the 8-byte length prefix against the file's size and the cap; return it."""
    if file_size < 8 or len(prefix) < 8:
        raise CorruptCheckpointError(
            f"{where}: the file is {file_size} bytes, too short to be a safetensors file; "
            "it was truncated or is not a checkpoint"
        )
    if pickle_kind(prefix) is not None:
        raise UnsupportedFormatError(
            f"{where}: this is a torch.save (pickle) file, not a safetensors file; "
            "inspect it with `torchkeep scan` before loading it"
        )
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES:
        raise CorruptCheckpointError(
            f"{where}: the header claims {length} bytes, over the {MAX_HEADER_BYTES}-byte limit; "
            "the file is corrupt or not a safetensors file"
        )
    if 8 + length > file_size:
        raise CorruptCheckpointError(
            f"{where}: the header claims {length} bytes but the file has only {file_size - 8} "
            "after the length prefix; the file was truncated"
        )
    return int(length)


def parse_header(raw: bytes, *, file_size: int, where: str) -> Header:
    """Parse and validate a safetensors header (``raw`` is the JSON text after the prefix).

    Checks: UTF-8, JSON without duplicate keys, a closed dtype list, shapes of non-negative
    integers, ``shape × itemsize == span``, spans contiguous from zero with no gap, overlap or
    trailing byte, and string-only metadata.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptCheckpointError(
            f"{where}: the header is not valid UTF-8 ({e})"
        ) from e
    obj = load_json(text, where=f"{where}: header")
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{where}: the header is not a JSON object")
    metadata_obj = obj.pop("__metadata__", {})
    if not isinstance(metadata_obj, dict) or not all(
        isinstance(v, str) for v in metadata_obj.values()
    ):
        raise CorruptCheckpointError(
            f"{where}: __metadata__ must map strings to strings, as safetensors requires"
        )
    tensors: dict[str, TensorEntry] = {}
    for name, spec in obj.items():
        tensors[name] = parse_tensor_spec(name, spec, where=where)
    data_size = file_size - 8 - len(raw)
    _check_spans(tensors, data_size, where=where)
    return Header(tensors=tensors, metadata=dict(metadata_obj), data_start=8 + len(raw))


def entry_if_valid(
    dtype: Any,
    shape: Any,
    offsets: Any,
    checksum: str | None = None,
    file: str | None = None,
) -> TensorEntry | None:
    """The entry, when every field is plainly valid; None for anything the full checks in
    ``parse_tensor_spec`` must look at (and explain). One pass, for headers of many tensors."""
    if type(dtype) is not str or type(shape) is not list or type(offsets) is not list:
        return None
    itemsize = ITEMSIZES.get(dtype)
    if itemsize is None or dtype in PACKED or len(offsets) != 2 or len(shape) > MAX_RANK:
        return None
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        return None
    nonzero = itemsize
    for d in shape:
        if type(d) is not int or d < 0:
            return None
        if d:
            nonzero *= d
    if (
        nonzero >= 2**63
        or (0 in shape and begin != end)
        or (0 not in shape and nonzero != end - begin)
    ):
        return None
    return TensorEntry(dtype, tuple(shape), begin, end, checksum, file)


def parse_tensor_spec(name: str, spec: Any, *, where: str) -> TensorEntry:
    """Validate one tensor's header entry; its shape comes back as torch's (``file_shape`` is
    the inverse). A well-formed entry of a dtype torch or torchkeep cannot hold is an
    ``UnsupportedFormatError``, anything malformed a ``CorruptCheckpointError``."""
    if type(spec) is dict and len(spec) == 3:
        entry = entry_if_valid(
            spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        )
        if entry is not None:
            return entry
    at = f"{where}: tensor '{name}'"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError(
            f"{at}: expected exactly dtype, shape and data_offsets"
        )
    dtype = spec["dtype"]
    if not isinstance(dtype, str) or not dtype or len(dtype) > _MAX_DTYPE_NAME:
        raise CorruptCheckpointError(f"{at}: the dtype {dtype!r:.80} is not a dtype name")
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise CorruptCheckpointError(
            f"{at}: shape must be a list of at most {MAX_RANK} dims"
        )
    if not all(is_int(d) and d >= 0 for d in shape):
        raise CorruptCheckpointError(
            f"{at}: shape {shape} must hold non-negative integers"
        )
    offsets = spec["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptCheckpointError(
            f"{at}: data_offsets {offsets} must be [begin, end], begin<=end"
        )
    if dtype not in ITEMSIZES:
        raise UnsupportedFormatError(f"{at} has dtype {dtype!r}, {_unknown_dtype(dtype)}")
    torch_shape = _torch_shape(dtype, shape, at=at)
    if math.prod(d for d in torch_shape if d) * ITEMSIZES[dtype] >= 2**63:
        raise CorruptCheckpointError(
            f"{at}: shape {shape} is larger than any tensor can be"
        )
    # Python integers do not overflow: the product is exact, and compared before any allocation.
    nbytes = math.prod(torch_shape) * ITEMSIZES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise CorruptCheckpointError(
            f"{at}: shape {shape} of {dtype} needs {nbytes} bytes but its span holds "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorEntry(
        dtype=dtype, shape=torch_shape, begin=offsets[0], end=offsets[1]
    )


_MAX_DTYPE_NAME = 64


def _unknown_dtype(dtype: str) -> str:
    known = ", ".join(sorted(ITEMSIZES))
    if dtype in WITHOUT_TORCH_DTYPE:
        why = f"a safetensors dtype that this torch ({torch.__version__}) has no dtype for"
    else:
        why = "which is not a safetensors dtype that torchkeep knows"
    return (
        f"{why}; torchkeep reads {known}. Read the file with the library that wrote it and "
        "convert the tensor to one of those"
    )


def _torch_shape(dtype: str, shape: list[int], *, at: str) -> tuple[int, ...]:
    per_item = PACKED.get(dtype)
    if per_item is None:
        return tuple(shape)
    if math.prod(shape) % per_item:
        raise CorruptCheckpointError(
            f"{at}: {math.prod(shape)} values of {dtype} do not fill whole bytes; the header "
            "is corrupt"
        )
    if shape[-1] % per_item:
        raise UnsupportedFormatError(
            f"{at}: a {dtype} tensor of shape {shape}, which torch cannot hold: its "
            f"{DTYPES[dtype]} packs {per_item} values into each item of the last dimension, "
            f"so that dimension must be a multiple of {per_item}"
        )
    return (*shape[:-1], shape[-1] // per_item)


def _check_spans(
    tensors: Mapping[str, TensorEntry], data_size: int, *, where: str
) -> None:
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != position:
            problem = (
                "overlaps the previous one"
                if entry.begin < position
                else "leaves a gap"
            )
            raise CorruptCheckpointError(
                f"{where}: tensor '{name}' starts at {entry.begin} and {problem} "
                f"(expected {position}); the header is corrupt"
            )
        position = entry.end
    if position != data_size:
        if position > data_size:
            raise CorruptCheckpointError(
                f"{where}: the tensors need {position} bytes of data but the file holds "
                f"{data_size}; the file was truncated"
            )
        raise CorruptCheckpointError(
            f"{where}: {data_size - position} byte(s) follow the last tensor; the file is corrupt "
            "or was written by two saves at once"
        )


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_json(text: str, *, where: str) -> Any:
    """Parse JSON, rejecting duplicate keys, non-finite literals and excessive nesting."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise CorruptCheckpointError(f"{where}: duplicate key {key!r}")
                seen.add(key)
        return result

    def no_constant(name: str) -> Any:
        raise CorruptCheckpointError(f"{where}: invalid JSON constant {name}")

    try:
        return json.loads(
            text, object_pairs_hook=no_duplicates, parse_constant=no_constant
        )
    except RecursionError as e:
        raise CorruptCheckpointError(f"{where}: JSON nested too deeply") from e
    except (
        ValueError
    ) as e:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise CorruptCheckpointError(f"{where}: invalid JSON ({e})") from e
