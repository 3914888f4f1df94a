"""The on-disk contract: safetensors headers, the manifest, names and their validation.

This is the only module that knows the layout of a file. A torchkeep file is a standard
safetensors file: an 8-byte little-endian header length, a JSON header, then the tensor bytes,
packed without gaps. The header's ``__metadata__`` entry ``torchkeep`` holds the manifest as JSON
text. A torchkeep directory holds ``manifest.json`` plus safetensors shards.

Everything read from a file is validated here before anything is allocated from it.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import json
import math
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchkeep import _version
from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError

FORMAT_NAME = "torchkeep"
FORMAT_VERSION = 2
# Version 2 added the "distributed" section (tensors sharded across the ranks of a distributed
# save); a save without one is written as version 1, readable by every torchkeep.
DISTRIBUTED_FORMAT_VERSION = 2
MANIFEST_KEY = "torchkeep"
MANIFEST_FILE = "manifest.json"
CHECKSUM_ALGORITHM = "xxh3_64"
# Tensors larger than this are hashed in pieces (in parallel); their checksum is the hash of the
# pieces' digests. Recorded in every manifest, so a reader never guesses it.
CHECKSUM_CHUNK = 16 << 20
HEADER_ALIGN = 64
MAX_HEADER_BYTES = 100 << 20
MAX_RANK = 64
_SAVE_ID = re.compile(r"[0-9a-f]{32}")
MAX_MANIFEST_BYTES = 256 << 20
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle", ".tar")

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
}
DTYPES: dict[str, torch.dtype] = {name: dtype for dtype, name in DTYPE_NAMES.items()}
ITEMSIZES: dict[str, int] = {name: dtype.itemsize for dtype, name in DTYPE_NAMES.items()}


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
class FileEntry:
    """A file of a directory save that is not a tensor shard (an exported program): its size
    and checksum."""

    nbytes: int
    checksum: str


@dataclass(frozen=True)
class Manifest:
    """What a save holds: the state tree, each tensor's place and checksum, aliases, metadata;
    for a whole model its ``model`` section (recipe, architecture) and other ``files``."""

    kind: str
    tensors: dict[str, TensorEntry]
    tree: Any = None
    aliases: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    torch_version: str = ""
    torchkeep_version: str = ""
    created: str = ""
    checksum_chunk: int = CHECKSUM_CHUNK
    format_version: int = FORMAT_VERSION
    files: dict[str, FileEntry] = field(default_factory=dict)
    model: Any = None
    distributed: dict[str, Sharded] | None = None
    save_id: str = ""  # a directory save's: every shard's header names it


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a sharded tensor: the stored tensor ``tensor`` holds the box at
    ``offsets`` (its shape is the stored tensor's)."""

    tensor: str
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Sharded:
    """A tensor saved in chunks by the ranks of a distributed save."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass(frozen=True)
class Header:
    """A parsed and validated safetensors header."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


# ---------------------------------------------------------------------------------------------
# safetensors headers


def dtype_name(dtype: torch.dtype, *, where: str) -> str:
    """Return the safetensors name of ``dtype``, or raise naming ``where`` it was found."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        from torchkeep.errors import UnsupportedObjectError

        raise UnsupportedObjectError(
            f"{where}: torchkeep does not store tensors of dtype {dtype}; convert it first "
            "(complex tensors: torch.view_as_real)"
        ) from None


def encode_header(tensors: Mapping[str, TensorEntry], metadata: Mapping[str, str]) -> bytes:
    """Return the 8-byte length prefix and the JSON header, padded so the data is aligned."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    for name, entry in tensors.items():
        header[name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [entry.begin, entry.end],
        }
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = -(-(8 + len(text)) // HEADER_ALIGN) * HEADER_ALIGN - 8
    text += b" " * (padded - len(text))
    return struct.pack("<Q", len(text)) + text


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
        raise CorruptCheckpointError(f"{where}: the header is not valid UTF-8 ({e})") from e
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
        tensors[name] = _parse_tensor_spec(name, spec, where=where)
    data_size = file_size - 8 - len(raw)
    _check_spans(tensors, data_size, where=where)
    return Header(tensors=tensors, metadata=dict(metadata_obj), data_start=8 + len(raw))


def _entry_if_valid(
    dtype: Any, shape: Any, offsets: Any, checksum: str | None = None, file: str | None = None
) -> TensorEntry | None:
    """The entry, when every field is plainly valid; None for anything the full checks in
    ``_parse_tensor_spec`` must look at (and explain). One pass, for headers of many tensors."""
    if type(dtype) is not str or type(shape) is not list or type(offsets) is not list:
        return None
    itemsize = ITEMSIZES.get(dtype)
    if itemsize is None or len(offsets) != 2 or len(shape) > MAX_RANK:
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


def _parse_tensor_spec(name: str, spec: Any, *, where: str) -> TensorEntry:
    if type(spec) is dict and len(spec) == 3:
        entry = _entry_if_valid(spec.get("dtype"), spec.get("shape"), spec.get("data_offsets"))
        if entry is not None:
            return entry
    at = f"{where}: tensor '{name}'"
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise CorruptCheckpointError(f"{at}: expected exactly dtype, shape and data_offsets")
    dtype = spec["dtype"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZES:
        raise CorruptCheckpointError(
            f"{at}: unknown dtype {dtype!r}; known: {', '.join(sorted(ITEMSIZES))}"
        )
    shape = spec["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise CorruptCheckpointError(f"{at}: shape must be a list of at most {MAX_RANK} dims")
    if not all(_is_int(d) and d >= 0 for d in shape):
        raise CorruptCheckpointError(f"{at}: shape {shape} must hold non-negative integers")
    offsets = spec["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CorruptCheckpointError(
            f"{at}: data_offsets {offsets} must be [begin, end], begin<=end"
        )
    if math.prod(d for d in shape if d) * ITEMSIZES[dtype] >= 2**63:
        raise CorruptCheckpointError(f"{at}: shape {shape} is larger than any tensor can be")
    # Python integers do not overflow: the product is exact, and compared before any allocation.
    nbytes = math.prod(shape) * ITEMSIZES[dtype]
    if nbytes != offsets[1] - offsets[0]:
        raise CorruptCheckpointError(
            f"{at}: shape {shape} of {dtype} needs {nbytes} bytes but its span holds "
            f"{offsets[1] - offsets[0]}"
        )
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def _check_spans(tensors: Mapping[str, TensorEntry], data_size: int, *, where: str) -> None:
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if entry.begin != position:
            problem = "overlaps the previous one" if entry.begin < position else "leaves a gap"
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


def _is_int(value: Any) -> bool:
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
        return json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except RecursionError as e:
        raise CorruptCheckpointError(f"{where}: JSON nested too deeply") from e
    except ValueError as e:  # JSONDecodeError, and ints over sys.get_int_max_str_digits()
        raise CorruptCheckpointError(f"{where}: invalid JSON ({e})") from e


# ---------------------------------------------------------------------------------------------
# the manifest


def manifest_to_json(manifest: Manifest) -> str:
    """Return the manifest as JSON text carrying a checksum of its own canonical form."""
    return signed_manifest_text(_manifest_body(manifest))


def signed_manifest_text(body: Mapping[str, Any]) -> str:
    """A manifest body (without ``manifest_checksum``) as the text torchkeep writes, signed."""
    return _written_form(body, _body_checksum(body))


def _written_form(body: Mapping[str, Any], checksum: Any) -> str:
    """The exact text a manifest is written as; a reader requires it byte for byte, so that
    a change the checksum's canonical form would not see (white space, key order) is caught."""
    signed = {**body, "manifest_checksum": checksum}
    return json.dumps(signed, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _manifest_body(m: Manifest) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for name, e in m.tensors.items():
        entry: dict[str, Any] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "offsets": [e.begin, e.end],
            "checksum": e.checksum,
        }
        if e.file is not None:
            entry["file"] = e.file
        tensors[name] = entry
    body: dict[str, Any] = {
        "format": FORMAT_NAME,
        "format_version": m.format_version,
        "kind": m.kind,
        "torch_version": m.torch_version or torch.__version__,
        "torchkeep_version": m.torchkeep_version or _package_version(),
        "created": m.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "checksum": {"algorithm": CHECKSUM_ALGORITHM, "chunk_bytes": m.checksum_chunk},
        "tensors": tensors,
        "aliases": dict(m.aliases),
        "tree": m.tree,
        "metadata": m.metadata,
    }
    if m.save_id:
        body["save_id"] = m.save_id
    if m.files:
        body["files"] = {n: {"bytes": f.nbytes, "checksum": f.checksum} for n, f in m.files.items()}
    if m.model is not None:
        body["model"] = m.model
    if m.distributed is not None:
        body["format_version"] = max(m.format_version, DISTRIBUTED_FORMAT_VERSION)
        body["distributed"] = {
            name: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "chunks": [{"tensor": c.tensor, "offsets": list(c.offsets)} for c in t.chunks],
            }
            for name, t in m.distributed.items()
        }
    elif m.format_version == FORMAT_VERSION:
        body["format_version"] = 1
    return body


def _body_checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{xxhash.xxh3_64_intdigest(canonical.encode()):016x}"


def _package_version() -> str:
    return _version.__version__


def manifest_from_json(text: str, *, where: str) -> Manifest:
    """Parse and validate manifest text; raise if it is corrupt or of an unknown version."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(f"{where}: the manifest is over {MAX_MANIFEST_BYTES} bytes")
    body = load_json(text, where=f"{where}: manifest")
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(f"{where}: the manifest is not a torchkeep manifest")
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(f"{where}: the manifest has no valid format_version")
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: written in format version {version} by torchkeep "
            f"{body.get('torchkeep_version')}; this torchkeep reads up to version "
            f"{FORMAT_VERSION}. Upgrade torchkeep to read it."
        )
    stored = body.pop("manifest_checksum", None)
    try:
        written = _written_form(body, stored)
    except ValueError:  # a number too large for a float (1e400): never written by torchkeep
        written = None
    if stored != _body_checksum(body) or text != written:
        raise CorruptCheckpointError(
            f"{where}: the manifest does not match its checksum; the file is corrupt"
        )
    checksum = body.get("checksum")
    if not isinstance(checksum, dict) or checksum.get("algorithm") != CHECKSUM_ALGORITHM:
        raise UnsupportedFormatError(
            f"{where}: unknown checksum algorithm {checksum!r}; this torchkeep knows "
            f"{CHECKSUM_ALGORITHM}"
        )
    chunk = checksum.get("chunk_bytes")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 4096:
        raise CorruptCheckpointError(f"{where}: invalid checksum chunk size {chunk!r}")
    raw_tensors = body.get("tensors")
    aliases = body.get("aliases")
    if not isinstance(raw_tensors, dict) or not isinstance(aliases, dict):
        raise CorruptCheckpointError(f"{where}: the manifest lacks its tensor table")
    tensors: dict[str, TensorEntry] = {}
    for name, spec in raw_tensors.items():
        tensors[name] = _parse_manifest_tensor(name, spec, where=where)
    distributed = None
    if "distributed" in body:
        distributed = _parse_distributed(body["distributed"], tensors, where=where)
    held = set(tensors) | set(distributed or ())
    for alias, target in aliases.items():
        if not isinstance(target, str) or target not in held:
            raise CorruptCheckpointError(
                f"{where}: alias '{alias}' points at '{target}', which the manifest does not hold"
            )
    tree = body.get("tree")
    try:
        check_tree(tree, set(tensors) | set(aliases) | set(distributed or ()))
    except (TypeError, ValueError, RecursionError) as e:
        raise CorruptCheckpointError(f"{where}: the manifest's state tree is malformed: {e}") from e
    save_id = body.get("save_id", "")
    if not isinstance(save_id, str) or (save_id and not _SAVE_ID.fullmatch(save_id)):
        raise CorruptCheckpointError(f"{where}: the manifest's save_id {save_id!r:.60} is invalid")
    metadata = body.get("metadata")
    model = body.get("model")
    if model is not None:
        problem = _model_section_problem(model)
        if problem:
            raise CorruptCheckpointError(f"{where}: the manifest's model section {problem}")
    return Manifest(
        kind=str(body.get("kind", "")),
        tensors=tensors,
        tree=tree,
        aliases=dict(aliases),
        metadata=metadata if isinstance(metadata, dict) else {},
        torch_version=str(body.get("torch_version", "")),
        torchkeep_version=str(body.get("torchkeep_version", "")),
        created=str(body.get("created", "")),
        checksum_chunk=chunk,
        format_version=version,
        files=_parse_files(body.get("files", {}), where=where),
        model=model,
        distributed=distributed,
        save_id=save_id,
    )


def _parse_distributed(
    raw: Any, tensors: Mapping[str, TensorEntry], *, where: str
) -> dict[str, Sharded]:
    """Validate the sharded tensors: each chunk a stored tensor of the same dtype and rank,
    inside the tensor, the chunks tiling it exactly (no gap, no overlap)."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(f"{where}: the manifest's distributed section {why}")

    if not isinstance(raw, dict):
        raise bad("is not a table")
    result: dict[str, Sharded] = {}
    used: set[str] = set()
    for name, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "chunks"}:
            raise bad(f"entry {name!r} is malformed")
        dtype, shape, chunks = spec["dtype"], spec["shape"], spec["chunks"]
        if dtype not in DTYPES or not _is_shape(shape) or not isinstance(chunks, list):
            raise bad(f"entry {name!r} has an invalid dtype, shape or chunk list")
        if name in tensors:
            raise bad(f"names {name!r} as a stored tensor and as a sharded one")
        parsed: list[Chunk] = []
        covered = 0
        for chunk in chunks:
            if not isinstance(chunk, dict) or set(chunk) != {"tensor", "offsets"}:
                raise bad(f"entry {name!r} has a malformed chunk")
            stored, offsets = chunk["tensor"], chunk["offsets"]
            entry = tensors.get(stored) if isinstance(stored, str) else None
            if entry is None or stored in used:
                raise bad(f"chunk {stored!r} of {name!r} is not a stored tensor, or is used twice")
            used.add(stored)
            if (
                not _is_shape(offsets)
                or len(offsets) != len(shape)
                or entry.dtype != dtype
                or len(entry.shape) != len(shape)
                or any(o + n > s for o, n, s in zip(offsets, entry.shape, shape, strict=True))
            ):
                raise bad(f"chunk {stored!r} does not lie inside {name!r} ({dtype}{shape})")
            parsed.append(Chunk(stored, tuple(offsets)))
            covered += math.prod(entry.shape)
        boxes = [(c.offsets, tensors[c.tensor].shape) for c in parsed]
        if covered != math.prod(shape) or _overlapping(boxes):
            raise bad(f"the chunks of {name!r} do not cover it exactly once")
        result[name] = Sharded(dtype, tuple(shape), tuple(parsed))
    return result


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 62 for n in value
    )


MAX_GRID_CELLS = 1 << 22


def _overlapping(boxes: list[tuple[tuple[int, ...], tuple[int, ...]]]) -> bool:
    """Whether any two non-empty boxes overlap. The boxes' edges cut each dimension into
    segments; each box covers a block of the grid they make, and two boxes overlap exactly
    when they share a cell. A sharding makes a grid of about one cell per chunk."""
    live = [(o, n) for o, n in boxes if math.prod(n)]
    if not live:
        return False
    cuts = [
        sorted({o[d] for o, _ in live} | {o[d] + n[d] for o, n in live})
        for d in range(len(live[0][0]))
    ]
    if math.prod(len(c) - 1 for c in cuts) > MAX_GRID_CELLS:
        return True  # far more fragments than any sharding makes: refused as malformed
    taken: set[tuple[int, ...]] = set()
    for offsets, shape in live:
        ranges = [
            range(bisect.bisect_left(c, o), bisect.bisect_left(c, o + n))
            for c, o, n in zip(cuts, offsets, shape, strict=True)
        ]
        for cell in itertools.product(*ranges):
            if cell in taken:
                return True
            taken.add(cell)
    return False


def _model_section_problem(model: Any) -> str | None:
    """What is wrong with a saved model's section of the manifest (types only: the recipe's
    contents are checked when it is decoded), or None."""
    if not isinstance(model, dict):
        return "is not an object"
    if not isinstance(model.get("class"), str):
        return "names no class"
    if model.get("recipe_problem") is not None and not isinstance(model["recipe_problem"], str):
        return "has a malformed recipe_problem"
    if model.get("recipe") is not None and not isinstance(model["recipe"], dict):
        return "has a malformed recipe"
    for key in ("buffers", "frozen"):
        names = model.get(key, [])
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            return f"has a malformed {key} list"
    program = model.get("program")
    if program is not None:
        inputs = program.get("inputs") if isinstance(program, dict) else None
        if not isinstance(inputs, list) or not all(
            isinstance(i, dict)
            and isinstance(i.get("dtype"), str)
            and isinstance(i.get("shape"), list)
            and all(d is None or _is_int(d) for d in i["shape"])
            for i in inputs
        ):
            return "has a malformed program description"
    attributes = model.get("attributes", {})
    if not isinstance(attributes, dict) or not all(
        isinstance(v, dict) for v in attributes.values()
    ):
        return "has malformed attributes"
    converted = model.get("converted")
    if converted is not None and not isinstance(converted, dict):
        return "has a malformed conversion record"
    if "architecture" in model and not _plain_architecture(model["architecture"], 0):
        return "has a malformed architecture"
    return None


def _plain_architecture(node: Any, depth: int) -> bool:
    if depth > 64 or not isinstance(node, dict):
        return False
    children = node.get("children", {})
    return (
        isinstance(node.get("type"), str)
        and _is_int(node.get("parameters"))
        and isinstance(children, dict)
        and all(_plain_architecture(c, depth + 1) for c in children.values())
    )


def _parse_files(raw: Any, *, where: str) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{where}: the manifest's file table is not an object")
    files: dict[str, FileEntry] = {}
    for name, spec in raw.items():
        check_member_name(name, where=where)
        if name == MANIFEST_FILE or not isinstance(spec, dict):
            raise CorruptCheckpointError(f"{where}: invalid file entry '{name}'")
        nbytes, checksum = spec.get("bytes"), spec.get("checksum")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise CorruptCheckpointError(f"{where}: file entry '{name}' has no valid size")
        if not isinstance(checksum, str) or len(checksum) != 16:
            raise CorruptCheckpointError(f"{where}: file entry '{name}' has no valid checksum")
        files[name] = FileEntry(nbytes, checksum)
    return files


def _parse_manifest_tensor(name: str, spec: Any, *, where: str) -> TensorEntry:
    at = f"{where}: manifest entry '{name}'"
    if not isinstance(spec, dict):
        raise CorruptCheckpointError(f"{at} is not an object")
    checksum = spec.get("checksum")
    if not isinstance(checksum, str) or len(checksum) != 16:
        raise CorruptCheckpointError(f"{at} has no valid checksum")
    file = spec.get("file")
    if file is not None:
        file = check_member_name(file, where=where)
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("offsets")
    entry = _entry_if_valid(dtype, shape, offsets, checksum, file)
    if entry is not None:
        return entry
    entry = _parse_tensor_spec(
        name, {"dtype": dtype, "shape": shape, "data_offsets": offsets}, where=where
    )
    return TensorEntry(entry.dtype, entry.shape, entry.begin, entry.end, checksum, file)


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


def check_against_header(
    manifest: Manifest, header: Header, *, file: str | None, where: str
) -> None:
    """Raise unless the header describes exactly the manifest's tensors stored in ``file``."""
    expected = {n: e for n, e in manifest.tensors.items() if e.file == file}
    if set(expected) != set(header.tensors):
        missing = sorted(set(expected) - set(header.tensors))[:5]
        extra = sorted(set(header.tensors) - set(expected))[:5]
        raise CorruptCheckpointError(
            f"{where}: the file's tensors do not match its manifest (missing {missing}, "
            f"unexpected {extra}); the file was modified or mixes two saves"
        )
    for name, entry in expected.items():
        found = header.tensors[name]
        if (found.dtype, found.shape, found.begin, found.end) != (
            entry.dtype,
            entry.shape,
            entry.begin,
            entry.end,
        ):
            raise CorruptCheckpointError(
                f"{where}: tensor '{name}' is {found.dtype}{list(found.shape)} at bytes "
                f"[{found.begin}, {found.end}) in the header but {entry.dtype}"
                f"{list(entry.shape)} at [{entry.begin}, {entry.end}) in the manifest; "
                "the file is corrupt"
            )


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
# the save was built in place (object stores).
SHARD_NAME = re.compile(r"shard-\d{5}(-[0-9a-f]{12})?\.safetensors")


def is_single_file(path: str) -> bool:
    """Return whether ``path`` names one safetensors file (else it names a directory)."""
    return path.lower().endswith(".safetensors")


MAX_TREE_DEPTH = 200


def _is_key_json(key: Any, depth: int) -> bool:
    """Whether typed JSON ``key`` decodes to a hashable dict key (a scalar or nested tuples)."""
    if depth > MAX_TREE_DEPTH:
        return False
    if key is None or isinstance(key, (str, int, float, bool)):
        return True
    if isinstance(key, dict) and len(key) == 1:
        ((tag, value),) = key.items()
        if tag in ("$float", "$bytes"):
            return isinstance(value, str)
        if tag == "$tuple" and isinstance(value, list):
            return all(_is_key_json(k, depth + 1) for k in value)
    return False


def check_tree(tree: Any, names: set[str]) -> None:
    """Raise TypeError/ValueError unless ``tree`` is a skeleton ``tree.decode`` can rebuild."""
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise ValueError(f"nested deeper than {MAX_TREE_DEPTH}")
        if isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
            continue
        if not isinstance(node, dict):
            continue
        if len(node) == 1:
            ((tag, value),) = node.items()
            if tag == "$tensor":
                if not isinstance(value, str) or value not in names:
                    raise ValueError(f"it refers to tensor {value!r}, which the manifest lacks")
                continue
            if tag == "$float":
                if value not in ("inf", "-inf", "nan"):
                    raise ValueError(f"$float {value!r}")
                continue
            if tag == "$bytes":
                if not isinstance(value, str):
                    raise TypeError("$bytes must be base64 text")
                try:
                    base64.b64decode(value, validate=True)
                except binascii.Error as e:
                    raise ValueError(f"$bytes: {e}") from e
                continue
            if tag == "$dtype":
                if not isinstance(getattr(torch, str(value), None), torch.dtype):
                    raise ValueError(f"unknown dtype {value!r}")
                continue
            if tag == "$device":
                try:
                    torch.device(value)
                except (RuntimeError, TypeError) as e:
                    raise ValueError(f"$device {value!r}") from e
                continue
            if tag == "$size":
                if not isinstance(value, list) or not all(_is_int(d) and d >= 0 for d in value):
                    raise ValueError(f"$size {value!r}")
                continue
            if tag == "$tuple":
                if not isinstance(value, list):
                    raise TypeError("$tuple must hold a list")
                stack.extend((v, depth + 1) for v in value)
                continue
            if tag == "$dict":
                if not isinstance(value, list) or not all(
                    isinstance(p, list) and len(p) == 2 for p in value
                ):
                    raise TypeError("$dict must hold [key, value] pairs")
                for key, v in value:
                    if not _is_key_json(key, depth):
                        raise TypeError(f"dict key {key!r:.100} is not a valid key")
                    stack.append((key, depth + 1))
                    stack.append((v, depth + 1))
                continue
        stack.extend((v, depth + 1) for v in node.values())
