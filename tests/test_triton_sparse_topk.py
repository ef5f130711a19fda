"""The Triton radix select of sparse_topk, config by config: interpreter on
CPU, compiled on a GPU. Checked against a plain Python ranking of each
window (NaN ranks above +inf, -0.0 equals +0.0), comparing value multisets
(ties may pick any position) and that positions are distinct and in the window."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from conftest import is_poisoned, poison

from rocmoe.backends.triton._sparse_topk_kernel import _coarse_digit
from rocmoe.backends.triton.sparse_topk import (
    MAX_SPLIT_PROGRAMS_PER_UNIT,
    TopkConfig,
    choose_config,
    launch_select,
    launch_window,
    workspace_numel,
)
from rocmoe.device import Device

CONFIGS = [
    TopkConfig(64, 4, 1, 11),
    TopkConfig(64, 4, 1, 8),
    TopkConfig(64, 2, 3, 11, RESIDENT=32),   # chunks that do not divide the row evenly; candidates streamed
    TopkConfig(128, 4, 8, 8, RESIDENT=1024),  # candidates in registers
    TopkConfig(64, 4, 4, 5, RESIDENT=128),    # digits that do not divide 32; both candidate paths
]


def _rank_key(v: float) -> tuple:
    return (2, 0.0) if math.isnan(v) else (1, v + 0.0)


def _check_row(row_values: list[float], n: int, topk: int, got: list[int]) -> None:
    if n <= topk:
        assert got == list(range(n)) + [-1] * (topk - n)
        return
    assert -1 not in got and len(set(got)) == topk and all(0 <= p < n for p in got), got
    want = sorted((_rank_key(v) for v in row_values[:n]), reverse=True)[:topk]
    assert sorted((_rank_key(row_values[p]) for p in got), reverse=True) == want


def _run(logits, lens, topk, config, **kwargs):
    out = poison(torch.empty(logits.shape[0], topk, dtype=torch.int32, device=logits.device))
    launch_select(logits, lens, topk, out, config, **kwargs)
    assert not is_poisoned(out).any()
    return out.cpu()


def _lengths(gen, tokens, width, topk):
    lens = torch.randint(0, width + 1, (tokens,), generator=gen, dtype=torch.int32)
    edges = [width, topk + 1, topk, 0, width + 50, -3]
    lens[: min(tokens, len(edges))] = torch.tensor(edges[: min(tokens, len(edges))], dtype=torch.int32)
    return lens


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
@pytest.mark.parametrize("topk", [1, 37, 256])
def test_random_rows(kernel_device, gen, config, topk):
    tokens, width = 8, 700
    logits = torch.randn(tokens, width, generator=gen)
    lens = _lengths(gen, tokens, width, topk)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config)
    for t in range(tokens):
        _check_row(logits[t].tolist(), min(max(int(lens[t]), 0), width), topk, out[t].tolist())


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_adversarial_rows(kernel_device, gen, config):
    width, topk = 300, 40
    rows = [
        torch.full((width,), 1.5),                                        # every score equal
        torch.randint(0, 3, (width,), generator=gen).float(),             # three values, many ties
        torch.where(torch.rand(width, generator=gen) < 0.5, float("-inf"), float("inf")),
        torch.where(torch.rand(width, generator=gen) < 0.5, -0.0, 0.0),   # signed zeros tie
        torch.randn(width, generator=gen) * 3e38,                         # huge magnitudes
        torch.randn(width, generator=gen) * 1e-40,                        # denormals
        torch.where(torch.rand(width, generator=gen) < 0.1, float("nan"), torch.randn(width, generator=gen)),
        torch.full((width,), float("-inf")),                              # a window of -inf still counts
        # exactly topk scores in a bin of their own: the k-th is its bin's last key
        torch.randn(width, generator=gen).index_fill(0, torch.randperm(width, generator=gen)[:topk], 1000.5),
        # the same with distinct values spanning one digit of every pass
        torch.randn(width, generator=gen).index_copy(
            0, torch.randperm(width, generator=gen)[:topk], 1000 + torch.rand(topk, generator=gen)),
    ]
    logits = torch.stack(rows)
    lens = torch.full((len(rows),), width, dtype=torch.int32)
    lens[1] = 77
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config)
    for t in range(len(rows)):
        _check_row(logits[t].tolist(), int(lens[t]), topk, out[t].tolist())


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2]], ids=repr)
def test_strided_rows_and_block_table(kernel_device, gen, config):
    tokens, width, topk, block_size = 5, 320, 24, 16
    storage = torch.randn(tokens, width + 13, generator=gen)
    logits = storage[:, :width]
    lens = _lengths(gen, tokens, width, topk)
    table = torch.stack([torch.randperm(64, generator=gen)[: width // block_size] for _ in range(tokens)]).int()
    table[0, 3] = -1
    positions = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config)
    slots = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config,
                 block_table=table.to(kernel_device), block_size=block_size)
    for t in range(tokens):
        _check_row(logits[t].tolist(), min(max(int(lens[t]), 0), width), topk, positions[t].tolist())
        # The split path places winners in slots reserved by atomics, so two
        # calls may order them differently: compare the converted multisets.
        want = []
        for p in positions[t].tolist():
            entry = -1 if p < 0 else int(table[t, p // block_size])
            want.append(-1 if entry < 0 else entry * block_size + p % block_size)
        assert sorted(slots[t].tolist()) == sorted(want)


def test_split_path_zeroes_a_dirty_workspace(kernel_device, gen):
    config = TopkConfig(64, 4, 4, 11)
    tokens, width, topk = 3, 500, 30
    logits = torch.randn(tokens, width, generator=gen)
    lens = torch.full((tokens,), width, dtype=torch.int32)
    numel = workspace_numel(tokens, width, topk) + 5
    workspace = torch.randint(1, 100, (numel,), generator=gen, dtype=torch.int32)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, workspace=workspace.to(kernel_device))
    for t in range(tokens):
        _check_row(logits[t].tolist(), width, topk, out[t].tolist())


@pytest.mark.parametrize("resident", [32, 4096], ids=["streamed", "resident"])
@pytest.mark.parametrize("capacity", [1, 60, 400])
def test_split_path_rows_whose_threshold_bin_overflows_the_candidates(kernel_device, gen, capacity, resident):
    """A narrow spread puts most of a row in the threshold's coarse bin: past
    ``capacity`` candidates the row is selected whole, below it from the list."""
    config = TopkConfig(64, 4, 4, 8, RESIDENT=resident)
    tokens, width, topk = 4, 400, 50
    narrow = 10.0 + 0.01 * torch.rand(width, generator=gen)   # one coarse bin
    wide = torch.randn(width, generator=gen)
    ties = torch.randint(0, 2, (width,), generator=gen).float()
    logits = torch.stack([narrow, wide, ties, narrow.flip(0)])
    lens = torch.tensor([width, width, width, 333], dtype=torch.int32)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, capacity=capacity)
    for t in range(tokens):
        _check_row(logits[t].tolist(), int(lens[t]), topk, out[t].tolist())


def _coarse_bin_sizes(row: torch.Tensor, topk: int) -> tuple[int, int]:
    """(scores above, scores inside) the coarse bin holding the topk-th score,
    from numpy's fp16 rounding (independent of the kernel)."""
    half = row.numpy().astype(np.float16).astype(np.float64)
    half[half == 0] = 0.0
    order = sorted(set(half.tolist()), reverse=True)
    digit = {v: int(np.array([v], dtype=np.float16).view(np.uint16)[0]) for v in order}
    digit = {v: ((~d & 0xFFFF) if d >> 15 else (d | 0x8000)) >> 8 for v, d in digit.items()}
    digits = np.array([digit[v] for v in half.tolist()])
    kth = np.sort(digits)[::-1][topk - 1]
    return int((digits > kth).sum()), int((digits == kth).sum())


@pytest.mark.parametrize("resident", [32, 4096], ids=["streamed", "resident"])
@pytest.mark.parametrize("margin", [-1, 0])
def test_split_path_candidate_capacity_boundary(kernel_device, gen, margin, resident):
    """Exactly ``capacity`` candidates use the list, one more selects the row whole."""
    config = TopkConfig(64, 4, 4, 8, RESIDENT=resident)
    width, topk = 600, 70
    logits = torch.randn(1, width, generator=gen) * 0.3 + 1.0
    _, inside = _coarse_bin_sizes(logits[0], topk)
    assert inside > topk // 2  # the case is only sharp when the bin holds many scores
    capacity = inside + margin
    lens = torch.tensor([width], dtype=torch.int32)
    workspace = torch.randint(0, width, (workspace_numel(1, width, topk, capacity),), generator=gen,
                              dtype=torch.int32)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, capacity=capacity,
               workspace=workspace.to(kernel_device))
    _check_row(logits[0].tolist(), width, topk, out[0].tolist())


def test_coarse_bins_order_like_the_scores(kernel_device):
    """The split path sends every score of a higher coarse bin to the output
    unexamined: that is only right if the bins never invert the float order,
    including at fp16's overflow, underflow and signed-zero edges."""
    edges = [float("-inf"), -3e38, -65520.0, -65504.0, -1.0, -6e-8, -1e-30, -0.0, 0.0, 1e-30, 6e-8, 2.0 ** -14,
             1.0, 1.0 + 2.0 ** -12, 1.25, 65504.0, 65519.0, 65520.0, 3e38, float("inf"), float("nan")]
    values = torch.tensor(edges + torch.linspace(-5, 5, 203).tolist(), dtype=torch.float32)
    width = values.numel()
    logits = values[torch.randperm(width)][None, :].repeat(2, 1)
    for topk in (1, 17, width // 2, width - 1):
        out = _run(logits.to(kernel_device), torch.tensor([width, width - 9], dtype=torch.int32,
                                                        device=kernel_device), topk, TopkConfig(64, 4, 2, 8))
        _check_row(logits[0].tolist(), width, topk, out[0].tolist())
        _check_row(logits[1].tolist(), width - 9, topk, out[1].tolist())


def test_window_fill_in_slots_past_one_block(kernel_device, gen):
    topk = 2500  # wider than one program's block
    lens = torch.tensor([0, 1, 2499, 2500, 9000], dtype=torch.int32)
    out = poison(torch.empty(5, topk, dtype=torch.int32, device=kernel_device))
    launch_window(lens.to(kernel_device), 3000, topk, out)
    for t, n in enumerate([0, 1, 2499, 2500, 2500]):
        assert out[t].tolist() == list(range(n)) + [-1] * (topk - n)


@triton.jit
def _coarse_digits_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, _coarse_digit(tl.load(x_ptr + offs, mask=offs < n, other=0.0)), mask=offs < n)


def test_coarse_digit_is_monotone(kernel_device, gen):
    edges = [float("-inf"), -3e38, -65520.0, -65504.0, -1.0, -6e-8, -1e-30, -0.0, 0.0, 1e-30, 6e-8, 2.0 ** -14,
             1.0, 1.0 + 2.0 ** -12, 1.25, 65504.0, 65519.0, 65520.0, 3e38, float("inf")]
    values = [*sorted(edges + (torch.randn(200, generator=gen) * 100).tolist()), float("nan")]
    x = torch.tensor(values, dtype=torch.float32, device=kernel_device)
    digits = torch.full((len(values),), -1, dtype=torch.int32, device=kernel_device)
    _coarse_digits_kernel[(1,)](x, digits, len(values), BLOCK=256)
    digits = digits.cpu().tolist()
    assert all(0 <= d < 256 for d in digits)
    assert all(a <= b for a, b in itertools.pairwise(digits)), digits
    assert digits[-1] == 255 and digits[values.index(0.0)] == digits[values.index(-0.0)]


@pytest.mark.parametrize("arch", ["sm90", "gfx942"])
def test_split_grid_and_workspace_stay_bounded_as_the_batch_grows(arch):
    """The table's last bucket runs on past the batches the tuner measured: a
    prefill-sized batch must get the row kernel, not a split grid (and a
    workspace) that grows with T."""
    device = Device.from_arch(arch)
    units = device.limits.compute_units
    for tokens in (1, 8, 64, 65, 200, 1000, 4096, 8192, 65536):
        for width in (8192, 32768, 131072):
            config = choose_config(device, tokens, width)
            if config.SPLIT > 1:
                assert tokens * config.SPLIT <= MAX_SPLIT_PROGRAMS_PER_UNIT * units, (tokens, width, config)
                assert workspace_numel(tokens, width, 2048) * 4 <= 256 << 20, (tokens, width, config)
    assert choose_config(device, 65536, 131072).SPLIT == 1
    assert choose_config(device, 1, 131072).SPLIT > 1
