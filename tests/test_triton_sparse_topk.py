"""The Triton radix select of sparse_topk, config by config: interpreter on
CPU, compiled on a GPU. Checked against a plain Python ranking of each
window (NaN ranks above +inf, -0.0 equals +0.0), comparing value multisets
(ties may pick any position) and that positions are distinct and in the window."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import is_poisoned, poison

from rocmoe.backends.triton._sparse_topk_kernel import _coarse_digit, _keys
from rocmoe.backends.triton.sparse_topk import (
    HEAD_COUNTERS,
    HEAD_STRIDE,
    MAX_SPLIT_PROGRAMS_PER_UNIT,
    SPEC,
    TopkConfig,
    candidate_capacity,
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
    TopkConfig(64, 4, 4, 6, RESIDENT=256, SAMPLE=64),  # windows longer than the sample: bounds estimated
    TopkConfig(64, 4, 4, 6, RESIDENT=256, SAMPLE=64, AGGREGATE=0),  # a slot per moving score
    TopkConfig(64, 4, 4, 8, RESIDENT=1024, SAMPLE=0),  # bounds from a coarse histogram of the whole row
    TopkConfig(64, 2, 3, 11, RESIDENT=32, SAMPLE=0, AGGREGATE=0),
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


def test_split_path_rejects_a_short_workspace(gen):
    config = TopkConfig(64, 4, 4, 11)
    logits = torch.randn(2, 500, generator=gen)
    lens = torch.full((2,), 500, dtype=torch.int32)
    short = torch.zeros(workspace_numel(2, 500, 30) - 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="workspace"):
        launch_select(logits, lens, 30, torch.empty(2, 30, dtype=torch.int32), config, workspace=short)


def _dirty_workspace(gen, tokens, width, topk, capacity=None, sample=4096, spare=0):
    """Random int32 scratch of the size the split path needs (plus ``spare``)."""
    numel = workspace_numel(tokens, width, topk, capacity, sample) + spare
    return torch.randint(1, 100, (numel,), generator=gen, dtype=torch.int32)


@pytest.mark.parametrize("sample", [0, 4096], ids=["coarse", "sampled"])
def test_split_path_clears_a_dirty_workspace(kernel_device, gen, sample):
    """The coarse path zeroes the head, the sample kernel writes its counters:
    either way nothing left in the workspace leaks into the result."""
    config = TopkConfig(64, 4, 4, 11, SAMPLE=sample)
    tokens, width, topk = 3, 500, 30
    logits = torch.randn(tokens, width, generator=gen)
    lens = torch.full((tokens,), width, dtype=torch.int32)
    workspace = _dirty_workspace(gen, tokens, width, topk, sample=sample, spare=5)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, workspace=workspace.to(kernel_device))
    for t in range(tokens):
        _check_row(logits[t].tolist(), width, topk, out[t].tolist())


def _counters(workspace: torch.Tensor, tokens: int) -> tuple[list[int], list[int]]:
    """(winners, candidates) per row from the split path's workspace head."""
    head = workspace[:tokens * HEAD_STRIDE].view(tokens, HEAD_STRIDE).cpu()
    return head[:, HEAD_COUNTERS].tolist(), head[:, HEAD_COUNTERS + 1].tolist()


@pytest.mark.parametrize("sample", [1024, 2048])
def test_sampled_bounds_hold_on_random_rows(kernel_device, gen, sample):
    """For scores in random order the sample's two keys bracket the topk-th
    score: the winners fit, winners and candidates cover topk, and the list
    (not the whole-row fallback) is what the last step used."""
    config = TopkConfig(256, 4, 4, 6, RESIDENT=1024, SAMPLE=sample)
    tokens, width, topk = 3, 4096, 100
    logits = torch.randn(tokens, width, generator=gen) * torch.tensor([[1.0], [1e-3], [50.0]])
    lens = torch.tensor([width, width - 1000, 3000], dtype=torch.int32)
    workspace = _dirty_workspace(gen, tokens, width, topk, sample=sample).to(kernel_device)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, workspace=workspace)
    winners, candidates = _counters(workspace, tokens)
    for t in range(tokens):
        _check_row(logits[t].tolist(), int(lens[t]), topk, out[t].tolist())
        assert 0 < winners[t] < topk <= winners[t] + candidates[t], (winners, candidates)
        assert candidates[t] <= candidate_capacity(width, topk, sample), (winners, candidates)


@pytest.mark.parametrize("resident", [32, 1024], ids=["streamed", "resident"])
def test_rows_the_sample_misjudges_fall_back_to_the_whole_row(kernel_device, gen, resident):
    """Scores arranged against the sample's positions (every sampled group
    lies in the first half of a 64-score period): raised there, the sample
    puts the bounds too high (too few winners and candidates); lowered there,
    too low (more winners than topk). Both rows are selected whole."""
    config = TopkConfig(64, 4, 4, 6, RESIDENT=resident, SAMPLE=128)
    width, topk = 2048, 1000
    in_sampled_half = (torch.arange(width) % 64 < 32).float()
    noise = torch.randn(2, width, generator=gen)
    logits = torch.stack([noise[0] + 100 * in_sampled_half, noise[1] - 100 * in_sampled_half])
    lens = torch.full((2,), width, dtype=torch.int32)
    workspace = _dirty_workspace(gen, 2, width, topk, sample=128).to(kernel_device)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, workspace=workspace)
    winners, candidates = _counters(workspace, 2)
    assert winners[0] + candidates[0] < topk and winners[1] > topk, (winners, candidates)
    for t in range(2):
        _check_row(logits[t].tolist(), width, topk, out[t].tolist())


@pytest.mark.parametrize("resident", [32, 4096], ids=["streamed", "resident"])
@pytest.mark.parametrize("capacity", [1, 60, 400])
def test_split_path_rows_whose_candidates_overflow_the_list(kernel_device, gen, capacity, resident):
    """Many ties at the topk-th score put most of a row in [lo, hi]: past
    ``capacity`` candidates the row is selected whole, below it from the list."""
    config = TopkConfig(64, 4, 4, 8, RESIDENT=resident, SAMPLE=64)
    tokens, width, topk = 4, 400, 50
    narrow = 10.0 + 0.01 * torch.rand(width, generator=gen)
    wide = torch.randn(width, generator=gen)
    ties = torch.randint(0, 2, (width,), generator=gen).float()
    logits = torch.stack([narrow, wide, ties, narrow.flip(0)])
    lens = torch.tensor([width, width, width, 333], dtype=torch.int32)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, capacity=capacity)
    for t in range(tokens):
        _check_row(logits[t].tolist(), int(lens[t]), topk, out[t].tolist())


@pytest.mark.parametrize("resident", [32, 4096], ids=["streamed", "resident"])
@pytest.mark.parametrize("margin", [-1, 0])
def test_split_path_candidate_capacity_boundary(kernel_device, gen, margin, resident):
    """A window no longer than the sample is ranked exactly, so its candidates
    are the scores equal to the topk-th: exactly ``capacity`` of them use the
    list, one more selects the row whole."""
    config = TopkConfig(64, 4, 4, 8, RESIDENT=resident, SAMPLE=1024)
    width, topk, tied = 600, 70, 45
    logits = torch.rand(1, width, generator=gen) * 2 - 1  # all far below the ties
    order = torch.randperm(width, generator=gen)
    logits[0, order[: topk - 20]] = 5.0 + torch.rand(topk - 20, generator=gen)  # 50 clear winners
    logits[0, order[topk - 20: topk - 20 + tied]] = 4.0  # the topk-th score, shared by 45
    capacity = tied + margin
    lens = torch.tensor([width], dtype=torch.int32)
    workspace = _dirty_workspace(gen, 1, width, topk, capacity).to(kernel_device)
    out = _run(logits.to(kernel_device), lens.to(kernel_device), topk, config, capacity=capacity,
               workspace=workspace)
    assert _counters(workspace, 1) == ([topk - 20], [tied])
    _check_row(logits[0].tolist(), width, topk, out[0].tolist())


def test_edge_values_order_like_the_scores(kernel_device):
    """The split path sends every score whose key is above the sampled bound
    to the output unexamined: that is only right if the keys never invert the
    float order, including at the overflow, underflow and signed-zero edges."""
    edges = [float("-inf"), -3e38, -65520.0, -65504.0, -1.0, -6e-8, -1e-30, -0.0, 0.0, 1e-30, 6e-8, 2.0 ** -14,
             1.0, 1.0 + 2.0 ** -12, 1.25, 65504.0, 65519.0, 65520.0, 3e38, float("inf"), float("nan")]
    values = torch.tensor(edges + torch.linspace(-5, 5, 203).tolist(), dtype=torch.float32)
    width = values.numel()
    logits = values[torch.randperm(width)][None, :].repeat(2, 1)
    for topk in (1, 17, width // 2, width - 1):
        for sample in (32, 256):  # estimated bounds, then exact ones
            out = _run(logits.to(kernel_device), torch.tensor([width, width - 9], dtype=torch.int32,
                                                            device=kernel_device), topk,
                       TopkConfig(64, 4, 2, 8, SAMPLE=sample))
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
def _keys_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    keys = _keys(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
    tl.store(out_ptr + offs, keys.to(tl.int32, bitcast=True), mask=offs < n)


def test_keys_order_like_the_scores(kernel_device, gen):
    edges = [float("-inf"), -3e38, -65520.0, -1.0, -1e-40, -0.0, 0.0, 1e-40, 6e-8, 1.0, 1.0 + 2.0 ** -23, 3e38,
             float("inf")]
    values = sorted({v for v in edges + (torch.randn(200, generator=gen) * 100).tolist() if v != 0})
    zero = next(i for i, v in enumerate(values) if v > 0)
    values[zero:zero] = [-0.0, 0.0]
    values.append(float("nan"))
    x = torch.tensor(values, dtype=torch.float32, device=kernel_device)
    keys = torch.zeros(len(values), dtype=torch.int32, device=kernel_device)
    _keys_kernel[(1,)](x, keys, len(values), BLOCK=256)
    keys = [k & 0xFFFFFFFF for k in keys.cpu().tolist()]
    assert keys[zero] == keys[zero + 1]  # -0.0 and +0.0 tie
    del keys[zero]
    assert all(a < b for a, b in itertools.pairwise(keys)), keys  # strictly: distinct floats, distinct keys
    assert keys[-1] == 0xFFFFFFFF


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



def test_config_rejects_what_the_kernels_cannot_run():
    for bad in (dict(SAMPLE=48), dict(SAMPLE=16), dict(RESIDENT=65536), dict(AGGREGATE=2), dict(BLOCK=1000)):
        fields = dict(BLOCK=1024, num_warps=8, SPLIT=4) | bad
        with pytest.raises(ValueError, match=next(iter(bad))):
            TopkConfig(**fields)
    TopkConfig(1024, 8, 4, SAMPLE=0)  # 0: the coarse histogram


@pytest.mark.parametrize("arch", ["sm90", "gfx942"])
def test_heuristic_picks_the_bounds_by_the_scores_in_all(arch):
    """Few scores in all: the coarse histogram spread over each row's
    programs; many: the sample (one program per row) and no second full read."""
    device = Device.from_arch(arch)
    choose = SPEC.heuristic(device)
    few = choose({"tokens": 1, "seq_len": 131072, "compute_units": device.limits.compute_units})
    many = choose({"tokens": 64, "seq_len": 131072, "compute_units": device.limits.compute_units})
    assert few.SPLIT > 1 and few.SAMPLE == 0
    assert many.SPLIT > 1 and many.SAMPLE > 0 and not many.AGGREGATE


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
