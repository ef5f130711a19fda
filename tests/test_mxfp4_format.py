"""MXFP4 packing: exact decode of every code and scale edge, OCP rounding, round trips."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st
from reference import E2M1, dequant_loop

from rocmoe import dequantize_mxfp4, quantize_mxfp4
from rocmoe.formats.mxfp4 import e8m0_to_float32


def test_every_byte_decodes_to_its_two_codes():
    blocks = torch.arange(256, dtype=torch.uint8).view(8, 32)  # 8 rows x 64 elements
    scales = torch.full((8, 2), 127, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    for byte in range(256):
        row, col = divmod(byte, 32)
        lo, hi = got[row, 2 * col].item(), got[row, 2 * col + 1].item()
        assert lo == E2M1[byte & 0xF] and math.copysign(1, lo) == math.copysign(1, E2M1[byte & 0xF])
        assert hi == E2M1[byte >> 4] and math.copysign(1, hi) == math.copysign(1, E2M1[byte >> 4])


@pytest.mark.parametrize("s, value", [(0, 2.0**-127), (1, 2.0**-126), (126, 0.5), (127, 1.0),
                                      (128, 2.0), (254, 2.0**127)])
def test_e8m0_edges_are_exact(s, value):
    assert e8m0_to_float32(torch.tensor([s], dtype=torch.uint8)).item() == value


def test_e8m0_255_is_nan_and_poisons_its_block_only():
    assert math.isnan(e8m0_to_float32(torch.tensor([255], dtype=torch.uint8)).item())
    blocks = torch.full((1, 32), 0x22, dtype=torch.uint8)  # every element 1.0
    scales = torch.tensor([[255, 127]], dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, torch.float32)
    assert torch.isnan(got[0, :32]).all() and (got[0, 32:] == 1.0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_matches_element_loop(gen, dtype):
    blocks = torch.randint(0, 256, (3, 48), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 134, (3, 3), generator=gen, dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales, dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), dequant_loop(blocks, scales).to(dtype).double(), rtol=0, atol=0)


def _nearest_even_code(v: float) -> int:
    """Brute force: the E2M1 code nearest to v, ties to the even mantissa, saturating."""
    mags = E2M1[:8]
    a = abs(v)
    if a >= 6.0:
        idx = 7
    else:
        dist = [abs(a - m) for m in mags]
        best = min(dist)
        cands = [i for i, d in enumerate(dist) if d == best]
        idx = cands[0] if len(cands) == 1 else next(i for i in cands if i % 2 == 0)
    return idx | (8 if math.copysign(1.0, v) < 0 else 0)


def test_quantize_follows_ocp_rounding(gen):
    w = torch.randn(4, 64, generator=gen, dtype=torch.float64) * 3
    w[0, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0] * 4, dtype=torch.float64)  # ties
    blocks, scales = quantize_mxfp4(w)
    for r in range(4):
        for b in range(2):
            chunk = w[r, 32 * b:32 * (b + 1)].tolist()
            amax = max(abs(v) for v in chunk)
            exp = math.floor(math.log2(amax)) - 2
            assert scales[r, b].item() == exp + 127
            for i, v in enumerate(chunk):
                col = 32 * b + i
                byte = blocks[r, col // 2].item()
                code = byte & 0xF if col % 2 == 0 else byte >> 4
                assert code == _nearest_even_code(v / 2.0**exp), (r, col, v)


def test_quantize_zero_and_nonfinite_blocks():
    w = torch.zeros(1, 96)
    w[0, 32] = float("nan")
    w[0, 64] = float("inf")
    w[0, 65] = 1.0
    _, scales = quantize_mxfp4(w)
    assert scales.tolist() == [[0, 255, 255]]


def test_quantize_clamps_the_shared_exponent():
    tiny = torch.full((1, 32), 2.0**-140, dtype=torch.float64)
    huge = torch.full((1, 32), 2.0**200, dtype=torch.float64)
    assert quantize_mxfp4(tiny)[1].item() == 0  # exponent clamped to -127
    blocks, scales = quantize_mxfp4(huge)
    assert scales.item() == 254 and (blocks == 0x77).all()  # 2**127 scale, saturated at 6


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), nblocks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1))
def test_round_trip_is_exact_on_representable_values(rows, nblocks, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, nblocks * 16), generator=g, dtype=torch.uint8)
    # Every block holds a code of magnitude 4 or 6, so its scale is what
    # quantize picks again and the bytes must come back unchanged (up to -0).
    blocks[:, ::16] = 0x70
    scales = torch.randint(1, 255, (rows, nblocks), generator=g, dtype=torch.uint8)
    values = dequantize_mxfp4(blocks, scales, torch.float64)
    b2, s2 = quantize_mxfp4(values)
    assert torch.equal(s2, scales)
    assert torch.equal(dequantize_mxfp4(b2, s2, torch.float64), values)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 3), nblocks=st.integers(1, 3), seed=st.integers(0, 2**31 - 1),
       magnitude=st.floats(1e-6, 1e6))
def test_round_trip_error_bound(rows, nblocks, seed, magnitude):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, nblocks * 32, generator=g, dtype=torch.float64) * magnitude
    back = dequantize_mxfp4(*quantize_mxfp4(w), dtype=torch.float64)
    # Per OCP MX: inside the E2M1 range the error is at most half a step
    # (steps are 0.5, 1, 2 times the block scale); above 6 x scale the value
    # saturates, so the bound is amax / 4 (amax / scale < 8).
    blocks_w = w.view(rows, nblocks, 32)
    amax = blocks_w.abs().amax(-1, keepdim=True)
    scale = torch.pow(2.0, torch.floor(torch.log2(amax)) - 2)
    q = blocks_w.abs() / scale
    half_step = torch.where(q <= 2, 0.25, torch.where(q <= 4, 0.5, 1.0)) * scale
    bound = torch.where(q > 6, q * scale - 6 * scale, half_step)
    err = (back.view_as(blocks_w) - blocks_w).abs()
    assert (err <= bound * (1 + 1e-12)).all()
    assert (err <= amax / 4 * (1 + 1e-12)).all()


def test_format_errors_name_the_argument():
    with pytest.raises(TypeError, match="blocks must be uint8"):
        dequantize_mxfp4(torch.zeros(2, 16), torch.zeros(2, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="same MXFP4 tensor"):
        dequantize_mxfp4(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_mxfp4(torch.randn(3, 40))
    with pytest.raises(TypeError, match="floating-point"):
        quantize_mxfp4(torch.ones(3, 32, dtype=torch.int32))
