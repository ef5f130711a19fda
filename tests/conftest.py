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


def adversarial_routing_logits(case: str, experts: int, gen: torch.Generator) -> torch.Tensor:
    """fp32 [rows, experts] router logits built to break a top-k: ties, equal
    rows, signed zeros, infinities (``infinities``: some rows with two +inf,
    whose softmax is NaN; ``pos_inf``: one +inf per row), huge magnitudes."""
    if case == "many_ties":
        return torch.randint(-2, 3, (16, experts), generator=gen).float()
    if case in ("all_equal", "all_equal_negative"):
        return torch.full((4, experts), -0.375 if case == "all_equal_negative" else 0.375)
    if case == "signed_zeros":
        logits = torch.where(torch.rand(8, experts, generator=gen) < 0.5, -0.0, 0.0)
        logits[:, ::7] = -1.0
        return logits
    if case == "huge":
        return torch.randn(8, experts, generator=gen) * 1e30
    logits = torch.randn(8, experts, generator=gen)
    if case == "infinities":
        logits[:, ::5] = float("-inf")
        logits[::2, 3] = float("inf")
        logits[1::2, 4:6] = float("inf")
    elif case == "neg_inf":
        logits[:, ::2] = float("-inf")
        logits[0, :] = float("-inf")
        logits[0, 5] = 1.0
    elif case == "pos_inf":
        logits[:, 9] = float("inf")
    else:
        raise ValueError(f"unknown adversarial case {case!r}")
    return logits
