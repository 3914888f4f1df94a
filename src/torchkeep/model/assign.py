"""Putting what a save holds into a rebuilt module: the loaded tensors as its parameters and
buffers (``assign``), and the plain attributes its constructor derived (``plain_attributes``
when saving, ``restore_attributes`` when loading).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from torchkeep.errors import CorruptCheckpointError, StateMismatchError
from torchkeep.model.decode import Trust, decode_value
from torchkeep.model.recipe import encode_value


def assign(
    module: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    *,
    where: str,
    frozen: Iterable[str] = (),
) -> None:
    """Make ``tensors`` the module's parameters and buffers, by name, keeping tied ones tied;
    parameters named in ``frozen`` get ``requires_grad=False``.

    Raises:
        StateMismatchError: a tensor is missing, extra, or of another shape.
    """
    # Keyed by id of the rebuilt model's tensor, which is kept alive beside its replacement so
    # that no id is reused while this runs (a module registered twice is visited twice).
    done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    frozen_keys = set(frozen)
    placed: set[int] = set()
    used: set[str] = set()
    missing: list[str] = []
    for prefix, owner in module.named_modules(remove_duplicate=False):
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for name, old in table.items():
                if old is None:
                    continue
                key = f"{prefix}.{name}" if prefix else name
                if id(old) in placed:  # this module was seen under another name already
                    used.add(key)
                    continue
                if id(old) in done:
                    table[name] = done[id(old)][1]
                    used.add(key)
                    continue
                new = tensors.get(key)
                if new is None:
                    missing.append(key)
                    continue
                if new.shape != old.shape:
                    raise StateMismatchError(
                        f"{where}: '{key}' is stored with shape {list(new.shape)} but the rebuilt "
                        f"model has {list(old.shape)}; the model's code changed since the save"
                    )
                trainable = old.requires_grad and key not in frozen_keys
                value = nn.Parameter(new, requires_grad=trainable) if is_param else new
                table[name] = value
                done[id(old)] = (old, value)
                placed.add(id(value))
                used.add(key)
    extra = sorted(set(tensors) - used)
    if missing or extra:
        raise StateMismatchError(
            f"{where}: the rebuilt model does not fit the stored weights"
            + (f"; missing from the save: {', '.join(missing[:8])}" if missing else "")
            + (f"; not in the rebuilt model: {', '.join(extra[:8])}" if extra else "")
            + ". The model's code changed since the save: load the exported program, or the"
            " weights with tk.load_weights(model, path, strict=False)"
        )


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)) and len(value) <= 64:
        return all(_plain(v) for v in value)
    return False


def plain_attributes(module: nn.Module) -> dict[str, dict[str, Any]]:
    """Every module's plain attributes (numbers, strings, None and short tuples or lists of
    them, as JSON), by module path: what a constructor may have derived from its arguments and
    a recipe may not reproduce (``self.scale = 1 / temperature``)."""
    found: dict[str, dict[str, Any]] = {}
    for prefix, m in module.named_modules():
        values = {
            name: encode_value(value, f"{prefix or '(root)'}.{name}", 0)
            for name, value in vars(m).items()
            if not name.startswith("_") and name != "training" and _plain(value)
        }
        if values:
            found[prefix] = values
    return found


def restore_attributes(module: nn.Module, saved: Any, *, where: str) -> None:
    """Set the plain attributes saved by ``plain_attributes`` on a rebuilt module; only
    attributes the rebuilt module has as plain values are set."""
    if not isinstance(saved, dict):
        raise CorruptCheckpointError(f"{where}: the model's saved attributes are malformed")
    modules = dict(module.named_modules())
    for prefix, values in saved.items():
        owner = modules.get(prefix)
        if owner is None or not isinstance(values, dict):
            raise CorruptCheckpointError(
                f"{where}: saved attributes for '{prefix}', which the rebuilt model lacks"
            )
        for name, encoded in values.items():
            if not _plain(vars(owner).get(name, object())):
                continue  # not a plain attribute of this class: never set from a file
            value = decode_value(encoded, Trust(), where, 0)
            if not _plain(value):
                raise CorruptCheckpointError(
                    f"{where}: saved attribute {prefix}.{name} is malformed"
                )
            setattr(owner, name, value)
