"""Coverage-guided fuzzing (atheris) of the parsers that read untrusted bytes: the safetensors
header, the manifest, and the restricted unpickler. Any exception that is not a TorchkeepError,
and any attempt to run code, is a finding.

    ./run.sh fuzz                       # 1,000,000 inputs (see RELIABILITY.md)
    ./run.sh fuzz -atheris_runs=10000   # any libFuzzer flags

Each input's first byte picks the target; the rest is the input.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import atheris
import torch  # not instrumented: the coverage that guides the fuzzer is torchkeep's

with atheris.instrument_imports(include=["torchkeep", "pickletools", "zipfile", "json"]):
    from torchkeep.errors import TorchkeepError
    from torchkeep.format import manifest_from_json, parse_header, read_header_length
    from torchkeep.legacy.unpickler import FileStorage, storage_pid, unpickle

MAX_ELEMENTS = 1 << 16  # a storage larger than this is refused, as a file too short would be


def _header(data: bytes) -> None:
    length = read_header_length(data[:9], file_size=len(data), where="fuzz")
    parse_header(data[8 : 8 + length], file_size=len(data), where="fuzz")


def _manifest(data: bytes) -> None:
    manifest_from_json(data.decode("utf-8", "replace"), where="fuzz")


def _pickle(data: bytes) -> None:
    storages: dict[str, FileStorage] = {}

    def storage(pid: Any) -> FileStorage:
        dtype, key, numel = storage_pid(pid, "fuzz")
        if numel > MAX_ELEMENTS:
            raise TorchkeepError("storage too large for the fuzzer")
        if key not in storages:
            storages[key] = FileStorage(key, torch.zeros(numel, dtype=dtype))
        return storages[key]

    unpickle(data, storage, "fuzz")


TARGETS = (_header, _manifest, _pickle)


_ACTIVE = [False]


def _refuse_code(event: str, args: tuple[Any, ...]) -> None:
    # An audit hook sees every import, exec, subprocess and os.system the process attempts.
    if not _ACTIVE[0]:
        return
    if event in ("exec", "compile", "os.system", "subprocess.Popen", "os.exec", "os.posix_spawn"):
        raise RuntimeError(f"the input ran code: {event} {args!r:.200}")
    if event == "import" and args and args[0] not in sys.modules:
        raise RuntimeError(f"the input imported {args[0]!r}")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    target = TARGETS[data[0] % len(TARGETS)]
    _ACTIVE[0] = True
    try:
        target(data[1:])
    except TorchkeepError:
        pass
    finally:
        _ACTIVE[0] = False


def _write_seeds(directory: str) -> None:
    """Valid inputs of each target, to start from: a save's header, its manifest (of a
    directory save, with a model section), and the pickles of torch.save files."""
    import io
    import json
    import struct
    import tempfile
    import zipfile

    import torchkeep as tk

    state = {"w": torch.arange(6.0).reshape(2, 3), "ids": torch.arange(3), "step": 1, "name": "x"}
    seeds: list[bytes] = []
    with tempfile.TemporaryDirectory() as scratch:
        tk.save(state, f"{scratch}/s.safetensors")
        with open(f"{scratch}/s.safetensors", "rb") as f:
            raw = f.read()
        (length,) = struct.unpack("<Q", raw[:8])
        seeds.append(b"\x00" + raw[: 8 + length])
        tk.save(state, f"{scratch}/d")
        with open(f"{scratch}/d/manifest.json", "rb") as f:
            seeds.append(b"\x01" + f.read())
        header = json.loads(raw[8 : 8 + length])
        seeds.append(b"\x01" + header["__metadata__"]["torchkeep"].encode())
    for obj in (state, {"layer": torch.nn.Linear(2, 2).state_dict()}, [1, 2.0, "a", None]):
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        with zipfile.ZipFile(buffer) as z:
            name = next(n for n in z.namelist() if n.endswith("data.pkl"))
            seeds.append(b"\x02" + z.read(name))
    os.makedirs(directory, exist_ok=True)
    for n, seed in enumerate(seeds):
        with open(os.path.join(directory, f"seed-{n}"), "wb") as f:
            f.write(seed)


def main() -> None:
    import codecs

    torch.zeros(1)  # everything the targets import is imported before the hook,
    for codec in ("ascii", "latin-1", "utf-8", "raw-unicode-escape", "unicode-escape"):
        codecs.lookup(codec)  # the text codecs pickles decode with included
    args = list(sys.argv)
    if not any(a.startswith("-atheris_runs=") for a in args[1:]):
        args.append("-atheris_runs=1000000")
    if not any(a.startswith("-max_len=") for a in args[1:]):
        args.append("-max_len=16384")
    if not any(not a.startswith("-") for a in args[1:]):
        corpus = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".corpus")
        _write_seeds(corpus)
        args.append(corpus)  # libFuzzer adds what it finds to this directory
    sys.addaudithook(_refuse_code)
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
