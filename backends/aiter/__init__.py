"""The AITER backend: adapters onto AMD's AITER kernel library (ROCm only).

Importing rocmoe never imports aiter; it is probed here, lazily, the first time
the registry asks.
"""

from __future__ import annotations

import importlib.util

import torch


def availability_reasons() -> list[str]:
    """Why AITER cannot run in this process (empty when it can)."""
    if not torch.version.hip:
        return ["AITER needs a ROCm build of torch (this torch was built without HIP)"]
    if importlib.util.find_spec("aiter") is None:
        return ["amd-aiter is not installed (pip install 'rocmoe[rocm]')"]
    try:
        import aiter  # noqa: F401  # raises RuntimeError, not ImportError, without ROCm
    except Exception as exc:
        return [f"importing aiter failed: {exc!r}"]
    return []
