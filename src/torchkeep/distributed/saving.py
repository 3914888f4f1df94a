"""Saving under torch.distributed: every rank writes its part of one directory save, whose
manifest has a ``distributed`` section: for each sharded tensor its dtype, global shape and
chunks, each chunk an ordinary stored tensor named ``<name>@<offsets>`` in the file of the rank
that wrote it (``shard-<rank>-<save id>``). A chunk replicated over several ranks is written
once, by the first of them; plain tensors and values are written by rank 0.

``save`` runs in named phases, each rank in step with the others: setup (rank 0 prepares the
staging directory, on a file system every rank sees, and broadcasts it), claim (which rank
writes which chunk), write (every rank writes its file), commit (rank 0 gathers each rank's
outcome and commits the manifest only if all succeeded, then broadcasts the result, so that
every rank returns or raises alike) and finish (rank 0 cleans up).

An incremental save (``Sharing``) shares with an earlier save: rank 0 opens the base at setup
and sends its manifest to every rank; each rank hashes its own chunks against it and shares
those whose checksums match; each base file is linked by the lowest rank that shares it.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from torchkeep.container import (
    DirectoryWrite,
    SaveInfo,
    WriteHooks,
    layout,
    uncertain_commit,
    write_items,
)
from torchkeep.container.share import Base, Shared
from torchkeep.distributed.group import Failure, Group, local_box, raise_failure
from torchkeep.distributed.sharing import ShardedInfo, Sharing, open_base_for, plan_rank
from torchkeep.errors import TorchkeepError, UnsupportedObjectError
from torchkeep.format import (
    MANIFEST_FILE,
    SHARD_SAVE_KEY,
    Chunk,
    Manifest,
    Sharded,
    TensorEntry,
    check_target_name,
    chunk_name,
    dtype_name,
    encode_header,
    is_single_file,
    manifest_from_json,
    manifest_to_json,
    shard_name,
)
from torchkeep.storage import Sink, Storage
from torchkeep.tree import is_dtensor

# The name the module had before it was a package: logging configured for it still applies.
log = logging.getLogger("torchkeep.distributed")

# files, tensors, tensor bytes, bytes written, bytes shared
_Written = tuple[tuple[str, ...], int, int, int, int]


def holds_dtensor(obj: Any, depth: int = 0) -> bool:
    """Whether ``obj`` (a state to save) holds a DTensor anywhere: then every rank must save."""
    if depth > 64:
        return False
    if is_dtensor(obj):
        return True
    if isinstance(obj, torch.nn.Module):
        return any(is_dtensor(t) for t in obj.state_dict().values())
    if isinstance(obj, Mapping):
        return any(holds_dtensor(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(holds_dtensor(v, depth + 1) for v in obj)
    state_dict = getattr(obj, "state_dict", None)
    if callable(state_dict) and not isinstance(obj, type):
        try:
            return holds_dtensor(state_dict(), depth + 1)
        except Exception:
            return False
    return False


def save(
    path: str,
    tensors: Mapping[str, torch.Tensor],
    *,
    kind: str,
    tree: Any,
    aliases: Mapping[str, str],
    metadata: Mapping[str, Any],
    storage: Storage,
    threads: int,
    sharing: Sharing | None = None,
) -> SaveInfo:
    """Write this rank's part of a distributed save; every rank of the group must call it.

    Returns what was written once the save is committed; raises on every rank if any rank
    failed.
    """
    started = time.perf_counter()
    group = Group()
    save_id, write, base = _setup(group, path, storage, sharing, tensors)
    claimed = _claim(group, tensors)
    likely_changed = sharing.likely_changed if sharing is not None else None
    mine = _write(group, write, save_id, claimed, threads, base, likely_changed)
    outcome = _commit(group, write, save_id, mine, kind, tree, aliases, metadata)
    _finish(group, write, outcome)
    if isinstance(outcome, Failure):
        raise_failure(path, outcome)
    files, count, nbytes, written, shared = outcome
    seconds = time.perf_counter() - started
    return SaveInfo(path, files, count, nbytes, written, seconds, shared_bytes=shared)


def _setup(
    group: Group,
    path: str,
    storage: Storage,
    sharing: Sharing | None,
    tensors: Mapping[str, torch.Tensor],
) -> tuple[str, DirectoryWrite, Base | None]:
    """Rank 0 checks the path (and the base) and creates the staging directory; every rank gets
    the save's id, the directory write and the base, or raises rank 0's failure."""
    setup: Any = None
    if group.rank == 0:
        try:
            check_target_name(path)
            if is_single_file(path):
                raise UnsupportedObjectError(
                    f"{path}: a distributed save is a directory (one file per rank); name it "
                    "without '.safetensors'"
                )
            base = open_base_for(path, storage, sharing, tensors)
            setup = (uuid.uuid4().hex, DirectoryWrite.begin(path, storage).staging, base)
        except Exception as e:
            setup = Failure.of(group.rank, e)
    setup = group.broadcast(setup)
    if isinstance(setup, Failure):
        raise_failure(path, setup)
    save_id, staging, base = setup
    return save_id, DirectoryWrite(path, storage, staging), base


def _claim(
    group: Group, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], ShardedInfo] | Failure:
    """The tensors this rank writes and the description of its sharded tensors (naming the
    chunks it writes), agreed with every rank; or why this rank cannot write (its own failure,
    or the ranks holding different DTensors)."""
    # A chunk held by several ranks (replicated, or a sub-mesh repeated by data parallelism)
    # is written by the lowest rank holding it.
    mine: Failure | None = None
    candidates: list[str] = []
    try:
        owned, sharded = _owned(group.rank, tensors)
        candidates = list(owned)
    except Exception as e:
        mine = Failure.of(group.rank, e)
        owned, sharded = {}, {}
    held = {name: (d, shape) for name, (d, shape, _) in sharded.items()}
    claims = group.all_gather((candidates, held, mine is not None))
    writer: dict[str, int] = {}
    for r, (names, _, _) in enumerate(claims):
        for name in names:
            writer.setdefault(name, r)
    if not any(early for _, _, early in claims):
        # The manifest describes rank 0's state: a DTensor that only another rank holds would
        # be written but never listed.
        mine = _differing(claims)
    if mine is not None:
        return mine
    return (
        {n: t for n, t in owned.items() if writer.get(n) == group.rank},
        {
            n: (d, shape, chunk if chunk is None or writer.get(chunk[0]) == group.rank else None)
            for n, (d, shape, chunk) in sharded.items()
        },
    )


def _write(
    group: Group,
    write: DirectoryWrite,
    save_id: str,
    claimed: tuple[dict[str, torch.Tensor], ShardedInfo] | Failure,
    threads: int,
    base: Base | None,
    likely_changed: Callable[[str], bool] | None,
) -> _RankResult | Failure:
    """This rank's file written, described; or its failure (a failed claim writes nothing)."""
    shared = Shared("")
    if base is not None and not isinstance(claimed, Failure):
        shared = plan_rank(group.rank, base, claimed, threads, likely_changed)
    # Every rank takes part, even one that failed: each base file is linked by the lowest rank
    # sharing it.
    claims = group.all_gather(sorted(shared.links))
    linker: dict[str, int] = {}
    for rank, files in enumerate(claims):
        for file in files:
            linker.setdefault(file, rank)
    if isinstance(claimed, Failure):
        return claimed
    owned, sharded = claimed
    to_link = [file for file in shared.links if linker[file] == group.rank]
    try:
        return _write_rank(write, save_id, group.rank, owned, sharded, threads, shared, to_link)
    except Exception as e:
        return Failure.of(group.rank, e)


def _commit(
    group: Group,
    write: DirectoryWrite,
    save_id: str,
    mine: _RankResult | Failure,
    kind: str,
    tree: Any,
    aliases: Mapping[str, str],
    metadata: Mapping[str, Any],
) -> _Written | Failure:
    """Rank 0 gathers every rank's outcome and commits the manifest if none failed; every rank
    gets what was written, or the first failure."""
    gathered = group.gather(mine)
    outcome: _Written | Failure | None = None
    if group.rank == 0:
        assert gathered is not None
        failures = [g for g in gathered if isinstance(g, Failure)]
        results = [g for g in gathered if isinstance(g, _RankResult)]
        write.wrote(r.file for r in results if r.file)
        write.wrote(file for r in results for file in r.linked)
        write.kept.extend(file for r in results for file in r.found)
        try:
            if failures:
                outcome = failures[0]
            else:
                outcome = _commit_manifest(write, save_id, results, kind, tree, aliases, metadata)
        except Exception as e:
            outcome = Failure.of(group.rank, e)
            if write.failed(e) is not e:
                # The manifest may have been stored before its error: the path holds this
                # save or the previous one, whole; the shards stay.
                outcome = Failure(0, "StorageError", uncertain_commit(e), committed=True)
    decided: _Written | Failure = group.broadcast(outcome)
    return decided


def _finish(group: Group, write: DirectoryWrite, outcome: _Written | Failure) -> None:
    """Rank 0 removes what a failed save wrote, or what a committed one replaced; after the
    broadcast, so that no rank waits for the cleaning."""
    if group.rank != 0:
        return
    try:
        if isinstance(outcome, Failure):
            write.discard()
        else:
            write.finish()
    except TorchkeepError as e:
        log.warning("%s: cleaning up after the save: %s", write.path, e)


def _writes_chunk(t: Any, where: str) -> bool:
    """Whether this rank writes its chunk of ``t``: a chunk replicated over mesh dimensions is
    written by the rank at coordinate 0 of each of them."""
    from torch.distributed.tensor import Replicate, Shard

    coordinate = t.device_mesh.get_coordinate()
    if coordinate is None:  # this rank holds no part of the tensor
        return False
    for dim, placement in enumerate(t.placements):
        if type(placement).__name__ == "_StridedShard":
            raise UnsupportedObjectError(
                f"{where}: a DTensor sharded twice along one dimension (FSDP2 over tensor "
                "parallelism) is not supported yet; save its .full_tensor(), or shard it once "
                "per dimension"
            )
        if isinstance(placement, Replicate):
            if coordinate[dim] != 0:
                return False
        elif not isinstance(placement, Shard):
            raise UnsupportedObjectError(
                f"{where}: a DTensor with a {placement} placement holds partial values; "
                "redistribute it to Shard or Replicate placements before saving"
            )
    return True


@dataclass(frozen=True)
class _RankResult:
    file: str | None
    entries: dict[str, TensorEntry]
    sharded: ShardedInfo
    file_bytes: int
    shared: dict[str, str] = field(default_factory=dict)  # base files it shares: their origins
    linked: tuple[str, ...] = ()  # those it linked
    shared_bytes: int = 0
    found: tuple[str, ...] = ()  # those it found at the path already (in place)


def _differing(claims: list[Any]) -> Failure | None:
    """A failure naming the first rank whose DTensors (names, dtypes, global shapes) differ
    from rank 0's, or None when every rank holds the same."""
    first = claims[0][1]
    for rank, (_, held, _) in enumerate(claims):
        if held == first:
            continue
        extra = sorted(set(held) - set(first))
        lacking = sorted(set(first) - set(held))
        unlike = sorted(n for n in set(held) & set(first) if held[n] != first[n])
        details = [
            f"{label} {names[:5]}"
            for label, names in (
                ("holds DTensors rank 0 does not:", extra),
                ("lacks rank 0's DTensors", lacking),
                ("holds DTensors of another dtype or global shape than rank 0's:", unlike),
            )
            if names
        ]
        return Failure(
            rank,
            "UnsupportedObjectError",
            "; ".join(details) + ". Every rank must save the same state (the same DTensors, "
            "each rank holding its part); states held by some ranks only, as pipeline stages, "
            "are not supported",
        )
    return None


def _owned(
    rank: int, tensors: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], ShardedInfo]:
    """The tensors this rank could write (its chunks; rank 0: the plain tensors too), and the
    description of every sharded tensor it holds."""
    owned: dict[str, torch.Tensor] = {}
    sharded: ShardedInfo = {}
    for name, t in tensors.items():
        if is_dtensor(t):
            dtype = dtype_name(t.dtype, where=name)
            chunk = None
            if _writes_chunk(t, name):
                offsets, shape = local_box(t)
                if math.prod(shape):
                    stored = chunk_name(name, offsets)
                    if stored in tensors:
                        raise UnsupportedObjectError(
                            f"{stored}: the name of a value of the state and of a chunk of "
                            f"DTensor {name}; rename the value"
                        )
                    owned[stored] = t.to_local().detach()  # type: ignore[attr-defined]
                    chunk = (stored, offsets)
            sharded[name] = (dtype, tuple(t.shape), chunk)
        elif rank == 0:
            owned[name] = t.detach()
    return owned, sharded


def _write_rank(
    write: DirectoryWrite,
    save_id: str,
    rank: int,
    owned: dict[str, torch.Tensor],
    sharded: ShardedInfo,
    threads: int,
    shared: Shared,
    to_link: list[str],
) -> _RankResult:
    """Link the base files this rank links, write the tensors this rank writes (and does not
    share) into its file; describe its sharded tensors' chunks."""
    linked = tuple(f for f in to_link if write.link(f, f"{shared.base}/{f}", shared.links[f]))
    found = tuple(f for f in to_link if f not in linked)  # in place: already at the path
    result = _RankResult(
        None, dict(shared.entries), sharded, 0, dict(shared.links), linked, shared.nbytes, found
    )
    owned = {n: t for n, t in owned.items() if n not in shared.entries}
    if not owned:
        return result
    dtypes = {n: t.dtype for n, t in owned.items()}
    file = shard_name(rank, save_id)
    entries = {n: replace(e, file=file) for n, e in layout(owned, dtypes, 1 << 62)[0]}
    header = encode_header(entries, {SHARD_SAVE_KEY: save_id})
    size = len(header) + sum(e.nbytes for e in entries.values())
    checksums: dict[str, str] = {}

    def fill(sink: Sink) -> None:
        sink.pwrite(memoryview(header), 0)
        checksums.update(
            write_items(sink, entries, owned, dtypes, len(header), threads, WriteHooks())
        )

    write.write(file, size, fill)
    entries = {n: replace(e, checksum=checksums[n]) for n, e in entries.items()}
    return replace(result, file=file, entries={**shared.entries, **entries}, file_bytes=size)


def _commit_manifest(
    write: DirectoryWrite,
    save_id: str,
    results: list[_RankResult],
    kind: str,
    tree: Any,
    aliases: Mapping[str, str],
    metadata: Mapping[str, Any],
) -> _Written:
    """Build the manifest from every rank's result, validate it and commit the save."""
    entries: dict[str, TensorEntry] = {}
    shared: dict[str, str] = {}
    for r in results:
        entries.update(r.entries)
        shared.update(r.shared)
    distributed: dict[str, Sharded] = {}
    for r in results:
        for name, (dtype, shape, chunk) in r.sharded.items():
            previous = distributed.get(name)
            if previous is not None and (previous.dtype, previous.shape) != (dtype, shape):
                raise UnsupportedObjectError(
                    f"{name}: the ranks hold it as different tensors ({previous.dtype}"
                    f"{list(previous.shape)} and {dtype}{list(shape)}); every rank must save "
                    "the same state"
                )
            chunks = previous.chunks if previous is not None else ()
            if chunk is not None:
                chunks = (*chunks, Chunk(chunk[0], chunk[1]))
            distributed[name] = Sharded(dtype, shape, chunks)
    manifest = Manifest(
        kind=kind,
        tensors=entries,
        tree=tree,
        aliases=dict(aliases),
        metadata=dict(metadata),
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        distributed=distributed,
        save_id=save_id,
        shared=shared,
    )
    text = manifest_to_json(manifest).encode()
    # Validate what was gathered exactly as a reader will (coverage of every tensor, names).
    manifest_from_json(text.decode(), where=f"{write.path}/{MANIFEST_FILE}")
    write.commit(text)
    files = (*sorted(r.file for r in results if r.file), *sorted(shared), MANIFEST_FILE)
    nbytes = sum(e.nbytes for e in entries.values())
    written = sum(r.file_bytes for r in results) + len(text)
    stored = {c.tensor for spec in distributed.values() for c in spec.chunks}
    count = len(distributed) + len(set(entries) - stored)
    return files, count, nbytes, written, sum(r.shared_bytes for r in results)
