"""Incremental checkpoints: what a CheckpointManager step costs when most of the state is frozen.

    python benchmarks/incremental.py                          # 1 GiB frozen base, 8 rounds
    python benchmarks/incremental.py --base-mib 64 --rounds 3

A fine-tune of a frozen base: a transformer-like state dict (as in benchmarks/core.py) that never
changes, plus a trainable head and its two Adam moments, changed in place every step. Each round
trains one step and saves it with two managers in turn (the order alternates): one incremental
(the default) and one with ``incremental=False``, both keeping the last 3 steps. Then a full
fine-tune, where every tensor changes each step, saved the same two ways. Before each save the
disk is let settle (``sync``, then half a second), so that neither manager's save pays for the
other's writeback.

Reported, as medians over the rounds: seconds per durable step save; bytes written per step,
counted by the kernel for this process (``/proc/self/io`` write_bytes: data and manifests, as
they reach the file system) and as torchkeep reports them (``SaveInfo.file_bytes``); the disk
the kept steps use (distinct files, by allocated blocks), against issue 20's targets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import torchkeep as tk
from output import progress_to_stderr, publish, script_header
from torchkeep.bench.report import machine_info
from torchkeep.bench.workload import MIB, make_state_dict, state_bytes

SETTLE_SECONDS = 0.5


def written_bytes() -> int:
    """Bytes this process has sent to the file system so far (0 where the kernel does not say)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("write_bytes:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def disk_used(root: str) -> int:
    """Allocated bytes of the distinct files under ``root`` (a hard link counts once)."""
    seen: dict[tuple[int, int], int] = {}
    for directory, _, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def make_head(nbytes: int) -> dict[str, Any]:
    """A trainable head of about ``nbytes`` and its Adam moments (the changed bytes are 3×)."""
    generator = torch.Generator().manual_seed(1)
    rows = max(1, nbytes // (4 * 1024))
    weight = torch.randn(rows, 1024, generator=generator)
    return {
        "weight": weight,
        "exp_avg": torch.zeros_like(weight),
        "exp_avg_sq": torch.zeros_like(weight),
    }


def train_step(head: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None) -> None:
    """Change the head and its moments in place (and, for a full fine-tune, every base tensor)."""
    head["exp_avg"].mul_(0.9).add_(0.1)
    head["exp_avg_sq"].mul_(0.999).add_(0.001)
    head["weight"].sub_(0.01 * head["exp_avg"])
    if base is not None:
        for t in base.values():
            if t.is_floating_point():
                t.mul_(0.999)
            else:
                t.add_(1)


class Measured:
    """Seconds, kernel-counted bytes and SaveInfo.file_bytes of each timed save of one manager."""

    def __init__(self, manager: tk.CheckpointManager) -> None:
        self.manager = manager
        self.seconds: list[float] = []
        self.kernel_bytes: list[int] = []
        self.file_bytes: list[int] = []

    def save(self, step: int, state: Any, *, timed: bool = True) -> None:
        # Each save starts on a quiet disk: the other manager's writeback and the discards of
        # the steps retention deleted (ext4 mounted with discard) would otherwise land in it.
        os.sync()
        time.sleep(SETTLE_SECONDS)
        before = written_bytes()
        started = time.perf_counter()
        info = self.manager.save(step, state)
        seconds = time.perf_counter() - started
        if timed:
            self.seconds.append(seconds)
            self.kernel_bytes.append(written_bytes() - before)
            assert isinstance(info, tk.SaveInfo)
            self.file_bytes.append(info.file_bytes)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def run(
    work: str, state: dict[str, Any], head: dict[str, torch.Tensor], rounds: int, full_tune: bool
) -> tuple[Measured, Measured]:
    """Save ``rounds`` training steps with an incremental manager and a whole-step one, in
    alternating order after one untimed first step each; return both."""
    tag = "full" if full_tune else "frozen"
    incremental = Measured(tk.CheckpointManager(os.path.join(work, f"{tag}-inc"), keep_last=3))
    whole = Measured(
        tk.CheckpointManager(os.path.join(work, f"{tag}-whole"), keep_last=3, incremental=False)
    )
    base = state["base"] if full_tune else None
    for measured in (incremental, whole):
        measured.save(1, state, timed=False)
    for r in range(rounds):
        train_step(head, base)
        order = (incremental, whole) if r % 2 == 0 else (whole, incremental)
        for measured in order:
            measured.save(r + 2, state)
        progress_to_stderr(
            f"{tag} round {r + 1}/{rounds}: incremental {incremental.seconds[-1]:.3f} s, "
            f"whole {whole.seconds[-1]:.3f} s"
        )
    for measured in (incremental, whole):
        measured.manager.close()
    return incremental, whole


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-mib", type=int, default=1024, help="frozen base (default 1024)")
    parser.add_argument("--head-mib", type=int, default=4, help="trainable head (default 4)")
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per case (default 8)")
    parser.add_argument("--dir", default=None, help="directory on the disk to measure (default: .)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="torchkeep-incremental-", dir=args.dir or os.getcwd())
    m = machine_info(work)
    try:
        base = make_state_dict(args.base_mib * MIB)
        head = make_head(args.head_mib * MIB)
        state = {"base": base, "head": head}
        base_bytes, head_bytes = state_bytes(base), state_bytes(head)
        total = base_bytes + head_bytes
        frozen_inc, frozen_whole = run(work, state, head, args.rounds, full_tune=False)
        kept_inc = disk_used(os.path.join(work, "frozen-inc"))
        kept_whole = disk_used(os.path.join(work, "frozen-whole"))
        full_inc, full_whole = run(work, state, head, args.rounds, full_tune=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    changed = head_bytes
    per_step = statistics.median(frozen_inc.kernel_bytes)
    reported = statistics.median(frozen_inc.file_bytes)
    byte_limit = 1.1 * changed + MIB
    time_ratio = frozen_inc.median / frozen_whole.median
    one_full = statistics.median(frozen_whole.kernel_bytes)
    disk_limit = 1.1 * one_full + changed
    full_ratio = full_inc.median / full_whole.median

    def yes(ok: bool) -> str:
        return "yes" if ok else "no"

    lines = [
        *script_header("torchkeep incremental checkpoints", "benchmarks/incremental.py", argv, m),
        f"- state: a frozen base of {base_bytes / MIB:.0f} MiB ({len(base)} tensors) and a "
        f"trainable head with its two Adam moments, {head_bytes / MIB:.0f} MiB in all "
        f"({total / MIB:.0f} MiB per step saved whole)",
        f"- {args.rounds} timed steps per case after one untimed first step, the two managers "
        f"alternating; keep_last=3; durable saves; sync and {SETTLE_SECONDS} s before each; "
        "medians",
        "- bytes written: /proc/self/io write_bytes of this process during the save (data, "
        "manifest and directory metadata as the kernel counts them)",
        "",
        "| fine-tune | manager | s per step | bytes written per step | SaveInfo.file_bytes | "
        "disk used by the kept steps |",
        "|---|---|---:|---:|---:|---:|",
        f"| frozen base | incremental (default) | {frozen_inc.median:.3f} | "
        f"{per_step / MIB:.2f} MiB | {reported / MIB:.2f} MiB | {kept_inc / MIB:.0f} MiB |",
        f"| frozen base | incremental=False | {frozen_whole.median:.3f} | "
        f"{one_full / MIB:.2f} MiB | {statistics.median(frozen_whole.file_bytes) / MIB:.2f} MiB | "
        f"{kept_whole / MIB:.0f} MiB |",
        f"| everything trainable | incremental (default) | {full_inc.median:.3f} | "
        f"{statistics.median(full_inc.kernel_bytes) / MIB:.2f} MiB | "
        f"{statistics.median(full_inc.file_bytes) / MIB:.2f} MiB | – |",
        f"| everything trainable | incremental=False | {full_whole.median:.3f} | "
        f"{statistics.median(full_whole.kernel_bytes) / MIB:.2f} MiB | "
        f"{statistics.median(full_whole.file_bytes) / MIB:.2f} MiB | – |",
        "",
        "| target | measured | met |",
        "|---|---|---|",
        f"| bytes written per step ≤ 1.1× the changed bytes + 1 MiB ({byte_limit / MIB:.2f} MiB) "
        f"| {per_step / MIB:.2f} MiB | {yes(per_step <= byte_limit)} |",
        f"| save time per step ≤ 0.1× a whole save | {time_ratio:.3f}× "
        f"({frozen_inc.median:.3f} s / {frozen_whole.median:.3f} s) | {yes(time_ratio <= 0.1)} |",
        f"| disk used by keep_last=3 ≤ 1.1× one whole save + the changed bytes "
        f"({disk_limit / MIB:.0f} MiB) | {kept_inc / MIB:.0f} MiB | {yes(kept_inc <= disk_limit)} |",
        f"| full fine-tune no slower than incremental=False | {full_ratio:.3f}× "
        f"({full_inc.median:.3f} s / {full_whole.median:.3f} s) | {yes(full_ratio <= 1.0)} |",
        "",
        "All step times: "
        + "; ".join(
            f"{name} {' '.join(f'{s:.3f}' for s in measured.seconds)}"
            for name, measured in (
                ("frozen/incremental", frozen_inc),
                ("frozen/whole", frozen_whole),
                ("full/incremental", full_inc),
                ("full/whole", full_whole),
            )
        ),
    ]
    publish("\n".join([*lines, ""]), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
