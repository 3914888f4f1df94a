"""Write the expected files of tests/test_golden.py into tests/golden/.

Run it against the torchkeep whose bytes are the reference (12bdb57, before the move into
layers), with nothing else of this checkout imported but the test module:

    git worktree add /tmp/tk-old 12bdb57
    PYTHONPATH=/tmp/tk-old/src .venv/bin/python tests/golden/make_golden.py
    git worktree remove /tmp/tk-old

Regenerate only for a deliberate format change.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests directory, for test_golden

import torch  # noqa: E402

import torchkeep  # noqa: E402
from test_golden import CASES, write_case  # noqa: E402


def _commit(module_file: str) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(Path(module_file).parent), "rev-parse", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    print(f"torchkeep from {torchkeep.__file__}, torch {torch.__version__}")
    for name in CASES:
        with tempfile.TemporaryDirectory() as scratch:
            saved = write_case(name, Path(scratch))
            target = HERE / name
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir()
            for file in sorted(saved.iterdir()):
                shutil.copyfile(file, target / file.name)
                print(f"{name}/{file.name}: {file.stat().st_size} bytes")
    made_with = {"torch": torch.__version__, "torchkeep_commit": _commit(torchkeep.__file__)}
    (HERE / "generated_with.json").write_text(json.dumps(made_with, indent=2) + "\n")
    print(made_with)


if __name__ == "__main__":
    main()
