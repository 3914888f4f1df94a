"""MkDocs hook: site pages that show a Markdown file from the repository's root.

The user guide lives in README.md, next to BENCHMARKS.md and RELIABILITY.md, where GitHub and
PyPI show them. The site shows each one as a page of its own: the page's file in ``docs/`` says
where the text lives, and this hook puts the text in its place. Their relative links are written
for the repository (``docs/bench.png``, ``BENCHMARKS.md``), so the ones listed in ``TARGETS`` are
pointed at the same files inside the site; a link this hook does not know is left as it is, and
``mkdocs build --strict`` fails on it if it leads nowhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mkdocs.config.defaults import MkDocsConfig
    from mkdocs.structure.files import Files
    from mkdocs.structure.pages import Page

# Site page (relative to docs/) -> the repository file it shows.
PAGES = {
    "guide.md": "README.md",
    "benchmarks.md": "BENCHMARKS.md",
    "reliability.md": "RELIABILITY.md",
}
# Link target as written in those files -> the same target inside the site.
TARGETS = {
    "docs/bench.png": "bench.png",
    "docs/architecture.md": "architecture.md",
    **{source: page for page, source in PAGES.items()},
}

_LINK = re.compile(r"\]\((?P<target>[^)#\s]+)(?P<rest>[^)]*)\)")


def _retarget(match: re.Match[str]) -> str:
    target = TARGETS.get(match["target"], match["target"])
    return f"]({target}{match['rest']})"


def on_page_markdown(markdown: str, *, page: Page, config: MkDocsConfig, files: Files) -> str:
    """Return the repository file a page shows, its links pointed inside the site."""
    source = PAGES.get(page.file.src_uri)
    if source is None:
        return markdown
    root = Path(config.config_file_path).parent
    return _LINK.sub(_retarget, (root / source).read_text(encoding="utf-8"))
