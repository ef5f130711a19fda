"""What every Triton op shares: where the kernels run, and small host helpers."""

from __future__ import annotations

import contextlib
import os
from typing import ClassVar

import torch

from rocmoe.device import Device
from rocmoe.registry import BackendOp

# Read once: under the interpreter the Triton backend also accepts CPU tensors,
# so the same public calls test the kernels on a CPU-only machine.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

GPU_FAMILIES = frozenset({"cdna3", "cdna4", "amd", "hopper", "blackwell", "ampere", "cuda", "xpu"})


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


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
