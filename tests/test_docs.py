from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torchkeep as tk

ROOT = Path(__file__).resolve().parent.parent


def test_docs_build_with_warnings_as_errors_and_document_every_public_name(tmp_path: Path):
    # The docs extra (mkdocs, mkdocstrings) is part of the dev install: a missing one fails.
    site = tmp_path / "site"
    # The build imports docs/hooks/; no bytecode is left in the working tree.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "mkdocs", "build", "--strict"]
    build = subprocess.run(
        [*command, "-f", str(ROOT / "mkdocs.yml"), "-d", str(site)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    assert "WARNING" not in build.stderr, build.stderr

    api = "\n".join(p.read_text(encoding="utf-8") for p in sorted((site / "api").rglob("*.html")))
    undocumented = [
        name for name in tk.__all__ if name != "__version__" and f'id="torchkeep.{name}"' not in api
    ]
    assert not undocumented, f"no API entry for {undocumented}; add a ::: directive in docs/api/"
    assert "torchkeep.__version__" in api

    # The guide is README.md, its image pointed at the copy inside the site.
    guide = (site / "guide" / "index.html").read_text(encoding="utf-8")
    assert 'src="../bench.png"' in guide
    assert (site / "bench.png").is_file()
    integrations = (site / "api" / "integrations" / "index.html").read_text(encoding="utf-8")
    for name in ("lightning.TorchkeepCheckpointIO", "transformers.TorchkeepTrainer"):
        assert f'id="torchkeep.integrations.{name}"' in integrations
