"""The Triton backend: rocmoe's own kernels, one module per op."""

from __future__ import annotations

import importlib.util


def availability_reasons() -> list[str]:
    """Why Triton kernels cannot run in this process (empty when they can)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (CUDA: pip install 'rocmoe[cuda]'; ROCm and XPU builds of torch "
                "bring it as pytorch-triton-rocm / pytorch-triton-xpu)"]
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install is a reason, not a crash
        return [f"importing triton failed: {exc!r}"]
    return []
