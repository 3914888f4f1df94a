"""Hugging Face model directories as ``save_pretrained`` writes them: ``tk.load`` and ``tk.diff``
see the state dict ``tk.load_state_dict`` returns, every checksum and CRC-32 checked, and the
command line inspects and compares them.

Tied weights are checked both ways: an index that ``tk.convert`` writes lists what each shard
holds, as transformers' does, and ``tk.load_weights`` fills the names a file leaves out through
the model's own ties. A directory that is no checkpoint is said to be what it is.

The models are tiny GPT-2s, Llamas and T5s built from a config (nothing is downloaded). The
installed transformers (5.x) always writes safetensors (``safe_serialization=False`` is ignored),
so the ``pytorch_model.bin`` layout (shards and their index) is written here as transformers 4.x
wrote it.
"""

from __future__ import annotations

import json
import os
import re
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


# ---------------------------------------------------------------------------------------------
# tied weights: GPT-2, Llama with tied embeddings and T5, from tiny configs


def _tied_model(transformers: Any, arch: str, seed: int = 0, *, tied: bool = True) -> Any:
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=16,
            bos_token_id=0, eos_token_id=0,
        )  # fmt: skip
        return transformers.GPT2LMHeadModel(config)
    if arch == "llama":
        config = transformers.LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=16,
            tie_word_embeddings=tied,
        )  # fmt: skip
        return transformers.LlamaForCausalLM(config)
    config = transformers.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2, vocab_size=100,
        decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


ARCHS = ("gpt2", "llama", "t5")
# The names each model ties to its input embedding (transformers stores the first only).
TIES = {
    "gpt2": ("transformer.wte.weight", "lm_head.weight"),
    "llama": ("model.embed_tokens.weight", "lm_head.weight"),
    "t5": (
        "shared.weight",
        "encoder.embed_tokens.weight",
        "decoder.embed_tokens.weight",
        "lm_head.weight",
    ),
}


def _assert_tied(model: Any, names: tuple[str, ...]) -> None:
    state = model.state_dict()
    assert len({state[n].data_ptr() for n in names}) == 1, names
    params = dict(model.named_parameters(remove_duplicate=False))
    assert len({id(params[n]) for n in names if n in params}) == 1, names


def _assert_same_weights(model: Any, reference: Any) -> None:
    mine, theirs = model.state_dict(), reference.state_dict()
    assert set(mine) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(mine[key], tensor), key


def _index(directory: Path) -> dict[str, str]:
    return json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_to_shards_indexes_what_each_shard_holds(transformers, tmp_path, arch):
    model = _tied_model(transformers, arch)
    ties = TIES[arch]
    _assert_tied(model, ties)
    model.save_pretrained(tmp_path / "reference", max_shard_size="20KB")
    reference = _index(tmp_path / "reference")
    assert not set(ties[1:]) & set(reference)  # transformers lists a tied tensor once

    # A torch.save of the state dict holds every tied name; the converted index lists each
    # tensor once, under the shard that stores it, as transformers does.
    torch.save(model.state_dict(), tmp_path / "model.pt")
    converted = tmp_path / "converted"
    tk.convert(tmp_path / "model.pt", converted, max_shard_size="20KB")
    weight_map = _index(converted)
    assert set(weight_map) == set(reference)
    for shard in set(weight_map.values()):
        with safetensors.safe_open(converted / shard, "pt") as f:
            held = set(f.keys())
        assert held == {k for k, v in weight_map.items() if v == shard}, shard

    # transformers loads it, tied again; torchkeep reads it back with the ties.
    model.config.save_pretrained(converted)
    loaded = type(model).from_pretrained(converted)
    _assert_same_weights(loaded, model)
    _assert_tied(loaded, ties)
    state = tk.load_state_dict(converted)
    assert set(state) == set(model.state_dict())
    assert len({id(state[n]) for n in ties}) == 1  # one tensor under all its names
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert tk.diff(tmp_path / "model.pt", converted).same
    fresh = _tied_model(transformers, arch, seed=1)
    assert tk.load_weights(fresh, converted).ok
    _assert_same_weights(fresh, model)
    _assert_tied(fresh, ties)
    described = tk.describe(converted)
    assert {t.name for t in described.tensors} == set(reference)
    assert set(described.aliases) == set(ties[1:])


@pytest.mark.parametrize("layout", ("single", "sharded"))
@pytest.mark.parametrize("arch", ARCHS)
def test_strict_load_weights_fills_tied_keys_through_their_tie(
    transformers, tmp_path, arch, layout
):
    model = _tied_model(transformers, arch)
    directory = tmp_path / layout
    if layout == "single":
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size="20KB")
        assert len(set(_index(directory).values())) > 1
    ties = TIES[arch]
    for strict in (True, False):
        fresh = _tied_model(transformers, arch, seed=1)
        result = tk.load_weights(fresh, directory, strict=strict)
        assert result.ok and result.missing == (), result
        _assert_same_weights(fresh, model)
        _assert_tied(fresh, ties)  # read once, into the memory the tied names share


def test_a_file_holding_every_tied_name_keeps_the_tie(transformers, tmp_path):
    model = _tied_model(transformers, "t5")
    torch.save(model.state_dict(), tmp_path / "model.pt")  # all four tied names, one storage
    tk.save_weights(model, tmp_path / "model.safetensors")  # stored once, with its aliases
    for source in (tmp_path / "model.pt", tmp_path / "model.safetensors"):
        fresh = _tied_model(transformers, "t5", seed=1)
        assert tk.load_weights(fresh, source).ok
        _assert_same_weights(fresh, model)
        _assert_tied(fresh, TIES["t5"])


def test_only_truly_missing_keys_are_reported(transformers, tmp_path):
    model = _tied_model(transformers, "llama")
    model.save_pretrained(tmp_path / "tied")
    # A key the file lacks and the model ties to nothing is missing, whatever else is tied.
    state = safetensors.torch.load_file(tmp_path / "tied" / "model.safetensors")
    del state["model.norm.weight"]
    (tmp_path / "partial").mkdir()
    safetensors.torch.save_file(state, tmp_path / "partial" / "model.safetensors")
    with pytest.raises(tk.StateMismatchError, match=r"model\.norm\.weight") as info:
        tk.load_weights(_tied_model(transformers, "llama", seed=1), tmp_path / "partial")
    assert "lm_head" not in str(info.value)
    fresh = _tied_model(transformers, "llama", seed=1)
    result = tk.load_weights(fresh, tmp_path / "partial", strict=False)
    assert result.missing == ("model.norm.weight",)
    assert torch.equal(fresh.lm_head.weight, model.lm_head.weight)
    _assert_tied(fresh, TIES["llama"])
    # An untied model's head is its own: the tied file does not hold it.
    untied = _tied_model(transformers, "llama", seed=1, tied=False)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    with pytest.raises(tk.StateMismatchError, match=r"missing from the file: lm_head\.weight"):
        tk.load_weights(untied, tmp_path / "tied")
    assert tk.load_weights(untied, tmp_path / "tied", strict=False).missing == ("lm_head.weight",)


# ---------------------------------------------------------------------------------------------
# every reader and command, on every layout


@pytest.mark.parametrize("layout", LAYOUTS)
def test_describe_and_verify_every_layout(transformers, tmp_path, layout, capsys):
    model = _model(transformers)
    directory = _save(model, tmp_path / layout, layout)
    state = tk.load_state_dict(directory)
    info = tk.describe(directory)
    assert info.format == "Hugging Face directory" and info.kind == "weights"
    assert {t.name for t in info.tensors} == set(state)
    assert info.tensor_bytes == sum(t.numel() * t.element_size() for t in state.values())
    weights = [p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin")]
    assert info.file_bytes == sum(p.stat().st_size for p in weights)
    report = tk.verify(directory)
    assert report.ok and report.tensors == len(state), report
    assert report.checksummed == (layout == "bin")  # the CRC-32s of torch.save's zip
    assert main(["inspect", "--all", str(directory)]) == 0
    out = capsys.readouterr().out
    assert "Hugging Face directory" in out and "transformer.wte.weight" in out
    assert main(["verify", str(directory)]) == 0
    assert f"ok {directory}: {len(state)} tensors" in capsys.readouterr().out
    assert main(["diff", str(directory), str(_save(model, tmp_path / "again", "single"))]) == 0
    assert "same" in capsys.readouterr().out
    assert tk.load_checkpoint(directory).state.keys() == state.keys()


def _not_checkpoints(transformers: Any, root: Path) -> dict[str, Path]:
    empty = root / "empty"
    empty.mkdir()
    files = root / "files"
    files.mkdir()
    (files / "notes.txt").write_text("mine")
    (files / "data.csv").write_text("1,2")
    config_only = root / "config-only"
    _model(transformers).config.save_pretrained(config_only)
    no_index = root / "no-index"
    _save(_model(transformers), no_index, "sharded")
    (no_index / "model.safetensors.index.json").unlink()
    return {"empty": empty, "files": files, "config-only": config_only, "no-index": no_index}


def test_a_directory_that_is_no_checkpoint_is_never_called_interrupted(
    transformers, tmp_path, capsys
):
    said = {
        "empty": "an empty directory",
        "files": "holds data.csv, notes.txt and no manifest.json",
        "config-only": "holds config.json, as a Hugging Face model directory does, but no weight",
        "no-index": "Hugging Face weight shards (model-00001-of-00005.safetensors",
    }
    for name, directory in _not_checkpoints(transformers, tmp_path).items():
        for read in (tk.load, tk.load_state_dict, tk.describe, tk.load_checkpoint):
            with pytest.raises(tk.TorchkeepError) as info:
                read(directory)
            message = str(info.value)
            assert "never committed" not in message and "interrupted" not in message, message
            assert message.startswith(f"{directory}: ") and said[name] in message, message
            assert "torchkeep reads" in message and "Hugging Face model directories" in message
        with pytest.raises(tk.TorchkeepError, match=re.escape(said[name])) as info:
            tk.load_weights(_model(transformers), directory)
        assert "never committed" not in str(info.value)
        report = tk.verify(directory)
        assert not report.ok and said[name] in report.problems[0]
        for command in ("inspect", "verify"):
            assert main([command, str(directory)]) == 1
            out = capsys.readouterr()
            assert said[name] in out.out + out.err and "never committed" not in out.out + out.err


def test_a_hugging_face_directory_is_named_where_a_save_is_needed(transformers, tmp_path):
    directory = _save(_model(transformers), tmp_path / "hf", "single")
    with pytest.raises(tk.IncompleteCheckpointError, match="a Hugging Face model directory") as e:
        tk.load_model(directory)
    assert "never committed" not in str(e.value) and "tk.load_weights" in str(e.value)


def test_an_interrupted_save_is_still_called_so(tmp_path):
    tk.save({"w": torch.ones(3)}, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "manifest.json").unlink()
    for read in (tk.load, tk.load_state_dict, tk.describe):
        with pytest.raises(tk.IncompleteCheckpointError, match="never committed"):
            read(tmp_path / "ckpt")
