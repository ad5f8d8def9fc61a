"""Programmatic dependent launch (PDL) for the kernels of a decode step (Hopper and newer).

A kernel launched with PDL may start while the kernel before it in the stream
is still running: its programs are scheduled as the previous kernel's programs
drain, so the launch latency and the ramp-up overlap the previous kernel's
tail instead of following it. In return every such kernel must execute
`griddepcontrol.wait` (`tl.extra.cuda.gdc_wait`) before it reads anything the
previous kernels wrote and before it writes anything at all; the wait returns
once the previous grid has completed and its memory is visible. Work that
touches only data no kernel writes (the skinny GEMM's weights) may run before
the wait (the skinny GEMM loads whole weight tiles there, so a weight update in place must
not be the kernel right before a forward; nothing here does that).
`gdc_launch_dependents` lets the next PDL kernel launch early.

Every kernel here that takes a `PDL` constexpr follows that contract, as do
the CUDA kernels launched through `cuda_rtc.launch(..., pdl=True)` (stream_gemv
copies its weights before the wait), so a chain of them is safe in any order
and next to kernels launched without PDL (those wait for full completion as
usual). One exception: a kernel that triggers at its start, before its own wait
(`trigger_early=True` of `stream_gemv` and `stream_decode`), lets the next kernel run
its pre-wait phase while the kernels before it may still run, back to and including
the nearest one that triggers after its own wait (everything before that one has
completed; a kernel launched without PDL starts only when everything before it has).
So the next kernel must read nothing before its wait that any of those kernels writes.
In the models: the QKV GEMV triggers early, before decode attention, whose pre-wait
reads (block table, seq_lens, positions, slots, cached context) may overlap the QKV
GEMV and the previous layer's down projection (which triggers after its wait and
writes only the residual stream); at the first layer the embedding before the QKV GEMV
is launched without PDL. Decode attention and o_proj trigger early before o_proj and
the gate/up GEMV, whose pre-wait phases read only weights, which no kernel writes.
CUDA graphs capture the launches with programmatic edges. `PAGED_BACKEND_PDL=0` turns it
off (read once).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

PDL_ENV = "PAGED_BACKEND_PDL"


@functools.cache
def _device_supports_pdl(index: int) -> bool:
    if os.environ.get(PDL_ENV, "1") == "0" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    if torch.version.hip is not None or torch.cuda.get_device_capability(index)[0] < 9:
        return False  # griddepcontrol is NVIDIA's (sm_90 and newer)
    return hasattr(tl.extra.cuda, "gdc_wait") and hasattr(tl.extra.cuda, "gdc_launch_dependents")


def pdl_enabled(t: torch.Tensor) -> bool:
    """Whether kernels on `t`'s device launch with PDL (CUDA, compute capability >= 9)."""
    if t.device.type != "cuda":
        return False
    index = t.device.index if t.device.index is not None else torch.cuda.current_device()
    return _device_supports_pdl(index)


def launch_kwargs(pdl: bool) -> dict:
    """Extra launch arguments of a kernel launched with (or without) PDL."""
    return {"launch_pdl": True} if pdl else {}


@triton.jit
def pdl_wait(PDL: tl.constexpr):
    """With PDL: wait for the previous kernel, then let the next one launch.

    Call it before any load of data a kernel may write and before any store (only reads of
    never-written data, such as weight prefetches, may come earlier)."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
