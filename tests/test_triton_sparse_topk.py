"""The Triton radix select of sparse_topk, config by config: interpreter on
CPU, compiled on a GPU. Checked against a plain Python ranking of each
window (NaN ranks above +inf, -0.0 equals +0.0), comparing value multisets
(ties may pick any position) and that positions are distinct and in the window."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import is_poisoned, poison

from rocmoe.backends.triton.sparse_topk import TopkConfig, launch_select, launch_window, workspace_numel

CONFIGS = [
    TopkConfig(64, 4, 1, 11),
    TopkConfig(64, 4, 1, 8),
    TopkConfig(64, 2, 3, 11),   # chunks that do not divide the row evenly
    TopkConfig(128, 4, 8, 8),
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
    workspace = torch.randint(1, 100, (workspace_numel(tokens, config) + 5,), generator=gen, dtype=torch.int32)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, workspace=workspace.to(kernel_device))
    for t in range(tokens):
        _check_row(logits[t].tolist(), width, topk, out[t].tolist())


def test_window_fill_in_slots_past_one_block(kernel_device, gen):
    topk = 2500  # wider than one program's block
    lens = torch.tensor([0, 1, 2499, 2500, 9000], dtype=torch.int32)
    out = poison(torch.empty(5, topk, dtype=torch.int32, device=kernel_device))
    launch_window(lens.to(kernel_device), 3000, topk, out)
    for t, n in enumerate([0, 1, 2499, 2500, 2500]):
        assert out[t].tolist() == list(range(n)) + [-1] * (topk - n)
