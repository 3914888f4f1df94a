"""``convert``: any readable checkpoint to a torchkeep/safetensors file, a torchkeep directory
or a Hugging Face sharded directory, with an optional cast for deployment."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import torch

from torchkeep.checkpoint import load
from torchkeep.container import SaveInfo, WriteOptions, write_container
from torchkeep.errors import UnsupportedFormatError
from torchkeep.format import check_target_name, is_single_file
from torchkeep.format.detect import Kind, readable
from torchkeep.legacy import PendingLoad, write_huggingface
from torchkeep.model import convert_model, is_saved_model
from torchkeep.storage import Storage, is_url, storage_for
from torchkeep.tree import cast_dtype, dedupe, flatten


def _is_weights(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def parse_size(size: int | str) -> int:
    """Return a byte count from an int or a string such as ``"5GB"`` or ``"500MiB"``."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "KB": 10**3, "MB": 10**6,
                 "GB": 10**9, "B": 1}  # fmt: skip
        for unit, factor in units.items():
            if text.endswith(unit) and text[: -len(unit)].replace(".", "", 1).isdigit():
                value = int(float(text[: -len(unit)]) * factor)
                break
        else:
            if not text.isdigit():
                raise ValueError(f"invalid size {size!r}; give bytes or a size such as '5GB'")
            value = int(text)
    if value <= 0:
        raise ValueError(f"invalid size {size!r}: must be positive")
    return value


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> SaveInfo:
    """Convert any checkpoint torchkeep reads into a torchkeep file, directory or HF directory.

    Args:
        src: a ``torch.save`` file, a safetensors or torchkeep file or directory, or a Hugging
            Face model directory.
        dst: ``*.safetensors`` for one file; any other name for a directory.
        dtype: cast float16/bfloat16/float32/float64 tensors to this dtype (e.g.
            ``torch.bfloat16`` to halve the size for deployment); other dtypes are never cast.
        max_shard_size: write a Hugging Face sharded directory (``model-00001-of-0000N.safetensors``
            plus ``model.safetensors.index.json``) with shards of at most this size (bytes or a
            string such as ``"5GB"``). The source must hold model weights.
        storage_options: the fsspec options of ``src`` and ``dst`` where they are URLs
            (``s3://…``). A remote source is downloaded to a temporary directory first.

    Example:
        ```python
        tk.convert("model.pth", "model.safetensors", dtype=torch.bfloat16)
        ```
    """
    source, src = storage_for(src, storage_options if is_url(os.fspath(src)) else None)
    storage, dst = storage_for(dst, storage_options if is_url(os.fspath(dst)) else None)
    with readable(source, src, download=True) as (_, local, kind):
        return _convert(local, kind, dst, storage, dtype=dtype, max_shard_size=max_shard_size)


def _convert(
    src: str,
    kind: Kind,
    dst: str,
    storage: Storage,
    *,
    dtype: torch.dtype | None,
    max_shard_size: int | str | None,
) -> SaveInfo:
    if max_shard_size is None and is_saved_model(src):
        if is_single_file(dst):
            raise UnsupportedFormatError(
                f"{src}: a whole model converts to a directory; name the target without "
                "'.safetensors' (or convert its weights: tk.save_weights(tk.load_state_dict(src), "
                "dst))"
            )
        return convert_model(src, dst, dtype=dtype, storage=storage)
    if max_shard_size is None and kind.pickled:
        return _stream_pickle(src, dst, storage, dtype=dtype)
    obj = load(src)  # of a Hugging Face directory: its weights, as load_state_dict reads them
    if max_shard_size is not None:
        if not _is_weights(obj):
            raise UnsupportedFormatError(
                f"{src}: holds more than model weights; a Hugging Face directory holds weights "
                "only. Convert to a torchkeep file or directory instead (no max_shard_size)"
            )
        return write_huggingface(
            obj, dst, storage, dtype=dtype, shard_bytes=parse_size(max_shard_size)
        )
    return _write(obj, dst, storage, dtype=dtype)


def _write(
    obj: Any,
    dst: str,
    storage: Storage,
    *,
    dtype: torch.dtype | None,
    ready: Callable[[torch.Tensor], None] | None = None,
    before_commit: Callable[[], None] | None = None,
) -> SaveInfo:
    weights = _is_weights(obj)
    flat = dedupe(obj, composites=True) if weights else flatten(obj)
    tensors = flat.tensors
    return write_container(
        dst,
        tensors,
        kind="weights" if weights else "state",
        storage=storage,
        options=WriteOptions(
            tree=flat.tree,  # a flat dict of tensors has one only if it holds sparse or quantized
            aliases=flat.aliases,
            dtype=_cast(dtype, flat.kept_dtype),
            ready=None if ready is None else (lambda name: ready(tensors[name])),
            before_commit=before_commit,
        ),
    )


def _cast(
    dtype: torch.dtype | None, kept: set[str]
) -> Callable[[str, torch.Tensor], torch.dtype] | None:
    if dtype is None:
        return None
    return lambda name, t: t.dtype if name in kept else cast_dtype(t, dtype)


def _stream_pickle(src: str, dst: str, storage: Storage, *, dtype: torch.dtype | None) -> SaveInfo:
    """Convert a ``torch.save`` file with its reading and the durable write overlapped: each
    tensor is written as soon as its bytes are in, and the result commits only after every
    CRC-32 of the source matched."""
    check_target_name(dst)
    pending = PendingLoad(src)
    try:
        return _write(
            pending.obj,
            dst,
            storage,
            dtype=dtype,
            ready=pending.wait,
            before_commit=pending.finish,
        )
    finally:
        pending.finish_quietly()
