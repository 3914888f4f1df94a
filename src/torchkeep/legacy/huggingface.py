"""Hugging Face model directories: which files hold which weights (``model.safetensors`` or
``pytorch_model.bin``, or an index and the shards it names), read into one flat state dict, and
written as sharded safetensors files committed by their index.

``load`` reads such a directory with ``load_huggingface``, and ``load_state_dict``/
``load_weights`` (through ``weights.WeightsSource``) open the same ``weights_files``: both return
the same weights.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Mapping, Set
from dataclasses import dataclass
from typing import TypeVar

import torch

from torchkeep.container import (
    DirectoryWrite,
    SaveInfo,
    WriteOptions,
    open_container,
    write_container,
)
from torchkeep.errors import CorruptCheckpointError, StorageError, UnsupportedFormatError
from torchkeep.format import (
    HF_INDEX_FILES,
    HF_SAFETENSORS_INDEX,
    HF_WEIGHT_FILES,
    check_member_name,
    check_target_name,
    hf_shard_name,
    is_single_file,
    load_json,
)
from torchkeep.format.detect import detect
from torchkeep.legacy.model_weights import weight_names, weights_in
from torchkeep.legacy.torch_save import load_pickle_file
from torchkeep.storage import Storage, join
from torchkeep.tree import cast_dtype, dedupe

MAX_INDEX_BYTES = 64 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class WeightsFile:
    """One weights file of a Hugging Face directory.

    Attributes:
        path: the file.
        index: the index that names it, or None for a directory's single weights file.
        keys: the state-dict keys the index places in it; None: all it holds.
    """

    path: str
    index: str | None = None
    keys: frozenset[str] | None = None

    def select(self, found: Mapping[str, T]) -> dict[str, T]:
        """Return the entries of ``found``, read from the file, that its index places there."""
        return {k: v for k, v in found.items() if self.keys is None or k in self.keys}

    def select_names(self, names: Mapping[str, str]) -> dict[str, str]:
        """Return the keys of ``names`` (state-dict key to stored tensor, of a safetensors
        file) that its index places there, and the tied names the file's manifest records
        for them: an index lists a tied tensor once, under the name it is stored as."""
        if self.keys is None:
            return dict(names)
        held = {names[k] for k in self.keys if k in names}
        return {k: n for k, n in names.items() if k in self.keys or n in held}

    def check_holds(self, found: Set[str]) -> None:
        """Raise unless ``found``, the keys read from the file, hold all its index places there."""
        if self.keys is None:
            return
        missing = self.keys - found
        if missing:
            raise CorruptCheckpointError(
                f"{self.path}: holds {len(self.keys) - len(missing)} of the {len(self.keys)} "
                f"tensors {self.index} places there (missing: {sorted(missing)[:5]})"
            )


def weights_files(storage: Storage, path: str) -> list[WeightsFile]:
    """Return the weights files of the Hugging Face directory at ``path``: those its index
    names, each with the keys placed there, or else its single weights file.

    Raises:
        CorruptCheckpointError: an index that is not JSON, too large, or names a file outside
            the directory or a missing one.
        IncompleteCheckpointError: neither an index nor a weights file (as ``open_container``
            says).
    """
    for index in HF_INDEX_FILES:
        if os.path.exists(os.path.join(path, index)):
            return _read_index(path, os.path.join(path, index))
    for single in HF_WEIGHT_FILES:
        if os.path.isfile(os.path.join(path, single)):
            return [WeightsFile(os.path.join(path, single))]
    # raises the error that explains what is missing
    open_container(path, storage=storage).close()
    return []


def _read_index(root: str, index: str) -> list[WeightsFile]:
    with open(index, "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise CorruptCheckpointError(f"{index}: the index is larger than {MAX_INDEX_BYTES} bytes")
    body = load_json(raw.decode("utf-8", "replace"), where=index)
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CorruptCheckpointError(f"{index}: no weight_map of names to files")
    by_file: dict[str, set[str]] = {}
    for key, file in weight_map.items():
        by_file.setdefault(check_member_name(file, where=index), set()).add(key)
    files = []
    for file, keys in sorted(by_file.items()):
        member = os.path.join(root, file)
        if not os.path.isfile(member):
            raise CorruptCheckpointError(f"{member}: named by {index} but missing")
        files.append(WeightsFile(member, index, frozenset(keys)))
    return files


def load_huggingface(
    storage: Storage, path: str, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Return the weights of the Hugging Face directory at ``path`` as one flat state dict,
    the one ``load_state_dict`` returns: with ``verify``, every checksum (torchkeep files) and
    CRC-32 (``pytorch_model.bin`` files) checked; tied weights one tensor under all their names.
    """
    state: dict[str, torch.Tensor] = {}
    for file in weights_files(storage, path):
        state.update(_read_weights(storage, file, verify=verify))
    return state


def _read_weights(storage: Storage, file: WeightsFile, *, verify: bool) -> dict[str, torch.Tensor]:
    if detect(storage, file.path).pickled:
        loaded = file.select(weights_in(load_pickle_file(file.path, verify=verify), file.path))
        file.check_holds(set(loaded))
        return loaded
    with open_container(file.path, storage=storage) as container:
        names = file.select_names(weight_names(container))
        file.check_holds(set(names))
        tensors = container.read(sorted(set(names.values())), verify=verify)
    return {k: tensors[n] for k, n in names.items()}


def write_huggingface(
    weights: Mapping[str, torch.Tensor],
    dst: str,
    storage: Storage,
    *,
    dtype: torch.dtype | None,
    shard_bytes: int,
) -> SaveInfo:
    """Write ``weights`` as a Hugging Face sharded directory at ``dst``: safetensors shards of
    at most ``shard_bytes`` (``model-00001-of-0000N.safetensors``), then the index that commits
    them (``model.safetensors.index.json``); tensors cast to ``dtype`` as ``tree.cast_dtype``
    says. Tied weights are stored once: the index names the stored one, the shard's manifest
    its ties."""
    if is_single_file(dst):
        raise UnsupportedFormatError(
            f"{dst}: a Hugging Face sharded checkpoint is a directory; give a name without the "
            ".safetensors suffix"
        )
    check_target_name(dst)
    started = time.perf_counter()
    flat = dedupe(weights)  # tied weights are stored once, as Hugging Face does

    def target(t: torch.Tensor) -> torch.dtype:
        return cast_dtype(t, dtype)

    sizes = {name: t.numel() * target(t).itemsize for name, t in flat.tensors.items()}
    shards = _shards(sizes, shard_bytes)
    count = len(shards)
    files = [hf_shard_name(i, count) for i in range(count)]
    if not storage.atomic_dirs and storage.exists(join(dst, HF_SAFETENSORS_INDEX)):
        raise StorageError(
            errno.EEXIST,
            f"{dst}: holds a Hugging Face checkpoint; in object storage it cannot be replaced "
            "without a moment where neither is whole. Convert to a new path, or delete it first",
        )
    write = DirectoryWrite.begin(dst, storage, marker=HF_SAFETENSORS_INDEX)
    try:
        total = 0
        for file, names in zip(files, shards, strict=True):
            write.wrote([file])
            info = write_container(
                join(write.staging, file),
                {n: flat.tensors[n] for n in names},
                kind="weights",
                storage=storage,
                options=WriteOptions(
                    aliases={a: t for a, t in flat.aliases.items() if t in names},
                    dtype=lambda _, t: target(t),
                ),
            )
            total += info.file_bytes
        # As transformers writes it: each name under the shard that stores it; tied names are
        # left out (each shard's manifest records them, and models tie them again on load).
        index = {
            "metadata": {
                "total_parameters": sum(t.numel() for t in flat.tensors.values()),
                "total_size": sum(sizes.values()),
            },
            "weight_map": {n: f for f, names in zip(files, shards, strict=True) for n in names},
        }
        text = json.dumps(index, indent=2, sort_keys=True).encode()
        # The index is written last: a reader never sees it before every shard it names.
        write.commit(text, marker=HF_SAFETENSORS_INDEX)
    except BaseException:
        write.discard()
        raise
    return SaveInfo(
        dst, (*files, HF_SAFETENSORS_INDEX), len(flat.tensors), sum(sizes.values()),
        total + len(text), time.perf_counter() - started,
    )  # fmt: skip


def _shards(sizes: Mapping[str, int], shard_bytes: int) -> list[list[str]]:
    """Cut the tensors, in order, into shards of at most ``shard_bytes`` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
