"""Checksums computed piece by piece, in parallel, as the engine reads: torchkeep's xxh3-64
and the CRC-32 of zip entries (``torch.save`` files)."""

from __future__ import annotations

import functools
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import xxhash


def checksum_bytes(data: memoryview | bytes) -> int:
    """Return the 64-bit digest of one piece of data (at most one checksum chunk)."""
    return int(xxhash.xxh3_64_intdigest(data))


def combine_digests(digests: Iterable[int]) -> str:
    """Return a tensor's checksum from the digests of its consecutive chunks."""
    parts = list(digests)
    if len(parts) == 1:
        return f"{parts[0]:016x}"
    packed = b"".join(d.to_bytes(8, "big") for d in parts)
    return f"{xxhash.xxh3_64_intdigest(packed):016x}"


def checksum_data(data: bytes | memoryview, chunk: int) -> str:
    """Return the checksum of a whole piece of data, computed chunk by chunk as tensors are."""
    view = memoryview(data)
    return combine_digests(checksum_bytes(view[b:e]) for b, e in chunk_spans(len(view), chunk))


def chunk_spans(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    """Split ``nbytes`` into consecutive ``[begin, end)`` pieces of at most ``chunk`` bytes."""
    if nbytes == 0:
        return [(0, 0)]
    return [(b, min(b + chunk, nbytes)) for b in range(0, nbytes, chunk)]


@dataclass(frozen=True)
class Checksum:
    """How a tensor's checksum is made from the digests of its pieces.

    Attributes:
        digest: the digest of one piece.
        spans: how ``nbytes`` is cut into pieces of at most ``chunk`` bytes.
        combine: the tensor's checksum, as text, from its pieces' digests in order.
    """

    digest: Callable[[memoryview], int]
    spans: Callable[[int, int], list[tuple[int, int]]]
    combine: Callable[[list[int], int], str]


XXH3 = Checksum(checksum_bytes, chunk_spans, lambda digests, chunk: combine_digests(digests))


def tail_first_spans(nbytes: int, chunk: int) -> list[tuple[int, int]]:
    """Cut ``nbytes`` so that only the first piece is short: every later piece is ``chunk``
    bytes, so CRCs combine with one precomputed operator."""
    if nbytes <= chunk:
        return [(0, nbytes)]
    head = nbytes % chunk
    spans = [(0, head)] if head else []
    return spans + [(b, b + chunk) for b in range(head, nbytes, chunk)]


# CRC-32 (zlib's polynomial, reflected) over GF(2): 32x32 matrices stored as 32 column words.


def _times(matrix: list[int], vector: int) -> int:
    total, i = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[i]
        vector >>= 1
        i += 1
    return total


def _compose(a: list[int], b: list[int]) -> list[int]:
    return [_times(a, column) for column in b]


@functools.cache
def _zeros(nbytes: int) -> tuple[int, ...]:
    """The operator that advances a CRC-32 over ``nbytes`` zero bytes."""
    one_bit = [0xEDB88320] + [1 << (n - 1) for n in range(1, 32)]
    power = _compose(one_bit, one_bit)  # 2 zero bits
    power = _compose(power, power)  # 4
    power = _compose(power, power)  # 8: one zero byte
    result = [1 << n for n in range(32)]
    while nbytes:
        if nbytes & 1:
            result = _compose(power, result)
        nbytes >>= 1
        if nbytes:
            power = _compose(power, power)
    return tuple(result)


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """Return the CRC-32 of ``A + B`` from the CRC-32s of ``A`` and ``B`` (zlib's definition)."""
    return _times(list(_zeros(second_length)), first) ^ second


def _combine_crcs(digests: list[int], chunk: int) -> str:
    total = digests[0]
    for digest in digests[1:]:
        total = crc32_combine(total, digest, chunk)
    return f"{total:08x}"


ZIP_CRC32 = Checksum(lambda view: zlib.crc32(view), tail_first_spans, _combine_crcs)
