"""The general checkpoint of the tutorials: model, optimizer, scheduler, scaler, epoch, loss,
metrics and the random generators, saved and restored in one call."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep._types import Device
from torchkeep.checkpoint.state import load, one_source, save
from torchkeep.container import SaveInfo
from torchkeep.errors import StateMismatchError
from torchkeep.tree import RNGState, Stateful


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
    source: str | os.PathLike[str] | None = None,
    *,
    model: torch.nn.Module | None = None,
    optimizer: Stateful | None = None,
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    map_location: Device | None = None,
    rng: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    device: Device | None = None,
    verify: bool = True,
    path: str | os.PathLike[str] | None = None,
) -> Checkpoint:
    """Restore a checkpoint written by ``save_checkpoint`` into the objects given, in place.

    Objects not given are left alone; the random number generators are restored with ``rng``.
    After loading, set ``model.eval()`` for inference or ``model.train()`` to resume training.

    Args:
        source: the checkpoint file or directory; local, or an fsspec URL.
        model: the module to load the weights into.
        optimizer: the optimizer to restore.
        scheduler: the learning-rate scheduler to restore.
        scaler: the ``GradScaler`` to restore.
        map_location: the device loaded tensors are placed on, as for ``load``.
        rng: restore the random number generators, if the checkpoint holds their state.
        storage_options: for a URL, the options of its fsspec file system.
        device: ``map_location`` under the name the other loaders use; give one of the two.
        verify: check every tensor's checksum (on by default), as for ``load``.
        path: ``source`` under its earlier name; give one of the two.

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
    source = one_source(source, path, caller="load_checkpoint")
    state = load(
        source,
        into=into,
        map_location=map_location,
        device=device,
        verify=verify,
        storage_options=storage_options,
    )
    if not isinstance(state, dict):
        raise StateMismatchError(f"{source}: holds no checkpoint dict")
    if rng and isinstance(state.get("rng_state"), Mapping):
        RNGState().load_state_dict(state["rng_state"])
    epoch = state.get("epoch")
    step = state.get("step")
    return Checkpoint(
        path=os.fspath(source),
        epoch=epoch,
        step=step,
        loss=state.get("loss"),
        metrics=state.get("metrics") or {},
        extra=state.get("extra"),
        state=state,
    )
