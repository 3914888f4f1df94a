"""Restoring loaded state into existing objects (``load(..., into=...)``): checking that it
fits before a byte is read, finding the tensors to read straight into, and loading Stateful
objects (modules, optimizers, DTensor parts through torchkeep.distributed)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from torchkeep import distributed
from torchkeep.errors import StateMismatchError
from torchkeep.format import Tag
from torchkeep.tree import (
    METADATA,
    STATEFUL,
    TENSOR,
    Stateful,
    decode,
    path_name,
    stored_shape,
)


def plan_destinations(
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
            plan_destinations(tree["state"], into.state_dict(), dests, sharded, aliases)
        elif isinstance(into, torch.optim.Optimizer) and sharded:
            distributed.plan_optimizer(into, tree["state"], sharded, aliases, dests)
        return
    if isinstance(tree, dict) and isinstance(into, Mapping) and not _is_tagged(tree):
        for key, sub in tree.items():
            if key in into:
                plan_destinations(sub, into[key], dests, sharded, aliases)
    elif isinstance(tree, dict) and set(tree) == {Tag.DICT} and isinstance(into, Mapping):
        # Keys that are not strings (an optimizer's parameter ids).
        for key, sub in tree[Tag.DICT]:
            plain_key = decode(key, lambda n: n)
            if isinstance(plain_key, (int, str)) and plain_key in into:
                plan_destinations(sub, into[plain_key], dests, sharded, aliases)
    elif isinstance(tree, list) and isinstance(into, (list, tuple)):
        for sub_tree, sub_into in zip(tree, into, strict=False):
            plan_destinations(sub_tree, sub_into, dests, sharded, aliases)


def check_into(
    tree: Any,
    into: Any,
    entries: Mapping[str, Any],
    aliases: Mapping[str, str],
    path: tuple[str, ...],
) -> None:
    """Raise StateMismatchError if ``into`` cannot take the saved state (keys, shapes)."""
    where = path_name(path)

    def stored(name: str) -> tuple[int, ...]:
        return tuple(entries[aliases.get(name, name)].shape)

    def shape(node: Any) -> tuple[int, ...] | None:
        if isinstance(node, dict) and set(node) == {TENSOR}:
            return stored(node[TENSOR])
        return stored_shape(node, stored)  # a sparse or quantized tensor's, or None

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
        unexpected = [k for k in state if k not in expected and k != METADATA]
        resized = [
            f"{k} (saved {list(shape(state[k]) or ())}, module {list(expected[k].shape)})"
            for k in expected
            # A quantized module's state dict also holds values that are not tensors.
            if k in state
            and isinstance(expected[k], torch.Tensor)
            and shape(state[k]) not in (None, tuple(expected[k].shape))
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
        elif isinstance(tree, dict) and Tag.DICT in tree:
            keys = {decode(k, lambda n: n): v for k, v in tree[Tag.DICT]}
        else:
            raise StateMismatchError(f"{where}: into= holds a dict but the checkpoint does not")
        missing = [k for k in into if k not in keys]
        if missing:
            raise StateMismatchError(
                f"{where}: the checkpoint has no {missing}; it holds {sorted(map(str, keys))}"
            )
        for k in into:
            check_into(keys[k], into[k], entries, aliases, (*path, str(k)))
        return
    items = tree if isinstance(tree, list) else (tree or {}).get(Tag.TUPLE)
    if not isinstance(items, list) or len(items) != len(into):
        raise StateMismatchError(f"{where}: into= holds {len(into)} items; the checkpoint differs")
    for n, (sub_tree, sub_into) in enumerate(zip(items, into, strict=True)):
        check_into(sub_tree, sub_into, entries, aliases, (*path, str(n)))


def _is_tagged(tree: dict[str, Any]) -> bool:
    return len(tree) == 1 and next(iter(tree)).startswith("$") and METADATA not in tree


def restore(tree: Any, value: Any, into: Any, path: tuple[str, ...]) -> Any:
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
            k: (restore(subtree.get(k), v, into[k], (*path, str(k))) if k in into else v)
            for k, v in value.items()
        }
    if isinstance(into, (list, tuple)) and isinstance(value, (list, tuple)):
        if len(into) != len(value):
            raise StateMismatchError(
                f"{where}: into= holds {len(into)} items but the checkpoint holds {len(value)}"
            )
        items = [
            restore(None, v, i, (*path, str(n)))
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
