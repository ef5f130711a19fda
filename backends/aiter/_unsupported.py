"""An op AITER has no kernel for with SPEC.md's semantics: always refused, with
the reason, so ``rocmoe info`` says why rather than "not implemented"."""

from __future__ import annotations

from typing import ClassVar

from rocmoe.device import Device
from rocmoe.registry import BackendOp


class NoAiterKernel(BackendOp):
    backend = "aiter"
    families: ClassVar[frozenset[str]] = frozenset({"cdna3", "cdna4"})

    def __init__(self, op: str, reason: str):
        self.op = op
        self.reason = reason

    def not_supported_reasons(self, device: Device, problem) -> list[str]:
        return [*super().not_supported_reasons(device, problem), self.reason]

    def run(self, *args, **kwargs) -> None:
        raise RuntimeError(f"aiter {self.op}: {self.reason}")
