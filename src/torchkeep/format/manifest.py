"""The manifest: what a save holds, written as signed JSON text and parsed back with every
field validated; the cross-check of a file's header against it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import xxhash

from torchkeep import _version
from torchkeep.errors import CorruptCheckpointError, UnsupportedFormatError
from torchkeep.format.header import (
    VERSION_3_DTYPES,
    Header,
    TensorEntry,
    entry_if_valid,
    file_shape,
    load_json,
    parse_tensor_spec,
)
from torchkeep.format.names import (
    CHECKSUM_ALGORITHM,
    CHECKSUM_CHUNK,
    DISTRIBUTED_FORMAT_VERSION,
    EXTENDED_FORMAT_VERSION,
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SAVE_ID,
    SHARD_NAME,
    SHARED_FORMAT_VERSION,
    check_member_name,
)
from torchkeep.format.sections import (
    ModelSection,
    Sharded,
    Tag,
    check_tree,
    model_section_problem,
    parse_distributed,
)


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
    # Shards an incremental save holds as an earlier save wrote them (for the tensors that did
    # not change), each to the id of the save that wrote it, which its header names.
    shared: dict[str, str] = field(default_factory=dict)

    def origin(self, file: str) -> str:
        """The id of the save that wrote shard ``file``: this one, or the one it shares it from."""
        return self.shared.get(file, self.save_id)

    def model_section(self) -> ModelSection | None:
        """The model section as read (checked when the manifest was parsed), or None."""
        return None if self.model is None else ModelSection.from_json(self.model)


def manifest_to_json(manifest: Manifest) -> str:
    """Return the manifest as JSON text carrying a checksum of its own canonical form."""
    return signed_manifest_text(_manifest_body(manifest))


def signed_manifest_text(body: Mapping[str, Any]) -> str:
    """A manifest body (without ``manifest_checksum``) as the text torchkeep writes, signed."""
    return _written_form(body, body_checksum(body))


def _written_form(body: Mapping[str, Any], checksum: Any) -> str:
    """The exact text a manifest is written as; a reader requires it byte for byte, so that
    a change the checksum's canonical form would not see (white space, key order) is caught."""
    signed = {**body, "manifest_checksum": checksum}
    return json.dumps(
        signed, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _manifest_body(m: Manifest) -> dict[str, Any]:
    tensors: dict[str, Any] = {}
    for name, e in m.tensors.items():
        entry: dict[str, Any] = {
            "dtype": e.dtype,
            "shape": list(file_shape(e.dtype, e.shape)),
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
        body["files"] = {
            n: {"bytes": f.nbytes, "checksum": f.checksum} for n, f in m.files.items()
        }
    if m.model is not None:
        body["model"] = m.model
    if m.shared:
        body["shared"] = dict(m.shared)
    needed = _lowest_version(m)
    # A manifest read back keeps its version (or the one its contents now need).
    computed = m.format_version == FORMAT_VERSION
    body["format_version"] = needed if computed else max(m.format_version, needed)
    if m.distributed is not None:
        body["distributed"] = {
            name: {
                "dtype": t.dtype,
                "shape": list(t.shape),
                "chunks": [
                    {"tensor": c.tensor, "offsets": list(c.offsets)} for c in t.chunks
                ],
            }
            for name, t in m.distributed.items()
        }
    return body


def _lowest_version(m: Manifest) -> int:
    """The lowest format version that holds everything ``m`` does."""
    if m.shared:
        return SHARED_FORMAT_VERSION
    if any(e.dtype in VERSION_3_DTYPES for e in m.tensors.values()) or any(
        _has_tag(m.tree, tag)
        for tag in (Tag.METADATA, Tag.SPARSE, Tag.QUANTIZED, Tag.COMPLEX)
    ):
        return EXTENDED_FORMAT_VERSION
    return DISTRIBUTED_FORMAT_VERSION if m.distributed is not None else 1


def _has_tag(tree: Any, tag: str) -> bool:
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if tag in node:
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def body_checksum(body: Mapping[str, Any]) -> str:
    canonical = json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True
    )
    return f"{xxhash.xxh3_64_intdigest(canonical.encode()):016x}"


def _package_version() -> str:
    return _version.__version__


def manifest_from_json(text: str, *, where: str) -> Manifest:
    """Parse and validate manifest text; raise if it is corrupt or of an unknown version."""
    if len(text) > MAX_MANIFEST_BYTES:
        raise CorruptCheckpointError(
            f"{where}: the manifest is over {MAX_MANIFEST_BYTES} bytes"
        )
    body = load_json(text, where=f"{where}: manifest")
    if not isinstance(body, dict) or body.get("format") != FORMAT_NAME:
        raise CorruptCheckpointError(
            f"{where}: the manifest is not a torchkeep manifest"
        )
    version = body.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptCheckpointError(
            f"{where}: the manifest has no valid format_version"
        )
    if version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"{where}: written in format version {version} by torchkeep "
            f"{body.get('torchkeep_version')}; this torchkeep reads up to version "
            f"{FORMAT_VERSION}. Upgrade torchkeep to read it."
        )
    stored = body.pop("manifest_checksum", None)
    try:
        written = _written_form(body, stored)
    except (
        ValueError
    ):  # a number too large for a float (1e400): never written by torchkeep
        written = None
    if stored != body_checksum(body) or text != written:
        raise CorruptCheckpointError(
            f"{where}: the manifest does not match its checksum; the file is corrupt"
        )
    checksum = body.get("checksum")
    if (
        not isinstance(checksum, dict)
        or checksum.get("algorithm") != CHECKSUM_ALGORITHM
    ):
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
        distributed = parse_distributed(body["distributed"], tensors, where=where)
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
        raise CorruptCheckpointError(
            f"{where}: the manifest's state tree is malformed: {e}"
        ) from e
    save_id = body.get("save_id", "")
    if not isinstance(save_id, str) or (save_id and not SAVE_ID.fullmatch(save_id)):
        raise CorruptCheckpointError(
            f"{where}: the manifest's save_id {save_id!r:.60} is invalid"
        )
    metadata = body.get("metadata")
    model = body.get("model")
    if model is not None:
        problem = model_section_problem(model)
        if problem:
            raise CorruptCheckpointError(
                f"{where}: the manifest's model section {problem}"
            )
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
        shared=_parse_shared(body.get("shared", {}), tensors, save_id, where=where),
    )


def _parse_shared(
    raw: Any, tensors: Mapping[str, TensorEntry], save_id: str, *, where: str
) -> dict[str, str]:
    """The shared-shard table: shard names of this save, each to another save's id."""
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(f"{where}: the manifest's shared table is not an object")
    named = {e.file for e in tensors.values()}
    for file, origin in raw.items():
        if not SHARD_NAME.fullmatch(file) or file not in named:
            raise CorruptCheckpointError(
                f"{where}: the shared table names {file!r:.80}, which is not a shard of this save"
            )
        if not isinstance(origin, str) or not SAVE_ID.fullmatch(origin) or origin == save_id:
            raise CorruptCheckpointError(
                f"{where}: shard '{file}' is shared from {origin!r:.60}, which is not the id "
                "of an earlier save"
            )
    if raw and not save_id:
        raise CorruptCheckpointError(f"{where}: only a directory save shares shards")
    return dict(raw)


def _parse_files(raw: Any, *, where: str) -> dict[str, FileEntry]:
    if not isinstance(raw, dict):
        raise CorruptCheckpointError(
            f"{where}: the manifest's file table is not an object"
        )
    files: dict[str, FileEntry] = {}
    for name, spec in raw.items():
        check_member_name(name, where=where)
        if name == MANIFEST_FILE or not isinstance(spec, dict):
            raise CorruptCheckpointError(f"{where}: invalid file entry '{name}'")
        nbytes, checksum = spec.get("bytes"), spec.get("checksum")
        if not isinstance(nbytes, int) or isinstance(nbytes, bool) or nbytes < 0:
            raise CorruptCheckpointError(
                f"{where}: file entry '{name}' has no valid size"
            )
        if not isinstance(checksum, str) or len(checksum) != 16:
            raise CorruptCheckpointError(
                f"{where}: file entry '{name}' has no valid checksum"
            )
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
    entry = entry_if_valid(dtype, shape, offsets, checksum, file)
    if entry is not None:
        return entry
    entry = parse_tensor_spec(
        name, {"dtype": dtype, "shape": shape, "data_offsets": offsets}, where=where
    )
    return TensorEntry(entry.dtype, entry.shape, entry.begin, entry.end, checksum, file)


def check_against_header(
    manifest: Manifest, header: Header, *, file: str | None, where: str
) -> None:
    """Raise unless the header describes exactly the manifest's tensors stored in ``file`` (a
    shared shard may hold more: tensors of the earlier save that changed since)."""
    expected = {n: e for n, e in manifest.tensors.items() if e.file == file}
    unexpected = set(header.tensors) - set(expected)
    if file in manifest.shared:
        unexpected = set()
    if set(expected) - set(header.tensors) or unexpected:
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
