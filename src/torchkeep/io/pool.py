"""Running I/O jobs on a few threads: positional reads, writes and hashing release the GIL."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

# Threads for positional I/O: one per core. Measured on 2 cores, more threads than cores made
# cold loads slower (they interleave the disk's sequential readahead) and saves no faster.
IO_THREADS = min(8, max(2, os.cpu_count() or 2))
# Tensors below this size are read and written in batches, one job for many, to keep the
# per-job overhead far below the cost of the bytes.
SMALL_TENSOR_BYTES = 1 << 20
BATCH_BYTES = 8 << 20


def run_jobs(jobs: Sequence[Callable[[], None]], *, threads: int) -> None:
    """Run every job on up to ``threads`` threads; on the first error, cancel the rest, raise it."""
    if threads <= 1 or len(jobs) <= 1:
        for job in jobs:
            job()
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="torchkeep-io") as pool:
        futures = [pool.submit(job) for job in jobs]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            error = future.exception()
            if error is not None:
                for pending in futures:
                    pending.cancel()
                raise error
