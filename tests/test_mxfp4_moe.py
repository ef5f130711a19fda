"""mxfp4_moe (torch backend) against the token-by-token fp64 reference of SPEC §2."""

from __future__ import annotations

import pytest
import torch
from conftest import is_poisoned, poison
from reference import moe_ref

import rocmoe

E, H, I = 4, 64, 32


def _weights(gen, num_experts=E, hidden=H, inter=I, bias=True, gate_up="interleaved", bias_dtype=torch.float32):
    w1b, w1s = rocmoe.quantize_mxfp4(torch.randn(num_experts, 2 * inter, hidden, generator=gen) * 0.2)
    w2b, w2s = rocmoe.quantize_mxfp4(torch.randn(num_experts, hidden, inter, generator=gen) * 0.2)
    b1 = (torch.randn(num_experts, 2 * inter, generator=gen) * 0.1).to(bias_dtype) if bias else None
    b2 = (torch.randn(num_experts, hidden, generator=gen) * 0.1).to(bias_dtype) if bias else None
    return rocmoe.Mxfp4MoeWeights(w1b, w1s, w2b, w2s, b1=b1, b2=b2, gate_up=gate_up)


def _routing(gen, tokens, k, num_experts=E):
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:k] for _ in range(tokens)]).int()
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1)
    return weights, ids


def _ref(x, w, topk_weights, topk_ids, activation="swigluoai", alpha=1.702, limit=7.0, **kw):
    return moe_ref(x, w.w1_blocks, w.w1_scales, w.w2_blocks, w.w2_scales, w.b1, w.b2, w.gate_up,
                   topk_weights, topk_ids, activation, alpha, limit, **kw)


def _assert_close(out, ref):
    assert not torch.isnan(out).any()
    err = float((out.double() - ref).norm() / ref.norm())
    assert err <= 1e-2, f"rel-L2 {err:.2e}"


@pytest.mark.parametrize("gate_up", ["interleaved", "concatenated"])
@pytest.mark.parametrize("activation, limit", [("swigluoai", 7.0), ("silu", None), ("silu", 10.0),
                                               ("swigluoai", None)])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(gen, gate_up, activation, limit, bias):
    w = _weights(gen, bias=bias, gate_up=gate_up)
    x = torch.randn(6, H, generator=gen).to(torch.bfloat16)
    tw, ids = _routing(gen, 6, 2)
    out = poison(torch.empty(6, H, dtype=torch.bfloat16))
    got = rocmoe.mxfp4_moe(x, w, tw, ids, activation=activation, limit=limit, out=out)
    assert got is out and not is_poisoned(out).any()
    _assert_close(got, _ref(x, w, tw, ids, activation, limit=limit))


def test_default_limit_depends_on_activation(gen):
    w = _weights(gen)
    x = (torch.randn(3, H, generator=gen) * 40).to(torch.float16)  # large enough to hit the clamp
    tw, ids = _routing(gen, 3, 2)
    _assert_close(rocmoe.mxfp4_moe(x, w, tw, ids), _ref(x, w, tw, ids, "swigluoai", limit=7.0))
    _assert_close(rocmoe.mxfp4_moe(x, w, tw, ids, activation="silu"), _ref(x, w, tw, ids, "silu", limit=None))


def test_float16_activations_and_bf16_bias_and_alpha(gen):
    w = _weights(gen, bias_dtype=torch.bfloat16)
    x = torch.randn(5, H, generator=gen).to(torch.float16)
    tw, ids = _routing(gen, 5, 3)
    got = rocmoe.mxfp4_moe(x, w, tw, ids, alpha=1.2)
    assert got.dtype == torch.float16
    _assert_close(got, _ref(x, w, tw, ids, alpha=1.2))


def test_expert_map_and_minus_one_ids(gen):
    w = _weights(gen)  # this rank holds 4 of 10 global experts
    expert_map = torch.full((10,), -1, dtype=torch.int32)
    expert_map[torch.tensor([7, 2, 9, 4])] = torch.arange(4, dtype=torch.int32)
    tokens = 8
    ids = torch.randint(0, 10, (tokens, 3), generator=gen, dtype=torch.int32)
    ids[0, 1] = -1
    ids[3] = -1  # a token with no expert anywhere: its row is zero (bias included)
    tw = torch.rand(tokens, 3, generator=gen)
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    got = rocmoe.mxfp4_moe(x, w, tw, ids, expert_map=expert_map)
    ref = _ref(x, w, tw, ids, expert_map=expert_map)
    assert (got[3] == 0).all()
    _assert_close(got, ref)


def test_int64_ids_and_out_of_range_ids_contribute_nothing(gen):
    w = _weights(gen)
    tw, ids = _routing(gen, 4, 2)
    ids = ids.long()
    ids[1, 0] = 57  # not an expert of this layer
    x = torch.randn(4, H, generator=gen).to(torch.bfloat16)
    _assert_close(rocmoe.mxfp4_moe(x, w, tw, ids), _ref(x, w, tw, ids))


def test_router_weight_on_input(gen):
    w = _weights(gen)
    tw, ids = _routing(gen, 5, 1)
    tw = torch.rand(5, 1, generator=gen) + 0.2
    x = torch.randn(5, H, generator=gen).to(torch.bfloat16)
    got = rocmoe.mxfp4_moe(x, w, tw, ids, apply_router_weight_on_input=True)
    _assert_close(got, _ref(x, w, tw, ids, apply_on_input=True))
    plain = rocmoe.mxfp4_moe(x, w, tw, ids)
    assert not torch.allclose(got.float(), plain.float())  # the swiglu is not linear in its input


@pytest.mark.parametrize("routing", ["one_token", "all_on_one_expert", "idle_experts"])
def test_routing_extremes(gen, routing):
    w = _weights(gen, num_experts=6)
    if routing == "one_token":
        tw, ids = _routing(gen, 1, 4, 6)
    elif routing == "all_on_one_expert":
        ids = torch.full((9, 1), 3, dtype=torch.int32)
        tw = torch.rand(9, 1, generator=gen)
    else:  # experts 0, 1, 5 receive nothing
        ids = torch.randint(2, 5, (7, 2), generator=gen, dtype=torch.int32)
        tw = torch.rand(7, 2, generator=gen)
    x = torch.randn(ids.shape[0], H, generator=gen).to(torch.bfloat16)
    _assert_close(rocmoe.mxfp4_moe(x, w, tw, ids), _ref(x, w, tw, ids))


def test_zero_tokens(gen):
    w = _weights(gen)
    out = rocmoe.mxfp4_moe(torch.empty(0, H, dtype=torch.bfloat16), w, torch.empty(0, 2),
                           torch.empty(0, 2, dtype=torch.int32))
    assert out.shape == (0, H)


def test_workspace_is_used_and_checked(gen):
    w = _weights(gen)
    tw, ids = _routing(gen, 6, 2)
    x = torch.randn(6, H, generator=gen).to(torch.bfloat16)
    need = rocmoe.mxfp4_moe_workspace_size(6, 2, w)
    assert need == 6 * 2 * H * 4
    workspace = torch.full((need,), 0xAB, dtype=torch.uint8)
    got = rocmoe.mxfp4_moe(x, w, tw, ids, workspace=workspace)
    assert (workspace != 0xAB).any()  # the backend computed in it
    _assert_close(got, _ref(x, w, tw, ids))
    out = poison(torch.empty(6, H, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=f"workspace must hold at least {need} bytes"):
        rocmoe.mxfp4_moe(x, w, tw, ids, workspace=workspace[: need - 4], out=out)
    assert is_poisoned(out).all()


def test_reproducible_bitwise(gen):
    w = _weights(gen)
    tw, ids = _routing(gen, 16, 3)
    x = torch.randn(16, H, generator=gen).to(torch.bfloat16)
    assert torch.equal(rocmoe.mxfp4_moe(x, w, tw, ids), rocmoe.mxfp4_moe(x, w, tw, ids))


def test_weights_are_converted_once(gen):
    w = _weights(gen)
    tw, ids = _routing(gen, 2, 2)
    x = torch.randn(2, H, generator=gen).to(torch.bfloat16)
    assert w.prepare(topk=2) == "torch"
    converted = w._converted["torch"]
    rocmoe.mxfp4_moe(x, w, tw, ids)
    assert w._converted["torch"] is converted


@pytest.mark.parametrize("change, exc, message", [
    (dict(w1_blocks=torch.zeros(E, 2 * I, H // 2, dtype=torch.int8)), TypeError, "w1_blocks must have dtype uint8"),
    (dict(w1_blocks=torch.zeros(E, 2 * I, 20, dtype=torch.uint8)), ValueError, "multiples of 32"),
    (dict(w1_scales=torch.zeros(E, 2 * I, 3, dtype=torch.uint8)), ValueError,
     r"w1_scales must have shape \[4, 64, 2\]"),
    (dict(w2_blocks=torch.zeros(E, H, 8, dtype=torch.uint8)), ValueError, r"w2_blocks must have shape \[4, 64, 16\]"),
    (dict(w2_scales=torch.zeros(3, H, 1, dtype=torch.uint8)), ValueError, r"w2_scales must have shape \[4, 64, 1\]"),
    (dict(b1=torch.zeros(E, I)), ValueError, r"b1 must have shape \[4, 64\]"),
    (dict(b2=torch.zeros(E, H, dtype=torch.float16)), TypeError, "b2 must have dtype float32, bfloat16"),
    (dict(gate_up="stacked"), ValueError, "gate_up must be one of"),
])
def test_bad_weights(gen, change, exc, message):
    args = dict(w1_blocks=torch.zeros(E, 2 * I, H // 2, dtype=torch.uint8),
                w1_scales=torch.zeros(E, 2 * I, H // 32, dtype=torch.uint8),
                w2_blocks=torch.zeros(E, H, I // 2, dtype=torch.uint8),
                w2_scales=torch.zeros(E, H, I // 32, dtype=torch.uint8))
    args.update(change)
    with pytest.raises(exc, match=message):
        rocmoe.Mxfp4MoeWeights(**args)


@pytest.mark.parametrize("change, exc, message", [
    (dict(weights="w"), TypeError, "weights must be rocmoe.Mxfp4MoeWeights"),
    (dict(x=torch.randn(3, H)), TypeError, "x must have dtype bfloat16, float16"),
    (dict(x=torch.randn(3, 32).to(torch.bfloat16)), ValueError, r"x must have shape \[M, 64\]"),
    (dict(topk_ids=torch.zeros(3, 2, dtype=torch.int16)), TypeError, "topk_ids must have dtype int32, int64"),
    (dict(topk_ids=torch.zeros(4, 2, dtype=torch.int32)), ValueError, r"topk_ids must have shape \[3, k"),
    (dict(topk_weights=torch.rand(3, 2).half()), TypeError, "topk_weights must have dtype float32"),
    (dict(topk_weights=torch.rand(3, 3)), ValueError, r"topk_weights must have shape \[3, 2\]"),
    (dict(activation="gelu"), ValueError, "activation must be one of 'swigluoai', 'silu'"),
    (dict(limit=-1.0), ValueError, "limit must be a positive float or None"),
    (dict(expert_map=torch.zeros(8, dtype=torch.int64)), TypeError, "expert_map must have dtype int32"),
    (dict(apply_router_weight_on_input=True), ValueError, "apply_router_weight_on_input needs k = 1"),
    (dict(workspace=torch.zeros(100, dtype=torch.float32)), TypeError, "workspace must have dtype uint8"),
    (dict(out=torch.empty(3, H, dtype=torch.float16)), TypeError, "out must have dtype bfloat16"),
])
def test_bad_call_raises_and_writes_nothing(gen, change, exc, message):
    w = _weights(gen)
    tw, ids = _routing(gen, 3, 2)
    out = poison(torch.empty(3, H, dtype=torch.bfloat16))
    args = dict(x=torch.randn(3, H, generator=gen).to(torch.bfloat16), weights=w, topk_weights=tw, topk_ids=ids,
                out=out)
    args.update(change)
    with pytest.raises(exc, match=message):
        rocmoe.mxfp4_moe(args.pop("x"), args.pop("weights"), args.pop("topk_weights"), args.pop("topk_ids"), **args)
    if args.get("out") is out:
        assert is_poisoned(out).all()
