"""The cyclic garbage collector, paused while many small acyclic objects are made."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector while many small objects are made (a header of
    thousands of tensors): they hold no cycles, and collections triggered by their number
    would walk the whole heap, doubling the time to open such a file."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
