"""The Triton routing kernel: interpreter on CPU, compiled on a GPU; against the
fp64 loop reference, ids exact, weights at SPEC tolerance."""

from __future__ import annotations

import pytest
import torch
from conftest import adversarial_routing_logits, is_poisoned, poison
from reference import routing_ref

import rocmoe
from rocmoe.backends.triton.gemma4_routing import IMPLEMENTATION, RoutingConfig, launch
from rocmoe.device import Device


def _dtypes(device):
    return [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])


def _run(logits, topk, scale, config=None, nan_expected=False):
    tokens = logits.shape[0]
    w = poison(torch.empty(tokens, topk, device=logits.device))
    if nan_expected:  # NaN is a legitimate output there, so poison with a finite value
        w.fill_(-1234.5)
    ids = poison(torch.empty(tokens, topk, dtype=torch.int32, device=logits.device))
    if config is None:
        rocmoe.gemma4_routing(logits, topk, scale, out_weights=w, out_ids=ids, backend="triton")
    else:
        launch(logits, topk, scale, w, ids, config)
    assert not is_poisoned(ids).any()
    assert not ((w == -1234.5).any() if nan_expected else is_poisoned(w).any())
    return w.cpu(), ids.cpu()


def _check(logits, topk, scale, w, ids, equal_nan=False):
    ref_w, ref_ids = routing_ref(logits.cpu(), topk, scale.cpu())
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6, equal_nan=equal_nan)


@pytest.mark.parametrize("tokens", [1, 7, 64, 1000])
@pytest.mark.parametrize("experts, topks", [(64, (1, 4, 8, 64)), (128, (1, 8, 128)), (256, (4, 8)),
                                            (1024, (1, 8))])
def test_public_op_matches_reference(kernel_device, gen, tokens, experts, topks):
    for topk in topks:
        if topk == experts and tokens > 7 and kernel_device.type == "cpu":
            continue  # K = E unrolls E reductions: the interpreter covers it at T <= 7
        for dtype in _dtypes(kernel_device):
            logits = (torch.randn(tokens, experts, generator=gen) * 2).to(dtype).to(kernel_device)
            scale = (torch.rand(experts, generator=gen) + 0.5).to(kernel_device)
            _check(logits, topk, scale, *_run(logits, topk, scale))


@pytest.mark.parametrize("lanes, key_bits", [(8, 64), (32, 64), (4, 32), (8, 32), (32, 32)])
@pytest.mark.parametrize("block_t, warps", [(1, 1), (4, 2), (16, 4)])
def test_every_launch_config(kernel_device, gen, lanes, key_bits, block_t, warps):
    scale = (torch.rand(128, generator=gen) + 0.5).to(torch.bfloat16).to(kernel_device)
    for dtype in (torch.float32, torch.float16):
        logits = torch.randn(37, 128, generator=gen).to(dtype).to(kernel_device)  # 37: a ragged last block
        for topk in (1, 3, 8):
            config = RoutingConfig(block_t, warps, lanes, key_bits)
            _check(logits, topk, scale, *_run(logits, topk, scale, config))


def test_more_slots_than_a_lanes_first_chunk(kernel_device, gen):
    """K = 16 / 32 / 64 of 64 experts over 8 or 4 lanes: where a lane's registers of the first
    chunk cannot hold its share of the slots, every lane keeps every slot (SPL 0)."""
    from rocmoe.backends.triton.gemma4_routing import kernel_layout

    scale = (torch.rand(64, generator=gen) + 0.5).to(kernel_device)
    spls = set()
    for config in (RoutingConfig(4, 1, 8), RoutingConfig(8, 1, 4)):
        for topk in (16, 32, 64):
            for dtype in (torch.float32, torch.float16):
                spls.add(kernel_layout(dtype, config, topk, 64)["SPL"])
                logits = torch.randn(6, 64, generator=gen).to(dtype).to(kernel_device)
                _check(logits, topk, scale, *_run(logits, topk, scale, config))
    assert 0 in spls and len(spls) > 2


@pytest.mark.parametrize("block_t", [1, 4])
def test_32_bit_keys_fall_back_on_fp32_near_ties(kernel_device, gen, block_t):
    """Logits a few ulps apart share the high bits of a 32-bit key; only the
    guard's fallback to 64-bit keys orders them right (exactly, by value)."""
    logits = torch.randn(6, 128, generator=gen)
    base = torch.tensor(5.0)
    # experts 90, 40, 7, 3: exact order 90 > 40 > 7 > 3 although ids ascend the other way
    for row in (0, 2, 5):
        for rank, expert in enumerate((90, 40, 7, 3)):
            value = base
            for _ in range(4 - rank):
                value = torch.nextafter(value, torch.tensor(10.0))
            logits[row, expert] = value
    # row 3: the near-tie straddles the K boundary (9th and 8th largest)
    logits[3] = torch.linspace(-3, 3, 128)
    logits[3, 0] = torch.nextafter(logits[3, 127 - 7], torch.tensor(10.0))  # beats the 8th by one ulp
    scale = torch.rand(128, generator=gen) + 0.5
    w, ids = _run(logits.to(kernel_device), 8, scale.to(kernel_device), RoutingConfig(block_t, 1, 8, 32))
    _check(logits, 8, scale, w, ids)
    assert ids[0, :4].tolist() == [90, 40, 7, 3]


@pytest.mark.parametrize("lanes, key_bits", [(8, 64), (32, 64), (8, 32)])
@pytest.mark.parametrize("case", ["many_ties", "all_equal_negative", "signed_zeros", "neg_inf", "pos_inf", "huge"])
def test_adversarial_rows(kernel_device, gen, lanes, key_bits, case):
    experts, topk = 64, 8
    scale = torch.rand(experts, generator=gen) + 0.5
    nan_expected = case in ("pos_inf", "neg_inf")
    for dtype in _dtypes(kernel_device):  # 16-bit logits take the float-key path (exact 23-bit keys)
        if case == "huge" and dtype == torch.float16:
            continue  # 1e30 is inf in fp16; pos_inf covers that
        logits = adversarial_routing_logits(case, experts, gen).to(dtype)
        w, ids = _run(logits.to(kernel_device), topk, scale.to(kernel_device), RoutingConfig(4, 2, lanes, key_bits),
                      nan_expected)
        _check(logits, topk, scale, w, ids, equal_nan=nan_expected)


def test_nan_rows_keep_valid_distinct_ids(kernel_device, gen):
    logits = torch.randn(6, 128, generator=gen)
    logits[2, 17] = float("nan")
    logits[4] = float("nan")
    logits[5, 40] = -float("nan")
    for dtype in _dtypes(kernel_device):
        for lanes, key_bits in ((8, 64), (32, 64), (8, 32)):
            typed = logits.to(dtype)
            w, ids = _run(typed.to(kernel_device), 8, torch.ones(128, device=kernel_device),
                          RoutingConfig(2, 1, lanes, key_bits), nan_expected=True)
            assert ((ids >= 0) & (ids < 128)).all()
            assert all(len(set(row)) == 8 for row in ids.tolist())
            clean = [0, 1, 3]
            _check(typed[clean], 8, torch.ones(128), w[clean], ids[clean])


def test_strided_rows(kernel_device, gen):
    wide = torch.randn(9, 300, generator=gen).to(kernel_device)
    logits = wide[:, 17:145]
    scale = (torch.rand(128, generator=gen) + 0.5).to(kernel_device)
    _check(logits, 8, scale, *_run(logits, 8, scale))


def test_zero_tokens_launch_nothing(kernel_device):
    w, ids = rocmoe.gemma4_routing(torch.empty(0, 128, device=kernel_device), 8,
                                   torch.ones(128, device=kernel_device), backend="triton")
    assert w.shape == (0, 8) and ids.shape == (0, 8)


def test_reasons():
    from rocmoe.ops.gemma4_routing import Gemma4RoutingProblem

    big = Gemma4RoutingProblem(torch.float32, torch.float32, 2048, 8)
    assert IMPLEMENTATION.not_supported_reasons(Device.from_arch("sm90"), big) == [
        "triton gemma4_routing supports E <= 1024, got E = 2048"]
    ok = Gemma4RoutingProblem(torch.float32, torch.float32, 128, 8)
    assert IMPLEMENTATION.not_supported_reasons(Device.from_arch("gfx942"), ok) == []
    # big E falls through to torch under the default order
    from rocmoe import registry

    assert registry.select("gemma4_routing", Device.from_arch("sm90"), big).impl.backend == "torch"
    assert registry.select("gemma4_routing", Device.from_arch("gfx950"), ok).impl.backend == "triton"
