"""Golden bytes of the on-disk format: what torchkeep writes, pinned byte for byte.

Three saves are compared, every file of each, with the files in ``tests/golden/``:

* ``single/``: one ``.safetensors`` file (``tk.save``) holding a model's state dict, an
  optimizer's state dict (int keys, a tuple of betas, a 0-d ``step``), a tensor saved under two
  names, tensors of other dtypes and plain values (int, float, str, bool, tuple, list, None),
  with metadata;
* ``model/``: a directory written by ``tk.save_model`` with ``example_inputs``: its shard, its
  member file ``program.pt2`` (the only kind of member a save writes) and its manifest with the
  recipe, the program's description, a non-persistent buffer, a frozen parameter and a plain
  attribute;
* ``distributed/``: a directory written by ``tk.save`` in a real two-rank gloo group, a DTensor
  sharded over both ranks: each rank's shard file and rank 0's manifest.

The expected files were written by torchkeep at 12bdb57 (before the move into layers), by
``tests/golden/make_golden.py`` with that checkout first on the path (``generated_with.json``
records the commit and the torch release)::

    git worktree add /tmp/tk-old 12bdb57
    PYTHONPATH=/tmp/tk-old/src .venv/bin/python tests/golden/make_golden.py
    git worktree remove /tmp/tk-old

Regenerate them only for a deliberate format change (then from this checkout, without
PYTHONPATH): a difference here is otherwise a change users would see in their files. One such
change: a module state dict keeps its ``_metadata`` (a ``$metadata`` entry beside its items, in
format version 3), so ``single/`` was written again from this checkout with that entry and that
version, its only differences from the file 12bdb57 wrote, which ``golden/older/single/`` keeps
(``test_torch_files`` reads it).

A save records when it was made, the versions of torch and torchkeep and a random save id;
``pinned()`` fixes them (``time.gmtime``, ``uuid.uuid4``, ``torch.__version__`` and the version
torchkeep reads: ``torchkeep.__version__`` at 12bdb57, ``torchkeep._version.__version__`` since),
in the same way for the old code and the current one, in every rank. Every uuid4 is the same
fixed one, so the save id does not depend on how many temporary names were made before it
(the temporary names repeat too, harmlessly: no two of one save are made beside one target).

``program.pt2`` is torch.export's archive, which torchkeep stores as given: its bytes depend on
torch's serializer as well, so the model case is compared only under the torch release the files
were generated with (``generated_with.json``) and skipped under another. The model it exports
is compiled from source under a fixed file and module name: torch.export records the stack
trace of every operation, which would otherwise hold the checkout's path.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
import time
import types
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.torch_version import TorchVersion

import torchkeep as tk

GOLDEN = Path(__file__).parent / "golden"

CREATED = time.struct_time((2001, 2, 3, 4, 5, 6, 5, 34, 0))  # 2001-02-03T04:05:06Z
SAVE_ID = uuid.UUID("0123abcd-4567-4ef0-89ab-cdef01234567")
TORCH_VERSION = "99.0.0+golden"
TORCHKEEP_VERSION = "0.0.0+golden"


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Fix what a save records besides its contents: the time, the save id, the versions."""
    real_gmtime = time.gmtime

    def gmtime(secs: float | None = None) -> time.struct_time:
        return CREATED if secs is None else real_gmtime(secs)

    def uuid4() -> uuid.UUID:
        return SAVE_ID

    targets: list[tuple[Any, str, Any]] = [
        (time, "gmtime", gmtime),
        (uuid, "uuid4", uuid4),
        (torch, "__version__", TorchVersion(TORCH_VERSION)),
        (tk, "__version__", TORCHKEEP_VERSION),  # read by the manifest at 12bdb57
    ]
    with contextlib.suppress(ModuleNotFoundError):  # where the manifest reads it since
        targets.append(
            (importlib.import_module("torchkeep._version"), "__version__", TORCHKEEP_VERSION)
        )
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for owner, name, value in targets:
            setattr(owner, name, value)
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


def _ramp(
    shape: tuple[int, ...],
    scale: float = 1 / 8,
    start: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Deterministic values exact in every dtype used here (multiples of a power of two)."""
    n = 1
    for d in shape:
        n *= d
    return (torch.arange(n, dtype=torch.float64) * scale + start).reshape(shape).to(dtype)


# The single file -------------------------------------------------------------------------------


def single_state() -> dict[str, Any]:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.copy_(_ramp(tuple(p.shape), start=-i))
    weights = model.state_dict()
    params = list(weights.values())
    # Adam's state dict after a step, built by hand: a real step's float results (a matmul, the
    # fused updates) may round differently on another CPU, and its param_groups' keys change
    # with torch releases; the format is what is pinned here, not the optimizer.
    optimizer = {
        "state": {
            i: {
                "step": torch.tensor(1.0),
                "exp_avg": _ramp(tuple(p.shape), scale=1 / 64, start=i),
                "exp_avg_sq": _ramp(tuple(p.shape), scale=1 / 1024),
            }
            for i, p in enumerate(params)
        },
        "param_groups": [
            {
                "lr": 0.001,
                "betas": (0.9, 0.999),
                "eps": 1e-08,
                "weight_decay": 0.0,
                "amsgrad": False,
                "foreach": None,
                "params": list(range(len(params))),
            }
        ],
    }
    return {
        "model": weights,
        "optimizer": optimizer,
        "tied": weights["0.weight"],  # the same tensor under a second name: an alias
        "tokens": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "half": _ramp((5,), dtype=torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "epoch": 3,
        "loss": 0.25,
        "name": "golden",
        "shape": (4, 3),
        "flags": [True, False],
        "nothing": None,
    }


def write_single(directory: Path) -> None:
    tk.save(single_state(), directory / "x.safetensors", metadata={"run": "golden", "seed": 7})


# The model directory with its member file --------------------------------------------------------

_MODEL_MODULE = "torchkeep_golden_model"
_MODEL_SOURCE = """
import torch
from torch import nn
from torch.nn import functional as F


class GoldenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 2)
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)
        self.alpha = 2
        with torch.no_grad():
            for i, p in enumerate(self.parameters()):
                p.copy_(torch.arange(p.numel(), dtype=torch.float32).reshape(p.shape) / 8 - i)
        self.head.bias.requires_grad_(False)

    def forward(self, x):
        h = F.linear(x, self.body.weight, self.body.bias).relu()
        return F.linear(h, self.head.weight, self.head.bias) * self.scale * self.alpha
"""


def golden_net() -> nn.Module:
    """The model of the model case, its class in a module of a fixed name and file name."""
    module = sys.modules.get(_MODEL_MODULE)
    if module is None:
        module = types.ModuleType(_MODEL_MODULE)
        exec(compile(_MODEL_SOURCE, f"<{_MODEL_MODULE}>", "exec"), module.__dict__)
        sys.modules[_MODEL_MODULE] = module
    net: nn.Module = module.GoldenNet()
    return net


def write_model(directory: Path) -> None:
    inputs = _ramp((2, 4), scale=1 / 4)
    tk.save_model(
        golden_net(), directory / "model", example_inputs=inputs, metadata={"task": "golden"}
    )


# The two-rank save -----------------------------------------------------------------------------


def distributed_state(world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    return {
        "model": {
            "w": distribute_tensor(_ramp((6, 4)), mesh, [Shard(0)]),
            "b": distribute_tensor(_ramp((5,), dtype=torch.bfloat16), mesh, [Shard(0)]),  # 3 + 2
            "r": distribute_tensor(_ramp((3,), start=1.0), mesh, [Replicate()]),
        },
        "step": 7,
        "plain": torch.full((2,), 5.0),
    }


def _rank(rank: int, world: int, init: str, path: str, module_file: str) -> None:
    """One rank of the distributed case (run by torch.multiprocessing.spawn)."""
    import torch.distributed as dist

    assert tk.__file__ == module_file, f"rank {rank} imported {tk.__file__}, not {module_file}"
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=120)
    )
    try:
        with pinned():
            tk.save(distributed_state(world), path)
    finally:
        dist.barrier()
        dist.destroy_process_group()
    from dist_workers import exit_without_teardown

    exit_without_teardown()


def write_distributed(directory: Path) -> None:
    store = directory / f"store-{os.urandom(6).hex()}"
    mp.spawn(
        _rank,
        args=(2, f"file://{store}", str(directory / "ckpt"), tk.__file__),
        nprocs=2,
        join=True,
    )


# The cases -------------------------------------------------------------------------------------

# name: (write into a fresh directory, the save's path in it)
CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "single": (write_single, "."),
    "model": (write_model, "model"),
    "distributed": (write_distributed, "ckpt"),
}


def write_case(name: str, scratch: Path) -> Path:
    """Write case ``name`` with everything pinned under ``scratch``; return the directory whose
    files are compared (the single file's directory, or the directory save itself)."""
    write, saved = CASES[name]
    with pinned():
        write(scratch)
    return scratch / saved


def _read_generated_with() -> dict[str, Any]:
    return json.loads((GOLDEN / "generated_with.json").read_text())


def _release(version: str) -> str:
    return version.split("+")[0]


# Comparison ------------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}/{k}"))
        return out or {prefix: {}}
    if isinstance(value, list):
        out = {}
        for i, v in enumerate(value):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out or {prefix: []}
    return {prefix: value}


def _json_difference(expected: Any, actual: Any) -> list[str]:
    a, b = _flatten(expected), _flatten(actual)
    lines = [f"  only expected {k}: {a[k]!r}" for k in a if k not in b]
    lines += [f"  only written  {k}: {b[k]!r}" for k in b if k not in a]
    lines += [f"  changed {k}: {a[k]!r} -> {b[k]!r}" for k in a if k in b and a[k] != b[k]]
    if not lines:
        lines = ["  the same values, laid out differently (key order, spacing or number form)"]
    return lines


def _safetensors_header(data: bytes) -> tuple[Any, int]:
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + size]), 8 + size


def _describe(name: str, expected: bytes, actual: bytes) -> list[str]:
    lines = [f"{name}: {len(expected)} bytes expected, {len(actual)} written"]
    first = next(
        (i for i, (x, y) in enumerate(zip(expected, actual, strict=False)) if x != y),
        min(len(expected), len(actual)),
    )
    lines.append(f"  first difference at byte {first}")
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        if name.endswith(".json"):
            return lines + _json_difference(json.loads(expected), json.loads(actual))
        if name.endswith(".safetensors"):
            (h1, start1), (h2, start2) = _safetensors_header(expected), _safetensors_header(actual)
            if h1 != h2 or start1 != start2:
                lines.append("  the header differs:")
                lines += _json_difference(h1, h2)
            if expected[start1:] != actual[start2:]:
                lines.append("  the tensor data differs")
    return lines


def assert_same_files(expected: Path, actual: Path) -> None:
    """Every file of ``actual`` is byte for byte that of ``expected``, and no file is missing or
    added (temporary files left behind included)."""
    want, got = sorted(os.listdir(expected)), sorted(os.listdir(actual))
    problems = []
    if want != got:
        problems.append(f"files: expected {want}, written {got}")
    for name in sorted(set(want) & set(got)):
        a, b = (expected / name).read_bytes(), (actual / name).read_bytes()
        if a != b:
            problems += _describe(name, a, b)
    assert not problems, f"{actual} differs from {expected}:\n" + "\n".join(problems)


# The tests -------------------------------------------------------------------------------------


def test_single_file_bytes_are_unchanged(tmp_path: Path) -> None:
    assert_same_files(GOLDEN / "single", write_case("single", tmp_path))


def test_model_directory_with_its_program_member_bytes_are_unchanged(tmp_path: Path) -> None:
    made_with = _read_generated_with()["torch"]
    if _release(torch.__version__) != _release(made_with):
        pytest.skip(
            f"program.pt2 is torch.export's archive, pinned for torch {made_with}; this is torch {torch.__version__}"
        )
    assert_same_files(GOLDEN / "model", write_case("model", tmp_path))


@pytest.mark.slow
def test_two_rank_distributed_save_bytes_are_unchanged(tmp_path: Path) -> None:
    saved = write_case("distributed", tmp_path)
    assert_same_files(GOLDEN / "distributed", saved)


def test_the_golden_files_hold_the_pinned_values() -> None:
    """The expected files record the pinned values, not the generating machine's, and
    ``pinned()`` puts back what it replaced."""
    manifest = json.loads((GOLDEN / "model" / "manifest.json").read_text())
    assert manifest["created"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", CREATED)
    assert manifest["torch_version"] == TORCH_VERSION
    assert manifest["torchkeep_version"] == TORCHKEEP_VERSION
    assert manifest["save_id"] == SAVE_ID.hex
    before = (time.gmtime, uuid.uuid4, torch.__version__)
    with pinned():
        pass
    assert (time.gmtime, uuid.uuid4, torch.__version__) == before
