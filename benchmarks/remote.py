"""Object storage: torchkeep against s3fs on moto's S3 server on loopback.

    python benchmarks/remote.py                       # 256 MiB, 5 repeats
    python benchmarks/remote.py --size-mib 32 --repeats 1

A transformer-like state dict (as in benchmarks/core.py) is saved with tk.save_weights to an
s3:// URL and loaded back with tk.load_state_dict, interleaved with s3fs moving the same number
of bytes as one object: ``put`` of a local file holding them (read from the page cache),
``pipe`` of them from memory, and ``cat`` of the object back into memory. The S3 server is
moto's, in its own process on 127.0.0.1, started by this script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import fsspec

import torchkeep as tk
from output import progress_to_stderr, publish, script_header
from torchkeep.bench.report import machine_info
from torchkeep.bench.runner import run_interleaved
from torchkeep.bench.workload import MIB, make_state_dict, state_bytes
from torchkeep.testing import MotoServer, options

TORCHKEEP = "torchkeep"
PUT = "s3fs put"
PIPE = "s3fs pipe"
CAT = "s3fs cat"


def _timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="counted runs per case (default 5)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)

    server = MotoServer()
    work = tempfile.mkdtemp(prefix="torchkeep-remote-")
    try:
        bucket = server.new_bucket()
        opts = options(server.endpoint)
        fs = fsspec.filesystem("s3", **opts)
        state = make_state_dict(args.size_mib * MIB)
        nbytes = state_bytes(state)
        data = os.urandom(nbytes)
        local = os.path.join(work, "data.bin")
        with open(local, "wb") as f:
            f.write(data)
        tk_url, raw_url = f"s3://{bucket}/tk.safetensors", f"s3://{bucket}/raw.bin"
        save = run_interleaved(
            "save",
            {
                TORCHKEEP: partial(_timed, tk.save_weights, state, tk_url, storage_options=opts),
                PUT: partial(_timed, fs.put_file, local, raw_url),
                PIPE: partial(_timed, fs.pipe_file, raw_url, data),
            },
            repeats=args.repeats,
            nbytes=nbytes,
            progress=progress_to_stderr,
        )
        load = run_interleaved(
            "load",
            {
                TORCHKEEP: partial(_timed, tk.load_state_dict, tk_url, storage_options=opts),
                CAT: partial(_timed, fs.cat_file, raw_url),
            },
            repeats=args.repeats,
            nbytes=nbytes,
            progress=progress_to_stderr,
        )
        loaded = tk.load_state_dict(tk_url, storage_options=opts)
        assert all(loaded[n].equal(t) for n, t in state.items()), "the loaded state differs"
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    m = machine_info(os.getcwd())
    lines = [
        *script_header(
            "torchkeep on object storage (S3 API on loopback)",
            "benchmarks/remote.py",
            argv,
            m,
            disk=False,
        ),
        f"- server: moto {_version('moto')} (S3 API, its own process on 127.0.0.1); "
        f"s3fs {_version('s3fs')}, fsspec {fsspec.__version__}",
        f"- {nbytes / MIB:.0f} MiB state dict; {args.repeats} counted runs per case after a "
        "warm-up, interleaved; ratio = the other's median time / torchkeep's (above 1: "
        "torchkeep is faster)",
        "",
        "| case | library | median s | best s | GB/s (median) | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for group, results in (("save", save), ("load", load)):
        for r in results:
            ratio = "" if r.library == TORCHKEEP or r.ratio is None else f"{r.ratio:.2f}"
            lines.append(
                f"| {group} | {r.library} | {r.median:.3f} | {r.minimum:.3f} | {r.gbps:.2f} | "
                f"{ratio} |"
            )
    publish("\n".join([*lines, ""]), args.out)
    return 0


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


if __name__ == "__main__":
    sys.exit(main())
