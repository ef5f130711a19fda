"""Shared fixtures: fresh random inputs every run (the seed is printed in the
header; ROCMOE_TEST_SEED=<n> reproduces a run), and output poisoning."""

from __future__ import annotations

import os
import secrets

import pytest
import torch

# Triton kernels run under the interpreter on a CPU-only machine, compiled on a
# GPU one; this must be decided before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

SESSION_SEED = int(os.environ.get("ROCMOE_TEST_SEED") or secrets.randbits(31))


def pytest_report_header(config):
    return f"rocmoe test seed: {SESSION_SEED} (reproduce with ROCMOE_TEST_SEED={SESSION_SEED})"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the session seed and the test's name."""
    seed = (SESSION_SEED * 1_000_003 + sum(map(ord, request.node.nodeid))) % (2**63)
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True)
def _fresh_registry():
    """Tests that touch ROCMOE_* variables reload them; restore afterwards."""
    from rocmoe import registry

    yield
    registry.reload_env()


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with a value no op writes: NaN for floats, a
    sentinel for ints."""
    if t.is_floating_point():
        return t.fill_(float("nan"))
    return t.fill_(-7777)


def is_poisoned(t: torch.Tensor) -> torch.Tensor:
    """Elementwise: still holds the poison."""
    if t.is_floating_point():
        return torch.isnan(t)
    return t == -7777


@pytest.fixture
def kernel_device() -> torch.device:
    """Where Triton kernels run in this process: the GPU, else the CPU interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.fail("no GPU and TRITON_INTERPRET is off: the Triton tests cannot run here")
    return torch.device("cpu")


@pytest.fixture(params=["torch", "triton"])
def backend(request, kernel_device):
    """(name, device) for tests run by every backend: torch on the CPU, triton
    where its kernels run (the GPU, else the interpreter)."""
    return request.param, torch.device("cpu") if request.param == "torch" else kernel_device


def on_device(device: torch.device):
    """A function moving tensors to ``device`` and passing anything else through."""
    def moved(t):
        return t.to(device) if isinstance(t, torch.Tensor) else t

    return moved
