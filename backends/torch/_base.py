"""What every torch-backend op shares."""

from __future__ import annotations

from typing import ClassVar

import torch

from rocmoe.registry import DEFAULT_ORDER, BackendOp


def refuse_graph_capture(tensor: torch.Tensor, what: str) -> None:
    """Raise a clear error instead of a CUDA failure when a host sync would
    happen inside a CUDA-graph capture."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"the torch backend {what}, so it cannot be captured in a CUDA graph; "
                           f"use another backend (backend='triton') for graph capture")


class TorchOp(BackendOp):
    """A torch implementation: runs on every device family torch runs on."""

    backend = "torch"
    families: ClassVar[frozenset[str]] = frozenset(DEFAULT_ORDER)
