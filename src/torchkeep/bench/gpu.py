"""GPU cases: loading a state dict onto a GPU and saving one from it, against ``torch`` and
safetensors, interleaved like the core cases.

* load to the device (cold cache, synchronised): ``tk.load_state_dict(device=...)`` against
  ``torch.load(map_location=...)`` and ``safetensors.torch.load_file(device=...)``;
* durable save from the device: ``tk.save_weights`` against ``torch.save`` and
  ``safetensors.torch.save_file``, each followed by an fsync (``cases.time_save``).

The same functions run with ``device="cpu"`` (how the harness is tested without a GPU).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import safetensors.torch
import torch

import torchkeep as tk
from torchkeep.bench.cases import LIBRARIES, SAFETENSORS, TORCH, TORCHKEEP, time_save
from torchkeep.bench.report import CaseResult, case_table
from torchkeep.bench.runner import EXTENSIONS, Progress, Step, run_interleaved
from torchkeep.bench.workload import (
    MIB,
    drop_cache,
    make_state_dict,
    remove_file,
    state_bytes,
)

LOAD_TO_DEVICE = "cold load to the device"
SAVE_FROM_DEVICE = "durable save from the device"
GPU_RUNS = 2 * len(LIBRARIES)  # runs per round: both cases, every library


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_load_to(library: str, path: str, device: torch.device) -> float:
    """Drop ``path`` from the page cache, then time loading it onto ``device``."""
    drop_cache(path)
    _synchronize(device)
    started = time.perf_counter()
    if library == TORCHKEEP:
        loaded = tk.load_state_dict(path, device=device)
    elif library == TORCH:
        loaded = torch.load(path, map_location=device)
    elif library == SAFETENSORS:
        loaded = safetensors.torch.load_file(path, device=str(device))
    else:
        raise ValueError(f"unknown library {library!r}")
    _synchronize(device)
    seconds = time.perf_counter() - started
    del loaded
    return seconds


@dataclass(frozen=True)
class GpuResult:
    device: str
    device_name: str
    command: str
    size_bytes: int
    tensors: int
    repeats: int
    cases: tuple[CaseResult, ...]


def run_gpu_benchmark(
    *,
    size_bytes: int = 4 << 30,
    repeats: int = 5,
    device: str = "cuda",
    directory: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
    command: str | None = None,
    step: Step | None = None,
) -> GpuResult:
    """Run the load and save cases on ``device``; files go to a temporary directory under
    ``directory`` (default: the current one), removed at the end. ``step`` is called after
    each run: ``(repeats + 1) * GPU_RUNS`` times."""
    target = torch.device(device)
    parent = os.fspath(directory) if directory is not None else os.getcwd()
    work = tempfile.mkdtemp(prefix="torchkeep-gpu-bench-", dir=parent)
    try:
        state = make_state_dict(size_bytes)
        nbytes = state_bytes(state)
        paths = {lib: os.path.join(work, f"load.{EXTENSIONS[lib]}") for lib in LIBRARIES}
        for lib in LIBRARIES:
            time_save(lib, state, paths[lib])
        runs: dict[str, Callable[[], float]] = {
            lib: partial(time_load_to, lib, paths[lib], target) for lib in LIBRARIES
        }
        cases = run_interleaved(
            LOAD_TO_DEVICE, runs, repeats=repeats, nbytes=nbytes, progress=progress, step=step
        )
        for p in paths.values():
            remove_file(p)
        on_device = {k: v.to(target) for k, v in state.items()}
        del state
        _synchronize(target)
        saves = {lib: os.path.join(work, f"save.{EXTENSIONS[lib]}") for lib in LIBRARIES}
        runs = {lib: partial(time_save, lib, on_device, saves[lib]) for lib in LIBRARIES}
        cases += run_interleaved(
            SAVE_FROM_DEVICE, runs, repeats=repeats, nbytes=nbytes, progress=progress, step=step
        )
        name = torch.cuda.get_device_name(target) if target.type == "cuda" else "CPU"
        return GpuResult(
            device=str(target),
            device_name=name,
            command=command if command is not None else shlex.join(["python", *sys.argv]),
            size_bytes=nbytes,
            tensors=len(on_device),
            repeats=repeats,
            cases=tuple(cases),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def format_gpu(result: GpuResult) -> str:
    lines = [
        "## torchkeep GPU benchmark",
        "",
        f"- command: `{result.command}`",
        f"- device: {result.device} ({result.device_name}); torch {torch.__version__}",
        f"- state dict: {result.size_bytes / MIB:.0f} MiB in {result.tensors} tensors; "
        f"{result.repeats} counted runs after a warm-up, interleaved; median seconds",
        "",
        *case_table(result.cases),
        "",
    ]
    return "\n".join(lines)
