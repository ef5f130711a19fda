"""What every Triton op shares: where the kernels run, and small host helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import ClassVar

import torch
import triton
import triton.language as tl

from rocmoe.device import Device
from rocmoe.registry import BackendOp

try:  # Grid dependency control (PTX griddepcontrol): in every Triton this package supports
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - a Triton build without the CUDA extras
    gdc_launch_dependents = gdc_wait = None

# Read once: under the interpreter the Triton backend also accepts CPU tensors,
# so the same public calls test the kernels on a CPU-only machine.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

#: ROCMOE_PDL=0 launches without programmatic dependent launch (read once, like TRITON_INTERPRET).
PDL_ALLOWED = os.environ.get("ROCMOE_PDL", "1") not in ("", "0")

GPU_FAMILIES = frozenset({"cdna3", "cdna4", "amd", "hopper", "blackwell", "ampere", "cuda", "xpu"})


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def uses_pdl(device: Device) -> bool:
    """Whether launches on ``device`` use programmatic dependent launch: NVIDIA
    sm90 and newer (PDL is a Hopper feature), unless ROCMOE_PDL=0.

    Under PDL a kernel may be placed on the GPU while the previous kernel of
    its stream still runs; it then waits for that kernel (and its memory
    writes) before it touches memory, and at once lets the next kernel be
    placed. What that saves is launch latency between back-to-back kernels,
    never any ordering. The routing and top-k kernels use it (on the H100,
    under CUDA-graph replay, 1.15-1.25x on small routing calls, 1.5x on the
    top-k short-circuit; routing grids of many waves launch without it, see
    gemma4_routing.pdl_for_grid); sparse-MLA decode and the MoE do not: there the
    next grid's programs, placed early and waiting, measured slower (down to
    0.77x) or no faster (ci/pdl_compare.py)."""
    if not PDL_ALLOWED or gdc_wait is None or device.vendor != "nvidia" or not device.arch.startswith("sm"):
        return False
    return device.arch[2:].isdigit() and int(device.arch[2:]) >= 90


def pdl_kwargs(device: Device) -> dict[str, bool]:
    """What a launch of a kernel with :func:`pdl_prologue` on ``device`` passes:
    its PDL constexpr, and under PDL the ``launch_pdl`` option (AMD's and
    Intel's Triton have no such option)."""
    return {"PDL": True, "launch_pdl": True} if uses_pdl(device) else {"PDL": False}


def with_pdl(builds: list, arch: str) -> list:
    """Build-check jobs (``KernelBuild``) as ``arch`` launches them: with the
    kernel's PDL constexpr, and the launch option where PDL is on."""
    kwargs = pdl_kwargs(Device.from_arch(arch))
    pdl = kwargs.pop("PDL")
    return [dataclasses.replace(b, constexprs=(*b.constexprs, ("PDL", pdl)), options=(*b.options, *kwargs.items()))
            for b in builds]


@triton.jit
def pdl_prologue(PDL: tl.constexpr):
    """A kernel's first statement. Under PDL: wait until the previous kernel of
    the stream has finished and its writes are visible, then let the next
    kernel be placed (it waits here in turn, so at most one grid runs ahead)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """Make ``tensor``'s GPU current for a launch (Triton launches on the current
    device); free when it already is."""
    if tensor.device.type == "cuda" and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    if tensor.device.type == "xpu" and tensor.device.index != torch.xpu.current_device():
        return torch.xpu.device(tensor.device)
    return contextlib.nullcontext()


class TritonOp(BackendOp):
    """A Triton implementation: every GPU family, and the CPU under TRITON_INTERPRET=1."""

    backend = "triton"
    families: ClassVar[frozenset[str]] = GPU_FAMILIES | ({"cpu"} if INTERPRET else frozenset())

    def not_supported_reasons(self, device: Device, problem) -> list[str]:
        if device.family == "cpu" and not INTERPRET:
            return ["Triton kernels need a GPU; on the CPU they run only under TRITON_INTERPRET=1 (for tests)"]
        return super().not_supported_reasons(device, problem)
