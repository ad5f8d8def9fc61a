"""CUDA C++ kernels compiled at run time (NVRTC) and launched through the driver API.

The one-token GEMV (`stream_gemv`) keeps asynchronous copies into shared
memory in flight across a kernel's PDL wait, which Triton cannot express, so
it is CUDA C++, as is its companion for the greedy LM head
(`lm_head_argmax`). This module is the small runtime they need, with no build
step and no extra package:

- `compile_module(source, name)` compiles the source once per device with
  NVRTC (libnvrtc: loaded by name, else from pip's `nvidia` packages) for the
  device's exact architecture and loads the cubin into torch's primary
  context (pushed for the call when another context is current).
- `launch(fn, grid, block, smem, args, pdl)` launches a kernel on torch's
  current stream with `cuLaunchKernelEx`, with the programmatic-stream-
  serialization attribute when `pdl` (kernels/pdl.py states the contract), so
  launches are captured by CUDA graphs like Triton's.

`available()` says whether all of that is present (CUDA device, driver and
NVRTC libraries); callers fall back to their Triton / torch path otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import logging
import os
import threading
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import torch

logger = logging.getLogger(__name__)

# Device helpers the kernels' sources start with: 16-bit floats as raw bits (no CUDA
# headers needed), conversions with round-to-nearest-even, a warp sum.
DEVICE_HELPERS = r"""
typedef unsigned short u16;

__device__ __forceinline__ unsigned smem_u32(const void* p) {
  unsigned r;
  asm volatile("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }"
               : "=r"(r) : "l"(p));
  return r;
}

template <bool BF16> __device__ __forceinline__ float to_f(u16 h) {
  if constexpr (BF16) {
    return __uint_as_float(((unsigned)h) << 16);
  } else {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
  }
}

template <bool BF16> __device__ __forceinline__ u16 from_f(float f) {
  u16 h;
  if constexpr (BF16) {
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  } else {
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  }
  return h;
}

template <bool BF16> __device__ __forceinline__ void unpack8(uint4 v, float* f) {
  const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    f[2 * j] = to_f<BF16>((u16)(w[j] & 0xffffu));
    f[2 * j + 1] = to_f<BF16>((u16)(w[j] >> 16));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
"""

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
    names = [f"libnvrtc.so.{major}", "libnvrtc.so"]
    try:  # pip wheels keep it under site-packages/nvidia/.../lib
        import nvidia  # type: ignore[import-not-found]
        for root in nvidia.__path__:
            names += sorted(glob.glob(os.path.join(root, "**", f"libnvrtc.so.{major}*"),
                                      recursive=True))
    except ImportError:
        pass
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise OSError("no NVRTC library (libnvrtc.so) found")


@functools.cache
def available() -> bool:
    """Whether kernels can be compiled and launched here: a CUDA (not ROCm) torch with a
    device, a driver with `cuLaunchKernelEx` (CUDA 12+) and the NVRTC library."""
    if torch.version.hip is not None or torch.version.cuda is None or not torch.cuda.is_available():
        return False
    try:
        if not hasattr(_libcuda(), "cuLaunchKernelEx"):
            return False
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


@functools.cache
def _primary_context(device_index: int) -> ctypes.c_void_p:
    """Torch's (the runtime's) primary context of a device, retained once per process."""
    torch.cuda.init()
    lib = _libcuda()
    dev, ctx = ctypes.c_int(), ctypes.c_void_p()
    _check_cu(lib.cuDeviceGet(ctypes.byref(dev), device_index), "cuDeviceGet")
    _check_cu(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    return ctx


@contextlib.contextmanager
def _context(device_index: int) -> Iterator[None]:
    """Run driver calls in the device's primary context: pushed on this thread when another
    (or none) is current, popped after, so torch's current device is left as it was."""
    ctx = _primary_context(device_index)
    lib = _libcuda()
    cur = ctypes.c_void_p()
    _check_cu(lib.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
    if cur.value == ctx.value:
        yield
        return
    _check_cu(lib.cuCtxPushCurrent_v2(ctx), "cuCtxPushCurrent")
    try:
        yield
    finally:
        _check_cu(lib.cuCtxPopCurrent_v2(ctypes.byref(cur)), "cuCtxPopCurrent")


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
        if lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)) != _NVRTC_SUCCESS or not size.value:
            raise RuntimeError(f"NVRTC produced no cubin for {name} ({arch})")
        cubin = ctypes.create_string_buffer(size.value)
        if lib.nvrtcGetCUBIN(prog, cubin) != _NVRTC_SUCCESS:
            raise RuntimeError(f"NVRTC could not return the cubin of {name} ({arch})")
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
                with _context(self.device_index):
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
            handle = ctypes.c_void_p()
            with _context(index):
                _check_cu(_libcuda().cuModuleLoadData(ctypes.byref(handle), cubin),
                          f"cuModuleLoadData({name})")
            mod = _modules[key] = CudaModule(handle, index, {})
    return mod


_usable: dict[tuple[str, int], bool] = {}


def compiles(source: str, name: str, device_index: int) -> bool:
    """Whether `source` compiles and loads on the device (tried once per name and device; a
    failure is logged once and the caller keeps its other path)."""
    key = (name, device_index)
    if key not in _usable:
        try:
            compile_module(source, name, torch.device("cuda", device_index))
            _usable[key] = True
        except (OSError, RuntimeError) as e:
            logger.warning("CUDA kernel %s is unavailable on cuda:%d: %s", name, device_index, e)
            _usable[key] = False
    return _usable[key]


def _allow_smem(kernel: CudaKernel, smem: int) -> None:
    """Opt the kernel in to `smem` bytes of dynamic shared memory (in its context)."""
    if smem > kernel.max_dynamic_smem:
        _check_cu(_libcuda().cuFuncSetAttribute(
            kernel.handle, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem),
            "cuFuncSetAttribute(max dynamic shared memory)")
        kernel.max_dynamic_smem = smem


def max_active_clusters(kernel: CudaKernel, grid: tuple[int, int, int], block: int,
                        smem: int) -> int:
    """How many clusters of a `__cluster_dims__` kernel the device can run at once with this
    launch shape (0: it cannot be launched at all, e.g. too much shared memory per cluster)."""
    lib = _libcuda()
    with _context(kernel.device_index):
        _allow_smem(kernel, smem)
        cfg = _LaunchConfig(*grid, block, 1, 1, smem, None, None, 0)
        n = ctypes.c_int()
        _check_cu(lib.cuOccupancyMaxActiveClusters(ctypes.byref(n), kernel.handle,
                                                   ctypes.byref(cfg)),
                  "cuOccupancyMaxActiveClusters")
    return n.value


def launch(kernel: CudaKernel, grid: Union[int, tuple[int, int, int]], block: int, smem: int,
           args: Sequence[ctypes._SimpleCData], pdl: bool) -> None:
    """Launch `kernel` on torch's current stream of its device (1-D block; a 1-D grid, or
    `(x, y, z)`, which must be a whole number of clusters for a kernel with `__cluster_dims__`)."""
    gx, gy, gz = (grid, 1, 1) if isinstance(grid, int) else grid
    lib = _libcuda()
    with _context(kernel.device_index):
        _allow_smem(kernel, smem)
        attr = _LaunchAttribute(_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, 0, 1)
        stream = torch.cuda.current_stream(kernel.device_index).cuda_stream
        cfg = _LaunchConfig(gx, gy, gz, block, 1, 1, smem, stream,
                            ctypes.pointer(attr) if pdl else None, 1 if pdl else 0)
        params = (ctypes.c_void_p * len(args))(
            *[ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args])
        _check_cu(lib.cuLaunchKernelEx(ctypes.byref(cfg), kernel.handle, params, None),
                  "cuLaunchKernelEx")
