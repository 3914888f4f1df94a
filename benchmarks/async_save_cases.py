"""Async saves in a training loop: how long ``save()`` blocks, and what saves in flight cost
the training steps.

* Blocking time: ``CheckpointManager(async_save=True).save()`` returns once the state is copied
  to its staging buffers; compared with a synchronous ``torch.save`` of the same state dict (to
  the page cache, and with an fsync), and with the device-to-host copy of the same bytes into
  pinned memory when the tensors are on a GPU.
* Step time: a training loop (an MLP with Adam) whose step lasts longer than a save, run in
  alternating phases without saves and with an async save started every step.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

import torchkeep as tk
from torchkeep.bench.workload import MIB, fsync_file, make_state_dict, remove_file

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BlockingResult:
    state_bytes: int
    device: str
    torchkeep_blocking: float  # median seconds save() blocked
    torchkeep_total: float  # median seconds until the save was durable
    torch_save: float  # median seconds of torch.save (page cache)
    torch_save_fsync: float  # median seconds of torch.save + fsync
    copy_to_pinned: float | None  # median seconds of a device-to-host copy (GPU only)


def _median(runs: list[float]) -> float:
    return statistics.median(runs)


def measure_blocking(
    size_bytes: int,
    directory: str,
    *,
    repeats: int,
    device: str = "cpu",
    progress: Progress | None = None,
) -> BlockingResult:
    """Time async ``save()`` calls against ``torch.save`` of the same state dict."""
    state = {k: v.to(device) for k, v in make_state_dict(size_bytes).items()}
    nbytes = sum(t.nbytes for t in state.values())
    blocking: list[float] = []
    total: list[float] = []
    plain: list[float] = []
    durable: list[float] = []
    copies: list[float] = []
    target = os.path.join(directory, "torch.pt")
    pinned = (
        {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in state.items()}
        if device != "cpu"
        else None
    )
    with tk.CheckpointManager(
        os.path.join(directory, "async"), keep_last=1, async_save=True
    ) as mgr:
        for run in range(repeats + 1):  # the first run allocates the staging buffers: warm-up
            started = time.perf_counter()
            future = mgr.save(run, {"model": state})
            returned = time.perf_counter()
            assert not isinstance(future, tk.container.SaveInfo)
            future.result()
            done = time.perf_counter()
            remove_file(target)
            t0 = time.perf_counter()
            torch.save(state, target)
            t1 = time.perf_counter()
            fsync_file(target)
            t2 = time.perf_counter()
            if pinned is not None:
                torch.cuda.synchronize()
                t3 = time.perf_counter()
                for k, v in state.items():
                    pinned[k].copy_(v, non_blocking=True)
                torch.cuda.synchronize()
                copies.append(time.perf_counter() - t3)
            if run == 0:
                continue
            blocking.append(returned - started)
            total.append(done - started)
            plain.append(t1 - t0)
            durable.append(t2 - t0)
            if progress is not None:
                progress(
                    f"async save blocked {blocking[-1]:.3f} s (durable after {total[-1]:.3f} s); "
                    f"torch.save {plain[-1]:.3f} s, + fsync {durable[-1]:.3f} s"
                )
    remove_file(target)
    return BlockingResult(
        nbytes,
        device,
        _median(blocking),
        _median(total),
        _median(plain),
        _median(durable),
        _median(copies[1:]) if copies[1:] else None,
    )


@dataclass(frozen=True)
class StepResult:
    state_bytes: int
    steps_per_phase: int
    phases: int
    step_without: float  # mean seconds per step, no saves
    step_with: float  # mean seconds per step, an async save started every step
    save_seconds: float  # median seconds from save() to durable

    @property
    def ratio(self) -> float:
        return self.step_with / self.step_without


def measure_steps(
    directory: str,
    *,
    width: int = 2048,
    batch: int = 8192,
    steps_per_phase: int = 6,
    phases: int = 3,
    progress: Progress | None = None,
) -> StepResult:
    """Alternate phases of training without and with an async save every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
    optimizer = torch.optim.Adam(model.parameters())
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    state: Mapping[str, object] = {"model": model, "optimizer": optimizer}

    def step() -> None:
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()

    step()  # creates Adam's state
    without: list[float] = []
    with_saves: list[float] = []
    saves: list[float] = []
    with tk.CheckpointManager(
        os.path.join(directory, "steps"), keep_last=1, async_save=True
    ) as mgr:
        mgr.save(0, state)
        mgr.wait()
        number = 1
        for phase in range(phases):
            started = time.perf_counter()
            for _ in range(steps_per_phase):
                step()
            without.append((time.perf_counter() - started) / steps_per_phase)
            mgr.wait()
            started = time.perf_counter()
            for _ in range(steps_per_phase):
                step()
                begun = time.perf_counter()
                future = mgr.save(number, state)
                number += 1
                assert not isinstance(future, tk.container.SaveInfo)

                def note(_: object, begun: float = begun) -> None:
                    saves.append(time.perf_counter() - begun)

                future.add_done_callback(note)
            with_saves.append((time.perf_counter() - started) / steps_per_phase)
            mgr.wait()
            if progress is not None:
                progress(
                    f"phase {phase + 1}/{phases}: step {without[-1]:.3f} s without saves, "
                    f"{with_saves[-1]:.3f} s with an async save every step"
                )
    nbytes = sum(t.nbytes for t in model.state_dict().values()) * 3  # weights + Adam's two
    return StepResult(
        nbytes,
        steps_per_phase,
        phases,
        statistics.mean(without),
        statistics.mean(with_saves),
        _median(saves),
    )


def format_training(blocking: list[BlockingResult], steps: StepResult | None) -> str:
    lines = [
        "| state | device | async save() blocks s | durable after s | torch.save s | "
        "torch.save + fsync s | blocking / torch.save | D2H copy to pinned s | blocking / copy |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in blocking:
        copy = "–" if b.copy_to_pinned is None else f"{b.copy_to_pinned:.3f}"
        over = (
            "–" if b.copy_to_pinned is None else f"{b.torchkeep_blocking / b.copy_to_pinned:.2f}×"
        )
        lines.append(
            f"| {b.state_bytes / MIB:.0f} MiB | {b.device} | {b.torchkeep_blocking:.3f} | "
            f"{b.torchkeep_total:.3f} | {b.torch_save:.3f} | {b.torch_save_fsync:.3f} | "
            f"{100 * b.torchkeep_blocking / b.torch_save:.1f}% | {copy} | {over} |"
        )
    text = "\n".join(lines) + "\n"
    if steps is not None:
        text += (
            "\n| training state | steps per phase × phases | step without saves s | "
            "step with an async save every step s | ratio | save until durable s |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            f"| {steps.state_bytes / MIB:.0f} MiB | {steps.steps_per_phase} × {steps.phases} | "
            f"{steps.step_without:.3f} | {steps.step_with:.3f} | {steps.ratio:.3f}× | "
            f"{steps.save_seconds:.3f} |\n"
        )
    return text
