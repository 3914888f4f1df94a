"""Exported programs (``torch.export``): the model as a graph of tensor operations that runs with
no class code, stored as ``program.pt2`` in a saved model's directory.

``torch.export.load`` trusts its file: it unpickles weights, constants and example inputs
flagged as pickles, hands shape expressions to ``sympy.sympify`` (``eval``), ``exec``s guard
code, and loads compiled libraries from an ``aotinductor`` folder. So an archive is checked here
first, entry by entry, and only the checked entries are handed to torch, in a fresh archive (so
that torch's zip reader and this check cannot see different contents):

* only the entries a plain program has: the graph JSON, weights and constants as raw tensor
  bytes with JSON configs that mark none of them as pickles, and an empty example-inputs entry;
* no guard code and no custom or opaque objects; every graph node calls an ATen operator, a
  symbolic-size helper or one of a few ``operator`` functions (the graph itself is JSON);
* every shape expression is built from sympy's symbols, integers and arithmetic alone.
"""

from __future__ import annotations

import io
import json
import keyword
import re
import types
import zipfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from torchkeep._types import Device
from torchkeep.container import Container
from torchkeep.errors import (
    CorruptCheckpointError,
    TorchkeepError,
    UnsafeFileError,
    UnsupportedObjectError,
)
from torchkeep.format import PROGRAM_FILE

_FIXED_ENTRIES = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    "models/model.json",
    "data/weights/model_weights_config.json",
    "data/constants/model_constants_config.json",
    "data/sample_inputs/model.pt",
}
_DATA_ENTRY = re.compile(r"data/(weights/weight|constants/tensor)_\d+")
_OPERATORS = {
    "_operator.getitem",
    "_operator.add",
    "_operator.sub",
    "_operator.mul",
    "_operator.floordiv",
    "_operator.truediv",
    "_operator.mod",
    "_operator.neg",
    "_operator.eq",
    "_operator.ne",
    "_operator.lt",
    "_operator.le",
    "_operator.gt",
    "_operator.ge",
    "_operator.and_",
    "_operator.or_",
    "math.ceil",
    "math.floor",
    "math.sqrt",
}
_TARGET = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+")
_DENIED_OPS = re.compile(r"torch\.ops\.aten\.[A-Za-z0-9_]*(file|save|load|print)[A-Za-z0-9_]*\.")
# Shape expressions are sympy source text: only these names, integers, operators and the
# quoted names of size symbols (no attribute access, no indexing, no other names).
_EXPR_NAMES = {
    "Symbol",
    "Integer",
    "Rational",
    "Add",
    "Mul",
    "Mod",
    "Max",
    "Min",
    "FloorDiv",
    "CeilToInt",
    "FloorToInt",
    "CleanDiv",
    "PythonMod",
    "positive",
    "integer",
    "nonnegative",
    "True",
    "False",
}
_EXPR_TOKENS = re.compile(r"\s*(?:'[su]\d+'|[A-Za-z_][A-Za-z0-9_]*|\d+|[-+*/%(),=])")
_MAX_PROGRAM_JSON = 256 << 20
# Module paths of parameters, buffers and constants ("fc1.weight"), and the keys holding them.
_FQN = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*")
_PASTED_NAMES = {
    "parameter_name",
    "buffer_name",
    "tensor_constant_name",
    "custom_obj_name",
    "fqn",
    "target_name",
}


def export_program(
    model: nn.Module, example_inputs: Any, *, dynamic_batch: bool
) -> tuple[bytes, dict[str, Any]]:
    """Export ``model`` called on ``example_inputs``; return the archive and its description.

    Raises:
        UnsupportedObjectError: the inputs are not tensors, or torch.export failed (its error
            is quoted).
    """
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        raise UnsupportedObjectError(
            "example_inputs must be a tensor or a tuple of tensors the model is called with, "
            f"not {type(example_inputs).__name__}"
        )
    dynamic = None
    if dynamic_batch:
        if any(a.dim() == 0 for a in args):
            raise UnsupportedObjectError(
                "dynamic_batch needs every example input to have a batch dimension; pass "
                "dynamic_batch=False to export for the inputs' exact shapes"
            )
        # A batch of 1 would be specialised by torch.export (sizes 0 and 1 are constants to
        # it): export on a batch of two copies instead.
        args = tuple(torch.cat([a, a]) if a.shape[0] < 2 else a for a in args)
        batch = torch.export.Dim("batch")
        dynamic = tuple({0: batch} for _ in args)
    was_training = model.training
    model.eval()
    try:
        exported = torch.export.export(model, args, dynamic_shapes=dynamic)
    except Exception as e:  # torch.export raises many kinds of errors
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        hint = "Try dynamic_batch=False, or save" if dynamic_batch else "Save"
        raise UnsupportedObjectError(
            f"torch.export could not export {type(model).__name__}: {type(e).__name__}: {first}. "
            f"{hint} it without example_inputs to keep only the recipe"
        ) from e
    finally:
        model.train(was_training)
    # Example inputs would be stored as a pickle; a loader would have to unpickle them.
    exported.example_inputs = None
    buffer = io.BytesIO()
    torch.export.save(exported, buffer)
    info = {
        "file": PROGRAM_FILE,
        "dynamic_batch": dynamic_batch,
        "inputs": [
            {
                "shape": [None if dynamic_batch and i == 0 else d for i, d in enumerate(a.shape)],
                "dtype": str(a.dtype).removeprefix("torch."),
            }
            for a in args
        ],
    }
    return buffer.getvalue(), info


def check_program(data: bytes, *, where: str) -> bytes:
    """Check an exported-program archive (see the module's docstring) and return a fresh
    archive of exactly the checked entries.

    Raises:
        UnsafeFileError: the archive holds anything a plain exported program does not.
    """
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        infos = archive.infolist()
    except (zipfile.BadZipFile, ValueError, EOFError, NotImplementedError) as e:
        raise UnsafeFileError(f"{where}: not a readable program archive ({e})") from e
    names = [i.filename for i in infos]
    roots = {n.split("/", 1)[0] for n in names}
    if len(roots) != 1 or len(set(names)) != len(names):
        raise UnsafeFileError(f"{where}: the program archive's entries are not one plain folder")
    root = roots.pop() + "/"
    entries: dict[str, bytes] = {}
    for info in infos:
        name = info.filename.removeprefix(root)
        if name not in _FIXED_ENTRIES and not _DATA_ENTRY.fullmatch(name):
            raise UnsafeFileError(
                f"{where}: the program archive holds '{name}', which a plain exported program "
                "does not (pickled objects, compiled libraries and guard code are refused)"
            )
        # Stored entries only: not compressed, encrypted (flag 0x1, 0x40) or patched (0x20).
        if (
            info.compress_type != zipfile.ZIP_STORED
            or info.flag_bits & 0x61
            or info.file_size > len(data)
        ):
            raise UnsafeFileError(
                f"{where}: the program archive's entry '{name}' is compressed, encrypted or "
                "larger than the archive"
            )
        try:
            entries[name] = archive.read(info)
        except (zipfile.BadZipFile, ValueError, EOFError, RuntimeError, NotImplementedError) as e:
            raise UnsafeFileError(f"{where}: the program archive is damaged ({e})") from e
    missing = sorted(_FIXED_ENTRIES - set(entries))
    if missing:
        raise UnsafeFileError(f"{where}: the program archive lacks {', '.join(missing)}")
    if entries["archive_format"] != b"pt2" or entries["data/sample_inputs/model.pt"]:
        raise UnsafeFileError(
            f"{where}: the program archive is not a plain pt2 archive without example inputs"
        )
    for config in (
        "data/weights/model_weights_config.json",
        "data/constants/model_constants_config.json",
    ):
        _check_data_config(_json(entries[config], where, config), where)
    _check_graph(_json(entries["models/model.json"], where, "models/model.json"), where)
    clean = io.BytesIO()
    with zipfile.ZipFile(clean, "w", compression=zipfile.ZIP_STORED) as out:
        for name, payload in entries.items():
            out.writestr(root + name, payload)
    return clean.getvalue()


def _json(raw: bytes, where: str, name: str) -> Any:
    if len(raw) > _MAX_PROGRAM_JSON:
        raise UnsafeFileError(f"{where}: the program's {name} is too large")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise UnsafeFileError(f"{where}: the program's {name} is not JSON ({e})") from e


def _check_data_config(body: Any, where: str) -> None:
    config = body.get("config") if isinstance(body, dict) else None
    if not isinstance(config, dict):
        raise UnsafeFileError(f"{where}: the program's tensor table is malformed")
    for name, meta in config.items():
        if (
            not _FQN.fullmatch(name)
            or not isinstance(meta, dict)
            or meta.get("use_pickle") is not False
            or meta.get("tensor_meta") is None
            or not isinstance(meta.get("path_name"), str)
            or not re.fullmatch(r"(weight|tensor)_\d+", meta["path_name"])
        ):
            raise UnsafeFileError(
                f"{where}: the program's tensor '{name}' is stored as a pickle or malformed"
            )


def _check_graph(body: Any, where: str) -> None:
    if not isinstance(body, dict):
        raise UnsafeFileError(f"{where}: the program's graph is malformed")
    if body.get("guards_code"):
        raise UnsafeFileError(f"{where}: the program carries guard code, which would be run")
    graph = (
        body.get("graph_module", {}).get("graph")
        if isinstance(body.get("graph_module"), dict)
        else None
    )
    if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
        raise UnsafeFileError(f"{where}: the program has no graph")
    if graph.get("custom_obj_values"):
        raise UnsafeFileError(f"{where}: the program holds custom objects")
    for node in graph["nodes"]:
        target = node.get("target") if isinstance(node, dict) else None
        if not (isinstance(target, str) and (target in _OPERATORS or _is_aten_op(target))):
            raise UnsafeFileError(
                f"{where}: the program calls {target!r}; only ATen operators are allowed"
            )
    for key, value in _walk(body):
        if key in ("as_graph", "as_operator", "as_custom_obj") and value is not None:
            raise UnsafeFileError(f"{where}: the program holds a {key[3:]} argument (refused)")
        if key == "expr_str" and not _plain_expression(value):
            raise UnsafeFileError(f"{where}: the program holds a shape expression {value!r}")
        # Names torch pastes into the Python code it generates for the module: plain names only.
        plain = isinstance(value, str) and (_FQN.fullmatch(value) or (key == "fqn" and not value))
        if key in _PASTED_NAMES and not plain:
            raise UnsafeFileError(f"{where}: the program holds a malformed name {value!r}")
        if key == "forward_arg_names" and not (
            isinstance(value, list) and all(_is_identifier(v) for v in value)
        ):
            raise UnsafeFileError(f"{where}: the program's argument names are malformed")
        if key in ("in_spec", "out_spec") and value is not None and not _plain_spec(value):
            raise UnsafeFileError(f"{where}: the program's {key} is malformed")


def _is_aten_op(target: str) -> bool:
    """Whether ``target`` names an overload of an ATen operator that touches no files."""
    if not _TARGET.fullmatch(target) or _DENIED_OPS.match(target) or "__" in target:
        return False
    _, _, _, name, overload = target.split(".")
    packet = getattr(torch.ops.aten, name, None)
    return isinstance(getattr(packet, overload, None), torch._ops.OpOverload)


def _is_identifier(value: Any) -> bool:
    return isinstance(value, str) and value.isidentifier() and not keyword.iskeyword(value)


def _plain_spec(text: Any) -> bool:
    """A serialized pytree spec whose type names and dict keys are plain names."""
    if not isinstance(text, str) or len(text) > 1_000_000:
        return False
    try:
        spec = json.loads(text)
    except (ValueError, RecursionError):
        return False
    for key, value in _walk(spec):
        if (
            key == "type"
            and value is not None
            and not (isinstance(value, str) and _FQN.fullmatch(value))
        ):
            return False
        if key == "context" and value is not None:
            try:
                context = json.loads(value) if isinstance(value, str) else value
            except (ValueError, RecursionError):
                return False
            leaves = context if isinstance(context, list) else [context]
            if not all(
                leaf is None
                or isinstance(leaf, int)
                or (isinstance(leaf, str) and _FQN.fullmatch(leaf))
                for leaf in leaves
            ):
                return False
    return True


def _walk(node: Any, key: str | None = None, depth: int = 0) -> Iterator[tuple[str | None, Any]]:
    if depth > 200:
        raise UnsafeFileError("the program's graph (models/model.json) is nested too deeply")
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v, k, depth + 1)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key, depth + 1)


def _plain_expression(text: Any) -> bool:
    if not isinstance(text, str) or len(text) > 10_000 or "**" in text or "Pow" in text:
        return False  # powers of literals could take sympy unbounded time to evaluate
    if any(len(digits) > 12 for digits in re.findall(r"\d+", text)):
        return False
    position = 0
    while position < len(text):
        match = _EXPR_TOKENS.match(text, position)
        if match is None:
            return False
        token = match.group().strip()
        if (token[0].isalpha() or token[0] == "_") and token not in _EXPR_NAMES:
            return False
        position = match.end()
    return True


def load_program(
    container: Container,
    *,
    device: Device,
    dtype: torch.dtype | None,
    verify: bool = True,
    rebuild: str | None = None,
) -> nn.Module:
    """Load the checked exported program of a saved model as a module on ``device``
    (``rebuild``: how the model could be rebuilt as its class instead, for ``train()``'s
    refusal)."""
    where = f"{container.path}/{PROGRAM_FILE}"
    clean = check_program(container.read_member(PROGRAM_FILE, verify=verify), where=where)
    try:
        exported = torch.export.load(io.BytesIO(clean))
    except Exception as e:  # torch raises many kinds of errors for a damaged program
        raise CorruptCheckpointError(f"{where}: torch cannot load the program: {e}") from e
    # A program keeps the device it was exported on, in its weights and in operators' device
    # arguments; the pass rewrites both (exported on a GPU, loaded on the CPU, say).
    from torch.export.passes import move_to_device_pass

    exported = move_to_device_pass(exported, torch.device(device))
    try:
        module = exported.module(check_guards=False)
    except TypeError:  # torch versions without check_guards
        module = exported.module()
    if dtype is not None:
        module = module.to(dtype)
    return inference_only(module, container.path, rebuild)


def inference_only(module: nn.Module, where: str, rebuild: str | None = None) -> nn.Module:
    """Make a module run from an exported program behave as the tutorials expect of a loaded
    model: it reports ``training == False`` (it was exported in eval mode, and runs so),
    accepts ``eval()`` and ``train(False)``, and refuses ``train()`` with a message that says
    how to get a model that trains (``rebuild``, when the save has a recipe, says how to load
    that). A deep copy keeps this; ``copy.copy`` builds torch's plain GraphModule."""
    how = f"{rebuild}, or build" if rebuild else "build"
    refusal = (
        f"{where}: this model was rebuilt from its exported program, which runs in eval mode "
        f"only: train() is refused. For a model that trains, {how} the model and load its "
        "weights: tk.load_weights(model, path)"
    )

    def train(self: nn.Module, mode: bool = True) -> nn.Module:
        if mode:
            raise TorchkeepError(refusal)
        for m in self.modules():
            m.training = False
        return self

    def eval(self: nn.Module) -> nn.Module:
        return train(self, False)

    module.train = types.MethodType(train, module)  # type: ignore[method-assign]
    module.eval = types.MethodType(eval, module)  # type: ignore[method-assign]
    copier = getattr(type(module), "__deepcopy__", None)
    if copier is not None:

        def deepcopy(memo: dict[int, Any]) -> nn.Module:  # copy.deepcopy looks on the instance
            return inference_only(copier(module, memo), where, rebuild)

        object.__setattr__(module, "__deepcopy__", deepcopy)
    return train(module, False)
