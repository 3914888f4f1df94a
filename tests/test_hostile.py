"""Hostile inputs: every case of the corpus (tests/hostile.py) through every reader ends in the
case's TorchkeepError subclass, runs no code and does not grow memory past the file's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import torchkeep as tk
from conftest import SimpleNet
from hostile import Case, corpus

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("hostile")
    built = corpus(root / "files", str(root / "canary"))
    return {case.name: case for case in built}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    tk.save_weights(SimpleNet(), path)
    return path


def _names() -> list[str]:
    # The names, without building the files at collection time.
    return [
        line.split('"')[1]
        for line in (HERE / "hostile_cases.txt").read_text().splitlines()
        if line.startswith('"')
    ]


def test_the_corpus_is_large_and_its_list_current(cases):
    assert len(cases) >= 40
    assert sorted(cases) == sorted(_names()), "update tests/hostile_cases.txt"
    kinds = {name.split(":")[0] for name in cases}
    assert kinds == {"header", "file", "dir", "pickle"}


@pytest.mark.parametrize("name", _names())
def test_every_reader_refuses_it_with_its_error_and_runs_nothing(cases, good, tmp_path, name):
    case = cases[name]
    canary = case.path.parents[1] / "canary"
    readers = {
        "load": lambda: tk.load(case.path),
        "load_state_dict": lambda: tk.load_state_dict(case.path),
        "load_weights": lambda: tk.load_weights(SimpleNet(), case.path),
        "load_checkpoint": lambda: tk.load_checkpoint(case.path, model=SimpleNet()),
        "describe": lambda: tk.describe(case.path),
        "diff": lambda: tk.diff(case.path, good),
        "convert": lambda: tk.convert(case.path, tmp_path / "out.safetensors"),
    }
    if case.in_the_data:
        assert tk.describe(case.path).tensors  # reads no tensor bytes
        del readers["describe"]
    for reader, call in readers.items():
        with pytest.raises(tk.TorchkeepError) as raised:
            call()
        assert type(raised.value) is case.error, (reader, raised.value)
        assert str(case.path) in str(raised.value), (reader, raised.value)
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(tk.TorchkeepError):
        tk.load_model(case.path)
    report = tk.verify(case.path)
    assert not report.ok and str(case.path) in " ".join(report.problems)
    if case.error is tk.UnsafeFileError or any(w in name for w in ("memo", "nul")):
        # Code to run, or a pickle too malformed to say: never called safe by the scan. (The
        # scan is about code: a well-formed pickle with impossible tensors has none.)
        assert not tk.scan(case.path).safe, tk.scan(case.path)
    assert not canary.exists(), f"{name} ran code"


_MEASURE = r"""
import json, re, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, sys.argv[1])
from pathlib import Path
import torchkeep as tk
from hostile import corpus

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) << 10

root = Path(sys.argv[2])
cases = corpus(root / "files", str(root / "canary"))
grown = {}
for case in cases:
    size = sum(p.stat().st_size for p in ([case.path] if case.path.is_file() else case.path.rglob("*")))
    for reader in (tk.load, tk.load_state_dict, tk.describe, tk.verify):
        try:
            reader(case.path)  # once, for the code paths' own first-use allocations
        except tk.TorchkeepError:
            pass
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size starts again from the current one
        before = status("VmRSS")
        try:
            reader(case.path)
        except tk.TorchkeepError:
            pass
        grown[f"{case.name} {reader.__name__}"] = (status("VmHWM") - before, size)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
control = bytearray(32 << 20)  # the measurement sees a known allocation
del control
grown["control"] = (status("VmHWM") - before, 0)
print(json.dumps(grown))
"""


def test_no_hostile_file_grows_memory_past_its_size(tmp_path):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.fail("this test needs Linux's /proc/self/clear_refs to reset the peak RSS")
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(HERE), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    grown = json.loads(done.stdout.splitlines()[-1])
    assert grown.pop("control")[0] >= 30 << 20  # a 32 MiB allocation shows
    slack = 16 << 20
    over = {k: v for k, v in grown.items() if v[0] > v[1] + slack}
    assert not over, over
    assert len(grown) >= 4 * 40
    assert torch.tensor([g for g, _ in grown.values()]).max() < 64 << 20
