"""Exact resumption through the CheckpointManager: a run stopped mid-epoch and resumed in a new
process, runs SIGKILLed at random moments (before, during and after saves), and the
ResumableSampler that makes mid-epoch resumption possible."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import torchkeep as tk
from torchkeep.format import MANIFEST_FILE


def assert_bitwise_equal(a: Any, b: Any, where: str = "state") -> None:
    """Every tensor torch.equal (same dtype and shape), every other value ==, recursively."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{list(a.shape)}"
        assert torch.equal(a, b), f"{where}: tensors differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), f"{where}: {a!r} != {b!r}"
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{where}.{n}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def _losses(stdout: str) -> dict[int, str]:
    """The ``loss STEP HEX`` lines a training script printed: each step's exact loss."""
    out = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "loss":
            out[int(parts[1])] = parts[2]
    return out


# ---------------------------------------------------------------------------------------------
# 1. Stopped in the middle of epoch 2, resumed in a new process: bitwise the uninterrupted run.

TUTORIAL_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset
    import torchkeep as tk

    mode, root, async_save, out = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4]
    EPOCHS, BATCH = 3, 8  # 50 samples: 7 batches an epoch (the last of 2)
    # step 17 is the 3rd batch of epoch 2; step 14 the last (partial) batch of epoch 1
    STOP_AT = int(os.environ.get("TK_STOP_AT", "17"))
    torch.set_num_threads(1)
    torch.manual_seed(0)

    data = torch.Generator().manual_seed(1234)
    x = torch.randn(50, 10, generator=data)
    y = (x[:, 0] + x[:, 1] > 0).long()
    dataset = TensorDataset(x, y)
    sampler = tk.ResumableSampler(dataset, seed=42)
    # generator=: without one, every iter(loader) draws a seed from the global torch RNG, even
    # with num_workers=0; the resumed run creates its iterator mid-epoch, after the RNG was
    # restored, and that extra draw would shift every dropout mask after it.
    loader = DataLoader(
        dataset, batch_size=BATCH, sampler=sampler, num_workers=0, generator=torch.Generator()
    )


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 32)
            self.drop = nn.Dropout(0.3)
            self.fc2 = nn.Linear(32, 2)

        def forward(self, x):
            return self.fc2(self.drop(torch.relu(self.fc1(x))))


    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    counters = {"epoch": torch.zeros((), dtype=torch.int64), "step": torch.zeros((), dtype=torch.int64)}
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "sampler": sampler,
        "rng": tk.RNGState(),
        "counters": counters,
    }


    def train(mgr):
        step = 0
        if mgr is not None:
            step = mgr.restore(state) or 0
            print("restored", step, int(counters["epoch"]), int(counters["step"]),
                  sampler.epoch, sampler.index, flush=True)
        for epoch in range(sampler.epoch, EPOCHS):
            sampler.set_epoch(epoch)  # keeps the position when resuming inside this epoch
            model.train()
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                step += 1
                print("loss", step, loss.item().hex(), flush=True)
                if mgr is not None:
                    counters["epoch"].fill_(epoch)
                    counters["step"].fill_(step)
                    mgr.save(step, state, metrics={"loss": loss})
                    if mode == "stop" and step == STOP_AT:
                        sys.exit(3)  # inside the with: the manager closes (async: waits)
            scheduler.step()
        return step


    if mode == "full":
        step = train(None)
    else:
        with tk.CheckpointManager(root, async_save=async_save) as mgr:
            step = train(mgr)
    tk.save(
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler,
         "step": step},
        out,
    )
    """
)


def _tutorial(tmp_path, *args: str, stop_at: int = 17) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "tutorial.py"
    if not script.exists():
        script.write_text(TUTORIAL_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), *args],
        env={**os.environ, "TK_STOP_AT": str(stop_at)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, Any], dict[int, str]]:
    """Run A: the tutorial loop, three epochs, never stopped, no checkpoint manager."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    done = _tutorial(tmp, "full", str(tmp / "unused"), "0", str(tmp / "final.safetensors"))
    assert done.returncode == 0, done.stderr
    losses = _losses(done.stdout)
    assert sorted(losses) == list(range(1, 22)), done.stdout
    return tk.load(tmp / "final.safetensors"), losses


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_interrupted_and_resumed_training_is_bitwise_identical(tmp_path, uninterrupted, async_save):
    reference, reference_losses = uninterrupted
    flag = "1" if async_save else "0"
    root = tmp_path / "checkpoints"

    # Run B, first process: saves every step, exits in the middle of epoch 2 (after step 17).
    stopped = _tutorial(tmp_path, "stop", str(root), flag, str(tmp_path / "never.safetensors"))
    assert stopped.returncode == 3, stopped.stderr
    assert "restored 0 0 0 0 0" in stopped.stdout  # a fresh start: nothing to restore
    first = _losses(stopped.stdout)
    assert sorted(first) == list(range(1, 18))
    assert not (tmp_path / "never.safetensors").exists()

    with tk.CheckpointManager(root) as mgr:
        assert mgr.steps() == [15, 16, 17]  # keep_last=3; the last save committed before exit
        assert tk.verify(mgr.path(17)).ok
        assert mgr.metrics(17) == {"loss": float.fromhex(first[17])}

    # Run B, second process: restores step 17 (epoch 2, 24 samples in) and finishes.
    resumed = _tutorial(tmp_path, "resume", str(root), flag, str(tmp_path / "final.safetensors"))
    assert resumed.returncode == 0, resumed.stderr
    # restored STEP, counters (epoch, step), sampler (epoch, index)
    assert "restored 17 2 17 2 24" in resumed.stdout, resumed.stdout
    second = _losses(resumed.stdout)
    assert sorted(second) == list(range(18, 22))  # the global step continues from 17

    # Every loss of the interrupted run, bit for bit, then every final tensor.
    for step, loss in {**first, **second}.items():
        assert loss == reference_losses[step], (
            f"step {step}: loss {loss} != {reference_losses[step]}"
        )
    final = tk.load(tmp_path / "final.safetensors")
    assert final["step"] == 21
    assert_bitwise_equal(final, reference)
    assert final["optimizer"]["state"]  # momentum buffers exist and were compared
    with tk.CheckpointManager(root) as mgr:
        assert mgr.steps() == [19, 20, 21]


def test_stop_on_the_last_partial_batch_of_an_epoch_resumes_bitwise(tmp_path, uninterrupted):
    """Saved while the last (partial) batch of epoch 1 runs: the sampler has handed out the
    whole epoch, but the epoch's end (scheduler.step) has not run; set_epoch keeps it there."""
    reference, reference_losses = uninterrupted
    root = tmp_path / "checkpoints"
    stopped = _tutorial(tmp_path, "stop", str(root), "0", str(tmp_path / "x"), stop_at=14)
    assert stopped.returncode == 3, stopped.stderr
    resumed = _tutorial(tmp_path, "resume", str(root), "0", str(tmp_path / "final.safetensors"))
    assert resumed.returncode == 0, resumed.stderr
    assert "restored 14 1 14 1 50" in resumed.stdout, resumed.stdout
    losses = {**_losses(stopped.stdout), **_losses(resumed.stdout)}
    assert losses == reference_losses
    assert_bitwise_equal(tk.load(tmp_path / "final.safetensors"), reference)


# ---------------------------------------------------------------------------------------------
# 2. SIGKILL at random moments: before, during and after saves, sync and async.

KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    import torch
    from torch import nn
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, TensorDataset
    import torchkeep as tk

    mode, root, out = sys.argv[1], sys.argv[2], sys.argv[3]  # mode: reference, sync or async
    EPOCHS, N, BATCH = 4, 100, 8  # 13 batches an epoch (the last of 4): 52 steps


    def say(line):
        os.write(1, (line + "\\n").encode())  # one write: lines of two threads never mix


    torch.set_num_threads(1)
    torch.manual_seed(0)
    data = torch.Generator().manual_seed(99)
    x = torch.randn(N, 16, generator=data)
    y = (x[:, :4].sum(1) > 0).long()
    dataset = TensorDataset(x, y)
    sampler = tk.ResumableSampler(dataset, seed=5)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, generator=torch.Generator())
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Dropout(0.25), nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    # Stepped every batch: no end-of-epoch work that a checkpoint could fall before or after.
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=20, gamma=0.5)
    big = torch.zeros(4 * 2**20)  # 16 MiB, so that saves take a good part of each step
    # Never changes, and is most of a step's bytes: each save shares its shard with the step
    # before (an incremental save) instead of writing it.
    frozen = torch.randn(6 * 2**20, generator=torch.Generator().manual_seed(7))
    expected_frozen = frozen.clone()
    counter = torch.zeros((), dtype=torch.int64)
    state = {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        "sampler": sampler,
        "rng": tk.RNGState(),
        "big": big,
        "frozen": frozen,
        "step": counter,
    }


    def train(mgr):
        step = 0
        if mgr is not None:
            step = mgr.restore(state) or 0
            assert int(counter) == step, (int(counter), step)
            assert torch.equal(big[:5], torch.full((5,), float(step))), big[:5]
            assert torch.equal(frozen, expected_frozen)
        say(f"resumed {step}")
        for epoch in range(sampler.epoch, EPOCHS):
            model.train()
            for xb, yb in loader:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                scheduler.step()
                big.add_(1.0)
                step += 1
                counter.fill_(step)
                say(f"loss {step} {loss.item().hex()}")
                time.sleep(0.02)  # the rest of a real training step
                if mgr is None:
                    continue
                future = mgr.save(step, state)
                if mode == "async":
                    future.add_done_callback(
                        lambda f, s=step: f.exception() is None and say(f"committed {s}")
                    )
                else:
                    say(f"committed {step}")
        return step


    if mode == "reference":
        step = train(None)
    else:
        with tk.CheckpointManager(root, keep_last=2, async_save=mode == "async") as mgr:
            step = train(mgr)
    tk.save(
        {"model": model, "optimizer": optimizer, "scheduler": scheduler, "sampler": sampler,
         "big": big, "step": step},
        out,
    )
    say("done")
    """
)
TOTAL_STEPS = 52
KILLS_PER_MODE = 15


class Child:
    """A training process whose stdout lines are collected as they arrive."""

    def __init__(self, script, mode: str, root, out, log) -> None:
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), mode, str(root), str(out)],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
            )
        self.lines: list[list[str]] = []
        self.eof = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.split())
                self._cond.notify_all()
        with self._cond:
            self.eof = True
            self._cond.notify_all()

    def losses_seen(self) -> int:
        return sum(1 for parts in self.lines if parts and parts[0] == "loss")

    def wait_for_losses(self, n: int, timeout: float) -> bool:
        """Wait until the run printed ``n`` losses (finished ``n`` steps); False at EOF."""
        with self._cond:
            self._cond.wait_for(lambda: self.eof or self.losses_seen() >= n, timeout)
            return self.losses_seen() >= n

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)

    def finish(self, timeout: float) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        return self.proc.returncode

    def values(self, tag: str) -> list[int]:
        return [int(p[1]) for p in self.lines if len(p) >= 2 and p[0] == tag]

    def stderr_tail(self) -> str:
        with open(self.log) as f:
            return f.read()[-3000:]


def _check_root(root, mode: str, previous: int | None, committed: int | None, info: dict) -> int:
    """After a kill: the state of the root, then a fresh manager's view of it; returns latest."""
    names = sorted(os.listdir(root)) if os.path.isdir(root) else []
    info["stale"] = [n for n in names if n.startswith(".step_")]
    unmanifested = [
        n
        for n in names
        if n.startswith("step_") and not os.path.exists(os.path.join(root, n, MANIFEST_FILE))
    ]
    with tk.CheckpointManager(root, keep_last=2) as mgr:
        steps = mgr.steps()
        latest = mgr.latest_step
        left = sorted(n for n in os.listdir(root) if n.startswith(".step_"))
        info.update(steps=steps, latest=latest)
        assert not left, f"{mode}: stale directories survived opening the manager: {left}; {info}"
        assert not mgr.problems, f"{mode}: {mgr.problems}; {info}"
        assert not unmanifested, f"{mode}: step directories without a manifest: {unmanifested}"
        for step in steps:
            assert os.path.exists(os.path.join(mgr.path(step), MANIFEST_FILE)), (step, info)
        assert len(steps) <= 3, f"{mode}: keep_last=2 plus the one being retired at most; {info}"
        if previous is not None:
            assert latest is not None and latest >= previous, (
                f"{mode}: committed steps went back from {previous}; {info}"
            )
        if committed is not None:
            assert latest is not None and latest >= committed, (
                f"{mode}: step {committed} was reported committed but the latest is {latest}; {info}"
            )
        for step in steps:
            report = tk.verify(mgr.path(step))
            assert report.ok, f"{mode}: step {step} does not verify: {report.problems}; {info}"
    return latest


@pytest.mark.slow
def test_sigkill_at_random_moments_never_loses_the_last_committed_step(tmp_path):
    began = time.monotonic()
    script = tmp_path / "train.py"
    script.write_text(KILL_SCRIPT)

    reference_run = Child(
        script, "reference", tmp_path / "unused", tmp_path / "ref.safetensors", tmp_path / "ref.log"
    )
    assert reference_run.finish(timeout=120) == 0, reference_run.stderr_tail()
    reference_losses = {int(p[1]): p[2] for p in reference_run.lines if p[:1] == ["loss"]}
    assert sorted(reference_losses) == list(range(1, TOTAL_STEPS + 1))
    reference = tk.load(tmp_path / "ref.safetensors")

    rng = random.Random(20250611)
    history: list[dict[str, Any]] = []

    def table() -> str:
        return "\n".join(str(h) for h in history)

    for mode in ("sync", "async"):
        root = tmp_path / f"ckpt-{mode}"
        out = tmp_path / f"final-{mode}.safetensors"
        latest: int | None = None
        for k in range(KILLS_PER_MODE + 1):
            last = k == KILLS_PER_MODE
            child = Child(script, mode, root, out, tmp_path / f"{mode}-{k}.log")
            info: dict[str, Any] = {"mode": mode, "run": k, "resumed_expected": latest}
            history.append(info)
            try:
                if last:
                    info["plan"] = "finish"
                    code = child.finish(timeout=120)
                    assert code == 0, f"{child.stderr_tail()}\n{table()}"
                elif rng.random() < 0.2:
                    # Before any save: during the import, the restore or the first step.
                    delay = rng.uniform(0.0, 2.2)
                    info["plan"] = f"kill {delay:.2f}s after start"
                    time.sleep(delay)
                else:
                    # After the n-th step's loss line, 0-120 ms into: the end of that step
                    # (20 ms), its save (~65 ms of 16 MiB), or the next step.
                    n = rng.randint(1, 3)
                    delay = rng.uniform(0.0, 0.12)
                    info["plan"] = f"kill {delay * 1000:.0f}ms after step {n} of this run"
                    reached = child.wait_for_losses(n, timeout=60)
                    assert reached, f"run ended early: {child.stderr_tail()}\n{table()}"
                    time.sleep(delay)
                if not last:
                    assert child.proc.poll() is None, (
                        f"ended before the kill: {child.stderr_tail()}\n{table()}"
                    )
                    child.kill()
                    assert child.proc.returncode == -signal.SIGKILL
            finally:
                child.kill()

            resumed = child.values("resumed")
            committed = child.values("committed")
            losses = child.values("loss")
            info.update(
                resumed=resumed[0] if resumed else None,
                reached=max(losses, default=None),
                committed=max(committed, default=None),
            )
            if resumed:
                assert resumed[0] == (latest or 0), f"did not resume from the latest\n{table()}"
            for parts in child.lines:
                if parts[:1] == ["loss"]:
                    step, loss = int(parts[1]), parts[2]
                    assert loss == reference_losses[step], (
                        f"{mode} run {k}: step {step} loss {loss} != reference "
                        f"{reference_losses[step]} (resumed from {info['resumed']})\n{table()}"
                    )
            latest = _check_root(root, mode, latest, info["committed"], info)

        assert latest == TOTAL_STEPS, table()
        # The runs were incremental: the last step shares the frozen tensor's shard.
        with open(root / f"step_{TOTAL_STEPS:09d}" / MANIFEST_FILE) as f:
            assert json.load(f).get("shared"), "the last step shares nothing"
        assert child.values("loss")[-1] == TOTAL_STEPS
        final = tk.load(out)
        assert final["step"] == TOTAL_STEPS
        assert_bitwise_equal(final, reference, f"{mode} final")

    kills = [h for h in history if h["plan"] != "finish"]
    during = [h for h in kills if h["stale"]]  # a kill mid-save leaves its staging directory
    early = [h for h in kills if h["resumed"] is None]
    elapsed = time.monotonic() - began
    summary = (
        f"{len(kills)} kills in {elapsed:.1f}s: {len(during)} left a save half-written, "
        f"{len(early)} before the run had restored, "
        f"{len(kills) - len(during) - len(early)} between saves"
    )
    print(table(), summary, sep="\n")
    assert len(kills) == 2 * KILLS_PER_MODE
    # The timing does what this test claims: many kills land inside a save.
    assert len(during) >= 3, f"{summary}\n{table()}"


# ---------------------------------------------------------------------------------------------
# 3. The sampler.


def _randperm(n: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def test_resumable_sampler(tmp_path):
    sampler = tk.ResumableSampler(list(range(23)), seed=11)
    assert len(sampler) == 23
    # Like RandomSampler: a new order each epoch, from seed + epoch.
    for epoch in range(3):
        assert list(sampler) == _randperm(23, 11 + epoch) == sampler.order(epoch)
        assert (sampler.epoch, sampler.index) == (epoch, 23)  # the next iteration moves on
    assert _randperm(23, 11) != _randperm(23, 12)

    # Resumes in the middle of an epoch, then goes on to the next.
    sampler.resume(1, 9)
    assert list(sampler) == _randperm(23, 12)[9:]
    assert (sampler.epoch, sampler.index) == (1, 23)
    assert list(sampler) == _randperm(23, 13)
    sampler.resume(4, 23)  # an epoch fully used: nothing left of it
    assert list(sampler) == []
    assert (sampler.epoch, sampler.index) == (4, 23)

    # set_epoch: the loop's epoch. Right after a restore into the same epoch it keeps the
    # position (a finished epoch yields nothing: its end-of-epoch work comes next); otherwise
    # the epoch starts from its first sample, as with DistributedSampler.
    sampler.resume(4, 23)
    sampler.set_epoch(4)
    assert list(sampler) == []
    sampler.set_epoch(4)
    assert list(sampler) == _randperm(23, 15)
    sampler.set_epoch(6)
    assert list(sampler) == _randperm(23, 17)
    sampler.resume(6, 20)
    sampler.set_epoch(6)
    assert list(sampler) == _randperm(23, 17)[20:]
    with pytest.raises(ValueError, match="epoch"):
        sampler.set_epoch(-1)

    # Stopped mid-epoch, saved with tk.save, loaded into a fresh sampler (of another seed).
    sampler = tk.ResumableSampler(list(range(23)), seed=11)
    it = iter(sampler)
    head = [next(it) for _ in range(7)]
    assert sampler.state_dict() == {
        "epoch": 0,
        "index": 7,
        "seed": 11,
        "length": 23,
        "shuffle": True,
    }
    tk.save({"sampler": sampler}, tmp_path / "s.safetensors")
    fresh = tk.ResumableSampler(list(range(23)), seed=999)
    tk.load(tmp_path / "s.safetensors", into={"sampler": fresh})
    assert fresh.state_dict() == sampler.state_dict()
    assert head + list(fresh) == _randperm(23, 11)
    assert list(fresh) == _randperm(23, 12)

    # Through a DataLoader (num_workers=0): the batches after the stop are the ones not seen.
    dataset = TensorDataset(torch.arange(50))
    whole = DataLoader(dataset, batch_size=8, sampler=tk.ResumableSampler(dataset, seed=3))
    expected = [b[0].tolist() for b in whole]
    sampler = tk.ResumableSampler(dataset, seed=3)
    it = iter(DataLoader(dataset, batch_size=8, sampler=sampler))
    seen = [next(it)[0].tolist() for _ in range(3)]
    saved = sampler.state_dict()
    assert saved["index"] == 24
    other = tk.ResumableSampler(dataset, seed=3)
    other.load_state_dict(saved)
    rest = [b[0].tolist() for b in DataLoader(dataset, batch_size=8, sampler=other)]
    assert seen + rest == expected

    # A different dataset length, or shuffle: refused, the sampler unchanged.
    for changed in (tk.ResumableSampler(51, seed=3), tk.ResumableSampler(50, shuffle=False)):
        before = changed.state_dict()
        with pytest.raises(ValueError, match="the dataset changed"):
            changed.load_state_dict(saved)
        assert changed.state_dict() == before
    with pytest.raises(tk.StateMismatchError, match="sampler"):
        tk.load(tmp_path / "s.safetensors", into={"sampler": tk.ResumableSampler(22)})

    # Out of range positions.
    for epoch, index in ((0, 24), (0, -1), (-1, 0)):
        with pytest.raises(ValueError, match="cannot resume"):
            tk.ResumableSampler(23).resume(epoch, index)
    with pytest.raises(ValueError, match="length"):
        tk.ResumableSampler(-1)

    # shuffle=False: the sequential order, every epoch, and resumable too.
    plain = tk.ResumableSampler(range(10), shuffle=False, seed=4)
    assert list(plain) == list(range(10))
    assert list(plain) == list(range(10))
    plain.resume(5, 6)
    assert list(plain) == [6, 7, 8, 9]
    assert plain.epoch == 5
