"""The runner: every case interleaved across libraries, then one ``BenchResult``."""

from __future__ import annotations

import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import replace
from functools import partial

import torch

from torchkeep.bench.cases import (
    CONVERT,
    LIBRARIES,
    LOAD,
    LOAD_INTO,
    RAW,
    READ_PTH,
    SAFETENSORS,
    SAVE,
    TORCH,
    TORCH_THEN_SAFETENSORS,
    TORCHKEEP,
    MemoryResult,
    collect_save_memory,
    measure_save_memory,
    save_with,
    time_convert,
    time_load,
    time_load_into,
    time_raw_read,
    time_raw_write,
    time_read_pth,
    time_save,
)
from torchkeep.bench.report import BenchResult, CaseResult, machine_info
from torchkeep.bench.workload import (
    MIB,
    make_model,
    make_raw_buffer,
    make_state_dict,
    remove_file,
    state_bytes,
)

Progress = Callable[[str], None]


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


def _cases(
    state: Mapping[str, torch.Tensor], work: str, repeats: int, progress: Progress | None
) -> tuple[list[CaseResult], list[CaseResult]]:
    """Run the three cases; the raw-disk reference runs in the same rounds as each of them,
    since the throughput of a shared or virtual disk drifts over minutes."""
    nbytes = state_bytes(state)
    raw_path = os.path.join(work, "raw.bin")
    buffer = make_raw_buffer(nbytes)
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
            remove_file(p)

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
        del model, loaded

        # Files users already have: the torch.save file written above, read and converted.
        pth = loads[TORCH]
        runs = {lib: partial(time_read_pth, lib, pth) for lib in (TORCHKEEP, TORCH)}
        cases += run_interleaved(READ_PTH, runs, repeats=repeats, nbytes=nbytes, progress=progress)
        converted = os.path.join(work, "converted.safetensors")
        saves[TORCHKEEP] = converted
        runs = {
            lib: partial(time_convert, lib, pth, converted)
            for lib in (TORCHKEEP, TORCH_THEN_SAFETENSORS)
        }
        cases += run_interleaved(CONVERT, runs, repeats=repeats, nbytes=nbytes, progress=progress)
        return cases, raw
    finally:
        for p in (*saves.values(), *loads.values(), raw_path):
            remove_file(p)


def _memory_cases(size_bytes: int, work: str, progress: Progress | None) -> list[MemoryResult]:
    if progress:
        progress("measuring the peak memory of each save in fresh processes")
    processes = {
        lib: measure_save_memory(lib, size_bytes, os.path.join(work, f"memory.{_EXT[lib]}"))
        for lib in LIBRARIES
    }
    results = []
    for lib, process in processes.items():
        results.append(collect_save_memory(lib, process))
        if progress:
            progress(f"peak extra memory / {lib}: {results[-1].mib:.1f} MiB")
    return results


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
        nbytes, tensors = state_bytes(state), len(state)
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
