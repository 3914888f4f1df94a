"""The results of a run, the machine it ran on, and the Markdown table made from them."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from dataclasses import dataclass

import safetensors
import torch

import torchkeep as tk
from torchkeep.bench.cases import (
    RAW,
    RAW_CHUNK,
    RAW_READ_THREADS,
    RAW_WRITE_THREADS,
    SAVE,
    TORCHKEEP,
    MemoryResult,
)
from torchkeep.bench.workload import MIB

GB = 1e9
MIN_PUBLISHED_REPEATS = 5


@dataclass(frozen=True)
class MachineInfo:
    cpu: str
    cores: int
    usable_cores: int
    memory_bytes: int
    kernel: str
    filesystem: str
    python: str
    torch: str
    safetensors: str
    torchkeep: str


@dataclass(frozen=True)
class CaseResult:
    """The times of one library in one case.

    Attributes:
        group: the case (``SAVE``, ``LOAD``, ``LOAD_INTO``).
        library: a library, or ``RAW`` for the raw-disk reference run in the same rounds.
        ratio: this library's median over torchkeep's in the same case (above 1: torchkeep is
            faster); ``None`` for the raw-disk reference.
    """

    group: str
    library: str
    times: tuple[float, ...]
    nbytes: int
    ratio: float | None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def minimum(self) -> float:
        return min(self.times)

    @property
    def gbps(self) -> float:
        return self.nbytes / self.median / GB


@dataclass(frozen=True)
class BenchResult:
    machine: MachineInfo
    command: str
    directory: str
    requested_bytes: int
    size_bytes: int
    tensors: int
    repeats: int
    cases: tuple[CaseResult, ...]
    raw: tuple[CaseResult, ...]
    memory: tuple[MemoryResult, ...]
    seconds: float

    def case(self, group: str, library: str) -> CaseResult:
        for c in (*self.cases, *self.raw):
            if c.group == group and c.library == library:
                return c
        raise KeyError((group, library))

    def raw_fraction(self, group: str) -> float:
        """torchkeep's throughput in ``group`` as a fraction of the raw disk's, measured in the
        same rounds (a durable write for saves, a cold read for loads)."""
        return self.case(group, TORCHKEEP).gbps / self.case(group, RAW).gbps


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _filesystem(directory: str) -> str:
    try:
        out = subprocess.run(
            ["df", "-PT", directory], capture_output=True, text=True, check=True, timeout=10
        ).stdout.splitlines()
        source, fstype = out[1].split()[:2]
        return f"{fstype} on {source}"
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        pass
    best, found = "", "unknown"
    real = os.path.realpath(directory)
    for line in _read_text("/proc/mounts").splitlines():
        fields = line.split()
        if len(fields) < 3 or len(fields[1]) < len(best):
            continue
        if real == fields[1] or real.startswith(fields[1].rstrip("/") + "/"):
            best, found = fields[1], f"{fields[2]} on {fields[0]}"
    return found


def machine_info(directory: str) -> MachineInfo:
    cpu = "unknown"
    for line in _read_text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    if cpu == "unknown":
        cpu = platform.processor() or platform.machine()
    memory = 0
    for line in _read_text("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            memory = int(line.split()[1]) * 1024
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 0
    return MachineInfo(
        cpu=cpu,
        cores=os.cpu_count() or 0,
        usable_cores=usable or (os.cpu_count() or 0),
        memory_bytes=memory,
        kernel=f"{platform.system()} {platform.release()}",
        filesystem=_filesystem(directory),
        python=platform.python_version(),
        torch=torch.__version__,
        safetensors=str(getattr(safetensors, "__version__", "unknown")),
        torchkeep=tk.__version__,
    )


def format_markdown(result: BenchResult) -> str:
    """Return the results as Markdown: a header describing the run, then the tables."""
    m = result.machine
    lines = [
        "## torchkeep core benchmark",
        "",
        f"- command: `{result.command}`",
        f"- machine: {m.cpu}; {m.cores} cores ({m.usable_cores} usable); "
        f"{m.memory_bytes / (1 << 30):.1f} GiB RAM; {m.kernel}",
        f"- file system: {m.filesystem} (files in a temporary directory under "
        f"`{result.directory}`)",
        f"- versions: Python {m.python}, torch {m.torch}, safetensors {m.safetensors}, "
        f"torchkeep {m.torchkeep}",
        f"- state dict: {result.size_bytes / MIB:.1f} MiB in {result.tensors} tensors "
        f"(transformer-like: fp32, bf16 attention, int64 step buffers)",
        f"- {result.repeats} counted runs per case after one warm-up run, interleaved across "
        "libraries; median and min in seconds; GB/s = 10⁹ bytes of tensor data / median",
        "- ratio = the library's median / torchkeep's median (above 1: torchkeep is faster)",
        "- durable save: torchkeep's fsync + atomic rename; torch.save and save_file + fsync of "
        "the file; a fresh file each run. Cold loads: the file is dropped from the page cache "
        "(fsync + POSIX_FADV_DONTNEED) before each run; the plain load then reads every byte.",
    ]
    if result.repeats < MIN_PUBLISHED_REPEATS:
        lines.append(
            f"- **{result.repeats} repeats: a smoke run, not for publication "
            f"(publish with {MIN_PUBLISHED_REPEATS} or more)**"
        )
    lines += [
        "",
        "| case | library | median s | min s | GB/s | ratio (torchkeep faster by ×) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in result.cases:
        ratio = f"{c.ratio:.2f}×" if c.ratio is not None else "–"
        lines.append(
            f"| {c.group} | {c.library} | {c.median:.3f} | {c.minimum:.3f} | "
            f"{c.gbps:.2f} | {ratio} |"
        )
    lines += [
        "",
        "Raw disk, measured on the same directory in the same interleaved rounds as each case "
        "(the throughput of a shared or virtual disk drifts): for saves, a durable write = "
        f"{RAW_WRITE_THREADS} threads pwrite {RAW_CHUNK // MIB} MiB chunks of one faulted-in "
        "buffer to a fresh file, then fsync; for loads, a cold read = "
        f"{RAW_READ_THREADS} threads preadv {RAW_CHUNK // MIB} MiB chunks into a faulted-in "
        "buffer after POSIX_FADV_DONTNEED.",
        "",
        "| raw disk, during | median s | min s | GB/s | torchkeep at |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in result.raw:
        kind = "durable write" if c.group == SAVE else "cold read"
        lines.append(
            f"| {kind}, during {c.group} | {c.median:.3f} | {c.minimum:.3f} | {c.gbps:.2f} | "
            f"{result.raw_fraction(c.group):.0%} |"
        )
    if result.memory:
        lines += [
            "",
            "Peak extra host memory during one save (growth of the peak RSS, VmHWM, in a fresh "
            "process, reset after building the state dict):",
            "",
            "| library | MiB | × state size |",
            "|---|---:|---:|",
        ]
        for r in result.memory:
            lines.append(
                f"| {r.library} | {r.mib:.1f} | {r.peak_extra_bytes / result.size_bytes:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)
