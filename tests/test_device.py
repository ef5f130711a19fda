"""The device model, with descriptors built from arch names (no hardware)."""

from __future__ import annotations

import pytest
import torch

from rocmoe.device import ARCH_LIMITS, Device, family_of_arch


@pytest.mark.parametrize("arch, vendor, family, torch_type, warp, lds", [
    ("gfx942", "amd", "cdna3", "cuda", 64, 64 * 1024),
    ("gfx950", "amd", "cdna4", "cuda", 64, 160 * 1024),
    ("sm90", "nvidia", "hopper", "cuda", 32, 227 * 1024),
    ("sm100", "nvidia", "blackwell", "cuda", 32, 227 * 1024),
    ("sm80", "nvidia", "ampere", "cuda", 32, 163 * 1024),
    ("xpu", "intel", "xpu", "xpu", 32, 128 * 1024),
    ("cpu", "cpu", "cpu", "cpu", 1, 0),
])
def test_from_arch(arch, vendor, family, torch_type, warp, lds):
    d = Device.from_arch(arch)
    assert (d.vendor, d.arch, d.family, d.torch_type) == (vendor, arch, family, torch_type)
    assert d.limits.warp_size == warp and d.limits.shared_mem_per_block == lds
    assert not d.present and d.index is None
    assert d.is_rocm == (vendor == "amd")


@pytest.mark.parametrize("arch, family", [("gfx940", "cdna3"), ("gfx1100", "amd"), ("sm86", "ampere"),
                                          ("sm89", "ampere"), ("sm120", "blackwell"), ("sm75", "cuda")])
def test_other_archs_have_families(arch, family):
    assert family_of_arch(arch) == family
    assert Device.from_arch(arch).limits.warp_size in (32, 64)


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="unknown architecture 'tpu'"):
        Device.from_arch("tpu")


def test_cpu_tensors_and_current_device_without_gpu():
    assert Device.of(torch.zeros(1)).arch == "cpu"
    assert Device.for_torch_device("cpu").present
    if not torch.cuda.is_available():
        assert Device.current().family == "cpu"


def test_limits_table_covers_the_build_matrix():
    assert {"gfx942", "gfx950", "sm90", "sm100"} <= set(ARCH_LIMITS)


def test_rocm_is_detected_from_torch_version_hip_not_gcnarchname(monkeypatch):
    """CUDA builds of torch also expose gcnArchName; only torch.version.hip decides."""
    from rocmoe import device as device_mod

    class Props:
        name, major, minor, multi_processor_count, gcnArchName = "Fake GPU", 9, 0, 132, "gfx942:sramecc+:xnack-"

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: Props)
    device_mod._probe.cache_clear()
    try:
        monkeypatch.setattr(torch.version, "hip", None)
        cuda = device_mod._probe("cuda", 0)
        assert (cuda.arch, cuda.family, cuda.limits.compute_units) == ("sm90", "hopper", 132)
        device_mod._probe.cache_clear()
        monkeypatch.setattr(torch.version, "hip", "6.4.0")
        rocm = device_mod._probe("cuda", 0)
        assert (rocm.arch, rocm.family, rocm.present) == ("gfx942", "cdna3", True)
    finally:
        device_mod._probe.cache_clear()
