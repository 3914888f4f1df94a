from __future__ import annotations

import time
from pathlib import Path

from torchkeep.bench import LIBRARIES, format_markdown, run_benchmark


def test_benchmark_harness_runs_every_case(tmp_path: Path) -> None:
    started = time.perf_counter()
    result = run_benchmark(size_bytes=4 << 20, repeats=1, directory=tmp_path)
    assert time.perf_counter() - started < 20

    assert len(result.cases) == 9 and len(result.raw) == 3
    for case in (*result.cases, *result.raw):
        assert case.times and all(t > 0 for t in case.times), case
    assert {c.library for c in result.cases} == set(LIBRARIES)
    assert [m.library for m in result.memory] == list(LIBRARIES)
    assert list(tmp_path.iterdir()) == []  # the working directory is removed

    text = format_markdown(result)
    for library in LIBRARIES:
        assert f"| {library} |" in text
    assert result.command in text
