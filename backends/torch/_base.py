"""What every torch-backend op shares."""

from __future__ import annotations

from typing import ClassVar

from rocmoe.registry import DEFAULT_ORDER, BackendOp


class TorchOp(BackendOp):
    """A torch implementation: runs on every device family torch runs on."""

    backend = "torch"
    families: ClassVar[frozenset[str]] = frozenset(DEFAULT_ORDER)
