"""Format detection: one answer to "what is at this path?", for files that other tools wrote."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import torchkeep as tk
from torchkeep.errors import CheckpointNotFoundError
from torchkeep.format.detect import Kind, detect, readable
from torchkeep.storage import DEFAULT_STORAGE, storage_for


def _kind(path: Path) -> Kind:
    return detect(DEFAULT_STORAGE, str(path))


def test_files_written_by_torch_and_safetensors(tmp_path: Path) -> None:
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "zip.pt")
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(state, str(tmp_path / "plain.safetensors"))
    tk.save(state, tmp_path / "mine.safetensors")
    assert _kind(tmp_path / "zip.pt") is Kind.TORCH_ZIP
    assert _kind(tmp_path / "legacy.pt") is Kind.TORCH_LEGACY
    assert _kind(tmp_path / "plain.safetensors") is Kind.SAFETENSORS
    assert _kind(tmp_path / "mine.safetensors") is Kind.SAFETENSORS
    assert Kind.TORCH_ZIP.pickled and Kind.TORCH_LEGACY.pickled
    assert not Kind.SAFETENSORS.pickled and not Kind.DCP.pickled


def test_directories_by_their_writers_names(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    tk.save({"w": torch.ones(3)}, tmp_path / "mine")
    dcp.save({"w": torch.ones(3)}, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    (tmp_path / "hf").mkdir()
    save_file({"w": torch.ones(3)}, str(tmp_path / "hf" / "model.safetensors"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    assert _kind(tmp_path / "mine") is Kind.DIRECTORY
    assert _kind(tmp_path / "dcp") is Kind.DCP
    assert _kind(tmp_path / "hf") is Kind.HUGGINGFACE
    # Reading these says what is missing.
    assert _kind(tmp_path / "other") is Kind.DIRECTORY
    assert _kind(tmp_path / "empty") is Kind.DIRECTORY


def test_a_save_pretrained_directory_is_hugging_face(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=16, n_positions=8)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(
        tmp_path / "sharded", max_shard_size="1KB"
    )
    assert _kind(tmp_path / "gpt2") is Kind.HUGGINGFACE
    assert _kind(tmp_path / "sharded") is Kind.HUGGINGFACE


def test_nothing_there_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="nothing: no such file or directory"):
        _kind(tmp_path / "nothing")


def test_object_stores_download_only_what_is_parsed_locally(tmp_path: Path) -> None:
    storage, url = storage_for("memory://detect/zip.pt")
    torch.save({"w": torch.ones(3)}, tmp_path / "zip.pt")
    storage.call(url, "uploading", "put", str(tmp_path / "zip.pt"), url)
    tk.save({"w": torch.ones(3)}, "memory://detect/mine.safetensors")
    with readable(storage, url) as (reading, path, kind):
        assert kind is Kind.TORCH_ZIP and reading is DEFAULT_STORAGE and path != url
    mine = "memory://detect/mine.safetensors"
    with readable(storage, mine) as (reading, path, kind):
        assert kind is Kind.SAFETENSORS and reading is storage and path == mine
