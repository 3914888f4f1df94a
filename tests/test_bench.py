from __future__ import annotations

import time
from pathlib import Path

from torchkeep.bench import LIBRARIES, format_markdown, run_benchmark


def test_benchmark_harness_runs_every_case(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_benchmark(size_bytes=4 << 20, repeats=1, directory=tmp_path)
    assert time.perf_counter() - started < 30

    # 3 libraries × 3 cases, then torchkeep against torch for torch.save files (read, convert).
    assert len(result.cases) == 13 and len(result.raw) == 3
    for case in (*result.cases, *result.raw):
        assert case.times and all(t > 0 for t in case.times), case
    assert {c.library for c in result.cases} == {*LIBRARIES, "torch.load + save_file"}
    assert {c.group for c in result.cases} >= {
        "convert .pth to safetensors, durable",
        "cold read of a torch.save file, all bytes read",
    }
    assert [m.library for m in result.memory] == list(LIBRARIES)
    assert list(tmp_path.iterdir()) == []  # the working directory is removed

    text = format_markdown(result)
    for library in LIBRARIES:
        assert f"| {library} |" in text
    assert result.command in text
