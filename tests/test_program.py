"""Security tests of ``torchkeep.program``: exported programs (``program.pt2``) crafted to run code.

Every hostile archive is built here, from a real exported program, by rewriting its entries.
Each payload, if it ever ran, would create a canary file in ``tmp_path``; where it is cheap, a
control first shows that plain ``torch.export.load`` (with ``ep.module()``) does run it, so a
refusal by ``check_program`` is a refusal of a live attack.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import inspect
import io
import json
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import sympy
import torch
from torch import nn

import torchkeep as tk
from torchkeep.format import (
    MANIFEST_FILE,
    FileEntry,
    manifest_from_json,
    manifest_to_json,
)
from torchkeep.io.checksum import checksum_data
from torchkeep.model.program import PROGRAM_FILE, check_program, export_program

GRAPH = "models/model.json"
WEIGHTS_CONFIG = "data/weights/model_weights_config.json"
CONSTANTS_CONFIG = "data/constants/model_constants_config.json"
SAMPLE_INPUTS = "data/sample_inputs/model.pt"


# ---------------------------------------------------------------------------------------------
# models and archives


class MLP(nn.Module):
    """A tiny MLP whose constructor argument is not kept, so no recipe can be inferred for it:
    ``save_model`` stores a program and ``load_model`` has to run it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, hidden)
        self.fc2 = nn.Linear(hidden, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def export_clean(model: nn.Module) -> bytes:
    data, info = export_program(model, torch.randn(2, 8), dynamic_batch=True)
    assert info["dynamic_batch"] is True
    return data


@pytest.fixture(scope="module")
def mlp() -> nn.Module:
    return tiny_mlp()


@pytest.fixture(scope="module")
def clean(mlp: nn.Module) -> bytes:
    """The archive torch.export.save writes for the tiny MLP (exported once per module)."""
    return export_clean(mlp)


def entries_of(data: bytes) -> tuple[str, dict[str, bytes]]:
    """The archive's single top folder, and its entries by name below that folder, in order."""
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        infos = z.infolist()
        roots = {i.filename.split("/", 1)[0] for i in infos}
        assert len(roots) == 1, roots
        return roots.pop(), {i.filename.split("/", 1)[1]: z.read(i) for i in infos}


def pack(root: str, entries: dict[str, bytes], *, deflate: tuple[str, ...] = ()) -> bytes:
    """A new ZIP_STORED archive of ``entries`` below ``root`` (those in ``deflate`` compressed)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as z:
        for name, payload in entries.items():
            method = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(f"{root}/{name}", payload, compress_type=method)
    return buffer.getvalue()


def rewrite(data: bytes, name: str, payload: bytes | None) -> bytes:
    """The archive with entry ``name`` replaced (added if new; removed when ``payload`` is None)."""
    root, entries = entries_of(data)
    if payload is None:
        del entries[name]
    else:
        entries[name] = payload
    return pack(root, entries)


def edit_json(data: bytes, name: str, change: Callable[[Any], Any]) -> bytes:
    """The archive with the JSON entry ``name`` changed in place by ``change``."""
    _, entries = entries_of(data)
    body = json.loads(entries[name])
    result = change(body)
    return rewrite(data, name, json.dumps(body if result is None else result).encode())


def walk(node: Any) -> Iterator[tuple[str, Any, Any]]:
    """Every (key, value, owning dict) in a JSON tree."""
    if isinstance(node, dict):
        for k, v in list(node.items()):
            yield k, v, node
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def user_signature(graph: dict[str, Any]) -> dict[str, Any]:
    """The root module's call signature (forward_arg_names, in_spec) in a graph JSON."""
    calls = graph["graph_module"]["module_call_graph"]
    return next(c for c in calls if c["fqn"] == "")["signature"]


def assert_refused(
    data: bytes, canary: os.PathLike[str] | None = None, match: str | None = None
) -> None:
    with pytest.raises(tk.UnsafeFileError, match=match):
        check_program(data, where="program.pt2")
    if canary is not None:
        assert not os.path.exists(canary), "the payload ran"


# ---------------------------------------------------------------------------------------------
# payloads: each creates a canary file when it runs


class _Exec:
    """Pickles as a call of ``exec`` on Python source."""

    def __init__(self, source: str) -> None:
        self.source = source

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.exec, (self.source,))


def touch(canary: os.PathLike[str]) -> str:
    """Python source that creates the canary."""
    return f"open({os.fspath(canary)!r}, 'w').close()"


def torch_pickle(canary: os.PathLike[str]) -> bytes:
    buffer = io.BytesIO()
    torch.save(_Exec(touch(canary)), buffer)
    return buffer.getvalue()


def sympy_touch(canary: os.PathLike[str]) -> str:
    """A shape expression that creates the canary when sympify evaluates it."""
    return f"__import__('pathlib').Path({os.fspath(canary)!r}).touch()"


def torch_runs_it(data: bytes, canary: os.PathLike[str], *, call: bool = False) -> None:
    """Control: plain torch (no check) loads the archive and runs the payload."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.load(io.BytesIO(data))
            module = ep.module()
            if call:
                module(torch.randn(3, 8))
        except Exception:  # the payload may break the load after it ran
            pass
    assert os.path.exists(canary), "control: torch did not run the payload"
    os.remove(canary)


def test_payloads_are_live(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    pickle.loads(pickle.dumps(_Exec(touch(a))))
    assert a.exists()
    sympy.sympify(sympy_touch(b))
    assert b.exists()


# ---------------------------------------------------------------------------------------------
# the clean archive


def test_clean_archive_passes_and_runs(mlp, clean):
    checked = check_program(clean, where="program.pt2")
    assert entries_of(checked) == entries_of(clean)
    with zipfile.ZipFile(io.BytesIO(checked)) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    module = torch.export.load(io.BytesIO(checked)).module()
    for batch in (1, 3, 17):
        x = torch.randn(batch, 8)
        with torch.no_grad():
            torch.testing.assert_close(module(x), mlp(x))


# ---------------------------------------------------------------------------------------------
# (1) weights stored as pickles


def test_weight_as_pickle_refused(clean, tmp_path):
    canary = tmp_path / "canary"

    def pickled(config):
        meta = next(iter(config["config"].values()))
        meta["use_pickle"] = True

    root, entries = entries_of(edit_json(clean, WEIGHTS_CONFIG, pickled))
    name = next(iter(json.loads(entries[WEIGHTS_CONFIG])["config"].values()))["path_name"]
    entries[f"data/weights/{name}"] = torch_pickle(canary)
    hostile = pack(root, entries)
    torch_runs_it(hostile, canary)
    assert_refused(hostile, canary, "pickle")


def test_weight_pickle_under_new_name_refused(clean, tmp_path):
    canary = tmp_path / "canary"

    def pickled(config):
        meta = next(iter(config["config"].values()))
        meta.update(use_pickle=True, path_name="weight_evil", tensor_meta=None)

    hostile = rewrite(
        edit_json(clean, WEIGHTS_CONFIG, pickled), "data/weights/weight_evil", torch_pickle(canary)
    )
    torch_runs_it(hostile, canary)
    assert_refused(hostile, canary)


@pytest.mark.parametrize("use_pickle", [None, 0, "false", []])
def test_weight_use_pickle_must_be_false(clean, use_pickle):
    def odd(config):
        next(iter(config["config"].values()))["use_pickle"] = use_pickle

    assert_refused(edit_json(clean, WEIGHTS_CONFIG, odd))


def test_weight_without_use_pickle_refused(clean):
    def missing(config):
        del next(iter(config["config"].values()))["use_pickle"]

    assert_refused(edit_json(clean, WEIGHTS_CONFIG, missing))


@pytest.mark.parametrize("body", [[], {"config": []}, {"config": {"w": "x"}}, {}, "x", None])
def test_malformed_weights_config_refused(clean, body):
    assert_refused(rewrite(clean, WEIGHTS_CONFIG, json.dumps(body).encode()))


# ---------------------------------------------------------------------------------------------
# (2) constants: pickles, opaque objects, custom objects


def _constant(path_name: str, *, use_pickle: bool, tensor_meta: Any = None) -> bytes:
    config = {
        "config": {
            "evil": {
                "path_name": path_name,
                "is_param": False,
                "use_pickle": use_pickle,
                "tensor_meta": tensor_meta,
            }
        }
    }
    return json.dumps(config).encode()


def test_constant_as_pickle_refused(clean, tmp_path):
    canary = tmp_path / "canary"
    _, entries = entries_of(clean)
    meta = next(iter(json.loads(entries[WEIGHTS_CONFIG])["config"].values()))["tensor_meta"]
    hostile = rewrite(
        rewrite(clean, CONSTANTS_CONFIG, _constant("tensor_0", use_pickle=True, tensor_meta=meta)),
        "data/constants/tensor_0",
        torch_pickle(canary),
    )
    torch_runs_it(hostile, canary)
    assert_refused(hostile, canary, "pickle")


def test_opaque_object_refused(clean, tmp_path):
    canary = tmp_path / "canary"
    hostile = rewrite(
        rewrite(clean, CONSTANTS_CONFIG, _constant("opaque_obj_0", use_pickle=True)),
        "data/constants/opaque_obj_0",
        pickle.dumps(_Exec(touch(canary))),
    )
    if "opaque_obj" in inspect.getsource(torch.export.pt2_archive._package):
        torch_runs_it(hostile, canary)  # torch versions that read opaque objects unpickle them
    assert_refused(hostile, canary)


@pytest.mark.parametrize("use_pickle", [True, False])
def test_custom_object_constant_refused(clean, tmp_path, use_pickle):
    canary = tmp_path / "canary"
    hostile = rewrite(
        rewrite(clean, CONSTANTS_CONFIG, _constant("custom_obj_0", use_pickle=use_pickle)),
        "data/constants/custom_obj_0",
        pickle.dumps(_Exec(touch(canary))),
    )
    assert_refused(hostile, canary)


def test_opaque_path_name_without_entry_refused(clean):
    # a path_name torch would hand to pickle.loads, even with use_pickle false and a tensor_meta
    _, entries = entries_of(clean)
    meta = next(iter(json.loads(entries[WEIGHTS_CONFIG])["config"].values()))["tensor_meta"]
    for name in ("opaque_obj_0", "custom_obj_0", "weight_0/../tensor_0"):
        config = _constant(name, use_pickle=False, tensor_meta=meta)
        assert_refused(rewrite(clean, CONSTANTS_CONFIG, config))


def test_custom_obj_values_refused(clean):
    def custom(graph):
        graph["graph_module"]["graph"]["custom_obj_values"] = {
            "obj": {"name": "obj", "class_fqn": "__torch__.torch.classes.evil.Evil"}
        }

    assert_refused(edit_json(clean, GRAPH, custom), match="custom objects")


# ---------------------------------------------------------------------------------------------
# (3) example inputs (torch retries them with weights_only=False)


def test_sample_inputs_pickle_refused(clean, tmp_path):
    canary = tmp_path / "canary"
    hostile = rewrite(clean, SAMPLE_INPUTS, torch_pickle(canary))
    torch_runs_it(hostile, canary)
    assert_refused(hostile, canary, "example inputs")


def test_sample_inputs_plain_tensors_refused(clean):
    assert_refused(rewrite(clean, SAMPLE_INPUTS, _sample_inputs()), match="example inputs")


# ---------------------------------------------------------------------------------------------
# (4) shape expressions (sympy.sympify is eval)


def _with_expression(clean: bytes, make: Callable[[str], str]) -> bytes:
    """Replace every shape expression by ``make(original)``."""

    def change(graph):
        found = 0
        for key, value, owner in walk(graph):
            if key == "expr_str":
                owner["expr_str"] = make(value)
                found += 1
        assert found

    return edit_json(clean, GRAPH, change)


def test_expression_calling_code_refused(clean, tmp_path):
    canary = tmp_path / "canary"
    hostile = _with_expression(clean, lambda e: f"{sympy_touch(canary)} or {e}")
    torch_runs_it(hostile, canary)
    assert_refused(hostile, canary, "shape expression")


@pytest.mark.parametrize(
    "make",
    [
        lambda e: "__import__('os').system('true')",
        lambda e: f"{e}.__class__",
        lambda e: f"{e}.func(1)",
        lambda e: f"[{e}][0]",
        lambda e: f"(lambda: {e})()",
        lambda e: f"{e} if True else 0",
        lambda e: f"eval('{e}')",
        lambda e: f'Symbol("s1", positive=True)+{e}',
        lambda e: f"Symbol('os', integer=True)+{e}",
        lambda e: f"{e}\\\n+1",
        lambda e: f"{e};1",
        lambda e: "exec" + e[6:],
        lambda e: f"S({e})",
        lambda e: None,
        lambda e: 7,
        lambda e: "1" * 20_000,
    ],
)
def test_odd_expressions_refused(clean, make):
    assert_refused(_with_expression(clean, make), match="shape expression")


def test_plain_expressions_accepted(clean):
    # what torch writes for sizes derived from a batch dimension
    check_program(
        _with_expression(clean, lambda e: f"Mul(Integer(2), {e}) + FloorDiv({e}, 3) - 1"),
        where="program.pt2",
    )


# ---------------------------------------------------------------------------------------------
# (5) guard code (exec'd by ep.module())


def _sample_inputs() -> bytes:
    buffer = io.BytesIO()
    torch.save(((torch.randn(2, 8),), {}), buffer)
    return buffer.getvalue()


def test_guards_code_refused(clean, tmp_path):
    canary = tmp_path / "canary"

    def guarded(graph):
        graph["guards_code"] = [f"({touch(canary)}) or True"]

    hostile = edit_json(clean, GRAPH, guarded)
    # ep.module() compiles guard code into a function run on every call (when the archive also
    # has example inputs)
    torch_runs_it(rewrite(hostile, SAMPLE_INPUTS, _sample_inputs()), canary, call=True)
    assert_refused(hostile, canary, "guard code")
    assert_refused(rewrite(hostile, SAMPLE_INPUTS, _sample_inputs()), canary)


@pytest.mark.parametrize("guards", ["1", [[]], {"g": "1"}, ["L['x'].size()[0] >= 2"]])
def test_any_guards_code_refused(clean, guards):
    def guarded(graph):
        graph["guards_code"] = guards

    assert_refused(edit_json(clean, GRAPH, guarded), match="guard code")


# ---------------------------------------------------------------------------------------------
# (6) compiled libraries (dlopen'ed from data/aotinductor)


def test_aotinductor_library_refused(clean):
    root, entries = entries_of(clean)
    entries["data/aotinductor/model/x.wrapper.so"] = b"\x7fELF" + b"\0" * 60
    entries["data/aotinductor/model/x.wrapper_metadata.json"] = json.dumps(
        {"AOTI_DEVICE_KEY": "cpu"}
    ).encode()
    assert_refused(pack(root, entries), match="data/aotinductor")


# ---------------------------------------------------------------------------------------------
# graph node targets and arguments


def _with_target(clean: bytes, target: str, inputs: list[Any] | None = None) -> bytes:
    def change(graph):
        node = graph["graph_module"]["graph"]["nodes"][1]
        node["target"] = target
        if inputs is not None:
            node["inputs"] = inputs

    return edit_json(clean, GRAPH, change)


@pytest.mark.parametrize(
    "target",
    [
        "torch.os.system",
        "builtins.eval",
        "builtins.exec",
        "os.system",
        "torch.ops.aten.from_file.default",
        "torch.ops.aten.save.default",
        "torch.ops.aten._print.default",
        "torch.ops.aten.linear.default.__call__",
        "torch.ops.aten.linear",
        "torch.ops.myns.evil.default",
        "torch.ops.higher_order.cond",
        "_operator.getitem.__globals__",
        "math.sqrt.__self__",
        "torch._C._jit_get_operation",
        "#myns:evil",
        "",
        None,
        ["torch.ops.aten.relu.default"],
    ],
)
def test_node_targets_refused(clean, tmp_path, target):
    canary = tmp_path / "canary"
    command = [{"name": "command", "arg": {"as_string": f"touch {canary}"}, "kind": 1}]
    assert_refused(_with_target(clean, target, command), canary, "only ATen operators")


def test_verifierless_os_system_target_refused(clean, tmp_path):
    # with no verifier torch would build a node calling os.system (found by the investigation)
    canary = tmp_path / "canary"
    command = [{"name": "command", "arg": {"as_string": f"touch {canary}"}, "kind": 1}]

    def change(graph):
        graph["verifiers"] = []
        node = graph["graph_module"]["graph"]["nodes"][1]
        node["target"] = "torch.os.system"
        node["inputs"] = command

    assert_refused(edit_json(clean, GRAPH, change), canary)


@pytest.mark.parametrize("target", ["_operator.getitem", "torch.ops.aten.relu.default"])
def test_allowed_targets_accepted(clean, target):
    check_program(_with_target(clean, target), where="program.pt2")


@pytest.mark.parametrize(
    "arg",
    [
        {"as_graph": {"graph": {"nodes": []}, "signature": {}}},
        {"as_operator": "builtins.eval"},
        {"as_custom_obj": {"name": "obj", "class_fqn": "__torch__.evil"}},
    ],
)
def test_graph_operator_and_custom_arguments_refused(clean, arg):
    key = next(iter(arg))

    def change(graph):
        node = graph["graph_module"]["graph"]["nodes"][0]
        node["inputs"].append({"name": "evil", "arg": arg, "kind": 1})

    assert_refused(edit_json(clean, GRAPH, change), match=key[3:])


@pytest.mark.parametrize("body", [[], "x", None, {"graph_module": []}, {"graph_module": {}}])
def test_malformed_graph_refused(clean, body):
    assert_refused(rewrite(clean, GRAPH, json.dumps(body).encode()))


def test_non_list_nodes_refused(clean):
    def change(graph):
        graph["graph_module"]["graph"]["nodes"] = {"0": {"target": "builtins.eval"}}

    assert_refused(edit_json(clean, GRAPH, change))


# ---------------------------------------------------------------------------------------------
# names that torch.fx pastes into the Python source it exec's (module()'s generated forward)


def test_forward_arg_names_are_refused(clean, tmp_path):
    """HOLE: forward_arg_names are pasted verbatim into ``def forward(self, ...)``, whose
    default values are evaluated when ep.module() execs the generated code."""
    canary = tmp_path / "canary"

    def change(graph):
        user_signature(graph)["forward_arg_names"] = ["input", f"_x={sympy_touch(canary)}"]

    hostile = edit_json(clean, GRAPH, change)
    torch_runs_it(hostile, canary)
    assert_refused(hostile, canary)


def test_parameter_names_are_refused(clean, tmp_path):
    """HOLE: a parameter's name is pasted into ``getattr(self, "...")`` in the generated forward,
    unescaped; a quote in it ends the string and the rest runs when the module is called."""
    canary = tmp_path / "canary"
    hex_path = os.fspath(canary).encode().hex()
    name = (
        f'a") if open(getattr(getattr(bytes, "fromhex")("{hex_path}"), "decode")(), "w") '
        'else getattr(self, "a'
    )
    assert "." not in name

    def rename_graph(graph):
        specs = graph["graph_module"]["signature"]["input_specs"]
        spec = next(s for s in specs if "parameter" in s)
        old = spec["parameter"]["parameter_name"]
        spec["parameter"]["parameter_name"] = name
        return old

    _, entries = entries_of(clean)
    graph = json.loads(entries[GRAPH])
    old = rename_graph(graph)
    config = json.loads(entries[WEIGHTS_CONFIG])
    config["config"] = {(name if k == old else k): v for k, v in config["config"].items()}
    hostile = rewrite(
        rewrite(clean, GRAPH, json.dumps(graph).encode()),
        WEIGHTS_CONFIG,
        json.dumps(config).encode(),
    )
    torch_runs_it(hostile, canary, call=True)
    assert_refused(hostile, canary)


def test_expression_too_costly_to_evaluate_is_refused(clean):
    """HOLE (denial of service): only symbols, integers and arithmetic, but sympify evaluates
    9**9**9**9 exactly and never returns; torch.export.load hangs and eats memory."""
    hostile = _with_expression(
        clean, lambda e: f"Integer(9)**Integer(9)**Integer(9)**Integer(9)*{e}"
    )
    assert_refused(hostile, match="shape expression")


# ---------------------------------------------------------------------------------------------
# archive structure


def test_compressed_entry_refused(clean):
    root, entries = entries_of(clean)
    assert_refused(pack(root, entries, deflate=(GRAPH,)), match="compressed")


def test_duplicate_entry_refused(clean):
    root, entries = entries_of(clean)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns of the duplicate name
        with zipfile.ZipFile(buffer, "w") as z:
            for name, payload in entries.items():
                z.writestr(f"{root}/{name}", payload)
            z.writestr(f"{root}/{GRAPH}", b'{"guards_code": ["1"]}')
    assert_refused(buffer.getvalue(), match="one plain folder")


def test_two_top_folders_refused(clean):
    root, entries = entries_of(clean)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, payload in entries.items():
            z.writestr(f"{root}/{name}", payload)
        z.writestr(f"other/{GRAPH}", entries[GRAPH])
    assert_refused(buffer.getvalue(), match="one plain folder")


@pytest.mark.parametrize(
    "name",
    [
        "extra/evil.py",
        "data/weights/model.pt",
        "data/constants/model.pt",
        "models/other.json",
        "data/weights/weight_0.so",
        "data/weights/weight_x",
        "data/weights/tensor_0/..",
        "../evil",
        "",
    ],
)
def test_unexpected_entry_refused(clean, name):
    assert_refused(rewrite(clean, name, b"x"))


def test_entry_without_folder_refused(clean):
    _, entries = entries_of(clean)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, payload in entries.items():
            z.writestr(name, payload)
    assert_refused(buffer.getvalue())


@pytest.mark.parametrize("missing", [GRAPH, WEIGHTS_CONFIG, CONSTANTS_CONFIG, SAMPLE_INPUTS])
def test_missing_entry_refused(clean, missing):
    assert_refused(rewrite(clean, missing, None), match="lacks")


@pytest.mark.parametrize("value", [b"pt3", b"", b"pt2\n", b"zip"])
def test_archive_format_must_be_pt2(clean, value):
    assert_refused(rewrite(clean, "archive_format", value), match="not a plain pt2")


@pytest.mark.parametrize(
    "data", [b"", b"not a zip at all", b"PK\x03\x04" + b"\0" * 40, b"\x80\x02}q\x00."]
)
def test_not_a_zip_refused(data):
    assert_refused(data, match="not a readable")


def test_torch_save_pickle_refused(tmp_path):
    canary = tmp_path / "canary"
    assert_refused(torch_pickle(canary), canary)


@pytest.mark.parametrize("depth", [300, 100_000])
def test_deeply_nested_json_refused(clean, depth):
    deep = "[" * depth + "]" * depth

    def nest(graph):
        graph["deep"] = "@DEEP@"

    _, entries = entries_of(edit_json(clean, GRAPH, nest))
    text = entries[GRAPH].replace(b'"@DEEP@"', deep.encode())
    assert_refused(rewrite(clean, GRAPH, text))
    assert_refused(rewrite(clean, WEIGHTS_CONFIG, deep.encode()))


@pytest.mark.parametrize("raw", [b"\xff\xfe\x00", b"{", b'{"config": NaN', b"\x00" * 10])
def test_config_not_json_refused(clean, raw):
    assert_refused(rewrite(clean, WEIGHTS_CONFIG, raw))
    assert_refused(rewrite(clean, GRAPH, raw))


def _set_flag(data: bytes, bit: int) -> bytes:
    """Set a general-purpose flag bit on every entry (local headers and central directory)."""
    out = bytearray(data)
    for signature, offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        for match in re.finditer(re.escape(signature), data):
            position = match.start() + offset
            flags = int.from_bytes(out[position : position + 2], "little") | bit
            out[position : position + 2] = flags.to_bytes(2, "little")
    return bytes(out)


@pytest.mark.parametrize("bit", [0x1, 0x20, 0x40])
def test_encrypted_or_patched_entries_refused(clean, bit):
    """HOLE (error contract): zipfile.read raises RuntimeError (encrypted, bit 0) or
    NotImplementedError (bits 5, 6) for these; they must surface as UnsafeFileError, like any
    other archive that cannot be read."""
    assert_refused(_set_flag(clean, bit))


# ---------------------------------------------------------------------------------------------
# fuzz: damaged archives never raise anything but UnsafeFileError, and never run anything


def _damaged(clean: bytes) -> Iterator[bytes]:
    size = len(clean)
    for i in range(40):
        position = (i * 7919 + 13) % size if i % 2 else i * size // 40
        out = bytearray(clean)
        out[position] ^= 0xFF if i % 3 else 0x01
        yield bytes(out)
    for i in range(1, 11):
        yield clean[: i * size // 11]


def test_damaged_archives(clean, tmp_path):
    canary = tmp_path / "canary"
    accepted = 0
    for data in _damaged(clean):
        try:
            checked = check_program(data, where="program.pt2")
        except tk.UnsafeFileError:
            continue
        accepted += 1
        # torch may reject a damaged program any way it likes
        with contextlib.suppress(Exception):
            torch.export.load(io.BytesIO(checked)).module()(torch.randn(3, 8))
        assert not canary.exists()
    assert accepted < 50


# ---------------------------------------------------------------------------------------------
# end to end: tk.save_model / tk.load_model


@pytest.fixture
def saved(tmp_path) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    model = MLP(16).eval()
    path = os.fspath(tmp_path / "model")
    tk.save_model(model, path, example_inputs=torch.randn(2, 8))
    return model, path


def test_saved_program_loads(saved):
    model, path = saved
    with open(os.path.join(path, MANIFEST_FILE)) as f:
        assert json.load(f)["model"]["recipe"] is None  # the loader must run the program
    loaded = tk.load_model(path)
    for batch in (1, 3, 17):
        x = torch.randn(batch, 8)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x))


def _hostile_program(path: str, canary: os.PathLike[str]) -> bytes:
    """The save's program with a weight stored as a pickle that creates the canary."""
    with open(os.path.join(path, PROGRAM_FILE), "rb") as f:
        program = f.read()

    def pickled(config):
        next(iter(config["config"].values()))["use_pickle"] = True

    root, entries = entries_of(edit_json(program, WEIGHTS_CONFIG, pickled))
    name = next(iter(json.loads(entries[WEIGHTS_CONFIG])["config"].values()))["path_name"]
    entries[f"data/weights/{name}"] = torch_pickle(canary)
    return pack(root, entries)


def _install(path: str, program: bytes) -> None:
    """Write ``program`` as the save's program.pt2 and a manifest consistent with it."""
    with open(os.path.join(path, PROGRAM_FILE), "wb") as f:
        f.write(program)
    manifest_path = os.path.join(path, MANIFEST_FILE)
    with open(manifest_path, encoding="utf-8") as f:
        manifest = manifest_from_json(f.read(), where=manifest_path)
    files = dict(manifest.files)
    files[PROGRAM_FILE] = FileEntry(len(program), checksum_data(program, manifest.checksum_chunk))
    model = dict(manifest.model)
    model["recipe"] = None
    manifest = dataclasses.replace(manifest, files=files, model=model)
    with open(manifest_path, "w", encoding="utf-8") as f:
        f.write(manifest_to_json(manifest))


def test_swapped_program_is_corrupt(saved, tmp_path):
    _, path = saved
    canary = tmp_path / "canary"
    hostile = _hostile_program(path, canary)
    with open(os.path.join(path, PROGRAM_FILE), "wb") as f:
        f.write(hostile)
    with pytest.raises(tk.CorruptCheckpointError):
        tk.load_model(path)
    assert not canary.exists()


def test_consistent_hostile_save_refused(saved, tmp_path):
    _, path = saved
    canary = tmp_path / "canary"
    hostile = _hostile_program(path, canary)
    torch_runs_it(hostile, canary)
    _install(path, hostile)
    with pytest.raises(tk.UnsafeFileError):
        tk.load_model(path)
    assert not canary.exists()


def test_consistent_hostile_save_with_expression_refused(saved, tmp_path):
    _, path = saved
    canary = tmp_path / "canary"
    with open(os.path.join(path, PROGRAM_FILE), "rb") as f:
        program = f.read()
    _install(path, _with_expression(program, lambda e: f"{sympy_touch(canary)} or {e}"))
    with pytest.raises(tk.UnsafeFileError):
        tk.load_model(path)
    assert not canary.exists()


def test_consistent_save_with_forward_arg_names_refused(saved, tmp_path):
    """HOLE, end to end: tk.load_model runs the code in forward_arg_names (see above)."""
    _, path = saved
    canary = tmp_path / "canary"
    with open(os.path.join(path, PROGRAM_FILE), "rb") as f:
        program = f.read()

    def change(graph):
        user_signature(graph)["forward_arg_names"] = ["x", f"_x={sympy_touch(canary)}"]

    _install(path, edit_json(program, GRAPH, change))
    try:
        with pytest.raises(tk.UnsafeFileError):
            tk.load_model(path)
    finally:
        assert not canary.exists(), "tk.load_model ran code from the saved program"
