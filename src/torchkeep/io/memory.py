"""Zero-copy byte views of tensor memory."""

from __future__ import annotations

import ctypes

import torch

# A memoryview over raw memory, made by CPython itself: one call, whatever the size (a ctypes
# array type per size would create a new class for every distinct tensor size).
_from_memory = ctypes.pythonapi.PyMemoryView_FromMemory
_from_memory.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t, ctypes.c_int)
_from_memory.restype = ctypes.py_object
_PYBUF_WRITE = 0x200


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Return a writable byte view of a contiguous CPU tensor's memory, without copying.

    The view does not keep the tensor alive: the caller holds the tensor while using it.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return memoryview(bytearray(0))
    view: memoryview = _from_memory(tensor.data_ptr(), nbytes, _PYBUF_WRITE)
    return view
