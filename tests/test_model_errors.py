"""Every error path of whole-model saving and loading, triggered by an input made in the test.

Covers the ``raise`` statements and error-converting ``except`` clauses of ``model.py``,
``recipe.py`` and ``program.py``, the model branches of ``convert``, the ``files`` table and
``read_member`` of a directory save (``container.py``), and the file table and model section of
a manifest (``format.py``). Paths already triggered by ``test_model.py``, ``test_program.py``,
``test_validation.py`` or ``test_convert.py`` are not repeated here.

Damaged manifests are resealed with a valid ``manifest_checksum`` (as ``test_validation.py``
does), so the rule under test, not the checksum, is what refuses them. They are written as
compact JSON, the way torchkeep writes them.

Tests marked ``BUG`` in their docstring fail against the current library: each shows a path
that raises a non-library exception or misbehaves.
"""

from __future__ import annotations

import functools
import io
import json
import os
import re
import shutil
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

import torchkeep as tk
import torchkeep.model.program
from torchkeep.container import WriteOptions, open_container, write_container
from torchkeep.format import (
    MANIFEST_FILE,
    FileEntry,
    manifest_from_json,
    manifest_to_json,
    signed_manifest_text,
)
from torchkeep.io.checksum import checksum_data
from torchkeep.model import assign
from torchkeep.model.capture import Recipe
from torchkeep.model.decode import Trust, decode_recipe, resolve
from torchkeep.model.program import PROGRAM_FILE, check_program
from torchkeep.model.recipe import encode_recipe

HERE = __name__  # the name recipes give this module
LINEAR = "torch.nn.modules.linear:Linear"
RELU = "torch.nn.modules.activation:ReLU"
SEQUENTIAL = "torch.nn.modules.container:Sequential"
GOOD_FILE_ENTRY = {"bytes": 1, "checksum": "0" * 16}

# ---------------------------------------------------------------------------------------------
# models and factories, at the top level so that recipes can name them


class Kept(nn.Module):
    """Keeps its argument: a recipe is inferred (and a program is saved with example inputs)."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        self.width = width
        self.fc = nn.Linear(width, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Unkept(nn.Module):
    """Keeps nothing of its argument: saved with example inputs, only its program loads."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, 2 * width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.fc(x))


FRAGILE_BROKEN = False


class Fragile(nn.Module):
    """Its constructor fails once FRAGILE_BROKEN is set: the code changed since the save."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        if FRAGILE_BROKEN:
            raise RuntimeError("the config file is missing")
        self.width = width
        self.fc = nn.Linear(width, 2)


class UnreadableSignature(nn.Module):
    """inspect.signature raises TypeError for it."""

    __signature__ = "not a signature"

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)


class Config:
    """A constructor argument whose comparison raises."""

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("cannot compare configs")


DEFAULT_CONFIG = Config()


class WithConfig(nn.Module):
    def __init__(self, config: Config = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(2, 2)


def returns_int() -> nn.Module:
    """Declared to return a module (so a recipe may call it), but does not."""
    return 10  # type: ignore[return-value]


def returns_dict() -> dict:
    return {}


def one_relu() -> nn.Sequential:
    return nn.Sequential(nn.ReLU())


def two_relus() -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.ReLU())


def unresolvable_hint() -> NoSuchType:  # type: ignore[name-defined]  # noqa: F821
    return nn.ReLU()


# ---------------------------------------------------------------------------------------------
# helpers


def reseal(path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    """Edit a directory save's manifest and recompute its own checksum (compact JSON)."""
    manifest = path / MANIFEST_FILE
    body = json.loads(manifest.read_text())
    edit(body)
    body.pop("manifest_checksum", None)
    manifest.write_text(signed_manifest_text(body))
    return path


def save_linear(tmp_path: Path, name: str = "model") -> Path:
    """A saved model with a recipe and no program (fast: nothing is exported)."""
    path = tmp_path / name
    tk.save_model(nn.Linear(2, 2), path)
    return path


def copy_save(source: Path, tmp_path: Path, name: str = "model") -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def nested_lists(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.fixture(scope="module")
def program_saves(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Saved models with exported programs, made once: ``kept`` has a recipe and a program,
    ``unkept`` only a program. Tests copy them before changing anything."""
    root = tmp_path_factory.mktemp("program_saves")
    torch.manual_seed(0)
    kept, unkept = Kept(3).eval(), Unkept(3).eval()
    tk.save_model(kept, root / "kept", example_inputs=torch.randn(2, 3))
    tk.save_model(unkept, root / "unkept", example_inputs=torch.randn(2, 3))
    return {"kept": root / "kept", "unkept": root / "unkept", "models": (kept, unkept)}


@pytest.fixture(scope="module")
def clean(program_saves: dict[str, Any]) -> bytes:
    """A program archive as torch.export.save wrote it."""
    return (program_saves["unkept"] / PROGRAM_FILE).read_bytes()


def archive_entries(data: bytes) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        root = infos[0].filename.split("/", 1)[0]
        return root, {i.filename.split("/", 1)[1]: z.read(i) for i in infos}


def archive_of(root: str, entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        for name, payload in entries.items():
            z.writestr(f"{root}/{name}", payload)
    return buffer.getvalue()


def with_root_signature(data: bytes, key: str, value: Any) -> bytes:
    """The archive with the root module's call signature entry ``key`` set to ``value``."""
    root, entries = archive_entries(data)
    graph = json.loads(entries["models/model.json"])
    calls = graph["graph_module"]["module_call_graph"]
    next(c for c in calls if c["fqn"] == "")["signature"][key] = value
    entries["models/model.json"] = json.dumps(graph).encode()
    return archive_of(root, entries)


def spec(type_name: Any, context: Any) -> str:
    return json.dumps([1, {"type": type_name, "context": context, "children_spec": []}])


def install_program(path: Path, program: bytes) -> None:
    """Make ``program`` the save's program.pt2, with a manifest that matches it and no recipe
    (so only the program can load it)."""
    (path / PROGRAM_FILE).write_bytes(program)
    manifest_path = os.fspath(path / MANIFEST_FILE)
    manifest = manifest_from_json(Path(manifest_path).read_text(), where=manifest_path)
    files = {PROGRAM_FILE: FileEntry(len(program), checksum_data(program, manifest.checksum_chunk))}
    model = {**manifest.model, "recipe": None}
    Path(manifest_path).write_text(manifest_to_json(replace(manifest, files=files, model=model)))


def test_models_here_are_named_by_this_module():
    assert Kept.__module__ == HERE
    assert sys.modules[HERE].returns_int is returns_int


# ---------------------------------------------------------------------------------------------
# model.py: save_model


def test_given_recipe_that_does_not_rebuild_is_refused_even_with_example_inputs(tmp_path):
    # A wrong explicit recipe is an error, not a reason to fall back to the program.
    with pytest.raises(tk.UnsupportedObjectError, match="recipe given for Unkept") as refused:
        tk.save_model(
            Unkept(4),
            tmp_path / "model",
            recipe=(Unkept, {"width": 5}),
            example_inputs=torch.randn(2, 4),
        )
    message = str(refused.value)
    assert "does not rebuild it" in message and "recipe=(" in message
    assert "(or pass example_inputs=" not in message  # the given-recipe branch
    assert not (tmp_path / "model").exists()


def test_given_recipe_whose_call_raises(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="calling it raised TypeError") as refused:
        tk.save_model(nn.ReLU(), tmp_path / "model", recipe=(nn.ReLU, {"bogus": 1}))
    assert "bogus" in str(refused.value) and "recipe given for ReLU" in str(refused.value)
    assert not (tmp_path / "model").exists()


# ---------------------------------------------------------------------------------------------
# model.py: load_model


def test_load_model_on_a_plain_safetensors_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(2)}, path)
    expected = "holds safetensors, not a whole model"
    with pytest.raises(tk.UnsupportedFormatError, match=expected) as e:
        tk.load_model(path)
    assert str(path) in str(e.value) and "tk.load_weights(model, path)" in str(e.value)


def test_load_model_with_neither_recipe_nor_program(tmp_path):
    def drop_recipe(body: dict[str, Any]) -> None:
        body["model"].update(recipe=None, recipe_problem="its argument 'width' is not kept")

    path = reseal(save_linear(tmp_path), drop_recipe)
    with pytest.raises(tk.UnsupportedObjectError, match="no exported program") as refused:
        tk.load_model(path)
    message = str(refused.value)
    assert str(path) in message
    assert "'width' is not kept" in message  # the stored reason
    assert "save it again with a recipe or example_inputs" in message


def test_recipe_naming_what_its_module_lacks_without_a_program(tmp_path):
    path = reseal(
        save_linear(tmp_path),
        lambda body: body["model"]["recipe"].update(call="torch.nn:NoSuchLayer"),
    )
    with pytest.raises(tk.UnsupportedObjectError, match="does not define") as refused:
        tk.load_model(path)
    assert str(path) in str(refused.value) and "torch.nn.NoSuchLayer" in str(refused.value)


def test_recipe_naming_what_its_module_lacks_falls_back_to_the_program(tmp_path, program_saves):
    kept, _ = program_saves["models"]
    path = reseal(
        copy_save(program_saves["kept"], tmp_path),
        lambda body: body["model"]["recipe"].update(call="torch.nn:NoSuchLayer"),
    )
    loaded = tk.load_model(path)
    assert not isinstance(loaded, Kept)  # the exported program ran
    x = torch.randn(5, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), kept(x))


def test_malformed_recipe_is_not_hidden_by_the_program(tmp_path, program_saves):
    path = reseal(
        copy_save(program_saves["kept"], tmp_path),
        lambda body: body["model"].update(recipe={"call": 5}),
    )
    with pytest.raises(tk.CorruptCheckpointError, match="the model recipe is malformed") as e:
        tk.load_model(path)
    assert str(path) in str(e.value)


def test_recipe_that_returns_no_module_at_load(tmp_path):
    path = reseal(
        save_linear(tmp_path),
        lambda body: body["model"].update(
            recipe={"call": f"{HERE}:returns_int", "args": [], "kwargs": {}}
        ),
    )
    with pytest.raises(tk.UnsafeFileError, match="allowed_modules"):  # a function: not trusted
        tk.load_model(path)
    with pytest.raises(tk.UnsupportedObjectError, match="returned int, not a module") as e:
        tk.load_model(path, allowed_modules=[HERE])
    assert str(path) in str(e.value) and "returns_int()" in str(e.value)


def test_constructor_that_raises_at_load_is_a_library_error(tmp_path, monkeypatch):
    """BUG (model.py, _rebuild -> recipe.py, build_on_meta, the CPU retry ``return
    recipe.build()``): when the class's constructor raises at load time (the code changed
    since the save), load_model raises the constructor's own exception (here RuntimeError)
    instead of a TorchkeepError naming the save and the recipe. save_model wraps the same
    failure (check_rebuilds: "calling it raised ..."), and _load_pickled wraps a pickle's
    own errors."""
    tk.save_model(Fragile(), tmp_path / "model")
    monkeypatch.setattr(sys.modules[HERE], "FRAGILE_BROKEN", True)
    with pytest.raises(tk.TorchkeepError) as refused:
        tk.load_model(tmp_path / "model")
    message = str(refused.value)
    assert str(tmp_path / "model") in message
    assert "Fragile" in message and "the config file is missing" in message


def test_load_model_on_a_model_save_without_its_model_section(tmp_path):
    """BUG (model.py, load_model, the ``not isinstance(section, dict)`` raise): a directory whose
    manifest says kind "model" but lost its model section is reported as
    UnsupportedFormatError "holds model, not a whole model", which contradicts itself;
    convert_model reports the same save as CorruptCheckpointError "a model save without its
    model section"."""
    path = reseal(save_linear(tmp_path), lambda body: body.pop("model"))
    with pytest.raises(tk.CorruptCheckpointError, match="model section") as refused:
        tk.load_model(path)
    assert str(path) in str(refused.value)


def test_assign_reports_missing_and_extra_tensors():
    tensors = {"weight": torch.zeros(2, 2), "extra": torch.zeros(1)}
    with pytest.raises(tk.StateMismatchError) as refused:
        assign(nn.Linear(2, 2), tensors, where="saved")
    message = str(refused.value)
    assert message.startswith("saved: the rebuilt model does not fit the stored weights")
    assert "missing from the save: bias" in message
    assert "not in the rebuilt model: extra" in message
    assert "tk.load_weights(model, path, strict=False)" in message


# ---------------------------------------------------------------------------------------------
# model.py: torch.save files


def _truncated_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "model.pt"
    torch.save(nn.Linear(2, 2), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    return path


def test_pickled_model_that_fails_to_load_with_trust_code(tmp_path):
    path = _truncated_pickle(tmp_path)
    with pytest.raises(tk.CorruptCheckpointError, match="loading the pickled model failed") as e:
        tk.load_model(path, trust_code=True)
    assert str(path) in str(e.value)


def test_truncated_pickle_without_trust_code_says_it_is_damaged(tmp_path):
    """BUG (model.py, _load_pickled, the UnsafeFileError raise): scan cannot read a truncated
    torch.save file (report.safe is False, report.unsafe is empty), and load_model reports
    "a pickled model (torch.save(model)); loading it runs code named by the file ()": it
    names no code and hides that the file is damaged. With trust_code=True the same file is
    a CorruptCheckpointError."""
    path = _truncated_pickle(tmp_path)
    with pytest.raises((tk.CorruptCheckpointError, tk.UnsafeFileError)) as refused:
        tk.load_model(path)
    message = str(refused.value)
    assert str(path) in message
    assert "file ()" not in message
    assert re.search(r"corrupt|damaged|truncated|refused|cannot be read", message, re.I), message


def test_pickled_object_that_is_not_a_model(tmp_path):
    path = tmp_path / "state.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(tk.UnsupportedFormatError, match="holds a dict, not a model") as refused:
        tk.load_model(path, trust_code=True)
    assert str(path) in str(refused.value) and "tk.load" in str(refused.value)


# ---------------------------------------------------------------------------------------------
# model.py convert_model, and convert.py's model branch


def test_convert_model_refuses_a_non_floating_dtype(tmp_path):
    path = save_linear(tmp_path)
    with pytest.raises(ValueError, match=re.escape("floating-point dtype such as torch.bfloat16")):
        tk.convert(path, tmp_path / "out", dtype=torch.int8)
    assert not (tmp_path / "out").exists()


def test_convert_model_to_a_single_file_is_refused(tmp_path):
    path = save_linear(tmp_path)
    with pytest.raises(tk.UnsupportedFormatError, match="converts to a directory") as refused:
        tk.convert(path, tmp_path / "out.safetensors")
    assert "tk.save_weights(tk.load_state_dict(src), dst)" in str(refused.value)
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_model_without_its_model_section(tmp_path):
    path = reseal(save_linear(tmp_path), lambda body: body.pop("model"))
    with pytest.raises(tk.CorruptCheckpointError, match="without its model section") as refused:
        tk.convert(path, tmp_path / "out")
    assert str(path) in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_convert_of_a_state_that_holds_the_words_kind_model(tmp_path):
    """BUG (model.py, is_saved_model, used by convert.py's convert): a save is taken for a
    whole model when the bytes '"kind":"model"' appear anywhere in the first 4 KiB of
    manifest.json, so a valid training state holding {"kind": "model"} (in its tree or its
    metadata) goes to convert_model and fails with CorruptCheckpointError "a model save
    without its model section"."""
    state = {"kind": "model", "w": torch.ones(2)}
    tk.save(state, tmp_path / "state")
    tk.convert(tmp_path / "state", tmp_path / "out")
    back = tk.load(tmp_path / "out")
    assert back["kind"] == "model" and torch.equal(back["w"], state["w"])


def test_a_model_whose_manifest_was_rewritten_is_refused_not_converted(tmp_path):
    """A saved model whose manifest.json was re-indented (or had one exponent's case changed:
    the same values, other bytes) is refused by every reader, and never converted silently
    into weights only; the manifest must be byte for byte what was written."""
    path = save_linear(tmp_path)
    original = (path / MANIFEST_FILE).read_text()
    body = json.loads(original)
    for text in (json.dumps(body, indent=2), " " + original, original + "\n"):
        (path / MANIFEST_FILE).write_text(text)
        assert not tk.verify(path).ok
        for read in (tk.load_model, tk.describe, lambda p: tk.convert(p, tmp_path / "out")):
            with pytest.raises(tk.CorruptCheckpointError, match="does not match its checksum"):
                read(path)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "inputs",
    [
        [{"shape": "x", "dtype": "float32"}],
        [{"dtype": "float32"}],
        [{"shape": [None, 3], "dtype": "Tensor"}],
        5,
    ],
    ids=["shape-text", "no-shape", "dtype-not-a-dtype", "inputs-not-a-list"],
)
def test_convert_model_with_a_malformed_program_section(tmp_path, program_saves, inputs):
    """BUG (model.py, convert_model -> _random_inputs): the program section's input specs are
    used without validation; a resealed manifest with a malformed one makes tk.convert raise
    ValueError, KeyError or TypeError instead of CorruptCheckpointError."""

    def malformed(body: dict[str, Any]) -> None:
        body["model"]["program"]["inputs"] = inputs

    path = reseal(copy_save(program_saves["unkept"], tmp_path), malformed)
    with pytest.raises(tk.CorruptCheckpointError, match="program") as refused:
        tk.convert(path, tmp_path / "out")
    assert str(path) in str(refused.value)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# recipe.py: finding and encoding a recipe


def test_recorded_recipe_of_a_model_changed_after_capture(tmp_path):
    with tk.capture():
        model = Unkept(3)
    model.fc = nn.Linear(4, 6)
    with pytest.raises(tk.UnsupportedObjectError, match="recipe recorded for Unkept") as refused:
        tk.save_model(model, tmp_path / "model")
    message = str(refused.value)
    assert "does not rebuild it" in message and "fc.weight" in message
    assert "recipe=(" in message and "example_inputs" in message
    assert not (tmp_path / "model").exists()


def test_model_nested_too_deeply_to_infer_a_recipe(tmp_path):
    model: nn.Module = nn.ReLU()
    for _ in range(70):
        model = nn.Sequential(model)
    with pytest.raises(tk.UnsupportedObjectError, match="nested too deeply to infer") as refused:
        tk.save_model(model, tmp_path / "model")
    assert "example_inputs" in str(refused.value)


def test_constructor_whose_signature_cannot_be_read(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="cannot read the constructor") as refused:
        tk.save_model(UnreadableSignature(), tmp_path / "model")
    assert "UnreadableSignature" in str(refused.value) and "recipe=(" in str(refused.value)
    # capture cannot record it either (its signature is needed there too): same refusal
    with tk.capture():
        captured = UnreadableSignature()
    with pytest.raises(tk.UnsupportedObjectError, match="cannot read the constructor"):
        tk.save_model(captured, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_argument_whose_comparison_raises_is_not_taken_for_its_default(tmp_path):
    # Comparing the kept value with the default raises: it counts as "not the default", so
    # the value is kept in the recipe, which then says it cannot be stored.
    with pytest.raises(tk.UnsupportedObjectError, match="no JSON form") as refused:
        tk.save_model(WithConfig(Config()), tmp_path / "model")
    assert "argument 'config' is a Config" in str(refused.value)


def test_given_factory_that_returns_no_module(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="it returned dict, not a module"):
        tk.save_model(nn.ReLU(), tmp_path / "model", recipe=(returns_dict, {}))


@pytest.mark.parametrize(
    ("model", "factory", "expected"),
    [
        (nn.Sequential(nn.ReLU()), two_relus, "only the rebuilt module has 1: module"),
        (nn.Sequential(nn.ReLU(), nn.ReLU()), one_relu, "only the saved module has 1: module"),
    ],
    ids=["rebuilt-has-more", "saved-has-more"],
)
def test_rebuilt_module_tree_of_another_length(tmp_path, model, factory, expected):
    with pytest.raises(tk.UnsupportedObjectError, match=re.escape(expected)) as refused:
        tk.save_model(model, tmp_path / "model", recipe=(factory, {}))
    assert "does not rebuild it" in str(refused.value)


def test_class_not_found_under_its_own_name(tmp_path):
    def make() -> nn.Module:
        class Ghost(nn.Module):
            pass

        Ghost.__qualname__ = "Ghost"  # looks top-level, but the module has no Ghost
        return Ghost()

    with pytest.raises(tk.UnsupportedObjectError, match="does not name") as refused:
        tk.save_model(make(), tmp_path / "model")
    assert f"{HERE}.Ghost" in str(refused.value) and "not importable" in str(refused.value)


def test_recipe_target_without_a_name(tmp_path):
    target = functools.partial(nn.ReLU)
    with pytest.raises(tk.UnsupportedObjectError, match="cannot be imported by name") as refused:
        tk.save_model(nn.ReLU(), tmp_path / "model", recipe=(target, {}))
    assert "top level of a module" in str(refused.value)


def test_encode_recipe_argument_nested_too_deeply():
    with pytest.raises(tk.UnsupportedObjectError, match="argument 'x': nested too deeply"):
        encode_recipe(Recipe(nn.ReLU, (), {"x": nested_lists(70)}))


# ---------------------------------------------------------------------------------------------
# recipe.py: decoding and resolving a stored recipe


def test_decode_recipe_argument_nested_too_deeply():
    recipe = {"call": RELU, "args": [nested_lists(70)], "kwargs": {}}
    with pytest.raises(tk.CorruptCheckpointError, match="saved: the model recipe is nested"):
        decode_recipe(recipe, Trust(), where="saved")


def test_decode_recipe_bounds_the_nesting_of_module_arguments():
    """BUG (recipe.py, decode_recipe/_decode): each "$module" value calls decode_recipe, which
    starts counting depth at 0 again, so the _MAX_DEPTH guard never applies to nested
    modules and a deep enough recipe raises RecursionError. On Python 3.12+ (whose JSON
    parser accepts deeper documents) a manifest holding ~400 nested "$module" values reaches
    this from tk.load_model."""
    recipe: dict[str, Any] = {"call": RELU, "args": [], "kwargs": {}}
    for _ in range(2000):
        recipe = {"call": SEQUENTIAL, "args": [{"$module": recipe}], "kwargs": {}}
    with pytest.raises(tk.CorruptCheckpointError, match="nested too deeply"):
        try:
            decode_recipe(recipe, Trust(), where="saved")
        except RecursionError:
            raise AssertionError("RecursionError escaped decode_recipe") from None


@pytest.mark.parametrize("device", ["nope", "cuda:-5", "cpu", "cuda:0"])
def test_a_stored_device_argument_builds_on_the_meta_device(device):
    """A device in a recipe (valid or not) must not make the constructor allocate memory: the
    model is built on the meta device and takes the loaded tensors."""
    recipe = {"call": LINEAR, "args": [20000, 20000], "kwargs": {"device": {"$device": device}}}
    decoded = decode_recipe(recipe, Trust(), where="saved")
    assert decoded.kwargs == {"device": torch.device("meta")}
    assert decoded.build().weight.device.type == "meta"


@pytest.mark.parametrize(
    "key",
    [{"$dict": []}, [[1]]],
    ids=["dict-key", "list-in-list-key"],
)
def test_decode_recipe_dict_with_an_unhashable_key(key):
    """BUG (recipe.py, _decode, the "$dict"/"$odict" branch): a key that decodes to a dict, or
    to a list holding a list (made a tuple of lists), is unhashable; building the dict raises
    TypeError instead of CorruptCheckpointError."""
    recipe = {"call": SEQUENTIAL, "args": [{"$odict": [[key, 1]]}], "kwargs": {}}
    with pytest.raises(tk.CorruptCheckpointError, match="saved: "):
        decode_recipe(recipe, Trust(), where="saved")


def test_resolve_a_module_that_cannot_be_imported():
    name = "tk_test_no_such_module_4f1c"
    assert name not in sys.modules
    with pytest.raises(tk.UnsupportedObjectError, match="cannot be imported here") as refused:
        resolve(f"{name}:Net", Trust(trust_code=True), where="saved", call=True)
    message = str(refused.value)
    assert message.startswith("saved: ") and f"{name}.Net" in message
    assert "Install it, or load the exported program instead" in message


def test_resolve_a_name_the_module_does_not_define():
    with pytest.raises(tk.UnsupportedObjectError, match="does not define") as refused:
        resolve("torch.nn:NoSuchLayer", Trust(), where="saved", call=True)
    assert "torch.nn.NoSuchLayer" in str(refused.value)
    assert "code changed since the save" in str(refused.value)


def test_factory_whose_return_annotation_cannot_be_resolved_is_not_trusted():
    with pytest.raises(tk.UnsafeFileError, match="not a module class") as e:
        resolve(f"{HERE}:unresolvable_hint", Trust(), where="saved", call=True)
    assert f"allowed_modules=['{HERE}']" in str(e.value)
    assert resolve(f"{HERE}:unresolvable_hint", Trust((HERE,)), where="saved", call=True) is (
        unresolvable_hint
    )


# ---------------------------------------------------------------------------------------------
# program.py


def test_dynamic_batch_needs_a_batch_dimension(tmp_path):
    with pytest.raises(tk.UnsupportedObjectError, match="batch dimension") as refused:
        tk.save_model(nn.ReLU(), tmp_path / "model", example_inputs=torch.tensor(1.0))
    assert "dynamic_batch=False" in str(refused.value)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("key", ["in_spec", "out_spec"])
@pytest.mark.parametrize(
    "value",
    [
        5,
        "{not json",
        spec("os.system(1)", None),
        spec("builtins.dict", "{not json"),
        spec("builtins.dict", json.dumps(["a b"])),
    ],
    ids=["not-text", "not-json", "odd-type", "context-not-json", "odd-context-key"],
)
def test_malformed_call_spec_refused(clean, key, value):
    with pytest.raises(tk.UnsafeFileError, match=f"program.pt2: the program's {key} is malformed"):
        check_program(with_root_signature(clean, key, value), where="program.pt2")


def test_program_json_over_the_size_limit_refused(clean, monkeypatch):
    # The limit is 256 MiB; lowered here rather than writing an archive that large.
    monkeypatch.setattr(torchkeep.model.program, "_MAX_PROGRAM_JSON", 16)
    with pytest.raises(
        tk.UnsafeFileError, match=re.escape("model_weights_config.json is too large")
    ):
        check_program(clean, where="program.pt2")


def test_entry_failing_its_crc_refused(clean):
    with zipfile.ZipFile(io.BytesIO(clean)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data/weights/weight_0"))
    start = info.header_offset
    name_length, extra_length = struct.unpack("<HH", clean[start + 26 : start + 30])
    damaged = bytearray(clean)
    damaged[start + 30 + name_length + extra_length] ^= 0xFF
    with pytest.raises(tk.UnsafeFileError, match="program archive is damaged"):
        check_program(bytes(damaged), where="program.pt2")


def test_entry_claiming_more_bytes_than_the_archive_refused(clean):
    # The central directory's uncompressed size of one entry, made larger than the archive.
    damaged = bytearray(clean)
    position = 0
    while True:
        position = clean.index(b"PK\x01\x02", position)
        (length,) = struct.unpack("<H", clean[position + 28 : position + 30])
        if clean[position + 46 : position + 46 + length].endswith(b"data/weights/weight_0"):
            break
        position += 4
    damaged[position + 24 : position + 28] = struct.pack("<I", len(clean) + 1)
    with pytest.raises(tk.UnsafeFileError, match="entry 'data/weights/weight_0'"):
        check_program(bytes(damaged), where="program.pt2")


def test_program_torch_cannot_load_is_a_library_error(tmp_path, program_saves):
    """BUG (program.py, load_program, ``torch.export.load``): an archive that passes
    check_program but that torch cannot load (here a weight entry 4 bytes shorter than its
    tensor), in a save whose manifest matches it, makes tk.load_model raise torch's
    RuntimeError ("We ran into an error when deserializing the saved file") instead of a
    TorchkeepError naming program.pt2."""
    path = copy_save(program_saves["unkept"], tmp_path)
    root, entries = archive_entries((path / PROGRAM_FILE).read_bytes())
    entries["data/weights/weight_0"] = entries["data/weights/weight_0"][:-4]
    program = archive_of(root, entries)
    check_program(program, where="program.pt2")  # the premise: the check lets it through
    install_program(path, program)
    with pytest.raises(tk.TorchkeepError, match=re.escape(PROGRAM_FILE)):
        tk.load_model(path)


# ---------------------------------------------------------------------------------------------
# container.py: read_member and the files of a directory save


def test_read_member_the_save_does_not_hold(tmp_path):
    path = save_linear(tmp_path)
    missing = re.escape("holds no file 'program.pt2'")
    with open_container(path) as container, pytest.raises(tk.CheckpointNotFoundError) as e:
        container.read_member(PROGRAM_FILE)
    assert re.search(missing, str(e.value))
    assert str(path / PROGRAM_FILE) in str(e.value)
    single = tmp_path / "weights.safetensors"
    tk.save_weights(nn.Linear(2, 2), single)
    with (
        open_container(single) as container,
        pytest.raises(tk.CheckpointNotFoundError, match=missing),
    ):
        container.read_member(PROGRAM_FILE)


@pytest.mark.parametrize("change", ["appended", "truncated"])
def test_member_of_the_wrong_size(tmp_path, program_saves, change):
    path = copy_save(program_saves["unkept"], tmp_path)
    program = path / PROGRAM_FILE
    data = program.read_bytes()
    program.write_bytes(data + b"\0" if change == "appended" else data[:-1])
    with pytest.raises(tk.CorruptCheckpointError, match="where the manifest says") as refused:
        tk.load_model(path)
    message = str(refused.value)
    assert str(program) in message and "truncated or was replaced" in message
    report = tk.verify(path)
    assert not report.ok and any("where the manifest says" in p for p in report.problems)


def test_member_that_is_a_directory(tmp_path, program_saves):
    path = copy_save(program_saves["unkept"], tmp_path)
    (path / PROGRAM_FILE).unlink()
    (path / PROGRAM_FILE).mkdir()
    named = re.escape("named by manifest.json but missing")
    with pytest.raises(tk.CorruptCheckpointError, match=named) as e:
        tk.load_model(path)
    assert str(path / PROGRAM_FILE) in str(e.value)


def test_member_named_like_a_shard(tmp_path):
    # The shard exists; the manifest also lists it as a member. (The message says "missing",
    # which is not what happened; see the report.)
    path = reseal(
        save_linear(tmp_path),
        lambda body: body.update(files={"shard-00000.safetensors": GOOD_FILE_ENTRY}),
    )
    with pytest.raises(
        tk.CorruptCheckpointError, match=re.escape("named by manifest.json")
    ) as refused:
        tk.load_model(path)
    assert str(path / "shard-00000.safetensors") in str(refused.value)


def test_files_on_a_single_file_save(tmp_path):
    target = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="only a directory save holds other files") as refused:
        write_container(str(target), {"a": torch.ones(2)}, kind="model", options=WriteOptions(files={"p": b"x"}))
    assert str(target) in str(refused.value)
    assert not target.exists()


@pytest.mark.parametrize(
    "name", [MANIFEST_FILE, "shard-00000.safetensors", "shard-00001.safetensors"]
)
def test_files_that_clash_with_the_save_s_own(tmp_path, name):
    tensors = {"a": torch.ones(4), "b": torch.ones(4)}  # two shards of 16 bytes
    target = tmp_path / "save"
    with pytest.raises(ValueError, match="clash with the save's own files") as refused:
        write_container(str(target), tensors, kind="model", options=WriteOptions(shard_bytes=16, files={name: b"x"}))
    assert name in str(refused.value) and str(target) in str(refused.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["../escaped", "a\\b"])
def test_write_container_refuses_member_names_the_reader_refuses(tmp_path, name):
    """BUG (container.py, write_container): member names are not checked as the reader checks
    them (format.check_member_name). "../escaped" is written outside the save directory,
    and both names commit a save that open_container then refuses ("the manifest names a
    file ... outside the checkpoint directory"). Expected: ValueError before writing, like
    the clash check."""
    (tmp_path / "parent").mkdir()
    target = tmp_path / "parent" / "save"
    with pytest.raises(ValueError, match=re.escape(repr(name)[1:-1])):
        write_container(str(target), {"a": torch.ones(2)}, kind="model", options=WriteOptions(files={name: b"x"}))
    assert os.listdir(tmp_path / "parent") == []


def test_write_container_refuses_a_model_section_the_reader_refuses(tmp_path):
    """BUG (container.py, write_container): ``model=`` is written whatever it is; a list
    commits a save that open_container refuses ("the manifest's model section is not an
    object"). Expected: ValueError before writing."""
    target = tmp_path / "save"
    with pytest.raises(ValueError, match="model"):
        write_container(str(target), {"a": torch.ones(2)}, kind="model", options=WriteOptions(model=[1, 2]))
    assert not target.exists()


# ---------------------------------------------------------------------------------------------
# format.py: the manifest's file table and model section


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ([], "the manifest's file table is not an object"),
        ({"../program.pt2": GOOD_FILE_ENTRY}, "outside the checkpoint directory"),
        ({"": GOOD_FILE_ENTRY}, "outside the checkpoint directory"),
        ({MANIFEST_FILE: GOOD_FILE_ENTRY}, "invalid file entry 'manifest.json'"),
        ({PROGRAM_FILE: 5}, "invalid file entry 'program.pt2'"),
        ({PROGRAM_FILE: {"checksum": "0" * 16}}, "file entry 'program.pt2' has no valid size"),
        ({PROGRAM_FILE: {"bytes": "1", "checksum": "0" * 16}}, "has no valid size"),
        ({PROGRAM_FILE: {"bytes": True, "checksum": "0" * 16}}, "has no valid size"),
        ({PROGRAM_FILE: {"bytes": -1, "checksum": "0" * 16}}, "has no valid size"),
        ({PROGRAM_FILE: {"bytes": 1}}, "file entry 'program.pt2' has no valid checksum"),
        ({PROGRAM_FILE: {"bytes": 1, "checksum": 5}}, "has no valid checksum"),
        ({PROGRAM_FILE: {"bytes": 1, "checksum": "abc"}}, "has no valid checksum"),
    ],
    ids=[
        "not-an-object",
        "escaping-name",
        "empty-name",
        "manifest-name",
        "entry-not-an-object",
        "no-size",
        "size-text",
        "size-bool",
        "size-negative",
        "no-checksum",
        "checksum-number",
        "checksum-short",
    ],
)
def test_malformed_file_table(tmp_path, files, expected):
    path = reseal(save_linear(tmp_path), lambda body: body.update(files=files))
    for load in (tk.load_model, tk.load):
        with pytest.raises(tk.CorruptCheckpointError, match=re.escape(expected)) as refused:
            load(path)
        assert str(path / MANIFEST_FILE) in str(refused.value)
    report = tk.verify(path)
    assert not report.ok and any(expected in p for p in report.problems), report.problems


@pytest.mark.parametrize("model", [[], "model", 5, True], ids=["list", "text", "int", "bool"])
def test_model_section_not_an_object(tmp_path, model):
    path = reseal(save_linear(tmp_path), lambda body: body.update(model=model))
    for load in (tk.load_model, tk.load):
        with pytest.raises(tk.CorruptCheckpointError, match="model section is not an object") as e:
            load(path)
        assert str(path / MANIFEST_FILE) in str(e.value)
    assert not tk.verify(path).ok


@pytest.mark.parametrize(
    "edit",
    [
        {"frozen": [[1]]},
        {"buffers": 5},
        {"class": 3},
        {"recipe": "Linear(2, 2)"},
        {"recipe_problem": 7},
        {"program": {"inputs": ["x"]}},
        {"program": {"inputs": [{"shape": ["b"], "dtype": "float32"}]}},
        {"architecture": {"type": "x", "parameters": "many", "children": {}}},
        {"attributes": {"": 3}},
        {"converted": "yes"},
    ],
    ids=lambda e: next(iter(e)),
)
def test_malformed_model_section_fields_are_corrupt(tmp_path, edit):
    path = reseal(save_linear(tmp_path), lambda body: body["model"].update(edit))
    for call in (tk.describe, tk.load_model, tk.load_state_dict):
        with pytest.raises(tk.CorruptCheckpointError, match="model section"):
            call(path)


def test_saved_attributes_that_do_not_fit_are_corrupt(tmp_path):
    path = reseal(
        save_linear(tmp_path), lambda body: body["model"].update(attributes={"fc9": {"x": 1}})
    )
    with pytest.raises(tk.CorruptCheckpointError, match="rebuilt model lacks"):
        tk.load_model(path)


def test_output_difference_of_outputs_without_elements():
    from torchkeep.model.convert import _difference

    assert "not measured" in _difference(torch.empty(0), torch.empty(0))
