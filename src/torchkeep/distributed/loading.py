"""Loading a distributed save, resharded: each rank reads only the chunks that overlap its own
part of each destination DTensor (a chunk is read whole, so that its checksum is verified),
straight into the destination where the chunk is exactly its part; a whole tensor (a checkpoint
saved with another world size, without a process group, or by torch.distributed.checkpoint) is
copied into a DTensor rank by rank; an optimizer's state is placed like its DTensor parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.distributed.group import Box, local_box
from torchkeep.format import DTYPES, Sharded
from torchkeep.tree import decode, is_dtensor


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
