"""Hugging Face model directories as ``save_pretrained`` writes them: ``tk.load`` and ``tk.diff``
see the state dict ``tk.load_state_dict`` returns, every checksum and CRC-32 checked, and the
command line inspects and compares them.

The models are tiny GPT-2s built from a config (nothing is downloaded). The installed
transformers (5.x) always writes safetensors (``safe_serialization=False`` is ignored), so the
``pytorch_model.bin`` layout (shards and their index) is written here as transformers 4.x wrote it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import torchkeep as tk
from torchkeep.cli import main

LAYOUTS = ("single", "sharded", "bin")


@pytest.fixture
def transformers(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # before transformers is imported: no download
    return pytest.importorskip("transformers")


def _model(transformers: Any, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8, bos_token_id=0, eos_token_id=0
    )
    return transformers.GPT2LMHeadModel(config)


def _save(model: Any, directory: Path, layout: str) -> Path:
    if layout == "single":
        model.save_pretrained(directory)  # model.safetensors
        assert (directory / "model.safetensors").is_file()
    elif layout == "sharded":
        model.save_pretrained(directory, max_shard_size="1KB")
        assert (directory / "model.safetensors.index.json").is_file()
        assert len(list(directory.glob("model-*-of-*.safetensors"))) > 1
    else:
        _save_bin_shards(model, directory)
    return directory


def _save_bin_shards(model: Any, directory: Path) -> None:
    """``pytorch_model-0000i-of-0000n.bin`` shards of what ``save_pretrained`` stores, each a
    ``torch.save`` of its part of the state dict, and ``pytorch_model.bin.index.json``."""
    single = directory.with_name(directory.name + "-single")
    model.save_pretrained(single)
    state = safetensors.torch.load_file(single / "model.safetensors")
    shutil.rmtree(single)
    directory.mkdir()
    keys = list(state)
    parts = [keys[: len(keys) // 3], keys[len(keys) // 3 : 2 * len(keys) // 3]]
    parts.append(keys[2 * len(keys) // 3 :])
    weight_map = {}
    for i, part in enumerate(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{len(parts):05d}.bin"
        torch.save({k: state[k] for k in part}, directory / name)
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_load_returns_what_load_state_dict_returns(transformers, tmp_path, layout):
    model = _model(transformers)
    directory = _save(model, tmp_path / layout, layout)
    loaded = tk.load(directory)
    expected = tk.load_state_dict(directory)
    assert isinstance(loaded, dict) and set(loaded) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(loaded[key], tensor), key
    # ... and that is the model's own state (save_pretrained leaves out the tied lm_head.weight)
    state = model.state_dict()
    assert set(loaded) <= set(state) and "transformer.h.0.attn.c_attn.weight" in loaded
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    fresh = _model(transformers, seed=1)
    fresh.load_state_dict(tk.load(directory), strict=False)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)  # tied again by the model


def test_diff_of_hugging_face_directories(transformers, tmp_path):
    model = _model(transformers)
    saved = {layout: _save(model, tmp_path / layout, layout) for layout in LAYOUTS}
    for a in LAYOUTS:
        for b in LAYOUTS:
            d = tk.diff(saved[a], saved[b])
            assert d.same and d.unchanged == len(tk.load_state_dict(saved[a])), (a, b, d)
    other = _model(transformers)
    with torch.no_grad():
        other.transformer.ln_f.bias += 1
    changed = _save(other, tmp_path / "changed", "sharded")
    d = tk.diff(saved["single"], changed)
    assert [c.name for c in d.changed] == ["transformer.ln_f.bias"] and not d.added
    assert d.changed[0].max_abs_diff == pytest.approx(1.0)


def test_cli_inspects_and_compares_hugging_face_directories(transformers, tmp_path, capsys):
    model = _model(transformers)
    single = _save(model, tmp_path / "single", "single")
    sharded = _save(model, tmp_path / "sharded", "sharded")
    for directory in (single, sharded):
        assert main(["inspect", "--all", str(directory)]) == 0
        out = capsys.readouterr().out
        assert "Hugging Face directory" in out and "transformer.h.0.attn.c_attn.weight" in out
    assert main(["diff", str(single), str(sharded)]) == 0
    assert "same" in capsys.readouterr().out
    _save(_model(transformers, seed=1), tmp_path / "other", "single")
    assert main(["diff", "--json", str(single), str(tmp_path / "other")]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["same"] and report["changed"]


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_damaged_shard_is_refused(transformers, tmp_path):
    model = _model(transformers)

    # A safetensors shard that lost its end: the files of save_pretrained carry no checksums,
    # but their headers say how long they are.
    sharded = _save(model, tmp_path / "sharded", "sharded")
    shard = sorted(sharded.glob("model-*-of-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 8)
    for load in (tk.load, tk.load_state_dict):
        with pytest.raises(tk.CorruptCheckpointError, match=shard.name):
            load(sharded)

    # A pytorch_model.bin shard with a flipped byte in a tensor: its CRC-32 no longer matches.
    binary = _save(model, tmp_path / "bin", "bin")
    shard = binary / "pytorch_model-00001-of-00003.bin"
    _flip(shard, bytes(shard.read_bytes()).find(b"data/0") + 100)
    for load in (tk.load, tk.load_state_dict):
        with pytest.raises(tk.CorruptCheckpointError, match="CRC"):
            load(binary)
    assert set(tk.load(binary, verify=False)) == set(tk.load_state_dict(binary, verify=False))

    # A shard written by torchkeep (tk.convert to a Hugging Face directory) carries checksums.
    converted = tmp_path / "converted"
    tk.convert(_save(model, tmp_path / "single", "single"), converted, max_shard_size="1KB")
    assert tk.diff(converted, tmp_path / "single").same
    shard = sorted(converted.glob("model-*-of-*.safetensors"))[0]
    _flip(shard, os.path.getsize(shard) - 3)
    for load in (tk.load, tk.load_state_dict):
        with pytest.raises(tk.CorruptCheckpointError, match="checksum"):
            load(converted)
    assert not tk.verify(converted).ok
