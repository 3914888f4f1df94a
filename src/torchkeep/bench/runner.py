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
    FIRST_TOUCH,
    LIBRARIES,
    LOAD,
    LOAD_INTO,
    LOAD_MEMORY,
    RAW,
    READ_PTH,
    SAFETENSORS,
    SAVE,
    SAVE_MEMORY,
    TORCH,
    TORCH_THEN_SAFETENSORS,
    TORCHKEEP,
    MemoryResult,
    aligned_buffer,
    collect_memory,
    direct_io,
    direct_io_refused,
    measure_memory,
    save_with,
    time_convert,
    time_first_touch,
    time_load,
    time_load_into,
    time_raw_read,
    time_raw_write,
    time_read_pth,
    time_save,
)
from torchkeep.bench.engine import (
    CHECKSUM_COST,
    CHECKSUMS_OFF,
    DIRECT_LOAD,
    DIRECT_LOAD_INTO,
    DIRECT_ON,
    DIRECT_SAVE,
    LAZY_OPEN,
    MEMCPY,
    SMALL_LOAD,
    SMALL_SAVE,
    SMALL_TENSORS,
    WARM_LOAD_INTO,
    make_small_state_dict,
    time_lazy_open,
    time_memcpy,
    time_save_without_checksums,
    time_warm_load_into,
)
from torchkeep.bench.report import BenchResult, CaseResult, machine_info
from torchkeep.bench.workload import (
    MIB,
    make_model,
    make_state_dict,
    remove_file,
    state_bytes,
)

Progress = Callable[[str], None]
Step = Callable[[], None]

# How many runs each part makes per round: libraries (and references) in each of its cases.
CORE_RUNS = 4 + 5 + 4 + 2 + 2  # save (with the raw device), cold load (with the raw device and
# the first touch of fresh memory), load into a model (with the raw device), then reading and
# converting a torch.save file
ENGINE_RUNS = 2 + 3 * 2 + 3 + 3 + 2 + 2  # checksum cost, direct I/O against the page cache in
# three cases, small saves, small loads, lazy open, warm load
MEMORY_RUNS = 2 * 3  # a save and a load per library, in fresh processes


def planned_runs(repeats: int, *, memory: bool = True, engine: bool = True) -> int:
    """How many times ``run_benchmark`` calls its ``step`` callback: once per run."""
    return (repeats + 1) * (CORE_RUNS + (ENGINE_RUNS if engine else 0)) + (
        MEMORY_RUNS if memory else 0
    )


def run_interleaved(
    group: str,
    runs: Mapping[str, Callable[[], float]],
    *,
    repeats: int,
    nbytes: int,
    progress: Progress | None = None,
    reference: str | None = TORCHKEEP,
    step: Step | None = None,
) -> list[CaseResult]:
    """One warm-up run of each case, then ``repeats`` rounds running every case once.

    The order rotates from round to round, so that no library always follows the same one.
    ``step`` is called after every run, warm-ups included.
    """
    say = progress or (lambda _: None)
    done = step or (lambda: None)
    for library, run in runs.items():
        say(f"{group} / {library}: warm-up {run():.3f} s")
        done()
    times: dict[str, list[float]] = {library: [] for library in runs}
    order = list(runs)
    for r in range(repeats):
        shift = r % len(order)
        for library in order[shift:] + order[:shift]:
            seconds = runs[library]()
            times[library].append(seconds)
            say(f"{group} / {library}: run {r + 1}/{repeats} {seconds:.3f} s")
            done()
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


EXTENSIONS = {TORCHKEEP: "tk.safetensors", TORCH: "pt", SAFETENSORS: "st.safetensors"}


def _split(results: list[CaseResult]) -> tuple[list[CaseResult], list[CaseResult]]:
    """Separate the libraries' results from the physical references' (which get no ratio)."""
    references = (RAW, FIRST_TOUCH)
    cases = [c for c in results if c.library not in references]
    raw = [replace(c, ratio=None) for c in results if c.library in references]
    return cases, raw


def _with_direct_io(mode: str, run: Callable[[], float]) -> float:
    with direct_io(mode):
        return run()


class _Rounds:
    """``run_interleaved`` with this run's repeats and callbacks."""

    def __init__(self, repeats: int, progress: Progress | None, step: Step | None) -> None:
        self.repeats, self.progress, self.step = repeats, progress, step

    def __call__(
        self, group: str, runs: Mapping[str, Callable[[], float]], nbytes: int
    ) -> list[CaseResult]:
        return run_interleaved(
            group,
            runs,
            repeats=self.repeats,
            nbytes=nbytes,
            progress=self.progress,
            step=self.step,
        )

    def say(self, line: str) -> None:
        if self.progress is not None:
            self.progress(line)


def _cases(
    state: Mapping[str, torch.Tensor], work: str, rounds: _Rounds, engine: bool, raw_direct: bool
) -> tuple[list[CaseResult], list[CaseResult]]:
    """Run the cases; the physical references run in the same rounds as each of them, since
    the throughput of a shared or virtual disk drifts over minutes."""
    nbytes = state_bytes(state)
    raw_path = os.path.join(work, "raw.bin")
    saves = {lib: os.path.join(work, f"save.{EXTENSIONS[lib]}") for lib in LIBRARIES}
    loads = {lib: os.path.join(work, f"load.{EXTENSIONS[lib]}") for lib in LIBRARIES}
    # Room for the whole torchkeep file (tensors, header and manifest) in the raw reads.
    buffer = aligned_buffer(nbytes + (16 << 20))
    cases: list[CaseResult] = []
    raw: list[CaseResult] = []
    try:
        runs: dict[str, Callable[[], float]] = {
            lib: partial(time_save, lib, state, saves[lib]) for lib in LIBRARIES
        }
        runs[RAW] = partial(time_raw_write, buffer, raw_path, nbytes=nbytes, direct=raw_direct)
        c, r = _split(rounds(SAVE, runs, nbytes))
        cases, raw = cases + c, raw + r
        remove_file(raw_path)
        if engine:
            runs = {
                TORCHKEEP: partial(time_save, TORCHKEEP, state, saves[TORCHKEEP]),
                CHECKSUMS_OFF: partial(time_save_without_checksums, state, saves[TORCHKEEP]),
            }
            cases += rounds(CHECKSUM_COST, runs, nbytes)
            save = partial(time_save, TORCHKEEP, state, saves[TORCHKEEP])
            cases += rounds(DIRECT_SAVE, _direct_or_not(save), nbytes)
        for p in saves.values():
            remove_file(p)

        rounds.say("writing the files to load")
        for lib in LIBRARIES:
            save_with(lib, state, loads[lib])
        # The raw device reads torchkeep's own file: the same bytes, from the same place on
        # the disk, written as long ago as the files the libraries load.
        read_raw = partial(time_raw_read, buffer, loads[TORCHKEEP], direct=raw_direct)
        runs = {lib: partial(time_load, lib, loads[lib]) for lib in LIBRARIES}
        runs[RAW] = read_raw
        runs[FIRST_TOUCH] = partial(time_first_touch, nbytes)
        c, r = _split(rounds(LOAD, runs, nbytes))
        cases, raw = cases + c, raw + r
        if engine:
            load = partial(time_load, TORCHKEEP, loads[TORCHKEEP])
            cases += rounds(DIRECT_LOAD, _direct_or_not(load), nbytes)

        model = make_model(state)
        runs = {lib: partial(time_load_into, lib, model, loads[lib]) for lib in LIBRARIES}
        runs[RAW] = read_raw
        c, r = _split(rounds(LOAD_INTO, runs, nbytes))
        cases, raw = cases + c, raw + r
        if engine:
            load_into = partial(time_load_into, TORCHKEEP, model, loads[TORCHKEEP])
            cases += rounds(DIRECT_LOAD_INTO, _direct_or_not(load_into), nbytes)
            copy = torch.zeros(nbytes, dtype=torch.uint8)
            runs = {
                TORCHKEEP: partial(time_warm_load_into, model, loads[TORCHKEEP]),
                MEMCPY: partial(time_memcpy, buffer[:nbytes], copy),
            }
            cases += rounds(WARM_LOAD_INTO, runs, nbytes)
            del copy
            runs = {lib: partial(time_lazy_open, lib, loads[lib]) for lib in (TORCHKEEP, TORCH)}
            cases += rounds(LAZY_OPEN, runs, nbytes)
        loaded = model.state_dict()
        if set(loaded) != set(state) or not all(torch.equal(loaded[k], state[k]) for k in state):
            raise AssertionError("the model does not hold the saved weights after loading")
        del model, loaded

        # Files users already have: the torch.save file written above, read and converted.
        pth = loads[TORCH]
        runs = {lib: partial(time_read_pth, lib, pth) for lib in (TORCHKEEP, TORCH)}
        cases += rounds(READ_PTH, runs, nbytes)
        converted = os.path.join(work, "converted.safetensors")
        saves[TORCHKEEP] = converted
        runs = {
            lib: partial(time_convert, lib, pth, converted)
            for lib in (TORCHKEEP, TORCH_THEN_SAFETENSORS)
        }
        cases += rounds(CONVERT, runs, nbytes)
        return cases, raw
    finally:
        for p in (*saves.values(), *loads.values(), raw_path):
            remove_file(p)


def _direct_or_not(run: Callable[[], float]) -> dict[str, Callable[[], float]]:
    """``run`` through the page cache (torchkeep's default) and with direct I/O: how the
    default was chosen, measured again on this machine."""
    return {
        TORCHKEEP: partial(_with_direct_io, "off", run),
        DIRECT_ON: partial(_with_direct_io, "on", run),
    }


def _small_cases(work: str, rounds: _Rounds, count: int) -> list[CaseResult]:
    """Durable saves and cold loads of many small tensors, against both other libraries."""
    rounds.say(f"building {count:,} small tensors")
    state = make_small_state_dict(count)
    nbytes = state_bytes(state)
    paths = {lib: os.path.join(work, f"small.{EXTENSIONS[lib]}") for lib in LIBRARIES}
    try:
        runs: dict[str, Callable[[], float]] = {
            lib: partial(time_save, lib, state, paths[lib]) for lib in LIBRARIES
        }
        cases = rounds(SMALL_SAVE, runs, nbytes)
        runs = {lib: partial(time_load, lib, paths[lib]) for lib in LIBRARIES}
        return cases + rounds(SMALL_LOAD, runs, nbytes)
    finally:
        for p in paths.values():
            remove_file(p)


def _memory_cases(
    size_bytes: int, work: str, progress: Progress | None, step: Step | None
) -> list[MemoryResult]:
    if progress:
        progress("measuring the peak memory of each save and load in fresh processes")
    results = []
    paths = {lib: os.path.join(work, f"memory.{EXTENSIONS[lib]}") for lib in LIBRARIES}
    try:
        for mode in (SAVE_MEMORY, LOAD_MEMORY):
            # Saves run side by side; each load reads the file its library's save wrote.
            processes = {
                lib: measure_memory(lib, size_bytes, paths[lib], mode) for lib in LIBRARIES
            }
            for lib, process in processes.items():
                results.append(collect_memory(lib, process, mode))
                if progress:
                    progress(f"peak extra memory / {mode} / {lib}: {results[-1].mib:.1f} MiB")
                if step:
                    step()
    finally:
        for p in paths.values():
            remove_file(p)
    return results


def run_benchmark(
    *,
    size_bytes: int = 1 << 30,
    repeats: int = 5,
    directory: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    memory: bool = True,
    engine: bool = True,
    small_tensors: int = SMALL_TENSORS,
    step: Step | None = None,
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
        memory: also measure the peak memory of each save and load in fresh processes.
        engine: also run the engine's cases (checksum cost, many small tensors, lazy open,
            warm load against memcpy).
        small_tensors: how many tensors of 4–64 KiB the small-tensor cases save and load.
        step: called after every run; ``planned_runs`` says how many calls to expect.
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
        raw_direct = not direct_io_refused(work)
        rounds = _Rounds(repeats, progress, step)
        cases, raw = _cases(state, work, rounds, engine, raw_direct)
        del state
        if engine:
            cases += _small_cases(work, rounds, small_tensors)
        memory_results = _memory_cases(size_bytes, work, progress, step) if memory else []
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
            small_tensors=small_tensors if engine else 0,
            raw_direct=raw_direct,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
