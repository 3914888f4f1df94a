from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from torchkeep.bench import LIBRARIES, format_markdown, run_benchmark
from torchkeep.bench.report import targets
from torchkeep.bench.runner import planned_runs
from torchkeep.cli import main


def test_benchmark_harness_runs_every_case(tmp_path: Path) -> None:
    started = time.perf_counter()
    steps: list[None] = []
    lines: list[str] = []
    result = run_benchmark(
        size_bytes=4 << 20,
        repeats=1,
        directory=tmp_path,
        small_tensors=200,
        progress=lines.append,
        step=lambda: steps.append(None),
    )
    assert time.perf_counter() - started < 60
    assert len(steps) == planned_runs(1)  # the progress bar's total is exact
    assert any("warm-up" in line for line in lines)

    groups = {c.group for c in result.cases}
    assert groups >= {
        "durable save",
        "durable save, checksums on and off",
        "cold load, all bytes read",
        "cold load into model",
        "warm load into existing tensors",
        "lazy open, cold",
        "durable save, small tensors",
        "cold load, small tensors, all bytes read",
        "convert .pth to safetensors, durable",
        "cold read of a torch.save file, all bytes read",
    }
    assert len(result.raw) == 4  # raw device in three cases, first touch in one
    for case in (*result.cases, *result.raw):
        assert case.times and all(t > 0 for t in case.times), case
    assert {(m.mode, m.library) for m in result.memory} == {
        (mode, lib) for mode in ("save", "load") for lib in LIBRARIES
    }
    load = result.memory_of("load", "torchkeep").peak_extra_bytes
    assert load >= result.size_bytes // 2  # the loaded tensors are counted
    assert list(tmp_path.iterdir()) == []  # the working directory is removed

    rows = targets(result)
    assert len(rows) == 15
    text = format_markdown(result)
    for library in LIBRARIES:
        assert f"| {library} |" in text
    assert result.command in text
    assert "200 float32 tensors of 4–64 KiB" in text
    assert "| lazy open ≤ 5 ms + 1 µs per tensor" in text


def test_bench_command_writes_the_table_and_the_chart(tmp_path: Path) -> None:
    out, chart = tmp_path / "bench.md", tmp_path / "bench.png"
    work = tmp_path / "work"
    work.mkdir()
    status = main(
        ["bench", "--size", "2MiB", "--repeats", "1", "--dir", str(work), "--out", str(out),
         "--plot", str(chart), "--small-tensors", "100", "--device", "cpu"]
    )  # fmt: skip
    assert status == 0
    text = out.read_text()
    assert "| durable save | torchkeep |" in text
    assert "| cold load to the device | torchkeep |" in text  # the --device cases
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list(work.iterdir()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--size", "lots"], "--size: invalid size"),
        (["--size", "0"], "--size: invalid size"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--small-tensors", "0"], "--small-tensors must be at least 1"),
        (["--device", "warp-drive"], "--device warp-drive: not a device"),
        (["--dir", "/nonexistent/dir"], "no such directory"),
    ],
)
def test_bench_command_refuses_bad_arguments(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", *argv]) == 2
    assert message in capsys.readouterr().err


def test_gpu_benchmark_harness_runs_on_the_cpu(tmp_path: Path) -> None:
    from torchkeep.bench.gpu import format_gpu, run_gpu_benchmark

    result = run_gpu_benchmark(size_bytes=2 << 20, repeats=1, device="cpu", directory=tmp_path)
    assert {(c.group, c.library) for c in result.cases} == {
        (group, lib)
        for group in ("cold load to the device", "durable save from the device")
        for lib in LIBRARIES
    }
    assert "| cold load to the device | torchkeep |" in format_gpu(result)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_bench_on_cuda_without_a_gpu_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no usable CUDA device" in capsys.readouterr().err
