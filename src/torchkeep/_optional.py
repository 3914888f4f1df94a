"""Optional extras: the one place where a missing one becomes ``MissingDependencyError``.

Every optional package (fsspec, Lightning, transformers, scikit-learn for the demo, safetensors
and matplotlib for the benchmark) is first imported inside ``importing`` (an integration's
package imports its framework there before any of its modules does), and every message ends
with the same install command, ``pip install 'torchkeep[<extra>]'``.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

from torchkeep.errors import MissingDependencyError

# The extras of pyproject.toml that a missing import can point to.
EXTRAS = ("remote", "lightning", "transformers", "demo", "bench", "plot")


def install_command(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'torchkeep[extra]'``."""
    if extra not in EXTRAS:
        raise ValueError(f"{extra!r} is not an extra of torchkeep (one of {', '.join(EXTRAS)})")
    return f"pip install 'torchkeep[{extra}]'"


def missing(extra: str, what: str, *, also: str = "") -> MissingDependencyError:
    """The error for a missing part of ``extra``: ``what``, how to install it, then ``also``."""
    return MissingDependencyError(f"{what}; install it with: {install_command(extra)}{also}")


@contextlib.contextmanager
def importing(extra: str, what: str, *, also: str = "") -> Iterator[None]:
    """Import optional packages inside: an ImportError becomes ``missing(extra, what)``, where
    ``{error}`` in ``what`` or ``also`` stands for the import's own message."""
    try:
        yield
    except MissingDependencyError:
        raise
    except ImportError as e:
        error = str(e)
        raise missing(
            extra, what.replace("{error}", error), also=also.replace("{error}", error)
        ) from e


def installed(package: str) -> bool:
    """Whether ``package`` could be imported, without importing it."""
    return importlib.util.find_spec(package) is not None
