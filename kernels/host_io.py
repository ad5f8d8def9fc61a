"""A decode step's small inputs read straight from pinned host memory (no copy engine).

A one-request decode step needs a few dozen bytes from the host (token id,
position, slot, sequence length, a block-table row) and a few from the device
(the sampled token of the step before, not read back yet). Three host->device
copies plus the two indexing kernels of the pending-token gather cost the
step ~30 us on the H100: each hand-off between the copy engine and the
compute queue leaves the GPU idle for 3-10 us. `stage_inputs` does it all in
one kernel that reads the pinned staging arrays over PCIe (pinned memory is
mapped into the device's address space under unified addressing) and writes
the decode graph's static buffers:

- `dst64[i] = src64[i]` for the int64 section (token ids, positions, slots,
  index rows), except that a negative value `v` among the first `num_ids`
  (a token id placeholder) becomes `last[-1 - v]`, the pending token's value
  in the previous step's sampled-token tensor;
- each int32 section (`seq_lens`, the block table) is a 2-D block of
  `rows x cols` values, contiguous in the host array from an offset, written
  into a row-strided device view.

Host reads use `ld.global.cv` (never served from a cache: the host rewrote
the staging set since the GPU last read it). The launch has no PDL: it waits
for the previous step's kernels, which read the buffers it overwrites.
Callers check `stage_supported` (a CUDA device where the kernel compiles) and
`host_pointer` (None when a host tensor is not device-mapped) and keep their
copies otherwise.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Optional, Sequence

import torch

from . import cuda_rtc

_SOURCE = r"""
__device__ __forceinline__ long long ld_host64(const long long* p) {
  long long v;
  asm volatile("ld.global.cv.s64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ int ld_host32(const int* p) {
  int v;
  asm volatile("ld.global.cv.s32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

// One thread per value: the int64 section, then int32 sections a and b.
extern "C" __global__ void stage_inputs(
    const long long* h64, long long* d64, int n64, int num_ids, const long long* last,
    const int* h32, int* da, long long a_stride, int a_rows, int a_cols, int a_off,
    int* db, long long b_stride, int b_rows, int b_cols, int b_off) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n64) {
    long long v = ld_host64(h64 + i);
    if (i < num_ids && v < 0) v = last[-1 - v];
    d64[i] = v;
    return;
  }
  i -= n64;
  if (i < a_rows * a_cols) {
    da[(long long)(i / a_cols) * a_stride + i % a_cols] = ld_host32(h32 + a_off + i);
    return;
  }
  i -= a_rows * a_cols;
  if (i < b_rows * b_cols)
    db[(long long)(i / b_cols) * b_stride + i % b_cols] = ld_host32(h32 + b_off + i);
}
"""

_NUM_THREADS = 256
_CU_POINTER_ATTRIBUTE_DEVICE_POINTER = 3


def host_pointer(t: torch.Tensor) -> Optional[int]:
    """The device address of a pinned CPU tensor's data (None: not pinned or not mapped)."""
    if t.device.type != "cpu" or not t.is_pinned() or not torch.cuda.is_available() \
            or not cuda_rtc.available():
        return None
    ptr = ctypes.c_uint64()
    with cuda_rtc._context(torch.cuda.current_device()):  # the address as that device sees it
        res = cuda_rtc._libcuda().cuPointerGetAttribute(
            ctypes.byref(ptr), _CU_POINTER_ATTRIBUTE_DEVICE_POINTER,
            ctypes.c_uint64(t.data_ptr()))
    return ptr.value if res == 0 and ptr.value else None


@functools.cache
def _compiles(index: int) -> bool:
    return cuda_rtc.compiles(_SOURCE, "host_io", index)


def stage_supported(device: torch.device) -> bool:
    """Whether `stage_inputs` runs on `device` (CUDA, driver and NVRTC present)."""
    if device.type != "cuda" or not cuda_rtc.available():
        return False
    return _compiles(device.index if device.index is not None else torch.cuda.current_device())


def stage_inputs(src64: torch.Tensor, dst64: torch.Tensor, num_ids: int,
                 last: Optional[torch.Tensor], src32: torch.Tensor,
                 sections32: Sequence[tuple[int, torch.Tensor]]) -> None:
    """Copy pinned `src64` (int64) into `dst64` and up to two int32 sections of pinned
    `src32` into device views, in one kernel on the current stream.

    `sections32`: `(offset, view)` pairs; `view` is a 1-D or row-major 2-D int32 device view
    (unit column stride) filled from `src32[offset:offset + view.numel()]` in row order.
    Placeholders `v < 0` among the first `num_ids` values of `src64` read `last[-1 - v]`
    (int64, on the device; may be None when there are none). Raises ValueError when a host
    array is not device-mapped or the shapes do not fit (callers check first)."""
    dev = dst64.device
    # An empty array has no allocation to map; nothing is read from it.
    h64 = host_pointer(src64) if src64.numel() else 0
    h32 = host_pointer(src32) if src32.numel() else 0
    if h64 is None or h32 is None:
        raise ValueError("stage_inputs needs pinned, device-mapped host arrays")
    if not (src64.dtype == dst64.dtype == torch.int64 and src32.dtype == torch.int32
            and dst64.is_contiguous() and dst64.numel() >= src64.numel() and len(sections32) <= 2
            and 0 <= num_ids <= src64.numel()):
        raise ValueError("stage_inputs: bad int64 arrays or too many int32 sections")
    if last is not None and not (last.dtype == torch.int64 and last.device == dev
                                 and last.is_contiguous()):
        raise ValueError("stage_inputs: `last` must be a contiguous int64 tensor on the device")
    secs: list = []
    for off, view in sections32:
        v2 = view.view(1, -1) if view.dim() == 1 else view
        if not (view.dtype == torch.int32 and view.device == dev and v2.dim() == 2
                and v2.stride(1) == 1 and off >= 0 and off + v2.numel() <= src32.numel()):
            raise ValueError("stage_inputs: bad int32 section")
        secs += [ctypes.c_void_p(v2.data_ptr()), ctypes.c_longlong(v2.stride(0)),
                 ctypes.c_int(v2.shape[0]), ctypes.c_int(v2.shape[1]), ctypes.c_int(off)]
    while len(secs) < 10:  # an unused section: no rows
        secs += [ctypes.c_void_p(0), ctypes.c_longlong(0), ctypes.c_int(0), ctypes.c_int(0),
                 ctypes.c_int(0)]
    total = src64.numel() + sum(v.numel() for _, v in sections32)
    if total == 0:
        return
    kernel = cuda_rtc.compile_module(_SOURCE, "host_io", dev).kernel("stage_inputs")
    args = [ctypes.c_void_p(h64), ctypes.c_void_p(dst64.data_ptr()), ctypes.c_int(src64.numel()),
            ctypes.c_int(num_ids),
            ctypes.c_void_p(last.data_ptr() if last is not None else 0),
            ctypes.c_void_p(h32), *secs]
    cuda_rtc.launch(kernel, -(-total // _NUM_THREADS), _NUM_THREADS, 0, args, False)
