"""Bit rot: every single-byte change and every truncation of every file a save writes is
detected, by loading and by ``verify``; exhaustively over positions for small saves, and as a
property over positions and values for a save of several checksum chunks."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchkeep as tk
from conftest import SimpleNet

MASKS = (0x01, 0x80, 0xFF)  # the lowest bit, the highest bit, every bit


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": SimpleNet().state_dict(),
        "ids": torch.randint(0, 100, (7,), generator=g, dtype=torch.int8),
        "half": torch.randn(3, generator=g).half(),
        "step": 12,
        "name": "run",
        "loss": 0.25,
    }


def _detected(path: Path, load: Callable[[Path], object]) -> list[str]:
    """What failed to notice the damage at ``path`` (empty when both did)."""
    missed = []
    try:
        load(path)
        missed.append("load")
    except tk.TorchkeepError:
        pass
    if tk.verify(path).ok:
        missed.append("verify")
    return missed


def _sweep(save: Path, target: Path, load: Callable[[Path], object]) -> list[tuple]:
    """Change each byte of ``target`` (a file of the save ``save``) with each mask, then cut it
    at every length; return what went unnoticed."""
    original = target.read_bytes()
    missed = []
    try:
        for position in range(len(original)):
            for mask in MASKS:
                damaged = bytearray(original)
                damaged[position] ^= mask
                target.write_bytes(damaged)
                missed += [(position, mask, m) for m in _detected(save, load)]
        for length in range(len(original)):
            target.write_bytes(original[:length])
            missed += [(length, "cut", m) for m in _detected(save, load)]
    finally:
        target.write_bytes(original)
    load(save)  # the file as it was loads again
    return missed


def test_every_byte_of_a_single_file_save(tmp_path):
    path = tmp_path / "state.safetensors"
    tk.save(_state(), path)
    assert os.path.getsize(path) > 2000
    assert _sweep(path, path, tk.load) == []


def test_every_byte_of_a_weights_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tk.save_weights(SimpleNet(), path)
    assert _sweep(path, path, tk.load_state_dict) == []


@pytest.mark.slow
def test_every_byte_of_every_file_of_a_directory_save(tmp_path):
    path = tmp_path / "ckpt"
    tk.save(_state(), path)
    files = sorted(path.iterdir())
    assert [f.name for f in files] == ["manifest.json", "shard-00000.safetensors"]
    for target in files:
        assert _sweep(path, target, tk.load) == [], target.name


def test_every_byte_of_a_whole_model_save(tmp_path):
    path = tmp_path / "model"
    tk.save_model(SimpleNet(), path)
    for target in sorted(path.iterdir()):
        original = target.read_bytes()
        missed = []
        # Every byte of small files, a spread of positions in large ones.
        step = max(1, len(original) // 1500)
        try:
            for position in range(0, len(original), step):
                damaged = bytearray(original)
                damaged[position] ^= 0xFF
                target.write_bytes(damaged)
                missed += [(position, m) for m in _detected(path, tk.load_model)]
        finally:
            target.write_bytes(original)
        assert missed == [], target.name
    tk.load_model(path)


# ---------------------------------------------------------------------------------------------
# a property over positions and values, for a save of several checksum chunks


_BIG: dict[str, Path] = {}


def _big_save() -> Path:
    """A 24 MiB save whose first tensor spans two 16 MiB checksum chunks; written once."""
    if "path" not in _BIG:
        root = Path(tempfile.mkdtemp(prefix="torchkeep-bitrot-"))
        path = root / "big.safetensors"
        g = torch.Generator().manual_seed(1)
        state = {"a": torch.randn(5 << 20, generator=g), "b": torch.randn(1 << 19, generator=g).double(), "n": 3}
        tk.save(state, path)
        _BIG["path"] = path
    return _BIG["path"]


def _changed(path: Path, position: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


@settings(max_examples=150, deadline=None)
@given(fraction=st.floats(0, 1, exclude_max=True), mask=st.integers(1, 255))
def test_any_changed_byte_of_a_large_save_is_detected(fraction, mask):
    path = _big_save()
    position = int(fraction * os.path.getsize(path))
    _changed(path, position, mask)
    try:
        assert _detected(path, tk.load) == [], position
    finally:
        _changed(path, position, mask)  # back as it was


@settings(max_examples=60, deadline=None)
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_any_truncation_of_a_large_save_is_detected(fraction):
    path = _big_save()
    length = int(fraction * os.path.getsize(path))
    with tempfile.TemporaryDirectory() as scratch:
        cut = Path(scratch) / "big.safetensors"
        with open(path, "rb") as src, open(cut, "wb") as dst:
            dst.write(src.read(length))
        assert _detected(cut, tk.load) == [], length


def test_the_large_save_spans_several_checksum_chunks():
    manifest = tk.describe(_big_save())
    assert manifest.tensor_bytes > 16 << 20
    tk.load(_big_save())
