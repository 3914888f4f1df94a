"""Any training state: ``save`` and ``load`` (``torch.save``/``torch.load`` without pickle)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep import distributed
from torchkeep._types import Device
from torchkeep.checkpoint.restore import check_into, plan_destinations, restore
from torchkeep.container import (
    WRITE_THREADS,
    SaveInfo,
    WriteOptions,
    open_container,
    write_container,
)
from torchkeep.container.share import share_with
from torchkeep.distributed import read_sharded
from torchkeep.errors import UnsupportedObjectError
from torchkeep.format import CHECKSUM_CHUNK
from torchkeep.format.detect import Kind, detect, readable
from torchkeep.legacy import load_dcp, load_huggingface, load_pickle_file
from torchkeep.storage import Storage, storage_for
from torchkeep.tree import (
    TENSOR,
    convert,
    convert_tree,
    decode,
    flatten,
    is_dtensor,
    kept_dtype,
)


def one_device(map_location: Device | None, device: Device | None) -> Device | None:
    """The device a loader places tensors on, given as ``map_location`` (torch's name) or as
    ``device`` (the name every torchkeep loader accepts)."""
    if map_location is not None and device is not None and map_location != device:
        raise ValueError(
            f"map_location={map_location!r} and device={device!r} name two devices; "
            "give one of them"
        )
    return device if map_location is None else map_location


def one_source(
    source: str | os.PathLike[str] | None, path: str | os.PathLike[str] | None, *, caller: str
) -> str | os.PathLike[str]:
    """What a loader reads, given as ``source`` (the name every loader uses) or as ``path``
    (the earlier name of ``load``, ``load_checkpoint`` and ``load_model``)."""
    if source is not None and path is not None:
        raise TypeError(
            f"{caller}() takes what it reads as source= or as path= (its earlier name), "
            "not both"
        )
    if source is not None:
        return source
    if path is not None:
        return path
    raise TypeError(f"{caller}() missing 1 required argument: 'source'")


def check_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise UnsupportedObjectError("metadata must be a dict of JSON values")
    try:
        json.dumps(metadata, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UnsupportedObjectError(
            f"metadata must hold JSON values only (str, numbers, bool, None, lists, dicts): {e}"
        ) from e
    return dict(metadata)


def save(
    obj: Any,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    storage: Storage | None = None,
    base: str | os.PathLike[str] | None = None,
) -> SaveInfo:
    """Save any training state without pickle: the drop-in for ``torch.save(obj, path)``.

    Args:
        obj: nested dicts, lists and tuples of tensors, Python scalars, str, bytes, None and
            Stateful objects (modules, optimizers, schedulers, GradScaler, ``RNGState``).
        path: a ``.safetensors`` file, or a directory for any other name; local, or an
            fsspec URL such as ``s3://bucket/run/ckpt`` (the ``remote`` extra).
        metadata: JSON-serialisable values stored with the state.
        storage_options: for a URL, the options of its fsspec file system (credentials,
            ``endpoint_url``, …).
        storage: write through this storage instead of the one ``path`` names (a
            ``torchkeep.testing.FaultyStorage`` that injects faults, for example).
        base: an earlier directory save of the same state, on the same storage: the tensors
            whose bytes it already holds are not written again, and its files holding them are
            shared with the new save (hard links on a local file system, copies made by the
            store on object storage). The new save is whole on its own: the base may be
            deleted afterwards. ``path`` must then be a directory.

    Returns:
        What was written.

    Raises:
        UnsupportedObjectError: a value cannot be stored; the message names its path in ``obj``.
        UnsupportedFormatError: ``path`` ends in a pickle suffix such as ``.pt``.
        StorageError: the write failed; any previous file at ``path`` is unchanged.
        ValueError, StateMismatchError, CorruptCheckpointError, IncompleteCheckpointError:
            ``base`` cannot be the base of this save (a one-file target, another storage, not
            an earlier save of this state, damaged); raised before anything is written.

    Example:
        ```python
        tk.save({"model": model, "optimizer": optimizer, "epoch": 5}, "ckpt.safetensors")
        ```
    """
    earlier = None if base is None else storage_for(base, storage_options, storage)[1]
    storage, target = storage_for(path, storage_options, storage)
    if distributed.active() and distributed.holds_dtensor(obj):
        # Every rank saves its part; a rank that cannot makes them all raise.
        failure: BaseException | None = None
        try:
            flat = flatten(obj, dtensors=True)
            checked = check_metadata(metadata)
        except Exception as e:
            failure = e
        distributed.agree(target, failure)
        return distributed.save(
            target,
            flat.tensors,
            kind="state",
            tree=flat.tree,
            aliases=flat.aliases,
            metadata=checked,
            storage=storage,
            threads=WRITE_THREADS,
            sharing=None if earlier is None else distributed.Sharing(earlier, strict=True),
        )
    flat = flatten(obj)
    checked = check_metadata(metadata)
    shared = None
    if earlier is not None:
        dtypes = {n: t.dtype for n, t in flat.tensors.items()}
        shared = share_with(
            earlier,
            target,
            flat.tensors,
            dtypes,
            storage,
            chunk=CHECKSUM_CHUNK,
            threads=WRITE_THREADS,
        )
    return write_container(
        target,
        flat.tensors,
        kind="state",
        storage=storage,
        options=WriteOptions(tree=flat.tree, aliases=flat.aliases, metadata=checked, shared=shared),
    )


def load(
    source: str | os.PathLike[str] | None = None,
    *,
    into: Any = None,
    map_location: Device | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    device: Device | None = None,
    storage: Storage | None = None,
    path: str | os.PathLike[str] | None = None,
) -> Any:
    """Load state saved by ``save``, any safetensors file (as a flat dict of tensors), a
    ``torch.save`` file (through a restricted unpickler that never runs code from the file),
    a torch.distributed.checkpoint directory (in one process, tensors reassembled in full), or
    a Hugging Face model directory (its weights, the state dict ``load_state_dict`` returns).

    Args:
        source: the file or directory.
        into: a tree of the saved shape holding Stateful objects and preallocated tensors;
            they are restored in place (tensors of matching dtype and shape, on the CPU or a
            GPU, are read straight into their memory) and returned at their places in the
            result.
        map_location: the device every loaded tensor is moved to (read straight there, a GPU
            through pinned staging buffers, unless ``dtype`` casts them first).
        dtype: the dtype float16, bfloat16, float32 and float64 tensors are cast to (integer,
            boolean, complex, float8 and float4 tensors keep theirs).
        verify: check every tensor's checksum (on by default).
        storage_options: for a URL (``s3://…``), the options of its fsspec file system.
        device: ``map_location`` under the name the other loaders use; give one of the two.
        storage: read through this storage instead of the one ``source`` names (a
            ``torchkeep.testing.FaultyStorage`` that injects faults, for example).
        path: ``source`` under its earlier name; give one of the two.

    Returns:
        The saved object; Stateful objects come back as their state dicts unless given in ``into``.

    Raises:
        CheckpointNotFoundError: nothing is saved at ``source``.
        IncompleteCheckpointError: the save at ``source`` never committed.
        CorruptCheckpointError: a header, size or checksum does not match; the message names
            the tensor.
        UnsupportedFormatError: ``source`` holds a format torchkeep does not read.
        UnsafeFileError: a ``torch.save`` file names code that unpickling it would run.
        StateMismatchError: ``into`` does not fit the saved state.

    Example:
        ```python
        state = tk.load("ckpt.safetensors", into={"model": model, "optimizer": optimizer})
        ```
    """
    source = one_source(source, path, caller="load")
    map_location = one_device(map_location, device)
    storage, target = storage_for(source, storage_options, storage)
    with readable(storage, target) as (storage, target, kind):
        return load_from(
            storage,
            target,
            into=into,
            map_location=map_location,
            dtype=dtype,
            verify=verify,
            kind=kind,
        )


def load_from(
    storage: Storage,
    path: str,
    *,
    into: Any = None,
    map_location: Device | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    kind: Kind | None = None,
) -> Any:
    """``load`` from ``path`` in ``storage`` (holding a checkpoint of ``kind``, when known)."""
    kind = kind or detect(storage, path)
    foreign = None
    if kind is Kind.DCP:
        foreign = load_dcp(path, verify=verify)
    elif kind is Kind.HUGGINGFACE:
        foreign = load_huggingface(storage, path, verify=verify)  # as load_state_dict reads it
    elif kind.pickled:
        foreign = load_pickle_file(path, verify=verify)
    if foreign is not None:
        obj = convert_tree(foreign, map_location, dtype)
        return obj if into is None else restore(None, obj, into, ())
    with open_container(path, storage=storage) as container:
        tree = _tree_of(container.entries, container.aliases, container.manifest)
        sharded = container.manifest.distributed if container.manifest else None
        shapes: dict[str, Any] = {**container.entries, **(sharded or {})}
        if into is not None:
            # Everything that can be checked is checked before a byte is read into `into`.
            check_into(tree, into, shapes, container.aliases, ())
        direct = bool(into is not None and map_location is None and dtype is None)
        dests: dict[str, torch.Tensor] = {}
        if direct or (into is not None and sharded):
            plan_destinations(tree, into, dests, sharded or {}, container.aliases)
        chunks = {c.tensor for spec in (sharded or {}).values() for c in spec.chunks}
        # Straight to the device unless a cast follows: reading in the file's dtype there and
        # casting would hold both copies on the device at once.
        loaded = container.read(
            [n for n in container.entries if n not in chunks],
            into={n: t for n, t in dests.items() if direct and not is_dtensor(t)},
            verify=verify,
            device=map_location if dtype is None else None,
        )
        if sharded:
            # Each rank reads the chunks overlapping its part of every DTensor in `into`.
            loaded.update(read_sharded(container, sharded, dests, verify=verify))
    aliases = container.aliases
    kept = {aliases.get(n, n) for n in kept_dtype(tree)} if dtype is not None else set()
    loaded = {
        n: convert(t, map_location=map_location, dtype=None if n in kept else dtype)
        for n, t in loaded.items()
    }

    def lookup(name: str) -> torch.Tensor:
        return loaded[aliases.get(name, name)]

    result = decode(tree, lookup)
    if into is None:
        return result
    return restore(tree, result, into, ())


def _tree_of(entries: Mapping[str, Any], aliases: Mapping[str, str], manifest: Any) -> Any:
    if manifest is not None and manifest.tree is not None:
        return manifest.tree
    # Weights and foreign safetensors files: a flat dict, tied names included.
    names = list(entries) + list(aliases)
    return {name: {TENSOR: name} for name in names}
