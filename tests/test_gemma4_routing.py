"""gemma4_routing (torch backend) against the fp64 loop reference of SPEC §1."""

from __future__ import annotations

import pytest
import torch
from conftest import adversarial_routing_logits, is_poisoned, poison
from hypothesis import given, settings, strategies as st
from reference import routing_ref

import rocmoe

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _check(logits, topk, scale, weights, ids):
    ref_w, ref_ids = routing_ref(logits, topk, scale)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    assert torch.equal(ids.long(), ref_ids)
    torch.testing.assert_close(weights.double(), ref_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens, experts, topk", [(1, 64, 1), (7, 128, 8), (64, 256, 4), (5, 1024, 8),
                                                   (3, 16, 16)])
def test_matches_reference(gen, dtype, tokens, experts, topk):
    logits = (torch.randn(tokens, experts, generator=gen) * 3).to(dtype)
    scale = torch.rand(experts, generator=gen) + 0.5
    out_w = poison(torch.empty(tokens, topk))
    out_ids = poison(torch.empty(tokens, topk, dtype=torch.int32))
    w, ids = rocmoe.gemma4_routing(logits, topk, scale, out_weights=out_w, out_ids=out_ids)
    assert w is out_w and ids is out_ids
    assert not is_poisoned(w).any() and not is_poisoned(ids).any()
    _check(logits, topk, scale, w, ids)


def test_bf16_scale_and_strided_rows(gen):
    wide = torch.randn(9, 200, generator=gen)
    logits = wide[:, 10:138]  # row stride 200, unit column stride
    scale = (torch.rand(128, generator=gen) + 0.5).to(torch.bfloat16)
    w, ids = rocmoe.gemma4_routing(logits, 8, scale)
    _check(logits, 8, scale, w, ids)


@pytest.mark.parametrize("case", ["many_ties", "all_equal", "signed_zeros", "infinities", "huge"])
def test_adversarial_rows(gen, case):
    experts, topk = 64, 8
    logits = adversarial_routing_logits(case, experts, gen)
    scale = torch.rand(experts, generator=gen) + 0.5
    w, ids = rocmoe.gemma4_routing(logits, topk, scale)
    ref_w, ref_ids = routing_ref(logits, topk, scale)
    assert torch.equal(ids.long(), ref_ids)
    # A +inf logit makes the softmax inf - inf = NaN in both (documented).
    torch.testing.assert_close(w.double(), ref_w, rtol=1e-5, atol=1e-6, equal_nan=(case == "infinities"))
    if case == "infinities":
        assert torch.isnan(w).all()  # every row selected a +inf


def test_nan_rows_keep_valid_ids(gen):
    logits = torch.randn(6, 128, generator=gen)
    logits[2, 17] = float("nan")
    logits[4] = float("nan")
    _, ids = rocmoe.gemma4_routing(logits, 8, torch.ones(128))
    assert ((ids >= 0) & (ids < 128)).all()
    assert all(len(set(row)) == 8 for row in ids.tolist())
    clean = [0, 1, 3, 5]
    _, ref_ids = routing_ref(logits[clean], 8, torch.ones(128))
    assert torch.equal(ids[clean].long(), ref_ids)


def test_zero_tokens_returns_empty():
    w, ids = rocmoe.gemma4_routing(torch.empty(0, 128), 8, torch.ones(128))
    assert w.shape == (0, 8) and ids.shape == (0, 8)


@settings(max_examples=30, deadline=None)
@given(tokens=st.integers(1, 12), experts=st.integers(1, 96), data=st.data(),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_hypothesis_shapes(tokens, experts, data, dtype, seed):
    topk = data.draw(st.integers(1, experts))
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g).to(dtype)
    scale = torch.rand(experts, generator=g) + 0.5
    w, ids = rocmoe.gemma4_routing(logits, topk, scale)
    _check(logits, topk, scale, w, ids)


def _good(gen):
    return dict(gating_output=torch.randn(4, 32, generator=gen), topk=4, per_expert_scale=torch.ones(32))


@pytest.mark.parametrize("change, exc, message", [
    (dict(gating_output=torch.randn(4, 32, 1)), ValueError, "gating_output must have 2 dimensions"),
    (dict(gating_output=torch.randint(0, 3, (4, 32))), TypeError, "gating_output must have dtype"),
    (dict(gating_output=torch.randn(32, 4).t()), ValueError, "gating_output must have unit stride"),
    (dict(topk=0), ValueError, r"topk must be in \[1, 32\], got 0"),
    (dict(topk=33), ValueError, r"topk must be in \[1, 32\], got 33"),
    (dict(topk=2.0), TypeError, "topk must be an int"),
    (dict(per_expert_scale=torch.ones(31)), ValueError, r"per_expert_scale must have shape \[32\]"),
    (dict(per_expert_scale=torch.ones(32, dtype=torch.float16)), TypeError, "per_expert_scale must have dtype"),
    (dict(out_weights=torch.empty(4, 5)), ValueError, r"out_weights must have shape \[4, 4\]"),
    (dict(out_weights=torch.empty(4, 4, dtype=torch.float64)), TypeError, "out_weights must have dtype float32"),
    (dict(out_ids=torch.empty(4, 4, dtype=torch.int64)), TypeError, "out_ids must have dtype int32"),
    (dict(out_ids=torch.empty(4, 8, dtype=torch.int32)[:, ::2]), ValueError, "out_ids must be contiguous"),
])
def test_bad_inputs_raise_and_write_nothing(gen, change, exc, message):
    args = _good(gen)
    out_w = poison(torch.empty(4, 4))
    out_ids = poison(torch.empty(4, 4, dtype=torch.int32))
    args.update(out_weights=out_w, out_ids=out_ids)
    args.update(change)
    with pytest.raises(exc, match=message):
        rocmoe.gemma4_routing(args.pop("gating_output"), args.pop("topk"), args.pop("per_expert_scale"), **args)
    assert is_poisoned(out_w).all() and is_poisoned(out_ids).all()
