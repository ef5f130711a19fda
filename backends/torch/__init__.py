"""The torch backend: the reference implementation of every op and the universal
fallback (CPU and any GPU torch supports). Vectorised over tokens; the MoE
loops over the experts that received tokens."""


def availability_reasons() -> list[str]:
    """torch is rocmoe's own dependency, so this backend is always available."""
    return []
