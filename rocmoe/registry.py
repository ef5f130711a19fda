"""Backend registry: which implementation of which op runs on which device.

Each backend (``aiter``, ``triton``, ``torch``) is a package
``rocmoe.backends.<backend>`` that answers ``availability_reasons()`` (why the
whole backend cannot run here, e.g. a missing library), and holds one module per
op, ``rocmoe.backends.<backend>.<op>``, exporting ``IMPLEMENTATION``: a
:class:`BackendOp` that states what it supports and answers
``not_supported_reasons(device, problem)``. No reasons means it can run.

Selection order, first match wins:
  1. the ``backend=`` argument of the op call;
  2. ``ROCMOE_<OP>_BACKEND`` (e.g. ``ROCMOE_MXFP4_MOE_BACKEND``);
  3. ``ROCMOE_BACKEND``;
  4. the default order for the device family (:data:`DEFAULT_ORDER`, with the
     per-op exceptions of :data:`OP_ORDER_OVERRIDES`).
1-3 accept one name or a comma-separated preference list; ``auto`` means the
default order. A requested choice that cannot run raises
:class:`BackendUnavailableError` with every reason (no silent fallback to the
default order). Selection is cached per (op, device, problem, request), so the
hot path is one dict lookup. Environment variables are read once, at import;
:func:`reload_env` re-reads them.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

from rocmoe.device import Device

__all__ = [
    "BACKENDS",
    "OPS",
    "DEFAULT_ORDER",
    "OP_ORDER_OVERRIDES",
    "BackendOp",
    "BackendUnavailableError",
    "Choice",
    "select",
    "explain",
    "default_order",
    "reload_env",
    "env_settings",
]

log = logging.getLogger("rocmoe")

BACKENDS: tuple[str, ...] = ("aiter", "triton", "torch")
OPS: tuple[str, ...] = ("gemma4_routing", "mxfp4_moe", "sparse_mla_decode", "sparse_topk")

# Preference per device family; the first backend with no reasons runs.
DEFAULT_ORDER: dict[str, tuple[str, ...]] = {
    "cdna3": ("aiter", "triton", "torch"),
    "cdna4": ("aiter", "triton", "torch"),
    "amd": ("triton", "torch"),
    "hopper": ("triton", "torch"),
    "blackwell": ("triton", "torch"),
    "ampere": ("triton", "torch"),
    "cuda": ("triton", "torch"),
    "xpu": ("triton", "torch"),
    "cpu": ("torch",),
}

# (op, family) -> order, where measurements say an op prefers another order
# than its family's default. Empty until a benchmark earns an entry.
OP_ORDER_OVERRIDES: dict[tuple[str, str], tuple[str, ...]] = {}


class BackendUnavailableError(RuntimeError):
    """No requested backend can run the op; the message lists every reason."""

    def __init__(self, op: str, device: Device, source: str, reasons: dict[str, list[str]]):
        self.op = op
        self.device = device
        self.reasons = reasons
        lines = [f"no backend can run {op} on {device.describe()} (requested by {source}):"]
        for name, why in reasons.items():
            lines.append(f"  {name}:")
            lines.extend(f"    - {r}" for r in why)
        super().__init__("\n".join(lines))


class BackendOp:
    """One backend's implementation of one op.

    Subclasses set the class attributes and implement ``run``; they extend
    :meth:`not_supported_reasons` with op-specific checks after calling
    ``super()``. ``problem`` is the op's frozen problem description (dtypes and
    the static dimensions that decide support), see ``rocmoe.ops``.
    """

    op: ClassVar[str]
    backend: ClassVar[str]
    #: Device families this implementation runs on.
    families: ClassVar[frozenset[str]]

    def not_supported_reasons(self, device: Device, problem: Any) -> list[str]:
        """User-facing sentences saying why this cannot run; empty if it can."""
        if device.family not in self.families:
            return [
                f"{self.backend} {self.op} does not run on {device.family} devices "
                f"(it runs on: {', '.join(sorted(self.families))})"
            ]
        return []

    def graph_capturable(self, problem: Any) -> bool:
        """Whether a call for ``problem`` can be captured in a CUDA graph (no host sync)."""
        return True

    def config_source(self, device: Device) -> str | None:
        """Where this implementation's launch configs come from on ``device``
        (a table path or a heuristic name), or None when it has none."""
        return None

    def __repr__(self) -> str:
        return f"<{self.backend} {self.op}>"


@dataclass(frozen=True)
class Choice:
    """A selection result: the implementation and how it was chosen."""

    impl: BackendOp
    source: str
    skipped: tuple[tuple[str, tuple[str, ...]], ...]


# --------------------------------------------------------------------------
# Environment, read once.

_ENV_GLOBAL = "ROCMOE_BACKEND"


def _env_name(op: str) -> str:
    return f"ROCMOE_{op.upper()}_BACKEND"


def _read_env() -> dict[str, str]:
    names = [_ENV_GLOBAL] + [_env_name(op) for op in OPS]
    return {n: os.environ[n] for n in names if os.environ.get(n, "").strip()}


_env: dict[str, str] = _read_env()


def env_settings() -> dict[str, str]:
    """The backend environment variables as read at import (or last reload)."""
    return dict(_env)


def reload_env() -> None:
    """Re-read the ``ROCMOE_*BACKEND`` variables and forget cached selections."""
    global _env
    _env = _read_env()
    _selection_cache.clear()


def _parse_request(value: str, source: str) -> tuple[str, ...] | None:
    """``"triton, torch"`` -> ("triton", "torch"); ``"auto"`` -> None."""
    names = tuple(n.strip().lower() for n in value.split(",") if n.strip())
    if not names:
        raise ValueError(f"{source} is empty; give a backend name ({', '.join(BACKENDS)}) or 'auto'")
    if names == ("auto",):
        return None
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(
            f"{source}={value!r}: unknown backend {', '.join(map(repr, unknown))}; "
            f"valid names: {', '.join(BACKENDS)} (or 'auto')"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"{source}={value!r} names a backend twice")
    return names


def _requested(op: str, backend: str | None) -> tuple[tuple[str, ...] | None, str]:
    if backend is not None:
        return _parse_request(backend, "backend"), "the backend= argument"
    for var in (_env_name(op), _ENV_GLOBAL):
        if var in _env:
            return _parse_request(_env[var], var), var
    return None, "default order"


def default_order(op: str, device: Device) -> tuple[str, ...]:
    """The backends tried, in order, for ``op`` on ``device`` when nothing is requested."""
    return OP_ORDER_OVERRIDES.get((op, device.family), DEFAULT_ORDER.get(device.family, ("torch",)))


# --------------------------------------------------------------------------
# Loading backends lazily: importing rocmoe imports no backend library.

_backend_reasons: dict[str, list[str]] = {}
_impls: dict[tuple[str, str], BackendOp | list[str]] = {}


def backend_reasons(backend: str) -> list[str]:
    """Why the whole backend cannot run in this process (cached)."""
    if backend not in _backend_reasons:
        try:
            module = importlib.import_module(f"rocmoe.backends.{backend}")
            _backend_reasons[backend] = list(module.availability_reasons())
        except Exception as exc:  # a broken optional install must not break rocmoe
            _backend_reasons[backend] = [f"importing rocmoe.backends.{backend} failed: {exc!r}"]
    return _backend_reasons[backend]


def implementation(op: str, backend: str) -> BackendOp | list[str]:
    """The backend's implementation of ``op``, or the reasons there is none."""
    key = (op, backend)
    if key not in _impls:
        reasons = backend_reasons(backend)
        if reasons:
            _impls[key] = reasons
        else:
            module_name = f"rocmoe.backends.{backend}.{op}"
            if importlib.util.find_spec(module_name) is None:
                _impls[key] = [f"the {backend} backend has no {op} implementation in this version"]
            else:
                try:
                    _impls[key] = importlib.import_module(module_name).IMPLEMENTATION
                except Exception as exc:
                    _impls[key] = [f"importing {module_name} failed: {exc!r}"]
    return _impls[key]


def reasons_for(op: str, backend: str, device: Device, problem: Any) -> list[str]:
    """Every reason ``backend`` cannot run ``op`` for ``problem`` on ``device``."""
    impl = implementation(op, backend)
    if isinstance(impl, list):
        return impl
    return impl.not_supported_reasons(device, problem)


# --------------------------------------------------------------------------
# Selection.

_selection_cache: dict[Hashable, Choice] = {}


def select(op: str, device: Device, problem: Hashable, backend: str | None = None) -> Choice:
    """Pick the implementation of ``op`` for ``problem`` on ``device``.

    Args:
        op: one of :data:`OPS`.
        device: where the op's tensors live.
        problem: the op's frozen problem description (hashable).
        backend: the caller's ``backend=`` argument, or None.

    Raises:
        ValueError: an unknown backend name in the argument or the environment.
        BackendUnavailableError: no requested (or default) backend can run.
    """
    key = (op, device.key, problem, backend)
    choice = _selection_cache.get(key)
    if choice is not None:
        return choice
    names, source = _requested(op, backend)
    if names is None:
        names = default_order(op, device)
        source = f"default order for {device.family}" if source == "default order" else source
    skipped: list[tuple[str, tuple[str, ...]]] = []
    for name in names:
        reasons = reasons_for(op, name, device, problem)
        if not reasons:
            impl = implementation(op, name)
            assert isinstance(impl, BackendOp)
            choice = Choice(impl, source, tuple(skipped))
            if skipped:
                log.debug("%s on %s: chose %s (%s); skipped %s", op, device.describe(), name,
                          source, "; ".join(f"{n}: {' '.join(r)}" for n, r in skipped))
            _selection_cache[key] = choice
            return choice
        skipped.append((name, tuple(reasons)))
    raise BackendUnavailableError(op, device, source, {n: list(r) for n, r in skipped})


@dataclass(frozen=True)
class Explanation:
    """One row of ``rocmoe info``: a backend's status for an op on a device."""

    op: str
    backend: str
    selected: bool
    available: bool
    reasons: tuple[str, ...]
    config_source: str | None


def explain(op: str, device: Device, problem: Hashable, backend: str | None = None) -> list[Explanation]:
    """Every backend's status for ``op``: which is selected, which can run, and why not.

    Raises ValueError for a malformed backend request, as :func:`select` does."""
    try:
        chosen: str | None = select(op, device, problem, backend).impl.backend
    except BackendUnavailableError:
        chosen = None
    rows = []
    for name in BACKENDS:
        reasons = reasons_for(op, name, device, problem)
        impl = implementation(op, name)
        config = impl.config_source(device) if isinstance(impl, BackendOp) and not reasons else None
        rows.append(Explanation(op, name, name == chosen, not reasons, tuple(reasons), config))
    return rows
