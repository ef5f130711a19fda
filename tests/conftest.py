"""Shared fixtures: fresh random inputs every run (the seed is printed in the
header; ROCMOE_TEST_SEED=<n> reproduces a run), and output poisoning."""

from __future__ import annotations

import os
import secrets

import pytest
import torch

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
