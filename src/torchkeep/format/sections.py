"""The manifest's sections beyond the tensor table: the distributed section (sharded tensors,
with the one check that their chunks tile each tensor exactly), the model section (ModelSection:
its keys written once), and the state tree's typed-JSON check (sparse and quantized tensors'
recipes included).
"""

from __future__ import annotations

import base64
import binascii
import bisect
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from torchkeep.errors import CorruptCheckpointError
from torchkeep.format.header import DTYPES, TensorEntry, is_int
from torchkeep.format.names import MAX_RANK


class Tag:
    """The typed-JSON tags: in a manifest's state tree (and a model's recipe), a one-entry dict
    ``{tag: value}`` stands for what JSON cannot hold. Every tag is written here once."""

    TENSOR = "$tensor"  # the name of a stored tensor
    STATEFUL = "$stateful"  # {"$stateful": class name, "state": its state_dict()}
    FLOAT = "$float"  # "inf", "-inf" or "nan"
    BYTES = "$bytes"  # base64 text
    DTYPE = "$dtype"  # "float32"
    DEVICE = "$device"  # "cuda:0"
    SIZE = "$size"  # a torch.Size, as a list
    TUPLE = "$tuple"  # a list
    DICT = "$dict"  # [key, value] pairs, for keys that are not plain strings
    # Beside a mapping's items: its ``_metadata``, the version records that a module's
    # state_dict() carries and load_state_dict() reads (format version 3).
    METADATA = "$metadata"
    # A sparse tensor (format version 3): {"layout": a key of SPARSE_PARTS, "size": [...],
    # "coalesced": bool (coo only), and each of its layout's parts as {"$tensor": name}}.
    SPARSE = "$sparse"
    # A quantized tensor (format version 3): {"qscheme": a key of QUANTIZED_PARTS, "dtype": a
    # key of QUANTIZED_DTYPES, "int_repr": {"$tensor": name}, and per tensor "scale" and
    # "zero_point" (JSON numbers), per channel "scales", "zero_points" ({"$tensor": name}) and
    # "axis"}.
    QUANTIZED = "$quantized"
    # A complex tensor of a dtype safetensors has no name for (format version 3): {"dtype": a
    # key of COMPLEX_DTYPES, "real": {"$tensor": name}}, the tensor torch.view_as_real makes.
    COMPLEX = "$complex"
    # The model recipe's own.
    ODICT = "$odict"  # an OrderedDict's [key, value] pairs
    MODULE = "$module"  # a sub-module's recipe
    REF = "$ref"  # an importable name


# The plain tensors a sparse tensor is stored as, by layout, under their keys in its recipe,
# named as torch names them (``t.crow_indices()``); and a quantized tensor's, by qscheme.
SPARSE_PARTS = {
    "coo": ("indices", "values"),
    "csr": ("crow_indices", "col_indices", "values"),
    "csc": ("ccol_indices", "row_indices", "values"),
    "bsr": ("crow_indices", "col_indices", "values"),
    "bsc": ("ccol_indices", "row_indices", "values"),
}
QUANTIZED_PARTS = {
    "per_tensor_affine": ("int_repr",),
    "per_channel_affine": ("int_repr", "scales", "zero_points"),
    "per_channel_affine_float_qparams": ("int_repr", "scales", "zero_points"),
}
# The quantized dtypes stored, with the dtype of their integer representation and the range
# of a zero point.
QUANTIZED_DTYPES = {
    "qint8": ("int8", -(1 << 7), (1 << 7) - 1),
    "quint8": ("uint8", 0, (1 << 8) - 1),
    "qint32": ("int32", -(1 << 31), (1 << 31) - 1),
}
# The complex dtypes stored as torch.view_as_real's pairs, with the dtype of those pairs.
COMPLEX_DTYPES = {"complex128": "float64", "complex32": "float16"}
# A part is stored as the tensor ``<path of the tensor>:<its key>`` (``emb.weight:indices``):
# state-dict keys hold no ``:``, so the name is no other tensor's (and if one is, the part's
# name gets a ``#n`` suffix like any taken name: the recipe names each part exactly).
PART_SEPARATOR = ":"
MAX_NUMEL = (1 << 63) - 1


@dataclass(frozen=True)
class Chunk:
    """One stored piece of a sharded tensor: the stored tensor ``tensor`` holds the box at
    ``offsets`` (its shape is the stored tensor's)."""

    tensor: str
    offsets: tuple[int, ...]


@dataclass(frozen=True)
class Sharded:
    """A tensor saved in chunks by the ranks of a distributed save."""

    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[Chunk, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


def parse_distributed(
    raw: Any, tensors: Mapping[str, TensorEntry], *, where: str
) -> dict[str, Sharded]:
    """Validate the sharded tensors: each chunk a stored tensor of the same dtype and rank,
    inside the tensor, the chunks tiling it exactly (no gap, no overlap)."""

    def bad(why: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{where}: the manifest's distributed section {why}"
        )

    if not isinstance(raw, dict):
        raise bad("is not a table")
    result: dict[str, Sharded] = {}
    used: set[str] = set()
    for name, spec in raw.items():
        if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "chunks"}:
            raise bad(f"entry {name!r} is malformed")
        dtype, shape, chunks = spec["dtype"], spec["shape"], spec["chunks"]
        if dtype not in DTYPES or not _is_shape(shape) or not isinstance(chunks, list):
            raise bad(f"entry {name!r} has an invalid dtype, shape or chunk list")
        if name in tensors:
            raise bad(f"names {name!r} as a stored tensor and as a sharded one")
        parsed: list[Chunk] = []
        for chunk in chunks:
            if not isinstance(chunk, dict) or set(chunk) != {"tensor", "offsets"}:
                raise bad(f"entry {name!r} has a malformed chunk")
            stored, offsets = chunk["tensor"], chunk["offsets"]
            entry = tensors.get(stored) if isinstance(stored, str) else None
            if entry is None or stored in used:
                raise bad(
                    f"chunk {stored!r} of {name!r} is not a stored tensor, or is used twice"
                )
            used.add(stored)
            if (
                not _is_shape(offsets)
                or len(offsets) != len(shape)
                or entry.dtype != dtype
                or len(entry.shape) != len(shape)
                or any(
                    o + n > s
                    for o, n, s in zip(offsets, entry.shape, shape, strict=True)
                )
            ):
                raise bad(
                    f"chunk {stored!r} does not lie inside {name!r} ({dtype}{shape})"
                )
            parsed.append(Chunk(stored, tuple(offsets)))
        boxes = [(c.offsets, tensors[c.tensor].shape) for c in parsed]
        if not tiles(tuple(shape), boxes):
            raise bad(f"the chunks of {name!r} do not cover it exactly once")
        result[name] = Sharded(dtype, tuple(shape), tuple(parsed))
    return result


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 62
        for n in value
    )


MAX_GRID_CELLS = 1 << 22

Box = tuple[tuple[int, ...], tuple[int, ...]]  # a chunk's offsets and sizes


def tiles(size: tuple[int, ...], boxes: list[Box]) -> bool:
    """The one tiling check of chunked tensors (torchkeep's distributed saves, DCP's chunks):
    whether the boxes lie inside ``size``, cover it, and do not overlap."""
    for offsets, sizes in boxes:
        if len(offsets) != len(size) or len(sizes) != len(size):
            return False
        if any(o + n > m for o, n, m in zip(offsets, sizes, size, strict=True)):
            return False
    return sum(math.prod(s) for _, s in boxes) == math.prod(size) and not _overlapping(boxes)


def _overlapping(boxes: list[Box]) -> bool:
    """Whether any two non-empty boxes overlap. The boxes' edges cut each dimension into
    segments; each box covers a block of the grid they make, and two boxes overlap exactly
    when they share a cell. A sharding makes a grid of about one cell per chunk."""
    live = [(o, n) for o, n in boxes if math.prod(n)]
    if not live:
        return False
    cuts = [
        sorted({o[d] for o, _ in live} | {o[d] + n[d] for o, n in live})
        for d in range(len(live[0][0]))
    ]
    if math.prod(len(c) - 1 for c in cuts) > MAX_GRID_CELLS:
        return True  # far more fragments than any sharding makes: refused as malformed
    taken: set[tuple[int, ...]] = set()
    for offsets, shape in live:
        ranges = [
            range(bisect.bisect_left(c, o), bisect.bisect_left(c, o + n))
            for c, o, n in zip(cuts, offsets, shape, strict=True)
        ]
        for cell in itertools.product(*ranges):
            if cell in taken:
                return True
            taken.add(cell)
    return False


@dataclass(frozen=True)
class ModelSection:
    """A whole model's section of the manifest (``tk.save_model``): how to rebuild the module,
    and what the save holds besides its state dict. Its keys are written here alone.

    Attributes:
        class_name: the module's class, ``module:Qualname`` (the key ``class``).
        recipe: the stored recipe (JSON) that rebuilds the module, or None.
        recipe_problem: why no recipe was stored, or None.
        program: the description of the exported program (its file and inputs), or None.
        buffers: the non-persistent buffers, saved beside the state dict.
        frozen: the parameters saved with ``requires_grad=False``.
        attributes: plain attributes of the modules, by module path.
        architecture: the module tree (each module's class and parameter count), or None.
        converted: for a converted model, what the conversion changed; else None.
    """

    class_name: str
    recipe: dict[str, Any] | None = None
    recipe_problem: str | None = None
    program: dict[str, Any] | None = None
    buffers: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    architecture: dict[str, Any] | None = None
    converted: dict[str, Any] | None = None
    # The section as read from a manifest: written back with only what changed set over it, so
    # that a converted model keeps the keys its save wrote, no more and no fewer, in their order
    # (a key this torchkeep does not know, one an earlier save did not write).
    as_read: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The section as the manifest holds it."""
        body = self._body()
        if self.as_read is None:
            return body
        before = ModelSection.from_json(self.as_read)._body()
        changed = {k: v for k, v in body.items() if k not in before or before[k] != v}
        return {**self.as_read, **changed}

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "class": self.class_name,
            "recipe": self.recipe,
            "recipe_problem": self.recipe_problem,
            "program": self.program,
            "buffers": self.buffers,
            "frozen": self.frozen,
            "attributes": self.attributes,
            "architecture": self.architecture,
        }
        if self.converted is not None:
            body["converted"] = self.converted
        return body

    @classmethod
    def from_json(cls, model: Any) -> ModelSection:
        """Read a saved model's section of the manifest, checking its types (the recipe's
        contents are checked when it is decoded).

        Raises:
            ValueError: the section is malformed; the message says how (``model_section_problem``).
        """
        if not isinstance(model, dict):
            raise ValueError("is not an object")
        if not isinstance(model.get("class"), str):
            raise ValueError("names no class")
        if model.get("recipe_problem") is not None and not isinstance(
            model["recipe_problem"], str
        ):
            raise ValueError("has a malformed recipe_problem")
        if model.get("recipe") is not None and not isinstance(model["recipe"], dict):
            raise ValueError("has a malformed recipe")
        for key in ("buffers", "frozen"):
            names = model.get(key, [])
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise ValueError(f"has a malformed {key} list")
        program = model.get("program")
        if program is not None:
            inputs = program.get("inputs") if isinstance(program, dict) else None
            if not isinstance(inputs, list) or not all(
                isinstance(i, dict)
                and isinstance(i.get("dtype"), str)
                and isinstance(i.get("shape"), list)
                and all(d is None or is_int(d) for d in i["shape"])
                for i in inputs
            ):
                raise ValueError("has a malformed program description")
        attributes = model.get("attributes", {})
        if not isinstance(attributes, dict) or not all(
            isinstance(v, dict) for v in attributes.values()
        ):
            raise ValueError("has malformed attributes")
        converted = model.get("converted")
        if converted is not None and not isinstance(converted, dict):
            raise ValueError("has a malformed conversion record")
        if "architecture" in model and not _plain_architecture(model["architecture"], 0):
            raise ValueError("has a malformed architecture")
        return cls(
            class_name=model["class"],
            recipe=model.get("recipe"),
            recipe_problem=model.get("recipe_problem"),
            program=program,
            buffers=model.get("buffers", []),
            frozen=model.get("frozen", []),
            attributes=attributes,
            architecture=model.get("architecture"),
            converted=converted,
            as_read=model,
        )


def model_section_problem(model: Any) -> str | None:
    """What is wrong with a saved model's section of the manifest (types only: the recipe's
    contents are checked when it is decoded), or None."""
    try:
        ModelSection.from_json(model)
    except ValueError as e:
        return str(e)
    return None


def _plain_architecture(node: Any, depth: int) -> bool:
    if depth > 64 or not isinstance(node, dict):
        return False
    children = node.get("children", {})
    return (
        isinstance(node.get("type"), str)
        and is_int(node.get("parameters"))
        and isinstance(children, dict)
        and all(_plain_architecture(c, depth + 1) for c in children.values())
    )


MAX_TREE_DEPTH = 200


def _is_key_json(key: Any, depth: int) -> bool:
    """Whether typed JSON ``key`` decodes to a hashable dict key (a scalar or nested tuples)."""
    if depth > MAX_TREE_DEPTH:
        return False
    if key is None or isinstance(key, (str, int, float, bool)):
        return True
    if isinstance(key, dict) and len(key) == 1:
        ((tag, value),) = key.items()
        if tag in (Tag.FLOAT, Tag.BYTES):
            return isinstance(value, str)
        if tag == Tag.TUPLE and isinstance(value, list):
            return all(_is_key_json(k, depth + 1) for k in value)
    return False


def check_tree(tree: Any, names: set[str]) -> None:
    """Raise TypeError/ValueError unless ``tree`` is a skeleton ``tree.decode`` can rebuild."""
    stack: list[tuple[Any, int]] = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_TREE_DEPTH:
            raise ValueError(f"nested deeper than {MAX_TREE_DEPTH}")
        if isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)
            continue
        if not isinstance(node, dict):
            continue
        if len(node) == 1:
            ((tag, value),) = node.items()
            if tag == Tag.TENSOR:
                if not isinstance(value, str) or value not in names:
                    raise ValueError(
                        f"it refers to tensor {value!r}, which the manifest lacks"
                    )
                continue
            if tag == Tag.FLOAT:
                if value not in ("inf", "-inf", "nan"):
                    raise ValueError(f"$float {value!r}")
                continue
            if tag == Tag.BYTES:
                if not isinstance(value, str):
                    raise TypeError("$bytes must be base64 text")
                try:
                    base64.b64decode(value, validate=True)
                except binascii.Error as e:
                    raise ValueError(f"$bytes: {e}") from e
                continue
            if tag == Tag.DTYPE:
                if not isinstance(getattr(torch, str(value), None), torch.dtype):
                    raise ValueError(f"unknown dtype {value!r}")
                continue
            if tag == Tag.DEVICE:
                try:
                    torch.device(value)
                except (RuntimeError, TypeError) as e:
                    raise ValueError(f"$device {value!r}") from e
                continue
            if tag == Tag.SIZE:
                if not isinstance(value, list) or not all(
                    is_int(d) and d >= 0 for d in value
                ):
                    raise ValueError(f"$size {value!r}")
                continue
            if tag in (Tag.SPARSE, Tag.QUANTIZED, Tag.COMPLEX):
                _check_recipe(tag, value, names)
                continue
            if tag == Tag.TUPLE:
                if not isinstance(value, list):
                    raise TypeError("$tuple must hold a list")
                stack.extend((v, depth + 1) for v in value)
                continue
            if tag == Tag.DICT:
                if not isinstance(value, list) or not all(
                    isinstance(p, list) and len(p) == 2 for p in value
                ):
                    raise TypeError("$dict must hold [key, value] pairs")
                for key, v in value:
                    if not _is_key_json(key, depth):
                        raise TypeError(f"dict key {key!r:.100} is not a valid key")
                    stack.append((key, depth + 1))
                    stack.append((v, depth + 1))
                continue
        stack.extend((v, depth + 1) for v in node.values())


def _check_recipe(tag: str, recipe: Any, names: set[str]) -> None:
    """Raise ValueError unless ``recipe`` is a well-formed sparse or quantized tensor's: its
    keys, its scalars, and parts naming stored tensors. What needs the parts' dtypes, shapes
    and values is checked as the tensor is rebuilt."""
    if not isinstance(recipe, dict):
        raise ValueError(f"{tag} must hold an object")
    if tag == Tag.SPARSE:
        layout = recipe.get("layout")
        if not isinstance(layout, str) or layout not in SPARSE_PARTS:
            raise ValueError(f"{tag}: unknown layout {layout!r:.40}")
        parts = SPARSE_PARTS[layout]
        scalars: tuple[str, ...] = (
            ("layout", "size", "coalesced") if layout == "coo" else ("layout", "size")
        )
        size = recipe.get("size")
        if (
            not isinstance(size, list)
            or len(size) > MAX_RANK
            or not all(is_int(d) and d >= 0 for d in size)
        ):
            raise ValueError(f"{tag}: size {size!r:.60} is not a list of dimensions")
        if math.prod(size) > MAX_NUMEL:
            raise ValueError(f"{tag}: size {size!r:.60} has more elements than a tensor holds")
        if layout == "coo" and not isinstance(recipe.get("coalesced"), bool):
            raise ValueError(f"{tag}: coalesced must be true or false")
    elif tag == Tag.COMPLEX:
        dtype = recipe.get("dtype")
        if not isinstance(dtype, str) or dtype not in COMPLEX_DTYPES:
            raise ValueError(f"{tag}: unknown complex dtype {dtype!r:.40}")
        scalars, parts = ("dtype",), ("real",)
    else:
        qscheme, dtype = recipe.get("qscheme"), recipe.get("dtype")
        if not isinstance(qscheme, str) or qscheme not in QUANTIZED_PARTS:
            raise ValueError(f"{tag}: unknown qscheme {qscheme!r:.40}")
        if not isinstance(dtype, str) or dtype not in QUANTIZED_DTYPES:
            raise ValueError(f"{tag}: unknown quantized dtype {dtype!r:.40}")
        parts = QUANTIZED_PARTS[qscheme]
        if qscheme == "per_tensor_affine":
            scalars = ("qscheme", "dtype", "scale", "zero_point")
            _check_scale(recipe.get("scale"))
            _, low, high = QUANTIZED_DTYPES[dtype]
            zero_point: Any = recipe.get("zero_point")
            if not is_int(zero_point) or not low <= zero_point <= high:
                raise ValueError(
                    f"{tag}: zero_point {zero_point!r:.40} is not an integer in [{low}, {high}]"
                )
        else:
            if qscheme == "per_channel_affine_float_qparams" and dtype != "quint8":
                # torch makes it for quint8 only; other dtypes crash its kernels
                raise ValueError(f"{tag}: {qscheme} holds quint8 tensors only, not {dtype}")
            scalars = ("qscheme", "dtype", "axis")
            axis: Any = recipe.get("axis")
            if not is_int(axis) or axis < 0:
                raise ValueError(f"{tag}: axis {axis!r:.40} is not a dimension")
    if set(recipe) != {*scalars, *parts}:
        expected = sorted({*scalars, *parts})
        raise ValueError(f"{tag} has keys {sorted(recipe)!r:.120}, not {expected}")
    for part in parts:
        node = recipe[part]
        if not isinstance(node, dict) or set(node) != {Tag.TENSOR}:
            raise ValueError(f"{tag}: {part} must be a {Tag.TENSOR}")
        if not isinstance(node[Tag.TENSOR], str) or node[Tag.TENSOR] not in names:
            raise ValueError(
                f"{tag}: {part} refers to tensor {node[Tag.TENSOR]!r:.100}, which the "
                "manifest lacks"
            )


def _check_scale(scale: Any) -> None:
    number = isinstance(scale, (int, float)) and not isinstance(scale, bool)
    if not number or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{Tag.QUANTIZED}: scale {scale!r:.40} is not a finite number above 0")
