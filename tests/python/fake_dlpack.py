"""Tensors that exist only as DLPack descriptions, for tests of the kernels' argument checks.

A ``FakeTensor`` exports a DLPack capsule (built with ctypes after the DLPack C ABI) claiming
any shape, strides, dtype and device, over an address nothing reads: the checks must reject
it before a kernel runs. It lets a machine without a GPU test the CUDA adapters' checks and
the CPU adapter's wrong-device error.
"""

from __future__ import annotations

import ctypes
import itertools

import torch

CPU, CUDA = 1, 2  # DLDeviceType
_DTYPES = {torch.float32: (2, 32), torch.float16: (2, 16), torch.bfloat16: (4, 16),
           torch.float64: (2, 64), torch.int64: (0, 64), torch.int32: (0, 32)}
_CAPSULE_NAME = b"dltensor"
_addresses = itertools.count(1 << 20, 1 << 20)  # 1 MiB apart: distinct fakes never overlap


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _ManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]  # null: nothing to free


_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class FakeTensor:
    """A DLPack producer of ``shape`` (dense row-major unless ``strides``) on ``device``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 device: tuple[int, int] = (CUDA, 0), strides: tuple[int, ...] | None = None,
                 address: int | None = None) -> None:
        self.shape, self.dtype, self.device, self.strides = shape, dtype, device, strides
        self.address = next(_addresses) if address is None else address
        self._alive: list[object] = []  # what the capsules point into, kept for the call

    def __dlpack__(self) -> object:
        ndim = len(self.shape)
        shape = (ctypes.c_int64 * ndim)(*self.shape)
        strides = None if self.strides is None else (ctypes.c_int64 * ndim)(*self.strides)
        code, bits = _DTYPES[self.dtype]
        managed = _ManagedTensor(_Tensor(self.address, _Device(*self.device), ndim,
                                         _DataType(code, bits, 1), shape, strides, 0), None, None)
        self._alive += [shape, strides, managed]
        return _capsule_new(ctypes.addressof(managed), _CAPSULE_NAME, None)
