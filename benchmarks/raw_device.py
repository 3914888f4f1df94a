"""The raw device, measured two ways: fio against the benchmark's own O_DIRECT reference.

    python benchmarks/raw_device.py --dir .bench                 # 1 GiB, 5 rounds
    python benchmarks/raw_device.py --size-mib 64 --repeats 1

Each round runs, in turn: fio writing a fresh file (O_DIRECT, 16 MiB requests, four psync jobs
striding over the file as the reference's four threads do, then fsync), the reference's durable
write (``torchkeep.bench.cases.time_raw_write``), fio reading its file back and the reference
reading its own (both dropped from the page cache first). The table gives the medians in GB/s.
fio is a Debian package (``apt-get install fio``); without it the script says so and stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from output import progress_to_stderr, publish, script_header
from torchkeep.bench.cases import (
    RAW_CHUNK,
    RAW_THREADS,
    aligned_buffer,
    time_raw_read,
    time_raw_write,
)
from torchkeep.bench.report import machine_info
from torchkeep.bench.workload import MIB, drop_cache


def fio(kind: str, path: str, nbytes: int) -> float:
    """GB/s of one fio run moving ``nbytes`` (a multiple of 4 chunks) as the reference does."""
    if kind == "read":
        drop_cache(path)
    stride = RAW_CHUNK * (RAW_THREADS - 1)
    command = [
        "fio", "--name=raw", f"--filename={path}", f"--rw={kind}:{stride}",
        f"--bs={RAW_CHUNK}", f"--size={nbytes - stride}", f"--io_size={nbytes // RAW_THREADS}",
        f"--numjobs={RAW_THREADS}", f"--offset_increment={RAW_CHUNK}", "--direct=1",
        "--ioengine=psync", "--group_reporting", "--output-format=json",
    ]  # fmt: skip
    if kind == "write":
        command += ["--end_fsync=1", "--fallocate=none"]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0][kind]
    if job["io_bytes"] != nbytes:
        raise RuntimeError(f"fio moved {job['io_bytes']} bytes, not {nbytes}")
    return float(job["bw_bytes"]) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="bytes moved (default 1024)")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    unit = RAW_CHUNK * RAW_THREADS // MIB
    if args.size_mib < unit or args.size_mib % unit or args.repeats < 1:
        parser.error(f"--size-mib must be a multiple of {unit}; --repeats at least 1")
    if shutil.which("fio") is None:
        print("fio is not installed (Debian: apt-get install fio)", file=sys.stderr)
        return 2
    nbytes = args.size_mib << 20
    work = tempfile.mkdtemp(prefix="torchkeep-raw-", dir=args.dir or os.getcwd())
    machine = machine_info(work)
    buffer = aligned_buffer(nbytes)
    names = ("fio write", "reference write", "fio read", "reference read")
    speeds: dict[str, list[float]] = {name: [] for name in names}
    try:
        fio_file, own_file = os.path.join(work, "fio.bin"), os.path.join(work, "own.bin")
        for r in range(args.repeats):
            for path in (fio_file, own_file):
                Path(path).unlink(missing_ok=True)
            speeds["fio write"].append(fio("write", fio_file, nbytes))
            speeds["reference write"].append(nbytes / time_raw_write(buffer, own_file) / 1e9)
            speeds["fio read"].append(fio("read", fio_file, nbytes))
            speeds["reference read"].append(nbytes / time_raw_read(buffer, own_file) / 1e9)
            progress_to_stderr(
                f"round {r + 1}/{args.repeats}: "
                + ", ".join(f"{n} {speeds[n][-1]:.2f} GB/s" for n in names)
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    lines = [
        *script_header("raw device: fio and the benchmark's reference", "benchmarks/raw_device.py",
                       argv, machine),
        f"- {args.size_mib} MiB per run, {args.repeats} rounds; O_DIRECT, {RAW_CHUNK // MIB} MiB "
        f"requests, {RAW_THREADS} in flight; writes to a fresh file, then fsync",
        "",
        "| measured by | write GB/s (median) | read GB/s (median) | every write | every read |",
        "|---|---:|---:|---|---|",
    ]  # fmt: skip
    for who in ("fio", "reference"):
        write, read = speeds[f"{who} write"], speeds[f"{who} read"]
        lines.append(
            f"| {who} | {statistics.median(write):.2f} | {statistics.median(read):.2f} | "
            f"{', '.join(f'{x:.2f}' for x in write)} | {', '.join(f'{x:.2f}' for x in read)} |"
        )
    publish("\n".join([*lines, ""]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
