"""The device model: which accelerator a tensor lives on, and what it can do.

Everything rocmoe knows about hardware lives here: vendor, architecture name,
family (the unit the registry and the config tables are keyed by) and the
limits kernels must respect. `Device.from_arch` builds the same descriptor with
no hardware present, for the ahead-of-time build matrix and for tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Device", "ArchLimits", "ARCH_LIMITS", "KNOWN_ARCHS", "family_of_arch", "meta_tensors_as",
           "launches_ahead_of_time"]


@dataclass(frozen=True)
class ArchLimits:
    """Per-architecture facts a launch configuration has to respect.

    compute_units: CUs (AMD) or SMs (NVIDIA) of the flagship part; the live
        count from the driver replaces it when hardware is present.
    shared_mem_per_block: bytes of LDS / shared memory one program may use.
    warp_size: threads per wavefront / warp.
    """

    compute_units: int
    shared_mem_per_block: int
    warp_size: int


# Flagship parts: gfx942 = MI300X (304 CUs), gfx950 = MI355X (256 CUs),
# sm90 = H100 SXM (132 SMs), sm100 = B200 (148 SMs), sm80 = A100 (108 SMs).
# Shared memory per block: gfx942 64 KiB LDS, gfx950 160 KiB, sm90/sm100
# 227 KiB opt-in, sm80 163 KiB opt-in.
ARCH_LIMITS: dict[str, ArchLimits] = {
    "gfx942": ArchLimits(compute_units=304, shared_mem_per_block=64 * 1024, warp_size=64),
    "gfx950": ArchLimits(compute_units=256, shared_mem_per_block=160 * 1024, warp_size=64),
    "sm90": ArchLimits(compute_units=132, shared_mem_per_block=227 * 1024, warp_size=32),
    "sm100": ArchLimits(compute_units=148, shared_mem_per_block=227 * 1024, warp_size=32),
    "sm80": ArchLimits(compute_units=108, shared_mem_per_block=163 * 1024, warp_size=32),
    "xpu": ArchLimits(compute_units=64, shared_mem_per_block=128 * 1024, warp_size=32),
    "cpu": ArchLimits(compute_units=1, shared_mem_per_block=0, warp_size=1),
}

KNOWN_ARCHS: tuple[str, ...] = tuple(ARCH_LIMITS)

_AMD_FAMILIES = {"gfx940": "cdna3", "gfx941": "cdna3", "gfx942": "cdna3", "gfx950": "cdna4"}


def family_of_arch(arch: str) -> str:
    """Map an architecture name to the family the registry orders backends by.

    Families: ``cdna3``, ``cdna4``, ``amd`` (other AMD GPUs), ``hopper``,
    ``blackwell``, ``ampere`` (sm80..sm89), ``cuda`` (other NVIDIA), ``xpu``, ``cpu``.
    """
    if arch in _AMD_FAMILIES:
        return _AMD_FAMILIES[arch]
    if arch.startswith("gfx"):
        return "amd"
    if arch.startswith("sm") and arch[2:].isdigit() and len(arch) >= 4:
        major = int(arch[2:-1])  # "sm90" -> 9, "sm100" -> 10, "sm86" -> 8
        if major == 9:
            return "hopper"
        if major in (10, 11, 12):
            return "blackwell"
        if major == 8:
            return "ampere"
        return "cuda"
    if arch in ("xpu", "cpu"):
        return arch
    raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(KNOWN_ARCHS)}")


def _vendor_of_arch(arch: str) -> str:
    if arch.startswith("gfx"):
        return "amd"
    if arch.startswith("sm"):
        return "nvidia"
    return {"xpu": "intel", "cpu": "cpu"}[arch]


@dataclass(frozen=True)
class Device:
    """One accelerator (or the CPU) as the registry and the configs see it.

    Attributes:
        vendor: ``"amd"``, ``"nvidia"``, ``"intel"`` or ``"cpu"``.
        arch: ``"gfx942"``, ``"gfx950"``, ``"sm90"``, ``"sm100"``, ``"sm80"``,
            ``"xpu"``, ``"cpu"`` (or another gfx*/sm* name).
        family: see :func:`family_of_arch`.
        torch_type: the torch device type tensors on it have (``"cuda"`` on
            both AMD and NVIDIA GPUs, ``"xpu"``, ``"cpu"``).
        index: the device index, ``None`` for the CPU and for descriptors
            built without hardware.
        name: the marketing name reported by the driver, or the arch.
        limits: :class:`ArchLimits`, with the live CU/SM count when known.
        present: whether this descriptor came from real hardware.
    """

    vendor: str
    arch: str
    family: str
    torch_type: str
    index: int | None
    name: str
    limits: ArchLimits
    present: bool = False

    @property
    def key(self) -> tuple[str, int | None, str]:
        """Hashable identity used by caches: (torch device type, index, arch)."""
        return (self.torch_type, self.index, self.arch)

    @property
    def is_rocm(self) -> bool:
        return self.vendor == "amd"

    @property
    def is_gpu(self) -> bool:
        return self.vendor in ("amd", "nvidia", "intel")

    def describe(self) -> str:
        """A short human description, e.g. ``"NVIDIA H100 80GB HBM3 (sm90, hopper)"``."""
        return f"{self.name} ({self.arch}, {self.family})"

    @staticmethod
    def from_arch(arch: str) -> Device:
        """A descriptor for ``arch`` with no hardware present.

        >>> Device.from_arch("gfx942").family
        'cdna3'
        """
        family = family_of_arch(arch)
        vendor = _vendor_of_arch(arch)
        torch_type = {"amd": "cuda", "nvidia": "cuda", "intel": "xpu", "cpu": "cpu"}[vendor]
        limits = ARCH_LIMITS.get(arch) or _fallback_limits(vendor)
        return Device(vendor, arch, family, torch_type, None, arch, limits, present=False)

    @staticmethod
    def current(index: int | None = None) -> Device:
        """The device torch would use now: the current GPU if any, else the CPU.

        On a torch build for ROCm (``torch.version.hip`` set) the arch is read
        from ``gcnArchName``; on CUDA it is ``sm{major}{minor}``. CUDA builds
        also have a ``gcnArchName`` attribute, so its presence proves nothing.
        """
        if torch.cuda.is_available():
            return Device.for_torch_device(
                torch.device("cuda", torch.cuda.current_device() if index is None else index)
            )
        xpu = getattr(torch, "xpu", None)
        if xpu is not None and xpu.is_available():
            return Device.for_torch_device(
                torch.device("xpu", xpu.current_device() if index is None else index)
            )
        return CPU

    @staticmethod
    def for_torch_device(device: torch.device | str) -> Device:
        """The descriptor of a ``torch.device`` (cached per type and index)."""
        device = torch.device(device)
        if device.type == "cpu":
            return CPU
        if device.type == "meta":
            return _meta_standin()
        index = device.index
        if index is None:
            index = torch.cuda.current_device() if device.type == "cuda" else 0
        return _probe(device.type, index)

    @staticmethod
    def of(tensor: torch.Tensor) -> Device:
        """The descriptor of the device ``tensor`` lives on."""
        device = tensor.device
        if device.type == "cpu":
            return CPU
        if device.type == "meta":
            return _meta_standin()
        return _probe(device.type, device.index if device.index is not None else 0)


_meta_device: contextvars.ContextVar[Device | None] = contextvars.ContextVar("rocmoe_meta_device", default=None)


@contextlib.contextmanager
def meta_tensors_as(arch: str, compute_units: int | None = None) -> Iterator[Device]:
    """Inside this block, tensors on torch's ``meta`` device (shapes and dtypes,
    no storage) stand for tensors on an ``arch`` GPU with ``compute_units``
    CUs/SMs (default: the arch's flagship part, ``ARCH_LIMITS``), so the ops'
    host code chooses that GPU's backends and launch configs. ``rocmoe
    precompile`` uses it to drive every launch with no GPU present."""
    device = Device.from_arch(arch)
    if compute_units is not None:
        if compute_units < 1:
            raise ValueError(f"compute_units must be positive, got {compute_units}")
        device = dataclasses.replace(device, limits=dataclasses.replace(device.limits, compute_units=compute_units))
    token = _meta_device.set(device)
    try:
        yield device
    finally:
        _meta_device.reset(token)


def launches_ahead_of_time(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a meta tensor standing for a GPU tensor (inside
    :func:`meta_tensors_as`): the ops then skip torch's dispatcher, whose fake
    kernels would otherwise take meta tensors and launch nothing."""
    return tensor.device.type == "meta" and _meta_device.get() is not None


def _meta_standin() -> Device:
    device = _meta_device.get()
    if device is None:
        raise ValueError("tensors on the meta device have no hardware; rocmoe treats them as a GPU only inside "
                         "rocmoe.device.meta_tensors_as(arch) (what rocmoe precompile does)")
    return device


def _fallback_limits(vendor: str) -> ArchLimits:
    if vendor == "amd":
        return ArchLimits(compute_units=64, shared_mem_per_block=64 * 1024, warp_size=64)
    if vendor == "nvidia":
        return ArchLimits(compute_units=80, shared_mem_per_block=99 * 1024, warp_size=32)
    return ARCH_LIMITS[{"intel": "xpu"}.get(vendor, "cpu")]


@functools.cache
def _probe(torch_type: str, index: int) -> Device:
    if torch_type == "cuda":
        props = torch.cuda.get_device_properties(index)
        if torch.version.hip:
            arch = props.gcnArchName.split(":")[0]
        else:
            arch = f"sm{props.major}{props.minor}"
        base = Device.from_arch(arch)
        limits = dataclasses.replace(base.limits, compute_units=props.multi_processor_count)
        return dataclasses.replace(base, index=index, name=props.name, limits=limits, present=True)
    if torch_type == "xpu":
        props = torch.xpu.get_device_properties(index)
        base = Device.from_arch("xpu")
        units = getattr(props, "gpu_subslice_count", None) or getattr(props, "max_compute_units", 0)
        limits = dataclasses.replace(base.limits, compute_units=int(units) or base.limits.compute_units)
        return dataclasses.replace(base, index=index, name=props.name, limits=limits, present=True)
    raise ValueError(f"rocmoe does not support torch device type {torch_type!r}")


CPU = dataclasses.replace(Device.from_arch("cpu"), name="CPU", present=True)
