"""Model weights as standard safetensors files: ``save_weights``, ``load_weights``,
``load_state_dict``."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep.checkpoint import Device, check_metadata, convert
from torchkeep.container import Container, SaveInfo, open_container, write_container
from torchkeep.errors import StateMismatchError, UnsupportedFormatError, UnsupportedObjectError
from torchkeep.tree import STATEFUL, TENSOR, dedupe

# Where a checkpoint keeps its model, in the order they are looked for.
MODEL_KEYS = ("model_state_dict", "model", "state_dict", "module")


@dataclass(frozen=True)
class LoadResult:
    """What ``load_weights`` did not load.

    Attributes:
        missing: keys the model has and the file lacks.
        unexpected: keys the file has and the model lacks.
        mismatched: keys present in both with different shapes (left unloaded).
    """

    missing: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def save_weights(
    model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> SaveInfo:
    """Save a model's weights as a standard ``.safetensors`` file any tool can read.

    Tied weights (one tensor under several names) are stored once and tied again on load.

    Args:
        model_or_state_dict: a module, or a dict of tensors such as ``model.state_dict()``.
        path: the ``.safetensors`` file (or a directory, for sharded weights).
        dtype: cast floating-point tensors to this dtype as they are written (e.g. bfloat16).
        metadata: JSON-serialisable values stored with the weights.

    Example::

        tk.save_weights(model, "model.safetensors")
    """
    state: Mapping[str, torch.Tensor]
    if isinstance(model_or_state_dict, torch.nn.Module):
        state = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        state = model_or_state_dict
    else:
        raise UnsupportedObjectError(
            "save_weights takes a module or a dict of tensors, not "
            f"{type(model_or_state_dict).__name__}"
        )
    flat = dedupe(state)

    def cast(name: str, t: torch.Tensor) -> torch.dtype:
        return dtype if dtype is not None and t.is_floating_point() else t.dtype

    return write_container(
        os.fspath(path),
        flat.tensors,
        kind="weights",
        aliases=flat.aliases,
        metadata=check_metadata(metadata),
        dtype=cast,
    )


def weight_names(container: Container) -> dict[str, str]:
    """Map each state-dict key of the file's model to the stored tensor holding it."""
    aliases = container.aliases
    manifest = container.manifest
    if manifest is None or manifest.tree is None:
        keys = {name: name for name in container.entries}
        keys.update(aliases)
        return keys
    tree = manifest.tree
    for key in MODEL_KEYS:
        if isinstance(tree, dict) and key in tree:
            tree = tree[key]
            break
    if isinstance(tree, dict) and set(tree) == {STATEFUL, "state"}:
        tree = tree["state"]
    if not isinstance(tree, dict) or not any(_is_tensor(v) for v in tree.values()):
        raise UnsupportedFormatError(
            f"{container.path}: holds no model weights (looked for a dict of tensors under "
            f"{', '.join(MODEL_KEYS)}); load it with tk.load instead"
        )
    return {k: aliases.get(v[TENSOR], v[TENSOR]) for k, v in tree.items() if _is_tensor(v)}


def _is_tensor(node: Any) -> bool:
    return isinstance(node, dict) and set(node) == {TENSOR}


def load_state_dict(
    source: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    lazy: bool = False,
    verify: bool = True,
) -> dict[str, torch.Tensor]:
    """Return the weights stored at ``source`` as a state dict.

    ``source`` is a safetensors file, a torchkeep directory, or a torchkeep checkpoint (its
    model entry). Tied weights come back as one tensor under all their names.

    Args:
        device: where the tensors are placed.
        dtype: cast floating-point tensors to this dtype.
        lazy: map the file instead of reading it: tensors are read from disk on first use, and
            checksums are not verified (run ``tk.verify`` for that). Later overwrites of the
            file do not change mapped tensors.
        verify: on eager loads, check every checksum (on by default).

    Example::

        model.load_state_dict(tk.load_state_dict("model.safetensors"))
    """
    with open_container(source) as container:
        keys = weight_names(container)
        stored = sorted(set(keys.values()))
        tensors = container.map(stored) if lazy else container.read(stored, verify=verify)
    if device != "cpu" or dtype is not None:
        tensors = {n: convert(t, map_location=device, dtype=dtype) for n, t in tensors.items()}
    return {key: tensors[name] for key, name in keys.items()}


def load_weights(
    model: torch.nn.Module,
    source: str | os.PathLike[str],
    *,
    strict: bool = True,
    device: Device | None = None,
    verify: bool = True,
) -> LoadResult:
    """Load weights into ``model`` in place, reading straight into its parameters' memory.

    Parameters on the CPU with the file's dtype are filled directly (no second copy); the
    others are read, then copied in (cast and moved to where each parameter lives).

    Args:
        strict: raise if any key is missing, unexpected or of another shape (the default);
            with ``strict=False`` the matching keys are loaded and the rest reported.
        device: load the tensors to this device before assigning them (default: the CPU).
        verify: check every checksum. On a corrupt file the error names the tensor; the
            model may then hold part of the new weights.

    Raises:
        StateMismatchError: with ``strict``, keys or shapes that do not fit (all named), before
            anything is read.

    Example::

        model = TheModelClass()
        tk.load_weights(model, "model.safetensors")
        model.eval()
    """
    with open_container(source) as container:
        keys = weight_names(container)
        expected = model.state_dict()
        shapes = {k: container.entries[name].shape for k, name in keys.items()}
        missing = tuple(k for k in expected if k not in keys)
        unexpected = tuple(k for k in keys if k not in expected)
        mismatched = tuple(
            k for k in expected if k in keys and tuple(expected[k].shape) != shapes[k]
        )
        result = LoadResult(missing, unexpected, mismatched)
        if strict and not result.ok:
            raise StateMismatchError(
                _mismatch_message(container.path, model, result, expected, shapes)
            )
        wanted = {k: keys[k] for k in expected if k in keys and k not in mismatched}
        dests = {} if device is not None else {keys[k]: expected[k] for k in wanted}
        tensors = container.read(sorted(set(wanted.values())), into=dests, verify=verify)
    state = {
        k: convert(tensors[name], map_location=device, dtype=None) for k, name in wanted.items()
    }
    # load_state_dict runs the module's own hooks; copying a tensor onto itself is skipped.
    model.load_state_dict(state, strict=False)
    return result


def _mismatch_message(
    path: str,
    model: torch.nn.Module,
    result: LoadResult,
    expected: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, ...]],
) -> str:
    def listing(keys: tuple[str, ...]) -> str:
        shown = ", ".join(keys[:8])
        return shown + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")

    parts = []
    if result.missing:
        parts.append(f"missing from the file: {listing(result.missing)}")
    if result.unexpected:
        parts.append(f"not in the model: {listing(result.unexpected)}")
    if result.mismatched:
        shown = [
            f"{k} (file {list(shapes[k])}, model {list(expected[k].shape)})"
            for k in result.mismatched[:8]
        ]
        parts.append(f"different shapes: {', '.join(shown)}")
    hint = "pass strict=False to load the keys that fit"
    for prefix in ("_orig_mod.", "module."):
        if result.unexpected and all(k.startswith(prefix) for k in result.unexpected):
            hint = (
                f"the file's keys start with '{prefix}' (added by "
                f"{'torch.compile' if prefix == '_orig_mod.' else 'DistributedDataParallel'}): "
                "save the unwrapped model, or strip the prefix from the keys"
            )
    return (
        f"{path} does not fit {type(model).__name__}: "
        + "; ".join(parts)
        + f". To proceed, {hint}."
    )
