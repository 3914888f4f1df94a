"""Model weights as standard safetensors files: ``save_weights``, ``load_weights``,
``load_state_dict``."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from torchkeep._types import Device
from torchkeep.checkpoint import check_metadata
from torchkeep.container import Container, SaveInfo, WriteOptions, open_container, write_container
from torchkeep.distributed import read_sharded
from torchkeep.errors import StateMismatchError, UnsupportedObjectError
from torchkeep.format import Sharded
from torchkeep.format.detect import Kind, detect, readable
from torchkeep.legacy import (
    load_dcp,
    load_pickle_file,
    stored_weights,
    weights_files,
    weights_in,
)
from torchkeep.storage import Storage, storage_for
from torchkeep.tree import (
    cast_dtype,
    convert,
    decode,
    dedupe,
    is_dtensor,
    parts_of,
    stored_shape,
)


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
    storage_options: Mapping[str, Any] | None = None,
    storage: Storage | None = None,
) -> SaveInfo:
    """Save a model's weights as a standard ``.safetensors`` file any tool can read.

    Tied weights (one tensor under several names) are stored once and tied again on load.
    Sparse and quantized tensors are stored as their plain parts (``emb.weight:indices``,
    ``emb.weight:values``) with a recipe in the manifest that rebuilds them on load.

    Args:
        model_or_state_dict: a module, or a dict of tensors such as ``model.state_dict()``.
        path: the ``.safetensors`` file (or a directory, for sharded weights).
        dtype: cast float16/bfloat16/float32/float64 tensors to this dtype as they are written
            (e.g. bfloat16), sparse tensors' values too; other dtypes are kept, and so are
            quantized tensors.
        metadata: JSON-serialisable values stored with the weights.
        storage_options: for a URL path (``s3://bucket/model.safetensors``), the options of
            its fsspec file system.
        storage: write through this storage instead of the one ``path`` names (a
            ``torchkeep.testing.FaultyStorage`` that injects faults, for example).

    Example:
        ```python
        tk.save_weights(model, "model.safetensors")
        ```
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
    storage, target = storage_for(path, storage_options, storage)
    flat = dedupe(state, composites=True)

    def cast(name: str, t: torch.Tensor) -> torch.dtype:
        return t.dtype if name in flat.kept_dtype else cast_dtype(t, dtype)

    return write_container(
        target,
        flat.tensors,
        kind="weights",
        storage=storage,
        options=WriteOptions(
            tree=flat.tree,  # only with sparse or quantized tensors: their recipes
            aliases=flat.aliases,
            metadata=check_metadata(metadata),
            dtype=cast,
        ),
    )


class _Part:
    """Weights from one file: read through a container, or already loaded from a pickle."""

    def __init__(
        self,
        container: Container | None = None,
        names: Mapping[str, str] | None = None,
        loaded: Mapping[str, torch.Tensor] | None = None,
        composites: Mapping[str, Any] | None = None,
    ) -> None:
        self.container = container
        self.names = dict(names or {})
        self.loaded = dict(loaded or {})
        # Sparse and quantized tensors, by key: their recipes, naming their stored parts.
        self.composites = dict(composites or {})

    def _sharded(self) -> dict[str, Sharded]:
        manifest = self.container.manifest if self.container is not None else None
        return dict(manifest.distributed or {}) if manifest is not None else {}

    def shapes(self) -> dict[str, tuple[int, ...]]:
        if self.container is not None:
            specs: dict[str, Any] = {**self.container.entries, **self._sharded()}
            aliases = self.container.aliases

            def shape_of(name: str) -> tuple[int, ...]:
                return tuple(specs[aliases.get(name, name)].shape)

            shapes = {k: specs[n].shape for k, n in self.names.items()}
            for k, node in self.composites.items():
                shapes[k] = stored_shape(node, shape_of) or ()
            return shapes
        return {k: tuple(t.shape) for k, t in self.loaded.items()}

    def read(
        self,
        keys: list[str],
        into: Mapping[str, torch.Tensor],
        *,
        lazy: bool,
        verify: bool,
        device: Device | None = None,
    ) -> dict[str, torch.Tensor]:
        if self.container is None:
            return {k: self.loaded[k] for k in keys}
        built = [k for k in keys if k in self.composites]
        keys = [k for k in keys if k not in self.composites]
        aliases = self.container.aliases
        parts = {
            aliases.get(n, n) for k in built for n in (parts_of(self.composites[k]) or {}).values()
        }
        sharded = self._sharded()
        stored = sorted(({self.names[k] for k in keys} | parts) - set(sharded))
        dests = {self.names[k]: t for k, t in into.items() if k in self.names}
        if lazy:
            tensors = self.container.map(stored)
        else:
            tensors = self.container.read(stored, into=dests, verify=verify, device=device)
        wanted = {self.names[k] for k in keys} & set(sharded)
        if wanted:  # saved by the ranks of a distributed save: reassembled whole
            spec = {n: sharded[n] for n in wanted}
            plain = {n: t for n, t in dests.items() if n in wanted and not is_dtensor(t)}
            tensors.update(read_sharded(self.container, spec, plain, verify=verify))
        result = {k: tensors[self.names[k]] for k in keys}
        if built:  # rebuilt from their parts, each once however many keys name it
            made = decode([self.composites[k] for k in built], lambda n: tensors[aliases.get(n, n)])
            result.update(zip(built, made, strict=True))
        return result


class WeightsSource:
    """Model weights from any file or directory torchkeep reads, by state-dict key."""

    def __init__(
        self,
        source: str | os.PathLike[str],
        *,
        verify: bool = True,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        storage, path = storage_for(source, storage_options)
        self.path = path.rstrip("/") or "/"
        self.parts: list[_Part] = []
        self.verify = verify
        self._local = contextlib.ExitStack()
        try:
            self.storage, self._where, kind = self._local.enter_context(
                readable(storage, self.path)
            )
            self._open(kind)
        except BaseException:
            self.close()
            raise
        self.part_of = {k: part for part in self.parts for k in part.shapes()}

    def _open(self, kind: Kind) -> None:
        path = self._where
        if kind is Kind.DCP:
            self.parts.append(_Part(loaded=weights_in(load_dcp(path, verify=self.verify), path)))
            return
        if kind is not Kind.HUGGINGFACE:
            self._open_file(path, kind)
            return
        for file in weights_files(self.storage, path):
            self._open_file(file.path)
            part = self.parts[-1]
            part.names, part.loaded = file.select_names(part.names), file.select(part.loaded)
            file.check_holds(set(part.shapes()))

    def _open_file(self, path: str, kind: Kind | None = None) -> None:
        if not (kind or detect(self.storage, path)).pickled:
            container = open_container(path, storage=self.storage)
            try:
                names, composites = stored_weights(container)
            except BaseException:
                container.close()
                raise
            self.parts.append(_Part(container=container, names=names, composites=composites))
        else:
            obj = load_pickle_file(path, verify=self.verify)
            self.parts.append(_Part(loaded=weights_in(obj, path)))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: shape for part in self.parts for k, shape in part.shapes().items()}

    def read(
        self,
        keys: list[str],
        *,
        into: Mapping[str, torch.Tensor] | None = None,
        lazy: bool = False,
        device: Device | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read ``keys``; tensors in ``into`` of the stored dtype and shape are filled, the
        others are read into new tensors, on ``device`` where the format allows it (the caller
        moves what is still elsewhere)."""
        result: dict[str, torch.Tensor] = {}
        for part in self.parts:
            mine = [k for k in keys if self.part_of[k] is part]
            if mine:
                result.update(
                    part.read(mine, into or {}, lazy=lazy, verify=self.verify, device=device)
                )
        return result

    def close(self) -> None:
        for part in self.parts:
            if part.container is not None:
                part.container.close()
        self._local.close()  # a downloaded copy is removed

    def __enter__(self) -> WeightsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_state_dict(
    source: str | os.PathLike[str],
    *,
    device: Device = "cpu",
    dtype: torch.dtype | None = None,
    lazy: bool = False,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Return the weights stored at ``source`` as a state dict.

    ``source`` is a safetensors file, a torchkeep file or directory (a checkpoint's model
    entry), a ``torch.save`` file (read without running code), a Hugging Face model
    directory (``model.safetensors``, sharded with its index, or ``pytorch_model.bin``), or a
    torch.distributed.checkpoint directory (its ``model`` entry, reassembled in full). Tied
    weights come back as one tensor under all their names.

    Args:
        device: where the tensors are placed.
        dtype: cast float16/bfloat16/float32/float64 tensors to this dtype; others are kept.
        lazy: map safetensors files instead of reading them: tensors are read from disk on
            first use, and checksums are not verified (run ``tk.verify`` for that). Later
            overwrites of the file do not change mapped tensors. Pickle files are always read.
        verify: on eager loads, check every checksum (on by default).
        storage_options: for a URL (``s3://…``), the options of its fsspec file system.

    Example:
        ```python
        model.load_state_dict(tk.load_state_dict("model.safetensors"))
        ```
    """
    with WeightsSource(source, verify=verify, storage_options=storage_options) as weights:
        # Straight to the device unless a cast follows (both copies would be held there).
        direct = not lazy and dtype is None
        tensors = weights.read(list(weights.shapes()), lazy=lazy, device=device if direct else None)
    if device != "cpu" or dtype is not None:
        converted: dict[int, torch.Tensor] = {}  # tied tensors stay tied after conversion
        for key, t in tensors.items():
            if id(t) not in converted:
                converted[id(t)] = convert(t, map_location=device, dtype=dtype)
            tensors[key] = converted[id(t)]
    return tensors


def load_weights(
    model: torch.nn.Module,
    source: str | os.PathLike[str],
    *,
    strict: bool = True,
    strip_prefix: str | None = None,
    device: Device | None = None,
    verify: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> LoadResult:
    """Load weights into ``model`` in place, reading straight into its parameters' memory.

    Parameters with the file's dtype, on the CPU or a GPU, are filled directly (no second copy;
    on a GPU through pinned staging buffers, disk reads overlapping the copies); the others are
    read, then copied in (cast and moved to where each parameter lives).

    Tied weights (parameters the model shares, such as a language model's embedding and
    output head) are read once, into their shared memory: a key the file lacks is not missing
    when the model ties it to one the file holds, as files that store each tied tensor once
    (``save_pretrained``'s) do.

    Args:
        strict: raise if any key is missing, unexpected or of another shape (the default);
            with ``strict=False`` the matching keys are loaded and the rest reported.
        strip_prefix: remove this prefix from the file's keys first, such as ``"module."``
            (added by DistributedDataParallel) or ``"_orig_mod."`` (added by torch.compile).
        device: load the tensors to this device before assigning them (default: the CPU).
        verify: check every checksum. On a corrupt file the error names the tensor; the
            model may then hold part of the new weights.
        storage_options: for a URL (``s3://…``), the options of its fsspec file system.

    Raises:
        StateMismatchError: with ``strict``, keys or shapes that do not fit (all named), before
            anything is read; when the keys carry a wrapper's prefix, the message says which.
        UnsupportedObjectError: the model's state dict holds values other than tensors (a
            quantized module's packed parameters): restore it with ``model.load_state_dict``.

    Example:
        ```python
        model = TheModelClass()
        tk.load_weights(model, "model.safetensors")
        model.eval()
        ```
    """
    expected = model.state_dict()
    others = [k for k, v in expected.items() if not isinstance(v, torch.Tensor)]
    if others:
        raise UnsupportedObjectError(
            f"{type(model).__name__}'s state dict holds values that are not tensors ("
            f"{others[0]}: {type(expected[others[0]]).__name__}), as quantized modules' do; "
            "load_weights reads tensors only: model.load_state_dict(tk.load(path)) restores it"
        )
    with WeightsSource(source, verify=verify, storage_options=storage_options) as weights:
        stored = weights.shapes()
        rename = {_strip(k, strip_prefix): k for k in stored}
        shapes = {k: stored[original] for k, original in rename.items()}
        mismatched = tuple(
            k for k in expected if k in shapes and tuple(expected[k].shape) != shapes[k]
        )
        fitting = [k for k in expected if k in shapes and k not in mismatched]
        wanted, tied = _one_per_tie(model, expected, fitting)
        missing = tuple(k for k in expected if k not in shapes and k not in tied)
        unexpected = tuple(k for k in shapes if k not in expected)
        result = LoadResult(missing, unexpected, mismatched)
        if strict and not result.ok:
            raise StateMismatchError(
                _mismatch_message(weights.path, model, result, expected, shapes)
            )
        # Read straight into the parameters (on any device) unless they must move.
        target = None if device is None else _concrete(torch.device(device))
        dests = {
            rename[k]: expected[k] for k in wanted if target is None or expected[k].device == target
        }
        tensors = weights.read([rename[k] for k in wanted], into=dests, device=device)
    state = {k: convert(tensors[rename[k]], map_location=device, dtype=None) for k in wanted}
    # load_state_dict runs the module's own hooks; copying a tensor onto itself is skipped.
    model.load_state_dict(state, strict=False)
    return result


def _one_per_tie(
    model: torch.nn.Module, expected: Mapping[str, torch.Tensor], held: list[str]
) -> tuple[list[str], set[str]]:
    """Return the keys of ``held`` (those the file holds with the model's shape, in the
    model's order) to read, one per group of tied keys, and every key tied to one of those:
    reading that one fills them all, and reading two into the same memory would race."""
    group_of = _tie_groups(model, expected)
    read: set[int] = set()
    wanted = []
    for key in held:
        group = group_of.get(key)
        if group is None or group not in read:
            wanted.append(key)
        if group is not None:
            read.add(group)
    return wanted, {k for k, group in group_of.items() if group in read}


def _tie_groups(model: torch.nn.Module, expected: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Number each group of two or more state-dict keys whose tensors the model shares: the
    same memory (address, dtype, shape and strides), or the same parameter or buffer object
    where memory says nothing (meta tensors, empty ones, DTensors, sparse layouts)."""
    objects = {
        **dict(model.named_parameters(remove_duplicate=False)),
        **dict(model.named_buffers(remove_duplicate=False)),
    }
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, t in expected.items():
        if t.device.type == "meta" or t.numel() == 0 or t.layout != torch.strided or is_dtensor(t):
            if key not in objects:
                continue
            identity: tuple[Any, ...] = ("object", id(objects[key]))
        else:
            identity = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        groups.setdefault(identity, []).append(key)
    tied = [keys for keys in groups.values() if len(keys) > 1]
    return {key: number for number, keys in enumerate(tied) for key in keys}


def _concrete(device: torch.device) -> torch.device:
    """``device`` with its index, as tensors report theirs (``cuda`` is ``cuda:N`` there)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _strip(key: str, prefix: str | None) -> str:
    return key[len(prefix) :] if prefix and key.startswith(prefix) else key


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
                f'pass strip_prefix="{prefix}"'
            )
    return (
        f"{path} does not fit {type(model).__name__}: "
        + "; ".join(parts)
        + f". To proceed, {hint}."
    )
