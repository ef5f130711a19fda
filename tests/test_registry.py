"""Backend selection for every device family, env handling, explanations."""

from __future__ import annotations

import pytest

from rocmoe import registry
from rocmoe.device import Device
from rocmoe.registry import BackendOp, BackendUnavailableError

ALL_ARCHS = ["gfx942", "gfx950", "sm90", "sm100", "sm80", "xpu", "cpu"]


class FakeImpl(BackendOp):
    def __init__(self, op, backend, families, extra_reason=None):
        self.op, self.backend, self.families = op, backend, frozenset(families)
        self.extra_reason = extra_reason

    def not_supported_reasons(self, device, problem):
        reasons = super().not_supported_reasons(device, problem)
        if self.extra_reason and problem == "too-big":
            reasons.append(self.extra_reason)
        return reasons


GPU_FAMILIES = {"cdna3", "cdna4", "amd", "hopper", "blackwell", "ampere", "cuda", "xpu"}


@pytest.fixture
def fake_backends(monkeypatch):
    """All three backends 'installed' for the op 'fake': aiter on CDNA only,
    triton on every GPU (but not for problem 'too-big'), torch everywhere."""
    impls = {
        ("fake", "aiter"): FakeImpl("fake", "aiter", {"cdna3", "cdna4"}),
        ("fake", "triton"): FakeImpl("fake", "triton", GPU_FAMILIES, "E > 1024 is not supported"),
        ("fake", "torch"): FakeImpl("fake", "torch", GPU_FAMILIES | {"cpu"}),
    }
    monkeypatch.setattr(registry, "_impls", dict(impls))
    monkeypatch.setattr(registry, "_selection_cache", {})
    monkeypatch.setattr(registry, "OPS", (*registry.OPS, "fake"))
    yield impls


@pytest.mark.parametrize("arch, expected", [("gfx942", "aiter"), ("gfx950", "aiter"), ("sm90", "triton"),
                                            ("sm100", "triton"), ("sm80", "triton"), ("xpu", "triton"),
                                            ("cpu", "torch")])
def test_default_order_per_family(fake_backends, arch, expected):
    choice = registry.select("fake", Device.from_arch(arch), "small")
    assert choice.impl.backend == expected
    assert choice.source.startswith("default order")


def test_falls_through_with_reasons(fake_backends):
    choice = registry.select("fake", Device.from_arch("sm90"), "too-big")
    assert choice.impl.backend == "torch"
    assert choice.skipped == (("triton", ("E > 1024 is not supported",)),)


def test_explicit_choice_that_cannot_run_raises_with_every_reason(fake_backends):
    with pytest.raises(BackendUnavailableError) as info:
        registry.select("fake", Device.from_arch("sm90"), "small", backend="aiter")
    message = str(info.value)
    assert "the backend= argument" in message and "aiter fake does not run on hopper" in message
    with pytest.raises(BackendUnavailableError, match="E > 1024"):
        registry.select("fake", Device.from_arch("sm90"), "too-big", backend="triton")


def test_preference_list_falls_through_within_the_list_only(fake_backends):
    assert registry.select("fake", Device.from_arch("sm90"), "small", backend="aiter,torch").impl.backend == "torch"
    with pytest.raises(BackendUnavailableError) as info:
        registry.select("fake", Device.from_arch("cpu"), "small", backend="aiter, triton")
    assert set(info.value.reasons) == {"aiter", "triton"}


@pytest.mark.parametrize("value, message", [
    ("trtion", r"unknown backend 'trtion'; valid names: aiter, triton, torch"),
    ("triton,cuda", "unknown backend 'cuda'"),
    (" , ", "is empty"),
    ("torch,torch", "names a backend twice"),
])
def test_bad_backend_argument(fake_backends, value, message):
    with pytest.raises(ValueError, match=message):
        registry.select("fake", Device.from_arch("cpu"), "small", backend=value)


def test_auto_and_case_and_spaces(fake_backends):
    dev = Device.from_arch("gfx942")
    assert registry.select("fake", dev, "small", backend="auto").impl.backend == "aiter"
    assert registry.select("fake", dev, "small", backend=" Triton ").impl.backend == "triton"


def test_env_precedence(fake_backends, monkeypatch):
    dev = Device.from_arch("gfx950")
    monkeypatch.setenv("ROCMOE_BACKEND", "torch")
    registry.reload_env()
    assert registry.select("fake", dev, "small").impl.backend == "torch"
    monkeypatch.setenv("ROCMOE_FAKE_BACKEND", "triton")
    registry.reload_env()
    choice = registry.select("fake", dev, "small")
    assert (choice.impl.backend, choice.source) == ("triton", "ROCMOE_FAKE_BACKEND")
    # the argument beats both variables
    assert registry.select("fake", dev, "small", backend="aiter").impl.backend == "aiter"


def test_env_is_read_once_until_reload(fake_backends, monkeypatch):
    dev = Device.from_arch("gfx942")
    assert registry.select("fake", dev, "small").impl.backend == "aiter"
    monkeypatch.setenv("ROCMOE_BACKEND", "torch")
    assert registry.select("fake", dev, "small").impl.backend == "aiter"  # not re-read per call
    registry.reload_env()
    assert registry.select("fake", dev, "small").impl.backend == "torch"


def test_env_typo_and_empty_value(fake_backends, monkeypatch):
    monkeypatch.setenv("ROCMOE_BACKEND", "aitre")
    registry.reload_env()
    with pytest.raises(ValueError, match=r"ROCMOE_BACKEND='aitre': unknown backend 'aitre'"):
        registry.select("fake", Device.from_arch("cpu"), "small")
    monkeypatch.setenv("ROCMOE_BACKEND", "")  # empty means unset
    registry.reload_env()
    assert registry.select("fake", Device.from_arch("cpu"), "small").impl.backend == "torch"
    assert "ROCMOE_BACKEND" not in registry.env_settings()


def test_env_unsatisfiable_is_not_silently_ignored(fake_backends, monkeypatch):
    monkeypatch.setenv("ROCMOE_FAKE_BACKEND", "aiter")
    registry.reload_env()
    with pytest.raises(BackendUnavailableError, match="requested by ROCMOE_FAKE_BACKEND"):
        registry.select("fake", Device.from_arch("cpu"), "small")


def test_selection_is_cached(fake_backends, monkeypatch):
    dev = Device.from_arch("sm90")
    first = registry.select("fake", dev, "small")
    calls = []
    monkeypatch.setattr(registry, "reasons_for", lambda *a: calls.append(a) or [])
    assert registry.select("fake", dev, "small") is first
    assert calls == []


def test_op_override_table(fake_backends, monkeypatch):
    monkeypatch.setitem(registry.OP_ORDER_OVERRIDES, ("fake", "hopper"), ("torch", "triton"))
    assert registry.select("fake", Device.from_arch("sm90"), "small").impl.backend == "torch"
    assert registry.select("fake", Device.from_arch("sm100"), "small").impl.backend == "triton"


def test_explain_lists_every_backend(fake_backends):
    rows = registry.explain("fake", Device.from_arch("sm90"), "too-big")
    assert [(r.backend, r.selected, r.available) for r in rows] == [
        ("aiter", False, False), ("triton", False, False), ("torch", True, True)]
    assert rows[1].reasons == ("E > 1024 is not supported",)


def test_missing_implementation_and_broken_backend_are_reasons(monkeypatch):
    monkeypatch.setattr(registry, "_impls", {})
    monkeypatch.setattr(registry, "_backend_reasons", {"aiter": ["amd-aiter is not installed"]})
    assert registry.reasons_for("gemma4_routing", "aiter", Device.from_arch("gfx942"), None) == [
        "amd-aiter is not installed"]
    reasons = registry.reasons_for("no_such_op", "torch", Device.from_arch("cpu"), None)
    assert reasons == ["the torch backend has no no_such_op implementation in this version"]


def test_real_ops_on_cpu_select_torch_and_explain_the_rest():
    for op in ("gemma4_routing", "mxfp4_moe", "sparse_mla_decode", "sparse_topk"):
        rows = {r.backend: r for r in registry.explain(op, Device.from_arch("cpu"), None)}
        assert rows["torch"].selected
        assert not rows["aiter"].available and rows["aiter"].reasons
    # AITER is never imported just by importing or selecting
    import sys

    assert "aiter" not in sys.modules
