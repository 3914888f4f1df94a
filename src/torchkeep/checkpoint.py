"""Any training state: ``save``/``load``, and the general checkpoint of the tutorials."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep import distributed
from torchkeep.container import WRITE_THREADS, SaveInfo, open_container, write_container
from torchkeep.distributed import read_sharded
from torchkeep.errors import StateMismatchError, UnsupportedObjectError
from torchkeep.format.detect import Kind, detect, readable
from torchkeep.legacy import load_dcp, load_huggingface, load_pickle_file
from torchkeep.storage import Storage, storage_for
from torchkeep.tree import (
    STATEFUL,
    TENSOR,
    RNGState,
    Stateful,
    decode,
    flatten,
    is_dtensor,
    path_name,
)

Device = str | torch.device


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

    Returns:
        What was written.

    Raises:
        UnsupportedObjectError: a value cannot be stored; the message names its path in ``obj``.
        UnsupportedFormatError: ``path`` ends in a pickle suffix such as ``.pt``.
        StorageError: the write failed; any previous file at ``path`` is unchanged.

    Example:
        ```python
        tk.save({"model": model, "optimizer": optimizer, "epoch": 5}, "ckpt.safetensors")
        ```
    """
    storage, target = storage_for(path, storage_options)
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
        )
    flat = flatten(obj)
    return write_container(
        target,
        flat.tensors,
        kind="state",
        tree=flat.tree,
        aliases=flat.aliases,
        metadata=check_metadata(metadata),
        storage=storage,
    )


def load(
    path: str | os.PathLike[str],
    *,
    into: Any = None,
    map_location: Device | None = None,
    dtype: torch.dtype | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Any:
    """Load state saved by ``save``, any safetensors file (as a flat dict of tensors), a
    ``torch.save`` file (through a restricted unpickler that never runs code from the file),
    a torch.distributed.checkpoint directory (in one process, tensors reassembled in full), or
    a Hugging Face model directory (its weights, the state dict ``load_state_dict`` returns).

    Args:
        path: the file or directory.
        into: a tree of the saved shape holding Stateful objects and preallocated tensors;
            they are restored in place (tensors of matching dtype and shape, on the CPU or a
            GPU, are read straight into their memory) and returned at their places in the
            result.
        map_location: the device every loaded tensor is moved to (read straight there, a GPU
            through pinned staging buffers, unless ``dtype`` casts them first).
        dtype: the dtype floating-point tensors are cast to (integer tensors are never cast).
        verify: check every tensor's checksum (on by default).
        storage_options: for a URL (``s3://…``), the options of its fsspec file system.

    Returns:
        The saved object; Stateful objects come back as their state dicts unless given in ``into``.

    Raises:
        CheckpointNotFoundError: nothing is saved at ``path``.
        IncompleteCheckpointError: the save at ``path`` never committed.
        CorruptCheckpointError: a header, size or checksum does not match; the message names
            the tensor.
        UnsupportedFormatError: ``path`` holds a format torchkeep does not read.
        UnsafeFileError: a ``torch.save`` file names code that unpickling it would run.
        StateMismatchError: ``into`` does not fit the saved state.

    Example:
        ```python
        state = tk.load("ckpt.safetensors", into={"model": model, "optimizer": optimizer})
        ```
    """
    storage, target = storage_for(path, storage_options)
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
        obj = _convert_tree(foreign, map_location, dtype)
        return obj if into is None else _restore(None, obj, into, ())
    with open_container(path, storage=storage) as container:
        tree = _tree_of(container.entries, container.aliases, container.manifest)
        sharded = container.manifest.distributed if container.manifest else None
        shapes: dict[str, Any] = {**container.entries, **(sharded or {})}
        if into is not None:
            # Everything that can be checked is checked before a byte is read into `into`.
            _check_into(tree, into, shapes, container.aliases, ())
        direct = bool(into is not None and map_location is None and dtype is None)
        dests: dict[str, torch.Tensor] = {}
        if direct or (into is not None and sharded):
            _plan_destinations(tree, into, dests, sharded or {}, container.aliases)
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
    loaded = {n: convert(t, map_location=map_location, dtype=dtype) for n, t in loaded.items()}
    aliases = container.aliases

    def lookup(name: str) -> torch.Tensor:
        return loaded[aliases.get(name, name)]

    result = decode(tree, lookup)
    if into is None:
        return result
    return _restore(tree, result, into, ())


def convert(
    tensor: torch.Tensor, *, map_location: Device | None, dtype: torch.dtype | None
) -> torch.Tensor:
    """Move ``tensor`` to ``map_location`` and cast it to ``dtype`` if it is floating point."""
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    if map_location is not None:
        tensor = tensor.to(map_location)
    return tensor


def _convert_tree(obj: Any, map_location: Device | None, dtype: torch.dtype | None) -> Any:
    if map_location is None and dtype is None:
        return obj
    if isinstance(obj, torch.Tensor):
        return convert(obj, map_location=map_location, dtype=dtype)
    if isinstance(obj, dict):
        return type(obj)({k: _convert_tree(v, map_location, dtype) for k, v in obj.items()})
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        return type(obj)(_convert_tree(v, map_location, dtype) for v in obj)
    return obj


def _tree_of(entries: Mapping[str, Any], aliases: Mapping[str, str], manifest: Any) -> Any:
    if manifest is not None and manifest.tree is not None:
        return manifest.tree
    # Weights and foreign safetensors files: a flat dict, tied names included.
    names = list(entries) + list(aliases)
    return {name: {TENSOR: name} for name in names}


def _plan_destinations(
    tree: Any,
    into: Any,
    dests: dict[str, torch.Tensor],
    sharded: Mapping[str, Any],
    aliases: Mapping[str, str],
) -> None:
    """Find the tensors of ``into`` that saved tensors can be read straight into."""
    if isinstance(tree, dict) and set(tree) == {TENSOR}:
        if isinstance(into, torch.Tensor):
            dests[tree[TENSOR]] = into.detach()
        return
    if isinstance(tree, dict) and set(tree) == {STATEFUL, "state"}:
        if isinstance(into, torch.nn.Module):
            # A module's state_dict() tensors share memory with its parameters and buffers.
            _plan_destinations(tree["state"], into.state_dict(), dests, sharded, aliases)
        elif isinstance(into, torch.optim.Optimizer) and sharded:
            distributed.plan_optimizer(into, tree["state"], sharded, aliases, dests)
        return
    if isinstance(tree, dict) and isinstance(into, Mapping) and not _is_tagged(tree):
        for key, sub in tree.items():
            if key in into:
                _plan_destinations(sub, into[key], dests, sharded, aliases)
    elif isinstance(tree, dict) and set(tree) == {"$dict"} and isinstance(into, Mapping):
        # Keys that are not strings (an optimizer's parameter ids).
        for key, sub in tree["$dict"]:
            plain_key = decode(key, lambda n: n)
            if isinstance(plain_key, (int, str)) and plain_key in into:
                _plan_destinations(sub, into[plain_key], dests, sharded, aliases)
    elif isinstance(tree, list) and isinstance(into, (list, tuple)):
        for sub_tree, sub_into in zip(tree, into, strict=False):
            _plan_destinations(sub_tree, sub_into, dests, sharded, aliases)


def _check_into(
    tree: Any,
    into: Any,
    entries: Mapping[str, Any],
    aliases: Mapping[str, str],
    path: tuple[str, ...],
) -> None:
    """Raise StateMismatchError if ``into`` cannot take the saved state (keys, shapes)."""
    where = path_name(path)

    def shape(node: Any) -> tuple[int, ...] | None:
        if isinstance(node, dict) and set(node) == {TENSOR}:
            return tuple(entries[aliases.get(node[TENSOR], node[TENSOR])].shape)
        return None

    if isinstance(into, torch.Tensor):
        saved = shape(tree)
        if saved is None:
            raise StateMismatchError(f"{where}: into= holds a tensor but the checkpoint does not")
        if tuple(into.shape) != saved:
            raise StateMismatchError(
                f"{where}: into= holds a tensor of shape {list(into.shape)} but the checkpoint's "
                f"is {list(saved)}"
            )
        return
    if isinstance(into, torch.nn.Module):
        state = (
            tree["state"] if isinstance(tree, dict) and set(tree) == {STATEFUL, "state"} else tree
        )
        if not isinstance(state, dict) or _is_tagged(state):
            raise StateMismatchError(f"{where}: the checkpoint holds no module state here")
        expected = into.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        resized = [
            f"{k} (saved {list(shape(state[k]) or ())}, module {list(expected[k].shape)})"
            for k in expected
            if k in state and shape(state[k]) not in (None, tuple(expected[k].shape))
        ]
        if missing or unexpected or resized:
            raise StateMismatchError(
                f"{where}: the saved state does not fit this {type(into).__name__}: missing "
                f"{missing[:8]}, unexpected {unexpected[:8]}, different shapes {resized[:8]}"
            )
        return
    if isinstance(into, Stateful) or not isinstance(into, (Mapping, list, tuple)):
        return  # other Stateful objects validate in their own load_state_dict
    if isinstance(into, Mapping):
        keys: dict[Any, Any] = {}
        if isinstance(tree, dict) and not _is_tagged(tree):
            keys = dict(tree)
        elif isinstance(tree, dict) and "$dict" in tree:
            keys = {decode(k, lambda n: n): v for k, v in tree["$dict"]}
        else:
            raise StateMismatchError(f"{where}: into= holds a dict but the checkpoint does not")
        missing = [k for k in into if k not in keys]
        if missing:
            raise StateMismatchError(
                f"{where}: the checkpoint has no {missing}; it holds {sorted(map(str, keys))}"
            )
        for k in into:
            _check_into(keys[k], into[k], entries, aliases, (*path, str(k)))
        return
    items = tree if isinstance(tree, list) else (tree or {}).get("$tuple")
    if not isinstance(items, list) or len(items) != len(into):
        raise StateMismatchError(f"{where}: into= holds {len(into)} items; the checkpoint differs")
    for n, (sub_tree, sub_into) in enumerate(zip(items, into, strict=True)):
        _check_into(sub_tree, sub_into, entries, aliases, (*path, str(n)))


def _is_tagged(tree: dict[str, Any]) -> bool:
    return len(tree) == 1 and next(iter(tree)).startswith("$")


def _restore(tree: Any, value: Any, into: Any, path: tuple[str, ...]) -> Any:
    """Put the loaded ``value`` into the objects of ``into``; return ``into``'s shape."""
    where = path_name(path)
    if isinstance(into, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            raise StateMismatchError(
                f"{where}: into= holds a tensor but the checkpoint holds {type(value).__name__}"
            )
        if into.shape != value.shape:
            raise StateMismatchError(
                f"{where}: into= holds a tensor of shape {list(into.shape)} but the checkpoint's "
                f"is {list(value.shape)}"
            )
        with torch.no_grad():
            if not distributed.fill_local(into, value):
                into.copy_(value)  # a no-op when the bytes were read straight into it
        return into
    if isinstance(into, Stateful) and not isinstance(into, (Mapping, type)):
        _load_stateful(into, value, where)
        return into
    if isinstance(into, Mapping):
        if not isinstance(value, Mapping):
            raise StateMismatchError(
                f"{where}: into= holds a dict but the checkpoint holds {type(value).__name__}"
            )
        missing = [k for k in into if k not in value]
        if missing:
            raise StateMismatchError(
                f"{where}: the checkpoint has no {missing}; it holds {sorted(map(str, value))}"
            )
        subtree = tree if isinstance(tree, dict) and not _is_tagged(tree) else {}
        return {
            k: (_restore(subtree.get(k), v, into[k], (*path, str(k))) if k in into else v)
            for k, v in value.items()
        }
    if isinstance(into, (list, tuple)) and isinstance(value, (list, tuple)):
        if len(into) != len(value):
            raise StateMismatchError(
                f"{where}: into= holds {len(into)} items but the checkpoint holds {len(value)}"
            )
        items = [
            _restore(None, v, i, (*path, str(n)))
            for n, (v, i) in enumerate(zip(value, into, strict=True))
        ]
        return type(value)(items) if isinstance(value, tuple) else items
    return value


def _int_state_keys(state: Any) -> Any:
    """An optimizer's state whose per-parameter keys came back as strings ("0": a
    torch.distributed.checkpoint save stores every key as a string) gets them back as the ints
    its param_groups name; the optimizer would otherwise drop that state without a word."""
    if not isinstance(state, dict):
        return state
    inner, groups = state.get("state"), state.get("param_groups")
    if not isinstance(inner, dict) or not inner or not isinstance(groups, list):
        return state
    ids = {
        p for g in groups if isinstance(g, dict) for p in g.get("params", ()) if type(p) is int
    }
    if not all(isinstance(k, str) and k.isascii() and k.isdigit() and int(k) in ids for k in inner):
        return state
    return {**state, "state": {int(k): v for k, v in inner.items()}}


def _load_stateful(obj: Stateful, state: Any, where: str) -> None:
    try:
        if isinstance(obj, torch.nn.Module):
            if not distributed.fill_module(obj, state):
                obj.load_state_dict(state, strict=True)
        elif isinstance(obj, torch.optim.Optimizer):
            obj.load_state_dict(distributed.place_optimizer_state(obj, _int_state_keys(state)))
        else:
            obj.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError) as e:
        raise StateMismatchError(
            f"{where}: the saved state does not fit this {type(obj).__name__}: {e}"
        ) from e


# ---------------------------------------------------------------------------------------------
# the general checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """What ``load_checkpoint`` restored, besides the objects it restored in place.

    Attributes:
        path: the checkpoint that was loaded.
        epoch: the ``epoch`` given to ``save_checkpoint``, or None.
        step: the ``step`` given to ``save_checkpoint``, or None.
        loss: the ``loss`` given to ``save_checkpoint`` (a tensor comes back as a tensor).
        metrics: the ``metrics`` given to ``save_checkpoint``.
        extra: the ``extra`` state given to ``save_checkpoint``, as plain state.
        state: the whole checkpoint dict, as ``load`` returns it.
    """

    path: str
    epoch: int | None = None
    step: int | None = None
    loss: Any = None
    metrics: dict[str, Any] = field(default_factory=dict)
    extra: Any = None
    state: dict[str, Any] = field(default_factory=dict)


_SLOTS = {
    "model": "model_state_dict",
    "optimizer": "optimizer_state_dict",
    "scheduler": "scheduler_state_dict",
    "scaler": "scaler_state_dict",
}


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    epoch: int | None = None,
    step: int | None = None,
    loss: Any = None,
    metrics: Mapping[str, Any] | None = None,
    extra: Any = None,
    rng: bool = True,
    metadata: Mapping[str, Any] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SaveInfo:
    """Save everything needed to resume training exactly: the tutorials' general checkpoint.

    The file holds ``model_state_dict``, ``optimizer_state_dict``, ``scheduler_state_dict``,
    ``scaler_state_dict``, ``epoch``, ``step``, ``loss``, ``metrics``, ``extra`` and, with
    ``rng``, the state of every random number generator.

    Args:
        path: a ``.safetensors`` file, or a directory for any other name; local, or an
            fsspec URL.
        model: the module whose weights are saved.
        optimizer: the optimizer, if any.
        scheduler: the learning-rate scheduler, if any.
        scaler: the ``GradScaler`` of mixed-precision training, if any.
        epoch: the epoch just finished.
        step: the optimizer step just taken.
        loss: the last loss (a tensor is detached and stored as a tensor).
        metrics: named values such as ``{"val_loss": 0.31}``.
        extra: any other state, as ``save`` takes it.
        rng: also save the state of every random number generator (see ``RNGState``).
        metadata: JSON-serialisable values stored with the checkpoint.
        storage_options: for a URL, the options of its fsspec file system.

    Returns:
        What was written.

    Raises:
        UnsupportedObjectError: a value cannot be stored; the message names its place.
        UnsupportedFormatError: ``path`` ends in a pickle suffix such as ``.pt``.
        StorageError: the write failed; any previous checkpoint at ``path`` is unchanged.

    Example:
        ```python
        tk.save_checkpoint("ckpt.safetensors", model=model, optimizer=optimizer,
                           epoch=epoch, loss=loss)
        ```
    """
    given = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    state: dict[str, Any] = {_SLOTS[k]: v for k, v in given.items() if v is not None}
    if isinstance(loss, torch.Tensor):
        loss = loss.detach()
    state.update(epoch=epoch, step=step, loss=loss, metrics=dict(metrics or {}), extra=extra)
    if rng:
        state["rng_state"] = RNGState()
    return save(state, path, metadata=metadata, storage_options=storage_options)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    model: torch.nn.Module | None = None,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    map_location: Device | None = None,
    rng: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> Checkpoint:
    """Restore a checkpoint written by ``save_checkpoint`` into the objects given, in place.

    Objects not given are left alone; the random number generators are restored with ``rng``.
    After loading, set ``model.eval()`` for inference or ``model.train()`` to resume training.

    Args:
        path: the checkpoint file or directory; local, or an fsspec URL.
        model: the module to load the weights into.
        optimizer: the optimizer to restore.
        scheduler: the learning-rate scheduler to restore.
        scaler: the ``GradScaler`` to restore.
        map_location: the device loaded tensors are placed on, as for ``load``.
        rng: restore the random number generators, if the checkpoint holds their state.
        storage_options: for a URL, the options of its fsspec file system.

    Returns:
        The epoch, step, loss, metrics and extra state that were saved.

    Raises:
        StateMismatchError: an object is given whose state the checkpoint lacks or does not fit.

    Example:
        ```python
        ckpt = tk.load_checkpoint("ckpt.safetensors", model=model, optimizer=optimizer)
        start_epoch = ckpt.epoch + 1
        ```
    """
    given = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}
    into: dict[str, Any] = {_SLOTS[k]: v for k, v in given.items() if v is not None}
    state = load(path, into=into, map_location=map_location, storage_options=storage_options)
    if not isinstance(state, dict):
        raise StateMismatchError(f"{path}: holds no checkpoint dict")
    if rng and isinstance(state.get("rng_state"), Mapping):
        RNGState().load_state_dict(state["rng_state"])
    epoch = state.get("epoch")
    step = state.get("step")
    return Checkpoint(
        path=os.fspath(path),
        epoch=epoch,
        step=step,
        loss=state.get("loss"),
        metrics=state.get("metrics") or {},
        extra=state.get("extra"),
        state=state,
    )
