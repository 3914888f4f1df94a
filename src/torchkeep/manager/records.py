"""What the manager keeps of each step in its manifest's metadata: the step, when it was written
and its metrics, read back as the ``Record``s that retention's policies rank."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from torchkeep.retention import Record

METADATA_KEY = "checkpoint_manager"


def step_metadata(step: int, metrics: dict[str, float]) -> dict[str, Any]:
    """The metadata of the save of ``step``, written now, with its (checked) metrics."""
    return {METADATA_KEY: {"step": step, "time": time.time(), "metrics": metrics}}


def record_of(metadata: Mapping[str, Any], step: int) -> Record | None:
    """The record of ``step`` in a manifest's metadata, or None where the checkpoint manager did
    not write it as that step (or the step was renamed)."""
    info = metadata.get(METADATA_KEY)
    if not isinstance(info, dict) or info.get("step") != step:
        return None
    metrics = info.get("metrics")
    when = info.get("time")
    return Record(
        step,
        float(when) if isinstance(when, (int, float)) else 0.0,
        dict(metrics) if isinstance(metrics, dict) else {},
    )


def check_metrics(metrics: Mapping[str, float] | None) -> dict[str, float]:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise ValueError("metrics must be a dict of names to numbers")
    clean: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not isinstance(name, str) or not number:
            raise ValueError(f"metrics must map names to numbers; {name!r} is {value!r}")
        try:
            finite = math.isfinite(value)
        except OverflowError:
            finite = False
        if not finite:
            raise ValueError(f"metric {name!r} is {value}; only finite numbers can be saved")
        clean[name] = value
    return clean
