"""The benchmark harness: torchkeep against ``torch.save``/``torch.load`` and safetensors.

Three cases, each run interleaved with its competitors (one warm-up run each, not counted):

* durable save: ``tk.save_weights`` (fsync + atomic rename) against ``torch.save`` and
  ``safetensors.torch.save_file``, each followed by an fsync of the file;
* cold load: the file dropped from the page cache, loaded, and every byte read once;
* load into an existing model (cold cache too).

A raw-disk reference (parallel ``pwrite`` + fsync for saves, parallel cold ``preadv`` for loads)
is measured on the same directory, in the same interleaved rounds as each case. The peak extra
host memory of each save is measured in a fresh process.

``run_benchmark`` returns a ``BenchResult``; ``format_markdown`` turns it into the published
table. ``benchmarks/core.py`` is the command-line front end.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial

import safetensors
import safetensors.torch
import torch
from torch import nn

import torchkeep as tk
from torchkeep.io.memory import tensor_bytes

GB = 1e9
MIB = 1 << 20
LAYERS = 24
RAW_CHUNK = 16 << 20
RAW_WRITE_THREADS = 4
RAW_READ_THREADS = 8
TORCHKEEP = "torchkeep"
TORCH = "torch"
SAFETENSORS = "safetensors"
SAVE = "durable save"
LOAD = "cold load, all bytes read"
LOAD_INTO = "cold load into model"
RAW = "raw disk"
LIBRARIES = (TORCHKEEP, TORCH, SAFETENSORS)
MIN_PUBLISHED_REPEATS = 5

Progress = Callable[[str], None]

# ---------------------------------------------------------------------------------------------
# the state dict and the model


def _spec(total_bytes: int) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a transformer of about ``total_bytes`` bytes.

    Per layer: q/k/v/o projections with biases in bf16 (8h² + 8h bytes), an MLP of width 4h in
    fp32 (32h² + 20h) and two layer norms in fp32 (16h). The embedding absorbs the remainder.
    """
    h = max(16, int(math.sqrt(max(total_bytes, 1) / (40 * LAYERS + 32))) // 16 * 16)
    f32, bf16, i64 = torch.float32, torch.bfloat16, torch.int64
    layers: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    step_every = max(1, LAYERS // 4)
    for i in range(LAYERS):
        p = f"layers.{i}"
        for proj in ("q", "k", "v", "o"):
            layers.append((f"{p}.attn.{proj}.weight", (h, h), bf16))
            layers.append((f"{p}.attn.{proj}.bias", (h,), bf16))
        layers += [
            (f"{p}.mlp.up.weight", (4 * h, h), f32),
            (f"{p}.mlp.up.bias", (4 * h,), f32),
            (f"{p}.mlp.down.weight", (h, 4 * h), f32),
            (f"{p}.mlp.down.bias", (h,), f32),
        ]
        for norm in ("ln1", "ln2"):
            layers.append((f"{p}.{norm}.weight", (h,), f32))
            layers.append((f"{p}.{norm}.bias", (h,), f32))
        if i % step_every == 0:
            layers.append((f"{p}.step", (), i64))
    tail = [("norm.weight", (h,), f32), ("norm.bias", (h,), f32)]
    used = sum(math.prod(s) * d.itemsize for _, s, d in layers + tail)
    vocab = max(16, (total_bytes - used) // (4 * h))
    return [("embed.weight", (vocab, h), f32), *layers, *tail]


def _fill(t: torch.Tensor, pool: torch.Tensor, offset: int) -> None:
    flat = t.view(-1)
    n, pos = flat.numel(), 0
    while pos < n:
        k = min(n - pos, pool.numel() - offset)
        flat[pos : pos + k].copy_(pool[offset : offset + k])
        pos += k
        offset = 0


def make_state_dict(total_bytes: int, *, seed: int = 0) -> dict[str, torch.Tensor]:
    """Return a transformer-like state dict of about ``total_bytes`` bytes.

    An embedding, ``LAYERS`` layers (attention in bf16, MLP and layer norms in fp32, an int64
    ``step`` buffer every few layers) and a final norm: about 400 tensors. Values are tiled
    from a 16 MiB random pool (distinct offsets per tensor), so building 1 GiB takes well under
    a second.
    """
    generator = torch.Generator().manual_seed(seed)
    pool = torch.empty(4 << 20, dtype=torch.float32).uniform_(-0.1, 0.1, generator=generator)
    state: dict[str, torch.Tensor] = {}
    for index, (name, shape, dtype) in enumerate(_spec(total_bytes)):
        if dtype == torch.int64:
            state[name] = torch.tensor(1000 * (index + 1) + seed, dtype=dtype)
            continue
        t = torch.empty(shape, dtype=dtype)
        _fill(t, pool, (index * 7919 + seed) % pool.numel())
        state[name] = t
    return state


def make_model(state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Return a module whose ``state_dict()`` has exactly the keys, shapes and dtypes given.

    Nested ``nn.Module`` containers follow the dotted names; floating-point entries become
    parameters, the others buffers. Every value is zeroed, so the memory is already faulted
    in, as in a real, initialised model.
    """
    root = nn.Module()
    modules: dict[str, nn.Module] = {"": root}
    for key, value in state_dict.items():
        *path, leaf = key.split(".")
        module, prefix = root, ""
        for part in path:
            prefix = f"{prefix}.{part}" if prefix else part
            if prefix not in modules:
                child = nn.Module()
                module.add_module(part, child)
                modules[prefix] = child
            module = modules[prefix]
        memory = torch.empty(value.shape, dtype=value.dtype).zero_()
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(memory))
        else:
            module.register_buffer(leaf, memory)
    return root


# ---------------------------------------------------------------------------------------------
# file helpers


def _drop_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def drop_cache(path: str | os.PathLike[str]) -> None:
    """Write ``path`` back and drop it from the page cache (every file, for a directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        for root, _, files in os.walk(path):
            for name in files:
                _drop_file(os.path.join(root, name))
    else:
        _drop_file(path)


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Make the data of the file at ``path`` durable."""
    fd = os.open(os.fspath(path), os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def touch(state: Mapping[str, torch.Tensor]) -> int:
    """Read every byte of every tensor once (summed as int64 words); return the sum."""
    total = 0
    for t in state.values():
        flat = t.detach().reshape(-1).view(torch.uint8)
        words = flat.numel() // 8 * 8
        try:
            total += int(flat[:words].view(torch.int64).sum()) + int(flat[words:].sum())
        except RuntimeError:  # not 8-byte aligned: byte by byte (slow, but never met here)
            total += int(flat.sum())
    return total


# ---------------------------------------------------------------------------------------------
# cases: each times one run and returns seconds


def save_with(library: str, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Save durably with ``library``: torchkeep's own commit, or the call plus an fsync."""
    if library == TORCHKEEP:
        tk.save_weights(state, path)
    elif library == TORCH:
        torch.save(dict(state), path)
        fsync_file(path)
    elif library == SAFETENSORS:
        safetensors.torch.save_file(dict(state), path)
        fsync_file(path)
    else:
        raise ValueError(f"unknown library {library!r}")


def time_save(library: str, state: Mapping[str, torch.Tensor], path: str) -> float:
    """Delete ``path``, then time one durable save of ``state`` to it."""
    _remove(path)
    started = time.perf_counter()
    save_with(library, state, path)
    return time.perf_counter() - started


def load_with(library: str, path: str) -> dict[str, torch.Tensor]:
    if library == TORCHKEEP:
        return tk.load_state_dict(path)
    if library == TORCH:
        loaded: dict[str, torch.Tensor] = torch.load(path)
        return loaded
    if library == SAFETENSORS:
        return safetensors.torch.load_file(path)
    raise ValueError(f"unknown library {library!r}")


def time_load(library: str, path: str) -> float:
    """Drop ``path`` from the page cache, then time one load plus a read of every byte."""
    drop_cache(path)
    started = time.perf_counter()
    touch(load_with(library, path))
    return time.perf_counter() - started


def load_into_with(library: str, model: nn.Module, path: str) -> None:
    if library == TORCHKEEP:
        tk.load_weights(model, path)
    elif library == TORCH:
        model.load_state_dict(torch.load(path))
    elif library == SAFETENSORS:
        safetensors.torch.load_model(model, path)
    else:
        raise ValueError(f"unknown library {library!r}")


def time_load_into(library: str, model: nn.Module, path: str) -> float:
    """Drop ``path`` from the page cache, then time one load of it into ``model``."""
    drop_cache(path)
    started = time.perf_counter()
    load_into_with(library, model, path)
    return time.perf_counter() - started


def _chunks(nbytes: int) -> list[tuple[int, int]]:
    return [(o, min(RAW_CHUNK, nbytes - o)) for o in range(0, nbytes, RAW_CHUNK)]


def time_raw_write(buffer: torch.Tensor, path: str, *, threads: int = RAW_WRITE_THREADS) -> float:
    """Time writing ``buffer`` (uint8, faulted in) to a fresh file: parallel pwrite + fsync."""
    _remove(path)
    view = tensor_bytes(buffer)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:

        def write(span: tuple[int, int]) -> None:
            offset, nbytes = span
            done = 0
            while done < nbytes:
                done += os.pwrite(fd, view[offset + done : offset + nbytes], offset + done)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(write, _chunks(len(view))))
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def time_raw_read(buffer: torch.Tensor, path: str, *, threads: int = RAW_READ_THREADS) -> float:
    """Drop ``path`` from the page cache, then time reading it into ``buffer`` with preadv."""
    drop_cache(path)
    view = tensor_bytes(buffer)
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:

        def read(span: tuple[int, int]) -> None:
            offset, nbytes = span
            done = 0
            while done < nbytes:
                n = os.preadv(fd, [view[offset + done : offset + nbytes]], offset + done)
                if n == 0:
                    raise OSError(f"{path}: short read at {offset + done}")
                done += n

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, _chunks(len(view))))
    finally:
        os.close(fd)
    return time.perf_counter() - started


# ---------------------------------------------------------------------------------------------
# peak memory, in a fresh process

_MEMORY_SCRIPT = """
import gc, json, resource, sys
from torchkeep.bench import make_state_dict, save_with


def peak_kib():
    # VmHWM is this process's own high-water mark. ru_maxrss is not enough on its own: after
    # exec it keeps the forked parent's peak, often larger than anything measured here.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


size, library, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
state = make_state_dict(size)
gc.collect()
# Reset the high-water mark to the current RSS (Linux >= 4.0), so that transient memory of
# imports and of building the state dict is not counted as the save's.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
before = peak_kib()
save_with(library, state, path)
after = peak_kib()
print(json.dumps({"before_kib": before, "after_kib": after}))
"""


@dataclass(frozen=True)
class MemoryResult:
    """Peak resident memory a save added on top of the state dict (high-water mark growth)."""

    library: str
    peak_extra_bytes: int

    @property
    def mib(self) -> float:
        return self.peak_extra_bytes / MIB


def measure_save_memory(library: str, size_bytes: int, path: str) -> subprocess.Popen[str]:
    """Start a process that builds the state dict, saves it with ``library``, prints JSON."""
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(tk.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    return subprocess.Popen(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(size_bytes), library, path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _memory_result(library: str, process: subprocess.Popen[str]) -> MemoryResult:
    out, err = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"memory measurement for {library} failed:\n{err}")
    values = json.loads(out.strip().splitlines()[-1])
    return MemoryResult(library, (values["after_kib"] - values["before_kib"]) * 1024)


# ---------------------------------------------------------------------------------------------
# results


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


# ---------------------------------------------------------------------------------------------
# the runner


def run_interleaved(
    group: str,
    runs: Mapping[str, Callable[[], float]],
    *,
    repeats: int,
    nbytes: int,
    progress: Progress | None = None,
    reference: str | None = TORCHKEEP,
) -> list[CaseResult]:
    """One warm-up run of each case, then ``repeats`` rounds running every case once.

    The order rotates from round to round, so that no library always follows the same one.
    """
    say = progress or (lambda _: None)
    for library, run in runs.items():
        say(f"{group} / {library}: warm-up {run():.3f} s")
    times: dict[str, list[float]] = {library: [] for library in runs}
    order = list(runs)
    for r in range(repeats):
        shift = r % len(order)
        for library in order[shift:] + order[:shift]:
            seconds = runs[library]()
            times[library].append(seconds)
            say(f"{group} / {library}: run {r + 1}/{repeats} {seconds:.3f} s")
    base = statistics.median(times[reference]) if reference in times else None
    return [
        CaseResult(
            group,
            library,
            tuple(t),
            nbytes,
            statistics.median(t) / base if base else None,
        )
        for library, t in times.items()
    ]


_EXT = {TORCHKEEP: "tk.safetensors", TORCH: "pt", SAFETENSORS: "st.safetensors"}


def _split(results: list[CaseResult]) -> tuple[list[CaseResult], list[CaseResult]]:
    """Separate the libraries' results from the raw-disk reference's (which gets no ratio)."""
    cases = [c for c in results if c.library != RAW]
    raw = [replace(c, ratio=None) for c in results if c.library == RAW]
    return cases, raw


def _raw_buffer(nbytes: int) -> torch.Tensor:
    buffer = torch.empty(nbytes, dtype=torch.uint8)
    _fill(buffer, torch.randint(0, 256, (16 << 20,), dtype=torch.uint8), 0)
    return buffer


def _cases(
    state: Mapping[str, torch.Tensor], work: str, repeats: int, progress: Progress | None
) -> tuple[list[CaseResult], list[CaseResult]]:
    """Run the three cases; the raw-disk reference runs in the same rounds as each of them,
    since the throughput of a shared or virtual disk drifts over minutes."""
    nbytes = _state_bytes(state)
    raw_path = os.path.join(work, "raw.bin")
    buffer = _raw_buffer(nbytes)
    cases: list[CaseResult] = []
    raw: list[CaseResult] = []
    saves = {lib: os.path.join(work, f"save.{_EXT[lib]}") for lib in LIBRARIES}
    loads = {lib: os.path.join(work, f"load.{_EXT[lib]}") for lib in LIBRARIES}
    try:
        runs: dict[str, Callable[[], float]] = {
            lib: partial(time_save, lib, state, saves[lib]) for lib in LIBRARIES
        }
        runs[RAW] = partial(time_raw_write, buffer, raw_path)
        c, r = _split(
            run_interleaved(SAVE, runs, repeats=repeats, nbytes=nbytes, progress=progress)
        )
        cases, raw = cases + c, raw + r
        for p in saves.values():
            _remove(p)

        if progress:
            progress("writing the files to load")
        for lib in LIBRARIES:
            save_with(lib, state, loads[lib])
        runs = {lib: partial(time_load, lib, loads[lib]) for lib in LIBRARIES}
        runs[RAW] = partial(time_raw_read, buffer, raw_path)
        c, r = _split(
            run_interleaved(LOAD, runs, repeats=repeats, nbytes=nbytes, progress=progress)
        )
        cases, raw = cases + c, raw + r

        model = make_model(state)
        runs = {lib: partial(time_load_into, lib, model, loads[lib]) for lib in LIBRARIES}
        runs[RAW] = partial(time_raw_read, buffer, raw_path)
        c, r = _split(
            run_interleaved(LOAD_INTO, runs, repeats=repeats, nbytes=nbytes, progress=progress)
        )
        cases, raw = cases + c, raw + r
        loaded = model.state_dict()
        if set(loaded) != set(state) or not all(torch.equal(loaded[k], state[k]) for k in state):
            raise AssertionError("the model does not hold the saved weights after loading")
        return cases, raw
    finally:
        for p in (*saves.values(), *loads.values(), raw_path):
            _remove(p)


def _memory_cases(size_bytes: int, work: str, progress: Progress | None) -> list[MemoryResult]:
    if progress:
        progress("measuring the peak memory of each save in fresh processes")
    processes = {
        lib: measure_save_memory(lib, size_bytes, os.path.join(work, f"memory.{_EXT[lib]}"))
        for lib in LIBRARIES
    }
    results = []
    for lib, process in processes.items():
        results.append(_memory_result(lib, process))
        if progress:
            progress(f"peak extra memory / {lib}: {results[-1].mib:.1f} MiB")
    return results


def _state_bytes(state: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def run_benchmark(
    *,
    size_bytes: int = 1 << 30,
    repeats: int = 5,
    directory: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    memory: bool = True,
) -> BenchResult:
    """Run every case and return the results.

    Args:
        size_bytes: about how large the state dict is.
        repeats: counted runs per case (after one warm-up run each); publish with 5 or more.
        directory: where the files go; a temporary directory is made inside it (default: the
            current directory, whose file system is more likely a disk than ``/tmp``'s) and
            removed at the end.
        progress: called with one line per run.
        command: the command line recorded in the result (default: this process's).
        memory: also measure each save's peak extra memory in a fresh process.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    started = time.perf_counter()
    parent = os.fspath(directory) if directory is not None else os.getcwd()
    work = tempfile.mkdtemp(prefix="torchkeep-bench-", dir=parent)
    try:
        if progress:
            progress(f"building a {size_bytes / MIB:.0f} MiB state dict")
        state = make_state_dict(size_bytes)
        nbytes, tensors = _state_bytes(state), len(state)
        machine = machine_info(work)
        cases, raw = _cases(state, work, repeats, progress)
        del state
        memory_results = _memory_cases(size_bytes, work, progress) if memory else []
        return BenchResult(
            machine=machine,
            command=command if command is not None else shlex.join(["python", *sys.argv]),
            directory=parent,
            requested_bytes=size_bytes,
            size_bytes=nbytes,
            tensors=tensors,
            repeats=repeats,
            cases=tuple(cases),
            raw=tuple(raw),
            memory=tuple(memory_results),
            seconds=time.perf_counter() - started,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# the table


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
