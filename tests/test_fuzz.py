"""Property tests: random and mutated files through every reader end only in a TorchkeepError
(or a load) and run nothing; generated states of every dtype, shape and nesting round-trip.

The number of examples is bounded for the suite; ``HYPOTHESIS_PROFILE=fuzz`` runs many more
(see RELIABILITY.md)."""

from __future__ import annotations

import io
import math
import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import torchkeep as tk
from conftest import SimpleNet
from hostile import Evil
from torchkeep.format import DTYPE_NAMES, DTYPES

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CANARY = Path(tempfile.gettempdir()) / f"torchkeep-fuzz-canary-{os.getpid()}"


def _readers(path: Path) -> dict[str, Callable[[], object]]:
    return {
        "load": lambda: tk.load(path),
        "load_state_dict": lambda: tk.load_state_dict(path),
        "describe": lambda: tk.describe(path),
        "verify": lambda: tk.verify(path),
        "scan": lambda: tk.scan(path),
    }


def _only_torchkeep_errors(path: Path) -> None:
    for name, read in _readers(path).items():
        try:
            read()
        except tk.TorchkeepError:
            pass
        except Exception as e:  # anything else is a bug: report which reader and what
            raise AssertionError(f"{name} raised {type(e).__name__}: {e}") from e
    assert not CANARY.exists(), "a file ran code"


# ---------------------------------------------------------------------------------------------
# seeds: valid files of every kind a reader meets, and pickles that would run code


def _seeds() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        state = {"model": SimpleNet().state_dict(), "step": 3, "ids": torch.arange(5, dtype=torch.int16)}
        tk.save(state, root / "state.safetensors")
        tk.save_weights(SimpleNet(), root / "weights.safetensors")
        torch.save(state, root / "zip.pt")
        torch.save(state, root / "legacy.pt", _use_new_zipfile_serialization=False)
        seeds = {p.name: p.read_bytes() for p in root.iterdir()}
    seeds["evil-protocol-2"] = pickle.dumps(Evil(str(CANARY)), protocol=2)
    seeds["evil-protocol-0"] = pickle.dumps(Evil(str(CANARY)), protocol=0)
    buffer = io.BytesIO()
    torch.save({"w": torch.ones(2), "evil": Evil(str(CANARY))}, buffer)
    seeds["evil-zip"] = buffer.getvalue()
    return seeds


SEEDS = _seeds()

_mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(0)),
    st.tuples(st.just("number"), st.floats(0, 1, exclude_max=True), st.sampled_from([0, 1, 255, 2**31 - 1, 2**32, 2**63 - 1, 2**64 - 1])),
)


def _mutate(data: bytes, mutations: list[tuple]) -> bytes:
    out = bytearray(data)
    for kind, where, arg in mutations:
        at = int(where * len(out)) if out else 0
        if kind == "flip" and out:
            out[min(at, len(out) - 1)] ^= arg
        elif kind == "insert":
            out[at:at] = arg
        elif kind == "delete":
            del out[at : at + arg]
        elif kind == "truncate":
            del out[at:]
        elif kind == "number" and len(out) >= 8:
            at = min(at, len(out) - 8)
            out[at : at + 8] = arg.to_bytes(8, "little")
    return bytes(out)


_fuzz = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_fuzz
@given(data=st.binary(max_size=4096), suffix=st.sampled_from([".safetensors", ".pt", ".bin"]))
def test_random_bytes_end_in_torchkeep_errors(data, suffix):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"random{suffix}"
        path.write_bytes(data)
        _only_torchkeep_errors(path)


@_fuzz
@given(seed=st.sampled_from(sorted(SEEDS)), mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_files_end_in_torchkeep_errors_and_run_nothing(seed, mutations):
    data = _mutate(SEEDS[seed], mutations)
    assume(data != SEEDS[seed])
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / ("file.safetensors" if seed.endswith(".safetensors") else "file.pt")
        path.write_bytes(data)
        _only_torchkeep_errors(path)
        if seed.startswith("state") or seed.startswith("weights"):
            # torchkeep's own files carry checksums: any change is an error, never a load.
            with pytest.raises(tk.TorchkeepError):
                tk.load(path)


@_fuzz
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_directory_manifests_end_in_torchkeep_errors(mutations):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "ckpt"
        tk.save({"w": torch.arange(6.0), "step": 1}, path)
        manifest = path / "manifest.json"
        original = manifest.read_bytes()
        damaged = _mutate(original, mutations)
        assume(damaged != original)
        manifest.write_bytes(damaged)
        _only_torchkeep_errors(path)
        with pytest.raises(tk.TorchkeepError):
            tk.load(path)


# ---------------------------------------------------------------------------------------------
# round-trips of generated states


_DTYPES = sorted(DTYPE_NAMES, key=str)


@st.composite
def _tensors(draw) -> torch.Tensor:
    dtype = draw(st.sampled_from(_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=4)))
    if dtype == DTYPES.get("F4") and not shape:
        shape = (1,)  # safetensors' F4 counts values along a last dimension: none in 0-d
    n = math.prod(shape)
    if dtype is torch.bool:
        values = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        t = torch.tensor(values, dtype=torch.bool).reshape(shape)
    else:
        raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
        # Any bit pattern: NaNs with payloads, infinities, subnormals, negative zeros.
        t = torch.frombuffer(bytearray(raw) or bytearray(1), dtype=torch.uint8)[: len(raw)]
        t = t.view(dtype).reshape(shape)
    if draw(st.booleans()) and t.dim() >= 2:
        t = t.transpose(0, 1)  # a non-contiguous view
    return t


_keys = st.one_of(st.text(min_size=1, max_size=8), st.integers(-5, 50))
_leaves = st.one_of(
    _tensors(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
    st.text(max_size=12),
    st.binary(max_size=12),
)
_states = st.recursive(
    _leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(_keys, children, max_size=4),
    ),
    max_leaves=12,
)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def _same(a: object, b: object) -> bool:
    """Equal in type, structure and every bit (NaN payloads and negative zeros included)."""
    if isinstance(a, torch.Tensor):
        return (
            isinstance(b, torch.Tensor)
            and (a.dtype, a.shape) == (b.dtype, b.shape)
            and torch.equal(_bits(a), _bits(b))
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return isinstance(b, float) and (a == b and math.copysign(1, a) == math.copysign(1, b))
    return type(a) is type(b) and a == b


@_fuzz
@given(state=st.dictionaries(st.text(min_size=1, max_size=8), _states, min_size=1, max_size=4), single=st.booleans())
def test_generated_states_round_trip_exactly(state, single):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / ("state.safetensors" if single else "state")
        tk.save(state, path)
        loaded = tk.load(path)
        assert _same(state, loaded), (state, loaded)
        assert tk.verify(path).ok


def test_every_supported_dtype_is_generated():
    assert len(_DTYPES) == 20  # every dtype that safetensors writes from this torch
