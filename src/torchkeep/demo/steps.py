"""The steps of the demo, in order, each a function that reports what it did as a ``Step``.

``run_demo`` runs them one after another on the ``Demo`` they share: where they write, how they
report, and what the earlier steps made (the reference run's epochs, the model, its inference in
a fresh process). A step that leaves nothing for the next ones to work on stops the demo.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import torchkeep as tk
from torchkeep.demo.processes import Progress, infer, run_command, run_training
from torchkeep.demo.report import DemoResult, Step, finish, human_size, size_on_disk
from torchkeep.demo.training import (
    CHILD_TIMEOUT,
    EPOCHS,
    KEEP_BEST,
    KEEP_LAST,
    KILLED_AT,
    DigitsMLP,
    evaluate,
    write_digits,
)
from torchkeep.tree import flatten


@dataclass
class Demo:
    """What the steps share: where they write, how they report, what earlier steps made."""

    out_dir: Path
    result: DemoResult
    report: Callable[[Step], None]
    progress: Progress
    data: Path
    sizes: dict[str, int]
    reference: list[dict[str, Any]] = field(default_factory=list)  # the uninterrupted epochs
    interrupted_at: float = 0.0  # when the run to be killed started: the resume times from it
    model: DigitsMLP | None = None  # the reference run's final model
    accuracy: float = 0.0  # its test accuracy in this process
    loaded: dict[str, Any] = field(default_factory=dict)  # what the fresh process saw
    stopped: bool = False  # set by a step that leaves nothing for the next ones

    @property
    def reference_root(self) -> Path:
        return self.out_dir / "uninterrupted"

    @property
    def root(self) -> Path:
        return self.out_dir / "interrupted"

    @property
    def model_dir(self) -> Path:
        return self.out_dir / "model"

    @property
    def half_dir(self) -> Path:
        return self.out_dir / "model-fp16"

    def add(self, step: Step) -> None:
        self.result.steps.append(step)
        self.report(step)


def _final_state(root: Path) -> dict[str, Any]:
    mgr = tk.CheckpointManager(root, keep_last=None)
    try:
        latest = mgr.latest_step
        assert latest is not None
        state: dict[str, Any] = tk.load(mgr.path(latest))
        return state
    finally:
        mgr.close()


def _identical(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, int]:
    """Whether two states are equal bit for bit: the same skeleton and values (as a save would
    write them), the same tensors byte for byte. Also the number of tensors compared."""
    fa, fb = flatten(a), flatten(b)

    def bits(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1).view(torch.uint8)

    ta, tb = fa.tensors, fb.tensors
    same = (
        fa.tree == fb.tree
        and fa.aliases == fb.aliases
        and ta.keys() == tb.keys()
        and all(
            ta[k].dtype == tb[k].dtype
            and ta[k].shape == tb[k].shape
            and torch.equal(bits(ta[k]), bits(tb[k]))
            for k in ta
        )
    )
    return same, len(ta)


class _Hostile:
    """Pickles as a call to os.system: what a malicious torch.save file holds."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (self.command,))


# ---------------------------------------------------------------------------------------------
# the steps


def train_uninterrupted(demo: Demo) -> None:
    """An uninterrupted run, the reference."""
    started = time.perf_counter()
    reference_root = demo.reference_root
    reference, _, _ = run_training(
        reference_root, demo.data, "training (uninterrupted run)", demo.progress
    )
    demo.reference = reference
    mgr = tk.CheckpointManager(reference_root, keep_last=None, monitor="val_loss")
    kept, best = mgr.steps(), mgr.best_step
    mgr.close()
    first, last = reference[0], reference[-1]
    sizes = demo.sizes
    demo.add(
        Step(
            "Trained the tutorials' MLP on handwritten digits with a CheckpointManager",
            f"{sizes['train']} training, {sizes['val']} validation, {sizes['test']} test "
            f"images; {EPOCHS} epochs in {time.perf_counter() - started:.1f} s, an asynchronous "
            f"save after each; validation loss {first['val_loss']:.3f} → {last['val_loss']:.3f}, "
            f"accuracy {last['val_accuracy']:.1%}. Kept steps {kept} "
            f"(keep_last={KEEP_LAST}, keep_best={KEEP_BEST} by val_loss: step {best})",
            ok=len(reference) == EPOCHS and best in kept,
        )
    )


def kill_mid_save(demo: Demo) -> None:
    """Training killed with SIGKILL in the middle of a save, its root reopened and verified."""
    demo.interrupted_at = time.perf_counter()
    root = demo.root
    _, paused, child = run_training(
        root, demo.data, "training (to be killed)", demo.progress, pause_at=KILLED_AT
    )
    if paused is None:
        demo.add(Step("Killed the training mid-save", "the training never reached the save", False))
        demo.stopped = True
        return
    partial = Path(paused["file"])
    child.send_signal(signal.SIGKILL)
    child.wait(CHILD_TIMEOUT)
    killed = child.returncode == -signal.SIGKILL
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(".step_"))
    mgr = tk.CheckpointManager(root, keep_last=None)  # opening the root clears dead saves
    steps, latest = mgr.steps(), mgr.latest_step
    left = sorted(p.name for p in root.iterdir() if p.name.startswith(".step_"))
    mgr.close()
    check = tk.verify(root / f"step_{latest:09d}") if latest is not None else None
    demo.add(
        Step(
            f"Killed the training process with SIGKILL in the middle of saving step {KILLED_AT}",
            f"{human_size(paused['written'])} of {human_size(paused['size'])} of "
            f"{partial.parent.name}/{partial.name} written when it died; committed steps "
            f"{steps}, the latest (step {latest}) verified: {check.tensors if check else 0} "
            f"tensors, every checksum matches; the half-written step is not listed, and its "
            f"staging directory was removed when the root was next opened",
            ok=killed
            and leftovers == [partial.parent.name]
            and not left
            and latest == KILLED_AT - 1
            and check is not None
            and check.ok
            and KILLED_AT not in steps,
        )
    )


def resume(demo: Demo) -> None:
    """The killed run resumed in a new process and compared with the reference, bit for bit."""
    root, reference = demo.root, demo.reference
    resumed, _, _ = run_training(root, demo.data, "training (resumed)", demo.progress)
    same_losses = [e["val_loss"] for e in resumed] == [
        e["val_loss"] for e in reference[KILLED_AT - 1 :]
    ]
    identical, count = _identical(_final_state(demo.reference_root), _final_state(root))
    demo.add(
        Step(
            f"Resumed from step {KILLED_AT - 1} in a new process",
            f"epochs {KILLED_AT}–{EPOCHS} in {time.perf_counter() - demo.interrupted_at:.1f} s; "
            f"the final checkpoint equals the uninterrupted run's bit for bit ({count} tensors: "
            f"weights, optimizer moments, every RNG state): {identical}; validation losses "
            f"equal: {same_losses}",
            ok=identical and same_losses,
        )
    )


def save_whole_model(demo: Demo) -> None:
    """The whole model, loaded where its class does not exist."""
    model = DigitsMLP()
    model.load_state_dict(_final_state(demo.reference_root)["model"])
    model.eval()
    test = tk.load(demo.data)["test"]
    _, accuracy = evaluate(model, test["x"], test["y"])
    model_dir = demo.model_dir
    tk.save_model(model, model_dir, example_inputs=torch.zeros(1, 1, 8, 8))
    loaded = infer(model_dir, demo.data)
    demo.model, demo.accuracy, demo.loaded = model, accuracy, loaded
    demo.add(
        Step(
            "Saved the whole model and loaded it in a fresh process without its class",
            f"the process imported torchkeep only (the class DigitsMLP "
            f"{'was imported there' if loaded['class_imported'] else 'was never imported'}); "
            f"rebuilt as {loaded['rebuilt_as']} from the exported "
            f"program; test accuracy {loaded['accuracy']:.1%} (in this process: {accuracy:.1%})",
            ok=not loaded["class_imported"] and loaded["accuracy"] == accuracy,
        )
    )


def fine_tune_frozen(demo: Demo) -> None:
    """A fine-tune of the last layer alone, saved incrementally: each step writes what changed."""
    assert demo.model is not None  # saved by an earlier step
    model = DigitsMLP()
    model.load_state_dict(demo.model.state_dict())
    model.requires_grad_(False)
    head = model.layers[-1]
    head.requires_grad_(True)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3)
    train = tk.load(demo.data)["train"]
    state = {"model": model, "optimizer": optimizer}
    written: list[int] = []
    shared: list[int] = []
    root = demo.out_dir / "fine-tune"
    with tk.CheckpointManager(root, keep_last=KEEP_LAST) as mgr:
        for step in range(1, 5):
            model.train()
            loss = torch.nn.functional.cross_entropy(model(train["x"]), train["y"])
            optimizer.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            info = mgr.save(step, state)
            assert isinstance(info, tk.SaveInfo)
            written.append(info.file_bytes)
            shared.append(info.shared_bytes)
        kept = mgr.steps()
        whole = all(tk.verify(mgr.path(s)).ok for s in kept)
    later = max(written[1:])
    demo.add(
        Step(
            "Fine-tuned the last layer with the rest frozen, saving every step incrementally",
            f"step 1 wrote the whole state ({human_size(written[0])}); each later step wrote "
            f"only the layer and its optimizer moments ({human_size(later)} at most) and shared "
            f"{human_size(shared[-1])} with the step before; kept steps {kept} each verify "
            f"whole on their own: {whole}",
            ok=whole and later < written[0] // 10 and min(shared[1:]) > 0,
        )
    )


def convert_to_float16(demo: Demo) -> None:
    """float16 for a small device."""
    model_dir, half_dir, loaded = demo.model_dir, demo.half_dir, demo.loaded
    tk.convert(model_dir, half_dir, dtype=torch.float16)
    half = infer(half_dir, demo.data)
    before, after = size_on_disk(model_dir), size_on_disk(half_dir)
    demo.add(
        Step(
            "Converted the model to float16",
            f"{human_size(before)} → {human_size(after)} ({after / before:.0%}); test accuracy "
            f"{loaded['accuracy']:.1%} → {half['accuracy']:.1%} ({half['dtype']})",
            ok=half["dtype"] == "float16" and abs(half["accuracy"] - loaded["accuracy"]) < 0.02,
        )
    )


# the command line on these files, a damaged copy and a hostile pickle


def inspect_model(demo: Demo) -> None:
    """``torchkeep inspect`` on the float16 model."""
    code, text = run_command("inspect", str(demo.half_dir))
    demo.add(
        Step(
            "torchkeep inspect model-fp16",
            "the model's tensors, tree and how it is rebuilt",
            code == 0,
            text,
        )
    )


def verify_with_bit_rot(demo: Demo) -> None:
    """``torchkeep verify`` on three good saves and a copy with one bit flipped."""
    damaged = demo.out_dir / "damaged" / f"step_{EPOCHS:09d}"
    shutil.copytree(demo.reference_root / f"step_{EPOCHS:09d}", damaged)
    shard = max(damaged.glob("*.safetensors"), key=lambda p: p.stat().st_size)
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit of bit rot
    shard.write_bytes(bytes(blob))
    good = demo.reference_root / f"step_{EPOCHS:09d}"
    code, text = run_command(
        "verify", str(good), str(demo.model_dir), str(demo.half_dir), str(damaged)
    )
    demo.add(
        Step(
            "torchkeep verify: three saves and a copy with one flipped bit",
            "every checksum of the good ones matches; the flipped bit is found and named",
            code == 1 and "CORRUPT" in text and text.count("CORRUPT") == 1,
            text,
        )
    )


def scan_hostile_pickle(demo: Demo) -> None:
    """``torchkeep scan`` and ``tk.load`` on a torch.save file that runs a command."""
    assert demo.model is not None  # saved by an earlier step
    hostile = demo.out_dir / "downloaded_model.pt"
    canary = demo.out_dir / "hostile-pickle-ran"
    torch.save({"model": demo.model.state_dict(), "hook": _Hostile(f"touch {canary}")}, hostile)
    code, text = run_command("scan", str(hostile))
    try:
        tk.load(hostile)
        refused = "loaded"
    except tk.UnsafeFileError as e:
        refused = f"tk.load refused it: {type(e).__name__}"
    demo.add(
        Step(
            "torchkeep scan on a hostile torch.save file (it calls os.system when unpickled)",
            f"{refused}; nothing ran ({canary.name} "
            f"{'EXISTS: the pickle ran' if canary.exists() else 'was never created'})",
            code == 1 and refused != "loaded" and not canary.exists(),
            text,
        )
    )


STEPS: tuple[Callable[[Demo], None], ...] = (
    train_uninterrupted,
    kill_mid_save,
    resume,
    save_whole_model,
    fine_tune_frozen,
    convert_to_float16,
    inspect_model,
    verify_with_bit_rot,
    scan_hostile_pickle,
)


def run_demo(out_dir: Path, *, report: Callable[[Step], None], progress: Progress) -> DemoResult:
    """Run every step of the demo, writing into ``out_dir``."""
    result = DemoResult(out_dir)
    data = out_dir / "data" / "digits.safetensors"
    data.parent.mkdir(parents=True, exist_ok=True)
    demo = Demo(out_dir, result, report, progress, data, write_digits(data))
    for step in STEPS:
        step(demo)
        if demo.stopped:
            break
    return finish(result)
