"""A bar chart of a benchmark run: throughput of each library in each case (matplotlib, an
optional extra: ``pip install 'torchkeep[plot]'``)."""

from __future__ import annotations

import os
from typing import Any

from torchkeep._optional import importing
from torchkeep.bench.cases import FIRST_TOUCH, RAW, SAFETENSORS, TORCH, TORCHKEEP
from torchkeep.bench.engine import CHECKSUMS_OFF, DIRECT_ON, LAZY_OPEN, MEMCPY
from torchkeep.bench.report import BenchResult, CaseResult
from torchkeep.bench.workload import MIB

COLORS = {
    TORCHKEEP: "#2a7ab0",
    CHECKSUMS_OFF: "#8ec1e0",
    TORCH: "#e0803a",
    SAFETENSORS: "#5aa05a",
    RAW: "#9a9a9a",
    MEMCPY: "#9a9a9a",
    FIRST_TOUCH: "#c8c8c8",
    DIRECT_ON: "#1d4f73",
}
LABELS = {RAW: "raw device / memcpy", MEMCPY: "raw device / memcpy"}
OTHER_COLOR = "#c08fc0"


def pyplot() -> Any:
    """Return ``matplotlib.pyplot`` on a file-only backend, or raise with the install command."""
    with importing("plot", "drawing the benchmark chart needs matplotlib"):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    return plt


def _rows(result: BenchResult) -> list[tuple[str, list[CaseResult]]]:
    """The cases to draw, in the order they ran, each with its libraries and references."""
    groups: dict[str, list[CaseResult]] = {}
    for case in (*result.cases, *result.raw):
        if case.group != LAZY_OPEN:  # a lazy open reads no data: it has no throughput
            groups.setdefault(case.group, []).append(case)
    return list(groups.items())


def plot(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Draw the run's throughput (GB/s, higher is better) as grouped bars into ``path``."""
    plt = pyplot()
    rows = _rows(result)
    height = 0.8
    figure, axes = plt.subplots(figsize=(10, 0.3 * sum(len(c) for _, c in rows) + 1.5))
    y = 0.0
    ticks, labels = [], []
    seen: set[str] = set()
    for group, cases in rows:
        top = y
        for case in cases:
            library = case.library
            label = LABELS.get(library, library)
            axes.barh(
                y,
                case.gbps,
                height=height,
                color=COLORS.get(library, OTHER_COLOR),
                label=None if label in seen else label,
            )
            seen.add(label)
            axes.text(case.gbps, y, f" {case.gbps:.2f}", va="center", fontsize=8)
            y += 1
        ticks.append((top + y - 1) / 2)
        labels.append(group)
        y += 0.8
    axes.set_yticks(ticks, labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("GB/s of tensor data (higher is better)")
    m = result.machine
    axes.set_title(
        f"torchkeep bench: {result.size_bytes / MIB:.0f} MiB state dict, median of "
        f"{result.repeats}\n{m.cpu}, {m.cores} cores, {m.filesystem}",
        fontsize=9,
    )
    axes.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    figure.savefig(os.fspath(path), dpi=110)
    plt.close(figure)
