"""The benchmark's workload: a transformer-like state dict, a model for it, and file helpers."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Mapping

import torch
from torch import nn

MIB = 1 << 20
LAYERS = 24


def _spec(total_bytes: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a transformer of about ``total_bytes`` bytes.

    Per layer: q/k/v/o projections with biases in bf16 (8h² + 8h bytes), an MLP of width 4h in
    fp32 (32h² + 20h) and two layer norms in fp32 (16h). The embedding absorbs the remainder.
    """
    h = max(16, int(math.sqrt(max(total_bytes, 1) / (40 * LAYERS + 32))) // 16 * 16)
    f32, bf16, i64 = torch.float32, torch.bfloat16, torch.int64
    layers: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    step_every = max(1, LAYERS // 4)
    for i in range(LAYERS):
        p = f"layers.{i}"
        for proj in ("q", "k", "v", "o"):
            layers.append((f"{p}.attn.{proj}.weight", (h, h), bf16))
            layers.append((f"{p}.attn.{proj}.bias", (h,), bf16))
        layers += [
            (f"{p}.mlp.up.weight", (4 * h, h), f32),
            (f"{p}.mlp.up.bias", (4 * h,), f32),
            (f"{p}.mlp.down.weight", (h, 4 * h), f32),
            (f"{p}.mlp.down.bias", (h,), f32),
        ]
        for norm in ("ln1", "ln2"):
            layers.append((f"{p}.{norm}.weight", (h,), f32))
            layers.append((f"{p}.{norm}.bias", (h,), f32))
        if i % step_every == 0:
            layers.append((f"{p}.step", (), i64))
    tail = [("norm.weight", (h,), f32), ("norm.bias", (h,), f32)]
    used = sum(math.prod(s) * d.itemsize for _, s, d in layers + tail)
    vocab = max(16, (total_bytes - used) // (4 * h))
    return [("embed.weight", (vocab, h), f32), *layers, *tail]


def _fill(t: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    flat = t.view(-1)
    n, pos = flat.numel(), 0
    while pos < n:
        k = min(n - pos, pool.numel() - offset)
        flat[pos : pos + k].copy_(pool[offset : offset + k])
        pos += k
        offset = 0


def make_state_dict(total_bytes: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a transformer-like state dict of about ``total_bytes`` bytes.

    An embedding, ``LAYERS`` layers (attention in bf16, MLP and layer norms in fp32, an int64
    ``step`` buffer every few layers) and a final norm: about 400 tensors. Values are tiled
    from a 16 MiB random pool (distinct offsets per tensor), so building 1 GiB takes well under
    a second.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(4 << 20, dtype=torch.float32).uniform_(-0.1, 0.1, generator=generator)
    state: dict[str, torch.Tensor] = {}
    for index, (name, shape, dtype) in enumerate(_spec(total_bytes)):
        if dtype == torch.int64:
            state[name] = torch.tensor(1000 * (index + 1) + seed, dtype=dtype)
            continue
        t = torch.empty(shape, dtype=dtype)
        _fill(t, pool, (index * 7919 + seed) % pool.numel())
        state[name] = t
    return state


def make_model(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Return a module whose ``state_dict()`` has exactly the keys, shapes and dtypes given.

    Nested ``nn.Module`` containers follow the dotted names; floating-point entries become
    parameters, the others buffers. Every value is zeroed, so the memory is already faulted
    in, as in a real, initialised model.
    """
    root = nn.Module()
    modules: dict[str, nn.Module] = {"": root}
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module, prefix = root, ""
        for part in path:
            prefix = f"{prefix}.{part}" if prefix else part
            if prefix not in modules:
                child = nn.Module()
                module.add_module(part, child)
                modules[prefix] = child
            module = modules[prefix]
        memory = torch.empty(value.shape, dtype=value.dtype).zero_()
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(memory))
        else:
            module.register_buffer(leaf, memory)
    return root


def make_raw_buffer(nbytes: int) -> torch.Tensor:
    """Return ``nbytes`` of random bytes, faulted in (the raw device's reference writes them,
    through ``cases.aligned_buffer``)."""
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    _fill(buffer, torch.randint(0, 256, (16 << 20,), dtype=torch.uint8), 0)
    return buffer


def state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Return the number of bytes of tensor data in ``state``."""
    return sum(t.numel() * t.element_size() for t in state.values())


# ---------------------------------------------------------------------------------------------
# file helpers


def _drop_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_cache(path: str | os.PathLike[str]) -> None:
    """Write ``path`` back and drop it from the page cache (every file, for a directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _drop_file(os.path.join(root, name))
    else:
        _drop_file(path)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make the data of the file at ``path`` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_file(path: str) -> None:
    """Delete the file at ``path`` if there is one."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def touch(state: Mapping[str, torch.Tensor]) -> int:
    """Read every byte of every tensor once (summed as int64 words); return the sum."""
    total = 0
    for t in state.values():
        flat = t.detach().reshape(-1).view(torch.uint8)
        words = flat.numel() // 8 * 8
        try:
            total += int(flat[:words].view(torch.int64).sum()) + int(flat[words:].sum())
        except RuntimeError:  # not 8-byte aligned: byte by byte (slow, but never met here)
            total += int(flat.sum())
    return total
