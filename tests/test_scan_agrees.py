"""``scan`` and ``load`` agree on every torch.save file: what ``load`` reads, ``scan`` calls safe;
what ``scan`` finds code to run in, ``load`` refuses as unsafe, naming the same code."""

from __future__ import annotations

import argparse
import collections
import io
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import torchkeep as tk
from hostile import pickle_files


def _objects() -> dict[str, Any]:
    """What users' torch.save files hold: the object kinds torch's own serialization saves."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    optimizer.step()
    plain = torch.arange(6.0)
    dtypes = [torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32,
              torch.int64, torch.uint8, torch.bool, torch.complex64, torch.complex128,
              torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32]  # fmt: skip
    return {
        "state-dict": model.state_dict(),
        "checkpoint": {
            "epoch": 3,
            "model_state_dict": model.state_dict(),
            "optimizer_state_dict": optimizer.state_dict(),
            "loss": 0.25,
            "rng": torch.get_rng_state(),
        },
        "dtypes": {str(d): torch.ones(3).to(d) for d in dtypes},
        "parameter": nn.Parameter(torch.ones(2)),
        "requires-grad": torch.ones(2, requires_grad=True),
        "storage": plain.untyped_storage(),
        "shared-views": [plain, plain[2:], plain.view(2, 3).t()],
        "containers": {
            "set": {1, 2},
            "frozenset": frozenset({3}),
            "tuple": (1, 2.5, "x", b"b", None, True),
            "slice": slice(1, 5, 2),
            "complex": 1 + 2j,
            "ordered": collections.OrderedDict(a=1),
            "counter": collections.Counter("aab"),
            "namespace": argparse.Namespace(lr=0.1, hidden=8),
            "dtype": torch.float16,
            "device": torch.device("cpu"),
            "size": torch.Size([2, 3]),
        },
        "meta": torch.empty(3, 4, device="meta"),
        "conj": torch.tensor([1 + 2j], dtype=torch.complex64).conj(),
        "sparse-coo": torch.eye(3).to_sparse(),
        "sparse-csr": torch.eye(3).to_sparse_csr(),
        "quantized": torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.qint8),
        "nested": torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]),
    }


def _files(root: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for name, obj in _objects().items():
        for zipped in (True, False):
            path = root / f"{name}-{'zip' if zipped else 'legacy'}.pt"
            try:
                torch.save(obj, path, _use_new_zipfile_serialization=zipped)
            except RuntimeError:  # the pre-1.6 format cannot hold every kind
                continue
            files[path.stem] = path
    for name, data in pickle_files(root, str(root / "canary")).items():
        path = root / f"hostile-{name}.pt"
        path.write_bytes(data)
        files[path.stem] = path
    return files


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    return _files(tmp_path_factory.mktemp("corpus"))


def test_the_corpus_holds_what_torch_writes_and_what_scanners_test(files):
    assert len(files) >= 50
    assert {"checkpoint-zip", "checkpoint-legacy", "hostile-getattr-chain"} <= set(files)


def test_scan_agrees_with_load_on_every_file(files):
    disagreements = []
    for name, path in files.items():
        report = tk.scan(path)
        try:
            tk.load(path)
            loaded: BaseException | None = None
        except tk.TorchkeepError as e:
            loaded = e
        if loaded is None:
            if not report.safe or report.unsafe:
                disagreements.append(f"{name}: loads, but scan says {report.verdict}")
        elif isinstance(loaded, tk.UnsafeFileError):
            named = [g for g in report.unsafe if g in str(loaded)]
            if report.safe or (report.unsafe and not named):
                disagreements.append(f"{name}: unsafe to load ({loaded}), scan: {report.verdict}")
        elif report.unsafe:
            disagreements.append(f"{name}: scan finds {report.unsafe}, load says {loaded!r}")
        elif report.safe and not isinstance(loaded, tk.UnsupportedFormatError):
            disagreements.append(f"{name}: scan calls it safe, load says {loaded!r}")
    assert not disagreements, "\n".join(disagreements)
    assert not (next(iter(files.values())).parent / "canary").exists()


def test_what_loads_is_what_torch_reads(files):
    for name, path in files.items():
        if name.startswith("hostile-"):
            continue
        try:
            ours = tk.load(path)
        except tk.UnsupportedFormatError:
            continue  # not read yet; the test above checks it is not called unsafe
        try:
            theirs = torch.load(path, weights_only=True)
        except Exception:  # torch cannot read some of its own pre-1.6 files (a bare storage)
            continue
        assert type(ours) is type(theirs), name
        buffer = io.BytesIO()
        torch.save(ours, buffer)  # what was read is plain data torch can save again
