"""The Triton backend: rocmoe's own kernels, one module per op."""

from __future__ import annotations

import importlib.util


def availability_reasons() -> list[str]:
    """Why Triton kernels cannot run in this process (empty when they can)."""
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install 'rocmoe[cuda]', '[rocm]' or '[xpu]')"]
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install is a reason, not a crash
        return [f"importing triton failed: {exc!r}"]
    return []
