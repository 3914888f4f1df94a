"""``torchkeep demo``: the whole run in a child process, and its error paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import torchkeep as tk
from torchkeep import demo
from torchkeep.cli import main


def test_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run(
        [sys.executable, "-m", "torchkeep.cli", "demo", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    text = done.stdout + done.stderr
    assert done.returncode == 0, text
    assert "demo passed: 9 of 9 steps" in text
    assert "each later step wrote only the layer and its optimizer moments" in text
    assert "bit for bit (34 tensors: weights, optimizer moments, every RNG state): True" in text
    assert f"in the middle of saving step {demo.KILLED_AT}" in text
    assert f"committed steps [{demo.KILLED_AT - 2}, {demo.KILLED_AT - 1}]" in text
    assert "DigitsMLP was never imported" in text and "exported program" in text
    assert "hostile-pickle-ran was never created" in text
    assert "(float16)" in text
    assert "UNSAFE" in text and "posix.system" in text and "UnsafeFileError" in text
    assert text.count("CORRUPT") == 1 and "does not match its checksum" in text
    # What it leaves: the two runs' kept steps, both verified; the models; no hostile side effect.
    for run in ("uninterrupted", "interrupted"):
        steps = sorted(p.name for p in (out / run).iterdir() if p.name.startswith("step_"))
        assert steps == [f"step_{s:09d}" for s in (demo.EPOCHS - 1, demo.EPOCHS)]
        assert all(tk.verify(out / run / s).ok for s in steps)
    assert not any(p.name.startswith(".step_") for p in (out / "interrupted").iterdir())
    tuned = sorted(p.name for p in (out / "fine-tune").iterdir() if p.name.startswith("step_"))
    assert tuned == ["step_000000003", "step_000000004"]
    assert all(tk.verify(out / "fine-tune" / s).ok for s in tuned)
    assert tk.describe(out / "model-fp16").kind == "model"
    assert not (out / "hostile-pickle-ran").exists()
    assert not tk.verify(out / "damaged" / f"step_{demo.EPOCHS:09d}").ok


def test_demo_refuses_a_directory_that_is_not_empty(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().out
    assert (tmp_path / "keep.txt").read_text() == "mine"


def _fake_run(seen: list[Path], ok: bool):
    def run(out_dir: Path, *, report, progress) -> demo.DemoResult:
        seen.append(out_dir)
        (out_dir / "file.bin").write_bytes(b"x" * 10)
        progress("work", 1, 1)
        step = demo.Step("a step", "its detail", ok, "its output")
        report(step)
        result = demo.DemoResult(out_dir, [step])
        result.files = [out_dir / "file.bin"]
        return result

    return run


def test_without_out_the_demo_uses_a_temporary_directory_and_removes_it(monkeypatch, capsys):
    seen: list[Path] = []
    monkeypatch.setattr(demo, "run_demo", _fake_run(seen, ok=True))
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "removed now" in out and "demo passed: 1 of 1 steps" in out and "its output" in out
    assert seen and not seen[0].exists()


def test_a_failed_step_fails_the_demo(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "run_demo", _fake_run([], ok=False))
    assert main(["demo", "--out", str(tmp_path / "out")]) == 1
    assert "demo failed: 0 of 1 steps" in capsys.readouterr().out


def test_without_scikit_learn_the_demo_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(tk.MissingDependencyError, match=r"pip install 'torchkeep\[demo\]'"):
        demo.write_digits(tmp_path / "digits.safetensors")
    assert not (tmp_path / "digits.safetensors").exists()


def test_the_worker_refuses_unknown_tasks():
    with pytest.raises(SystemExit, match="usage: torchkeep demo-worker train"):
        demo.worker(["frobnicate"], print)


def test_a_failing_training_process_is_reported_with_its_error(tmp_path):
    events = []
    with pytest.raises(RuntimeError, match=r"training process failed:(.|\n)*no-such-data"):
        demo._run_training(
            tmp_path / "run", tmp_path / "no-such-data.safetensors", "training", lambda *a: events.append(a)
        )
    assert events == []
