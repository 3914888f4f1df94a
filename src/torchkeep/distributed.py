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
"""

from __future__ import annotations

import errno
import logging
import math
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, NoReturn

import torch

from torchkeep import errors
from torchkeep.container import (
    DirectoryWrite,
    SaveInfo,
    WriteHooks,
    layout,
    uncertain_commit,
    write_items,
)
from torchkeep.errors import StorageError, TorchkeepError, UnsupportedObjectError
from torchkeep.format import (
    DTYPES,
    MANIFEST_FILE,
    Chunk,
    Manifest,
    Sharded,
    TensorEntry,
    check_target_name,
    dtype_name,
    encode_header,
    is_single_file,
    manifest_from_json,
    manifest_to_json,
)
from torchkeep.storage import Sink, Storage
from torchkeep.tree import decode, is_dtensor

log = logging.getLogger(__name__)

Box = tuple[tuple[int, ...], tuple[int, ...]]  # offsets, shape


def active() -> bool:
    """Whether this process is a rank of an initialized process group."""
    return bool(torch.distributed.is_available() and torch.distributed.is_initialized())


def local_box(t: Any) -> Box:
    """The part of DTensor ``t``'s global tensor held by this rank: (offsets, shape)."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offsets = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return tuple(offsets), tuple(shape)


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
    sharded: dict[str, tuple[str, tuple[int, ...], tuple[str, tuple[int, ...]] | None]]
    file_bytes: int


@dataclass(frozen=True)
class _Failure:
    rank: int
    kind: str
    message: str
    committed: bool = False  # the path may hold this save: the commit's outcome is unknown


def _failure(rank: int, e: BaseException) -> _Failure:
    kind = type(e).__name__ if isinstance(e, TorchkeepError) else "StorageError"
    return _Failure(rank, kind, str(e))


def _raise(path: str, failure: _Failure, *, committed: bool = False) -> NoReturn:
    cls = getattr(errors, failure.kind, StorageError)
    if not (isinstance(cls, type) and issubclass(cls, TorchkeepError)):
        cls = StorageError
    state = "" if committed else "; nothing was committed (the previous save, if any, is intact)"
    message = f"{path}: the distributed save failed on rank {failure.rank}: {failure.message}"
    message += state
    if issubclass(cls, OSError):
        raise cls(errno.EIO, message)
    raise cls(message)


def agree(path: str, failure: BaseException | None) -> None:
    """Raise on every rank if any rank failed before a collective save (every rank calls this,
    so that a rank that cannot go on never leaves the others waiting)."""
    dist = torch.distributed
    mine = None if failure is None else _failure(dist.get_rank(), failure)
    everyone: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    failed = [f for f in everyone if isinstance(f, _Failure)]
    if failed:
        if failure is not None and failed[0].rank == dist.get_rank():
            raise failure
        _raise(path, failed[0])


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
) -> SaveInfo:
    """Write this rank's part of a distributed save; every rank of the group must call it.

    Returns what was written once the save is committed; raises on every rank if any rank
    failed.
    """
    started = time.perf_counter()
    dist = torch.distributed
    rank, world = dist.get_rank(), dist.get_world_size()

    setup: list[Any] = [None]
    if rank == 0:
        try:
            check_target_name(path)
            if is_single_file(path):
                raise UnsupportedObjectError(
                    f"{path}: a distributed save is a directory (one file per rank); name it "
                    "without '.safetensors'"
                )
            setup[0] = (uuid.uuid4().hex, DirectoryWrite.begin(path, storage).staging)
        except Exception as e:
            setup[0] = _failure(rank, e)
    dist.broadcast_object_list(setup, src=0)
    if isinstance(setup[0], _Failure):
        _raise(path, setup[0])
    save_id, staging = setup[0]
    write = DirectoryWrite(path, storage, staging)

    # A chunk held by several ranks (replicated, or a sub-mesh repeated by data parallelism)
    # is written by the lowest rank holding it.
    mine: Any = None
    failed_early = False
    candidates: list[str] = []
    try:
        owned, sharded = _owned(rank, tensors)
        candidates = list(owned)
    except Exception as e:
        mine, failed_early = _failure(rank, e), True
        owned, sharded = {}, {}
    held = {name: (d, shape) for name, (d, shape, _) in sharded.items()}
    claims: list[Any] = [None] * world
    dist.all_gather_object(claims, (candidates, held, failed_early))
    writer: dict[str, int] = {}
    for r, (names, _, _) in enumerate(claims):
        for name in names:
            writer.setdefault(name, r)
    if not any(early for _, _, early in claims):
        # The manifest describes rank 0's state: a DTensor that only another rank holds would
        # be written but never listed.
        differing = _differing(claims)
        if differing is not None:
            mine, failed_early = differing, True
    try:
        if not failed_early:
            mine = _write_rank(
                write,
                save_id,
                rank,
                {n: t for n, t in owned.items() if writer.get(n) == rank},
                {
                    n: (d, shape, chunk if chunk is None or writer.get(chunk[0]) == rank else None)
                    for n, (d, shape, chunk) in sharded.items()
                },
                threads,
            )
    except Exception as e:
        mine = _failure(rank, e)
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(mine, gathered, dst=0)

    outcome: list[Any] = [None]
    if rank == 0:
        assert gathered is not None
        failures = [g for g in gathered if isinstance(g, _Failure)]
        results = [g for g in gathered if isinstance(g, _RankResult)]
        write.wrote(r.file for r in results if r.file)
        try:
            if failures:
                outcome[0] = failures[0]
            else:
                outcome[0] = _commit(write, save_id, results, kind, tree, aliases, metadata)
        except Exception as e:
            outcome[0] = _failure(rank, e)
            if write.failed(e) is not e:
                # The manifest may have been stored before its error: the path holds this
                # save or the previous one, whole; the shards stay.
                outcome[0] = _Failure(0, "StorageError", uncertain_commit(e), committed=True)
    dist.broadcast_object_list(outcome, src=0)
    if rank == 0:  # after the broadcast: no rank waits for the cleaning
        try:
            if isinstance(outcome[0], _Failure):
                write.discard()
            else:
                write.finish()
        except TorchkeepError as e:
            log.warning("%s: cleaning up after the save: %s", path, e)
    if isinstance(outcome[0], _Failure):
        _raise(path, outcome[0], committed=outcome[0].committed)
    files, count, nbytes, written = outcome[0]
    return SaveInfo(path, files, count, nbytes, written, time.perf_counter() - started)


def _differing(claims: list[Any]) -> _Failure | None:
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
        return _Failure(
            rank,
            "UnsupportedObjectError",
            "; ".join(details) + ". Every rank must save the same state (the same DTensors, "
            "each rank holding its part); states held by some ranks only, as pipeline stages, "
            "are not supported",
        )
    return None


def _chunk_name(name: str, offsets: Iterable[int]) -> str:
    return f"{name}@{','.join(map(str, offsets))}"


ShardedInfo = dict[str, tuple[str, tuple[int, ...], tuple[str, tuple[int, ...]] | None]]


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
                    stored = _chunk_name(name, offsets)
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
) -> _RankResult:
    """Write the tensors this rank writes into its file; describe its sharded tensors' chunks."""
    if not owned:
        return _RankResult(None, {}, sharded, 0)
    dtypes = {n: t.dtype for n, t in owned.items()}
    file = f"shard-{rank:05d}-{save_id[:12]}.safetensors"
    entries = {n: replace(e, file=file) for n, e in layout(owned, dtypes, 1 << 62)[0]}
    header = encode_header(entries, {"torchkeep_save": save_id})
    size = len(header) + sum(e.nbytes for e in entries.values())
    checksums: dict[str, str] = {}

    def fill(sink: Sink) -> None:
        sink.pwrite(memoryview(header), 0)
        checksums.update(
            write_items(sink, entries, owned, dtypes, len(header), threads, WriteHooks())
        )

    write.write(file, size, fill)
    entries = {n: replace(e, checksum=checksums[n]) for n, e in entries.items()}
    return _RankResult(file, entries, sharded, size)


def _commit(
    write: DirectoryWrite,
    save_id: str,
    results: list[_RankResult],
    kind: str,
    tree: Any,
    aliases: Mapping[str, str],
    metadata: Mapping[str, Any],
) -> tuple[tuple[str, ...], int, int, int]:
    entries: dict[str, TensorEntry] = {}
    for r in results:
        entries.update(r.entries)
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
    )
    text = manifest_to_json(manifest).encode()
    # Validate what was gathered exactly as a reader will (coverage of every tensor, names).
    manifest_from_json(text.decode(), where=f"{write.path}/{MANIFEST_FILE}")
    write.commit(text)
    files = (*sorted(r.file for r in results if r.file), MANIFEST_FILE)
    nbytes = sum(e.nbytes for e in entries.values())
    written = sum(r.file_bytes for r in results) + len(text)
    stored = {c.tensor for spec in distributed.values() for c in spec.chunks}
    return files, len(distributed) + len(set(entries) - stored), nbytes, written


# ---------------------------------------------------------------------------------------------
# loading


def _intersect(a: Box, b: Box) -> Box | None:
    offsets, shape = [], []
    for ao, an, bo, bn in zip(a[0], a[1], b[0], b[1], strict=True):
        lo, hi = max(ao, bo), min(ao + an, bo + bn)
        if hi <= lo:
            return None
        offsets.append(lo)
        shape.append(hi - lo)
    return tuple(offsets), tuple(shape)


def _window(t: torch.Tensor, box: Box, origin: tuple[int, ...]) -> torch.Tensor:
    """The part of ``t`` (which holds the box at ``origin``) covering ``box``."""
    view = t
    for dim, (o, n, base) in enumerate(zip(box[0], box[1], origin, strict=True)):
        view = view.narrow(dim, o - base, n)
    return view


def read_sharded(
    container: Any,
    sharded: Mapping[str, Sharded],
    dests: Mapping[str, torch.Tensor],
    *,
    verify: bool,
) -> dict[str, torch.Tensor]:
    """Read every sharded tensor: into its destination's local part when the destination is a
    DTensor (only the chunks overlapping it), else whole (into the destination when it fits)."""
    result: dict[str, torch.Tensor] = {}
    entries = container.entries
    for name, spec in sharded.items():
        dest = dests.get(name)
        if dest is not None and is_dtensor(dest):
            if dest.device_mesh.get_coordinate() is None:  # type: ignore[attr-defined]
                result[name] = dest  # this rank holds no part of it
                continue
            box = local_box(dest)
            target = dest.to_local()  # type: ignore[attr-defined]
        else:
            box = ((0,) * len(spec.shape), spec.shape)
            fits = (
                dest is not None
                and dest.device.type == "cpu"
                and dest.dtype == DTYPES[spec.dtype]
                and tuple(dest.shape) == spec.shape
                and dest.is_contiguous()
            )
            target = (
                dest
                if fits and dest is not None
                else torch.empty(spec.shape, dtype=DTYPES[spec.dtype])
            )
        for chunk in spec.chunks:
            chunk_box = (chunk.offsets, entries[chunk.tensor].shape)
            overlap = _intersect(chunk_box, box)
            if overlap is None:
                continue
            window = _window(target, overlap, box[0])
            direct = window.is_contiguous() and window.device.type == "cpu"
            if overlap == chunk_box and direct and window.dtype == DTYPES[spec.dtype]:
                got = container.read([chunk.tensor], into={chunk.tensor: window}, verify=verify)
                if got[chunk.tensor] is not window:
                    window.copy_(got[chunk.tensor])
                continue
            data = container.read([chunk.tensor], verify=verify)[chunk.tensor]
            window.copy_(_window(data, overlap, chunk.offsets))
        result[name] = dest if dest is not None and is_dtensor(dest) else target
    return result



def fill_local(dest: torch.Tensor, value: Any) -> bool:
    """Copy this rank's part of the whole tensor ``value`` into DTensor ``dest`` (a checkpoint
    saved with any world size, or by torch.distributed.checkpoint). False if ``dest`` is not a
    DTensor or ``value`` is one (DTensor to DTensor copies reshard themselves)."""
    if not is_dtensor(dest) or not isinstance(value, torch.Tensor) or is_dtensor(value):
        return False
    if tuple(value.shape) != tuple(dest.shape):
        return False
    box = local_box(dest)
    local: torch.Tensor = dest.to_local()  # type: ignore[attr-defined]
    with torch.no_grad():
        local.copy_(_window(value, box, (0,) * len(box[0])))
    return True


def fill_module(module: torch.nn.Module, state: Mapping[str, Any]) -> bool:
    """Load ``state`` into a module whose parameters are DTensors (FSDP2, tensor parallel):
    each rank copies its part. False (nothing done) if the module holds no DTensor."""
    expected = module.state_dict()
    if not any(is_dtensor(t) for t in expected.values()):
        return False
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise KeyError(f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    with torch.no_grad():
        for name, dest in expected.items():
            value = state[name]
            if value is dest:
                continue  # read straight into it
            if not fill_local(dest, value):
                dest.copy_(value)
    # The module's own load hooks run (FSDP2 re-derives its sharded parameters in one); each
    # tensor given is the one it is copied into, so nothing is copied twice.
    module.load_state_dict(expected, strict=True)
    return True


# ---------------------------------------------------------------------------------------------
# optimizers of DTensor parameters (FSDP2): their state is placed like the parameters


class _Named(str):
    """A saved tensor's name, standing at its place in a decoded tree while planning."""


def _paired_params(optimizer: torch.optim.Optimizer, saved_groups: Any) -> list[tuple[Any, Any]]:
    """(saved parameter id, parameter) in the order ``Optimizer.load_state_dict`` pairs them;
    empty when the groups differ (``load_state_dict`` then reports it)."""
    groups = optimizer.param_groups
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        return []
    pairs: list[tuple[Any, Any]] = []
    for saved, group in zip(saved_groups, groups, strict=True):
        ids = saved.get("params") if isinstance(saved, dict) else None
        if not isinstance(ids, list) or len(ids) != len(group["params"]):
            return []
        pairs.extend(zip(ids, group["params"], strict=True))
    return pairs


def plan_optimizer(
    optimizer: torch.optim.Optimizer,
    state_tree: Any,
    sharded: Mapping[str, Sharded],
    aliases: Mapping[str, str],
    dests: dict[str, torch.Tensor],
) -> None:
    """Destinations for the sharded state of ``optimizer``'s DTensor parameters (Adam's moments
    under FSDP2): new DTensors placed like each parameter, so that every rank reads only its part.
    A fresh optimizer has no state yet to read into, and one that has is replaced by the load."""

    saved = decode(state_tree, _Named)
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict):
        return
    for sid, param in _paired_params(optimizer, saved.get("param_groups")):
        values = saved["state"].get(sid)
        if not is_dtensor(param) or not isinstance(values, dict):
            continue
        for key, value in values.items():
            if key == "step":
                continue  # torch keeps an optimizer's step as it was saved
            name = aliases.get(value, value) if isinstance(value, _Named) else None
            spec = sharded.get(name) if name is not None else None
            if name is not None and spec is not None and spec.shape == tuple(param.shape):
                dests[name] = torch.empty_like(param.detach(), dtype=DTYPES[spec.dtype])


def place_optimizer_state(optimizer: torch.optim.Optimizer, state: Any) -> Any:
    """``state`` with each whole tensor kept for a DTensor parameter (saved without a process
    group, or by torch.distributed.checkpoint) made a DTensor placed like the parameter; tensors
    planned by ``plan_optimizer`` are DTensors already."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
        return state
    placed: dict[Any, Any] = {}
    pairs = dict(_paired_params(optimizer, state.get("param_groups")))
    for sid, values in state["state"].items():
        param = pairs.get(sid)
        if param is None or not is_dtensor(param) or not isinstance(values, dict):
            placed[sid] = values
            continue
        placed[sid] = {}
        for key, value in values.items():
            if (
                key != "step"  # torch keeps an optimizer's step as it was saved
                and isinstance(value, torch.Tensor)
                and not is_dtensor(value)
                and tuple(value.shape) == tuple(param.shape)
            ):
                dest = torch.empty_like(param.detach(), dtype=value.dtype)
                fill_local(dest, value)
                value = dest
            placed[sid][key] = value
    return {**state, "state": placed}
