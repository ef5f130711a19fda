"""Every op traces into one graph under torch.compile(fullgraph=True) on CPU,
through its rocmoe::<op> custom op, and gives the eager result."""

from __future__ import annotations

import pytest
import torch

import rocmoe


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn):
    return torch.compile(fn, fullgraph=True, dynamic=False)


def test_custom_ops_are_registered_with_fake_impls():
    for name in ("gemma4_routing", "mxfp4_moe", "sparse_mla_decode", "sparse_topk"):
        op = getattr(torch.ops.rocmoe, name).default
        assert op._schema.name == f"rocmoe::{name}"


def test_gemma4_routing_compiles(gen):
    logits = torch.randn(16, 64, generator=gen)
    scale = torch.rand(64, generator=gen)

    def fn(logits, scale):
        w, ids = rocmoe.gemma4_routing(logits * 2.0, 4, scale)
        return w * 3.0, ids

    w, ids = _compiled(fn)(logits, scale)
    ew, eids = fn(logits, scale)
    assert torch.equal(ids, eids) and torch.allclose(w, ew)


def test_gemma4_routing_with_out_buffers_compiles(gen):
    logits = torch.randn(8, 32, generator=gen)
    scale = torch.rand(32, generator=gen)
    out_w, out_ids = torch.empty(8, 2), torch.empty(8, 2, dtype=torch.int32)

    def fn(logits, scale, out_w, out_ids):
        rocmoe.gemma4_routing(logits, 2, scale, out_weights=out_w, out_ids=out_ids)

    _compiled(fn)(logits, scale, out_w, out_ids)
    ew, eids = rocmoe.gemma4_routing(logits, 2, scale)
    assert torch.equal(out_ids, eids) and torch.allclose(out_w, ew)


def test_sparse_topk_compiles(gen):
    logits = torch.randn(4, 100, generator=gen)
    lens = torch.tensor([100, 20, 7, 64], dtype=torch.int32)

    def fn(logits, lens):
        return rocmoe.sparse_topk(logits, lens, 16), rocmoe.sparse_topk(None, lens.clamp(max=16), 16, max_seq_len=16)

    got, window = _compiled(fn)(logits, lens)
    want, want_window = fn(logits, lens)
    assert [set(r) for r in got.tolist()] == [set(r) for r in want.tolist()]
    assert torch.equal(window, want_window)


def test_sparse_mla_decode_compiles(gen):
    q = torch.randn(2, 4, 64, generator=gen)
    cache = torch.randn(4, 16, 64, generator=gen)
    idx = torch.randint(-1, 64, (2, 10), generator=gen, dtype=torch.int32)
    sink = torch.randn(4, generator=gen)

    def fn(q, cache, idx, sink):
        out, lse = rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=0.1, d_v=32, attn_sink=sink)
        return out + 1, lse

    out, lse = _compiled(fn)(q, cache, idx, sink)
    eo, el = fn(q, cache, idx, sink)
    torch.testing.assert_close(out, eo)
    torch.testing.assert_close(lse, el)


def test_mxfp4_moe_compiles(gen):
    w1b, w1s = rocmoe.quantize_mxfp4(torch.randn(3, 64, 64, generator=gen) * 0.2)
    w2b, w2s = rocmoe.quantize_mxfp4(torch.randn(3, 64, 32, generator=gen) * 0.2)
    weights = rocmoe.Mxfp4MoeWeights(w1b, w1s, w2b, w2s, gate_up="concatenated")
    x = torch.randn(5, 64, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 3, (5, 2), generator=gen, dtype=torch.int32)
    tw = torch.rand(5, 2, generator=gen)

    def fn(x, tw, ids):
        return rocmoe.mxfp4_moe(x, weights, tw, ids, activation="silu", limit=10.0)

    torch.testing.assert_close(_compiled(fn)(x, tw, ids), fn(x, tw, ids))
