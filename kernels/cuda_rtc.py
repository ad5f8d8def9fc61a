"""CUDA C++ kernels compiled at run time (NVRTC) and launched through the driver API.

The one-token GEMV (`stream_gemv`) keeps asynchronous copies into shared
memory in flight across a kernel's PDL wait, which Triton cannot express, so
it is CUDA C++. This module is the small runtime it needs, with no build step
and no extra package:

- `compile_module(source, name)` compiles the source once per device with
  NVRTC (libnvrtc, which CUDA builds of torch load) for the device's exact
  architecture and loads the cubin into torch's primary context.
- `launch(fn, grid, block, smem, args, pdl)` launches a kernel on torch's
  current stream with `cuLaunchKernelEx`, with the programmatic-stream-
  serialization attribute when `pdl` (kernels/pdl.py states the contract), so
  launches are captured by CUDA graphs like Triton's.

`available()` says whether all of that is present (CUDA device, driver and
NVRTC libraries); callers fall back to their Triton kernel otherwise.
"""

from __future__ import annotations

import ctypes
import functools
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
_CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT = 9
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6
_NVRTC_SUCCESS = 0


class _LaunchAttribute(ctypes.Structure):
    # CUlaunchAttribute: a 4-byte id, 4 bytes of padding, a 64-byte value union whose
    # programmaticStreamSerializationAllowed is the int at its start.
    _fields_ = [("id", ctypes.c_uint), ("pad", ctypes.c_uint), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):
    _fields_ = [("grid_x", ctypes.c_uint), ("grid_y", ctypes.c_uint), ("grid_z", ctypes.c_uint),
                ("block_x", ctypes.c_uint), ("block_y", ctypes.c_uint), ("block_z", ctypes.c_uint),
                ("shared_mem_bytes", ctypes.c_uint), ("stream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


@functools.cache
def _libcuda() -> ctypes.CDLL:
    return ctypes.CDLL("libcuda.so.1")


@functools.cache
def _libnvrtc() -> ctypes.CDLL:
    major = (torch.version.cuda or "0").split(".")[0]
    for name in (f"libnvrtc.so.{major}", "libnvrtc.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no NVRTC library (libnvrtc.so) found")


@functools.cache
def available() -> bool:
    """Whether kernels can be compiled and launched here: a CUDA (not ROCm) torch with a
    device, and the driver and NVRTC libraries."""
    if torch.version.hip is not None or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    try:
        _libcuda()
        _libnvrtc()
    except OSError:
        return False
    return True


def _check_cu(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _libcuda().cuGetErrorString(result, ctypes.byref(msg))
        text = msg.value.decode() if msg.value else "unknown error"
        raise RuntimeError(f"{what} failed: CUDA error {result} ({text})")


_tls = threading.local()


def _ensure_context(device_index: int) -> None:
    """Make torch's primary context of the device current on this thread (driver calls
    need one; the runtime sets it only lazily)."""
    if getattr(_tls, "device", None) == device_index:
        cur = ctypes.c_void_p()
        _check_cu(_libcuda().cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
        if cur.value:
            return
    torch.cuda.init()
    lib = _libcuda()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check_cu(lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
    _check_cu(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    _check_cu(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    _tls.device = device_index


def _nvrtc_compile(source: str, name: str, arch: str) -> bytes:
    lib = _libnvrtc()
    prog = ctypes.c_void_p()
    res = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(),
                                 0, None, None)
    if res != _NVRTC_SUCCESS:
        raise RuntimeError(f"nvrtcCreateProgram failed ({res})")
    try:
        opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
        arr = (ctypes.c_char_p * len(opts))(*opts)
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        if res != _NVRTC_SUCCESS:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log)
            raise RuntimeError(f"NVRTC failed to compile {name} for {arch}:\n"
                               f"{log.value.decode(errors='replace')}")
        size = ctypes.c_size_t()
        lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
        cubin = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetCUBIN(prog, cubin)
        return cubin.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@dataclass
class CudaKernel:
    """One `extern "C"` kernel of a loaded module."""

    handle: ctypes.c_void_p
    device_index: int
    max_dynamic_smem: int = 48 << 10  # what a kernel may use without opting in


@dataclass
class CudaModule:
    """A compiled module on one device; `kernel(name)` looks its kernels up once."""

    handle: ctypes.c_void_p
    device_index: int
    kernels: dict

    def kernel(self, name: str, carveout: Optional[int] = None) -> CudaKernel:
        """The kernel `name`; `carveout` (percent of the unified L1 / shared memory given to
        shared memory, set on first lookup) is the preferred split for its launches."""
        k = self.kernels.get(name)
        if k is None:
            lib = _libcuda()
            fn = ctypes.c_void_p()
            _check_cu(lib.cuModuleGetFunction(ctypes.byref(fn), self.handle, name.encode()),
                      f"cuModuleGetFunction({name})")
            if carveout is not None:
                _check_cu(lib.cuFuncSetAttribute(
                    fn, _CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT, carveout),
                    "cuFuncSetAttribute(carveout)")
            k = self.kernels[name] = CudaKernel(fn, self.device_index)
        return k


_modules: dict[tuple[str, int], CudaModule] = {}
_lock = threading.Lock()


def compile_module(source: str, name: str, device: torch.device) -> CudaModule:
    """`source` compiled for and loaded on `device` (cached by name and device)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = (name, index)
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            major, minor = torch.cuda.get_device_capability(index)
            suffix = "a" if major == 9 else ""  # sm_90a: Hopper's arch-specific features
            cubin = _nvrtc_compile(source, name, f"sm_{major}{minor}{suffix}")
            _ensure_context(index)
            handle = ctypes.c_void_p()
            _check_cu(_libcuda().cuModuleLoadData(ctypes.byref(handle), cubin),
                      f"cuModuleLoadData({name})")
            mod = _modules[key] = CudaModule(handle, index, {})
    return mod


def launch(kernel: CudaKernel, grid: int, block: int, smem: int,
           args: Sequence[ctypes._SimpleCData], pdl: bool) -> None:
    """Launch `kernel` on torch's current stream of its device (1-D grid and block)."""
    _ensure_context(kernel.device_index)
    lib = _libcuda()
    if smem > kernel.max_dynamic_smem:
        _check_cu(lib.cuFuncSetAttribute(kernel.handle,
                                         _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
                  "cuFuncSetAttribute(max dynamic shared memory)")
        kernel.max_dynamic_smem = smem
    attr = _LaunchAttribute(_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 0, 1)
    stream = torch.cuda.current_stream(kernel.device_index).cuda_stream
    cfg = _LaunchConfig(grid, 1, 1, block, 1, 1, smem, stream,
                        ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
    params = (ctypes.c_void_p * len(args))(
        *[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
    _check_cu(lib.cuLaunchKernelEx(ctypes.byref(cfg), kernel.handle, params, None),
              "cuLaunchKernelEx")
