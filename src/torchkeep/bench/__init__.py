"""The benchmark harness: torchkeep against ``torch.save``/``torch.load`` and safetensors.

Three cases, each run interleaved with its competitors (one warm-up run each, not counted):

* durable save: ``tk.save_weights`` (fsync + atomic rename) against ``torch.save`` and
  ``safetensors.torch.save_file``, each followed by an fsync of the file;
* cold load: the file dropped from the page cache, loaded, and every byte read once;
* load into an existing model (cold cache too).

Each case is measured against its physical bound, in the same interleaved rounds: the raw device
through ``O_DIRECT`` (a durable write of one aligned buffer for saves, a cold read of
torchkeep's file for loads) and, for loads into new tensors, the first touch of as much fresh
memory. The peak extra host memory of each save and load is measured in a fresh process.

``run_benchmark`` returns a ``BenchResult``; ``format_markdown`` turns it into the published
table. ``benchmarks/core.py`` is the command-line front end.

The package: ``workload`` builds what is saved, ``cases`` times one run of each case,
``runner`` interleaves them, ``report`` describes the machine and writes the table.

It holds what ``torchkeep bench`` runs; the benchmarks it does not run (async saves, whole-model
loads, object storage, scaling, distributed saves) live with their scripts in ``benchmarks/``.
"""

from __future__ import annotations

from torchkeep.bench.cases import (
    FIRST_TOUCH,
    LIBRARIES,
    LOAD,
    LOAD_INTO,
    RAW,
    RAW_CHUNK,
    RAW_THREADS,
    SAFETENSORS,
    SAVE,
    TORCH,
    TORCHKEEP,
    MemoryResult,
    aligned_buffer,
    direct_io,
    load_into_with,
    load_with,
    measure_memory,
    save_with,
    time_first_touch,
    time_load,
    time_load_into,
    time_raw_read,
    time_raw_write,
    time_save,
)
from torchkeep.bench.report import (
    GB,
    MIN_PUBLISHED_REPEATS,
    BenchResult,
    CaseResult,
    MachineInfo,
    format_markdown,
    machine_info,
)
from torchkeep.bench.runner import Progress, run_benchmark, run_interleaved
from torchkeep.bench.workload import (
    LAYERS,
    MIB,
    drop_cache,
    fsync_file,
    make_model,
    make_state_dict,
    touch,
)

__all__ = [
    "FIRST_TOUCH",
    "GB",
    "LAYERS",
    "LIBRARIES",
    "LOAD",
    "LOAD_INTO",
    "MIB",
    "MIN_PUBLISHED_REPEATS",
    "RAW",
    "RAW_CHUNK",
    "RAW_THREADS",
    "SAFETENSORS",
    "SAVE",
    "TORCH",
    "TORCHKEEP",
    "BenchResult",
    "CaseResult",
    "MachineInfo",
    "MemoryResult",
    "Progress",
    "aligned_buffer",
    "direct_io",
    "drop_cache",
    "format_markdown",
    "fsync_file",
    "load_into_with",
    "load_with",
    "machine_info",
    "make_model",
    "make_state_dict",
    "measure_memory",
    "run_benchmark",
    "run_interleaved",
    "save_with",
    "time_first_touch",
    "time_load",
    "time_load_into",
    "time_raw_read",
    "time_raw_write",
    "time_save",
    "touch",
]
