"""Which checkpoints to keep: a pure function over (step, time, metrics) records, no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Record:
    """One committed checkpoint, as the retention policy sees it.

    Attributes:
        step: the step number.
        time: when it was written, in seconds since the epoch.
        metrics: the metrics saved with it.
    """

    step: int
    time: float = 0.0
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """What to keep.

    Attributes:
        keep_last: the newest N steps (the newest is always kept, even with 0).
        keep_best: the N best steps by ``monitor``; steps without that metric (or with a NaN)
            never count as best.
        monitor: the metric ``keep_best`` ranks by, such as ``"val_loss"``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        keep_every: also keep every step that is a multiple of this (milestones), if set.
    """

    keep_last: int | None = 3
    keep_best: int = 0
    monitor: str | None = None
    mode: str = "min"
    keep_every: int | None = None

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise ValueError(f"keep_last must be 0 or more (None: keep all), not {self.keep_last}")
        if self.keep_best < 0:
            raise ValueError(f"keep_best must be 0 or more, not {self.keep_best}")
        if self.keep_best and not self.monitor:
            raise ValueError("keep_best needs monitor=, the name of the metric to rank steps by")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {self.mode!r}")
        if self.keep_every is not None and self.keep_every < 1:
            raise ValueError(f"keep_every must be 1 or more, not {self.keep_every}")


def best(records: Iterable[Record], policy: Policy) -> list[Record]:
    """The records ranked best first by the policy's metric (ties: the newer step first)."""
    if not policy.monitor:
        return []
    sign = 1.0 if policy.mode == "min" else -1.0
    scored = [(score, r) for r in records if (score := _score(r, policy.monitor)) is not None]
    return [r for _, r in sorted(scored, key=lambda sr: (sign * sr[0], -sr[1].step))]


def _score(record: Record, metric: str) -> float | None:
    value = record.metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def retained(records: Iterable[Record], policy: Policy) -> set[int]:
    """The steps to keep: the newest, the last ``keep_last``, the ``keep_best`` best and the
    multiples of ``keep_every``. Every other step may be deleted."""
    records = list(records)
    if not records:
        return set()
    by_step = sorted(records, key=lambda r: r.step)
    keep = {by_step[-1].step}
    if policy.keep_last is None:
        return {r.step for r in records}
    if policy.keep_last:
        keep.update(r.step for r in by_step[max(0, len(by_step) - policy.keep_last) :])
    keep.update(r.step for r in best(records, policy)[: policy.keep_best])
    if policy.keep_every:
        keep.update(r.step for r in records if r.step % policy.keep_every == 0)
    return keep
