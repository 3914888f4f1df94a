"""The results of a run, the machine it ran on, and the Markdown table made from them."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import safetensors
import torch

import torchkeep as tk
from torchkeep.bench.cases import (
    FIRST_TOUCH,
    LOAD,
    LOAD_INTO,
    LOAD_MEMORY,
    RAW_CHUNK,
    RAW_THREADS,
    SAFETENSORS,
    SAVE,
    SAVE_MEMORY,
    TORCH,
    TORCHKEEP,
    MemoryResult,
)
from torchkeep.bench.engine import (
    CHECKSUM_COST,
    CHECKSUMS_OFF,
    LAZY_OPEN,
    MEMCPY,
    SMALL_LOAD,
    SMALL_SAVE,
    WARM_LOAD_INTO,
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
        library: a library, or a physical reference run in the same rounds (``RAW``, the
            raw device; ``FIRST_TOUCH``, fresh memory).
        ratio: this library's median over torchkeep's in the same case (above 1: torchkeep is
            faster); ``None`` for the physical references.
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
    small_tensors: int = 0  # how many the small-tensor cases held (0: not run)
    raw_direct: bool = True  # whether the raw references used O_DIRECT (False: refused)

    def case(self, group: str, library: str) -> CaseResult:
        for c in (*self.cases, *self.raw):
            if c.group == group and c.library == library:
                return c
        raise KeyError((group, library))

    def memory_of(self, mode: str, library: str) -> MemoryResult:
        for r in self.memory:
            if r.mode == mode and r.library == library:
                return r
        raise KeyError((mode, library))

    def bound(self, group: str) -> float:
        """The physical bound of ``group`` in seconds, measured in the same rounds: the median
        of the slowest of its references (the raw device; for loads into new tensors, also the
        first touch of as much fresh memory)."""
        medians = [c.median for c in self.raw if c.group == group]
        if not medians:
            raise KeyError((group, "no physical reference"))
        return max(medians)

    def raw_fraction(self, group: str) -> float:
        """torchkeep's throughput in ``group`` as a fraction of its physical bound's."""
        return self.bound(group) / self.case(group, TORCHKEEP).median


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


def case_table(cases: Iterable[CaseResult]) -> list[str]:
    """The Markdown table of cases: times, throughput and ratio, one row each."""
    lines = [
        "| case | library | median s | min s | GB/s | ratio (torchkeep faster by ×) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in cases:
        ratio = f"{c.ratio:.2f}×" if c.ratio is not None else "–"
        lines.append(
            f"| {c.group} | {c.library} | {c.median:.3f} | {c.minimum:.3f} | "
            f"{c.gbps:.2f} | {ratio} |"
        )
    return lines


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
        *_small_line(result),
        "- durable save: torchkeep's fsync + atomic rename; torch.save and save_file + fsync of "
        "the file; a fresh file each run. Cold loads: the file is dropped from the page cache "
        "(fsync + POSIX_FADV_DONTNEED) before each run; the plain load then reads every byte.",
    ]
    if result.repeats < MIN_PUBLISHED_REPEATS:
        lines.append(
            f"- **{result.repeats} repeats: a smoke run, not for publication "
            f"(publish with {MIN_PUBLISHED_REPEATS} or more)**"
        )
    lines += ["", *case_table(result.cases)]
    how = "with O_DIRECT" if result.raw_direct else "through the page cache (O_DIRECT refused)"
    lines += [
        "",
        "Physical references, measured in the same interleaved rounds as each case (the "
        f"throughput of a shared or virtual disk drifts). Raw device, {how}: for saves, "
        f"{RAW_CHUNK // MIB} MiB requests of one page-aligned, faulted-in buffer, {RAW_THREADS} "
        "in flight, to a fresh file in the same directory, then fsync; for loads, the same "
        "requests reading torchkeep's file (the same bytes, from the same place on the disk) "
        "after POSIX_FADV_DONTNEED. First touch: allocating as much fresh memory and writing "
        "one byte of each page, on as many threads as torchkeep reads with. torchkeep at = the "
        "bound's median / torchkeep's median, where the bound is the slowest reference of the "
        "case.",
        "",
        "| reference | during | median s | min s | GB/s | torchkeep at |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for c in result.raw:
        if c.library == FIRST_TOUCH:
            kind = "first touch of fresh memory"
        else:
            kind = "raw durable write" if c.group == SAVE else "raw cold read"
        lines.append(
            f"| {kind} | {c.group} | {c.median:.3f} | {c.minimum:.3f} | {c.gbps:.2f} | "
            f"{result.raw_fraction(c.group):.0%} |"
        )
    if result.memory:
        lines += [
            "",
            "Peak extra host memory during one save (growth of the peak RSS, VmHWM, in a fresh "
            "process, reset after building the state dict):",
            "",
            "| during | library | MiB | × state size |",
            "|---|---|---:|---:|",
        ]
        for r in result.memory:
            lines.append(
                f"| {r.mode} | {r.library} | {r.mib:.1f} | "
                f"{r.peak_extra_bytes / result.size_bytes:.2f} |"
            )
    rows = targets(result)
    if rows:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {t} | {m} | {'yes' if ok else 'no'} |" for t, m, ok in rows]
    lines.append("")
    return "\n".join(lines)


def _small_line(result: BenchResult) -> list[str]:
    sizes = [c.nbytes for c in result.cases if c.group == SMALL_SAVE]
    if not sizes:
        return []
    return [
        f"- small tensors: {result.small_tensors:,} float32 tensors of 4–64 KiB "
        f"({sizes[0] / MIB:.0f} MiB in all)"
    ]


def _at_least(value: float | None, limit: float) -> tuple[str, bool]:
    if value is None:
        raise KeyError("no ratio")
    return f"{value:.2f}×", value >= limit


def targets(result: BenchResult) -> list[tuple[str, str, bool]]:
    """The engine's speed and memory targets, each with its measured value and whether it was
    met; a target whose cases were not run is left out."""

    def ratio(group: str, library: str) -> float | None:
        return result.case(group, library).ratio

    def checksum_cost() -> tuple[str, bool]:
        # Medians and best runs both: one slow flush of the disk can move a median of five
        # by more than the checksums cost.
        on, off = result.case(CHECKSUM_COST, TORCHKEEP), result.case(CHECKSUM_COST, CHECKSUMS_OFF)
        by_median = on.median / off.median - 1
        by_best = on.minimum / off.minimum - 1
        measured = f"{by_median:+.1%} (medians), {by_best:+.1%} (best runs)"
        return measured, by_median <= 0.15 and by_best <= 0.15

    lazy_limit = 0.005 + 1e-6 * result.tensors

    def lazy_open() -> tuple[str, bool]:
        seconds = result.case(LAZY_OPEN, TORCHKEEP).median
        return f"{seconds * 1e3:.2f} ms", seconds <= lazy_limit

    def save_memory() -> tuple[str, bool]:
        extra = result.memory_of(SAVE_MEMORY, TORCHKEEP).peak_extra_bytes
        return f"{extra / MIB:.1f} MiB", extra <= 256 * MIB

    def load_memory() -> tuple[str, bool]:
        over = result.memory_of(LOAD_MEMORY, TORCHKEEP).peak_extra_bytes - result.size_bytes
        return f"size {over / MIB:+.1f} MiB", over <= 64 * MIB

    def bound(group: str, limit: float) -> tuple[str, bool]:
        return _at_least(result.raw_fraction(group), limit)

    raw = "raw O_DIRECT" if result.raw_direct else "raw buffered (O_DIRECT refused)"
    checks: list[tuple[str, Callable[[], tuple[str, bool]]]] = [
        (f"durable save ≥ 0.9× the {raw} durable write", lambda: bound(SAVE, 0.9)),
        ("durable save ≥ 3× torch.save + fsync", lambda: _at_least(ratio(SAVE, TORCH), 3)),
        (
            "durable save ≥ 1.5× safetensors save_file + fsync",
            lambda: _at_least(ratio(SAVE, SAFETENSORS), 1.5),
        ),
        ("checksums on ≤ 15% slower than off", checksum_cost),
        (
            f"cold load into model ≥ 0.9× the {raw} read",
            lambda: bound(LOAD_INTO, 0.9),
        ),
        (
            "cold load into model ≥ 1.5× torch.load + load_state_dict",
            lambda: _at_least(ratio(LOAD_INTO, TORCH), 1.5),
        ),
        (
            f"cold load into new tensors ≥ 0.85× max({raw} read, first touch)",
            lambda: bound(LOAD, 0.85),
        ),
        (
            "cold load into new tensors ≥ 1.2× safetensors load_file",
            lambda: _at_least(ratio(LOAD, SAFETENSORS), 1.2),
        ),
        ("cold load ≥ 1.7× torch.load", lambda: _at_least(ratio(LOAD, TORCH), 1.7)),
        (
            "warm load into existing tensors ≥ 0.5× one-thread memcpy",
            lambda: _at_least(ratio(WARM_LOAD_INTO, MEMCPY), 0.5),
        ),
        (f"lazy open ≤ 5 ms + 1 µs per tensor ({lazy_limit * 1e3:.2f} ms here)", lazy_open),
        ("small tensors: save ≥ 2× torch.save", lambda: _at_least(ratio(SMALL_SAVE, TORCH), 2)),
        ("small tensors: load ≥ 2× torch.load", lambda: _at_least(ratio(SMALL_LOAD, TORCH), 2)),
        ("extra host memory during a save ≤ 256 MiB", save_memory),
        ("peak during a load ≤ size + 64 MiB", load_memory),
    ]
    rows = []
    for target, check in checks:
        try:
            measured, met = check()
        except KeyError:
            continue
        rows.append((target, measured, met))
    return rows
