"""The AITER adapters calling AITER, on an AMD GPU (marker rocm: the ROCm
container runs them, docker/selftest.sh rocm). Each result is compared with the
torch backend's fp32 computation at SPEC tolerances; an arch or shape the
adapter refuses is skipped with the adapter's own reason."""

from __future__ import annotations

import pytest
import torch
from conftest import is_poisoned, poison
from test_gpu import _replay_matches_eager

import rocmoe
from rocmoe import registry
from rocmoe.device import Device

pytestmark = [
    pytest.mark.rocm,
    pytest.mark.skipif(not (torch.version.hip and torch.cuda.is_available()), reason="needs a ROCm GPU"),
]


@pytest.fixture
def amd():
    reasons = registry.backend_reasons("aiter")
    if reasons:
        pytest.fail(f"AITER is unavailable in the ROCm image: {reasons}")
    return torch.device("cuda")


def _require(op: str, problem) -> None:
    reasons = registry.reasons_for(op, "aiter", Device.current(), problem)
    if reasons:
        pytest.skip("; ".join(reasons))


def _moe_inputs(gen, device, tokens, experts=32, topk=4, hidden=2880, inter=2880):
    from rocmoe.bench.cases import random_mxfp4_weights

    weights = random_mxfp4_weights(experts, hidden, inter, "interleaved", True, device, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(device, torch.bfloat16)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).int().to(device)
    topk_weights = torch.softmax(torch.randn(tokens, topk, generator=gen), -1).to(device)
    return weights, x, topk_weights, ids


def _moe_reference(weights, x, topk_weights, ids, **kw):
    from rocmoe.backends.torch import mxfp4_moe as torch_moe

    return torch_moe.mxfp4_moe_torch(x, torch_moe.IMPLEMENTATION.prepare(weights), topk_weights, ids,
                                     activation="swigluoai", limit=7.0, compute_dtype=torch.float32, **kw)


@pytest.mark.parametrize("tokens", [1, 8, 64, 512])
def test_aiter_moe_at_gpt_oss_shapes(amd, gen, tokens):
    weights, x, topk_weights, ids = _moe_inputs(gen, amd, tokens)
    from rocmoe.ops.mxfp4_moe import _problem

    _require("mxfp4_moe", _problem(x.dtype, weights, 4, "swigluoai", False, False))
    out = poison(torch.empty_like(x))
    rocmoe.mxfp4_moe(x, weights, topk_weights, ids, out=out, backend="aiter")
    assert not is_poisoned(out).any()
    ref = _moe_reference(weights, x, topk_weights, ids)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) <= 1e-2


def test_aiter_moe_expert_parallel_and_dropped_ids(amd, gen):
    weights, x, topk_weights, ids = _moe_inputs(gen, amd, 64, experts=16)
    from rocmoe.ops.mxfp4_moe import _problem

    _require("mxfp4_moe", _problem(x.dtype, weights, 4, "swigluoai", True, False))
    # 32 global experts, the 16 local ones in global order (AITER's convention).
    expert_map = torch.full((32,), -1, dtype=torch.int32)
    local = torch.randperm(32, generator=gen)[:16].sort().values
    expert_map[local] = torch.arange(16, dtype=torch.int32)
    global_ids = torch.randint(0, 32, ids.shape, generator=gen, dtype=torch.int32)
    global_ids[::7, 0] = -1
    global_ids = global_ids.to(amd)
    expert_map = expert_map.to(amd)
    out = rocmoe.mxfp4_moe(x, weights, topk_weights, global_ids, expert_map=expert_map, backend="aiter")
    ref = _moe_reference(weights, x, topk_weights, global_ids, expert_map=expert_map)
    assert float((out.float() - ref.float()).norm() / ref.float().norm()) <= 1e-2


def test_aiter_moe_graph_capture(amd, gen):
    weights, x, topk_weights, ids = _moe_inputs(gen, amd, 8)
    from rocmoe.ops.mxfp4_moe import _problem

    _require("mxfp4_moe", _problem(x.dtype, weights, 4, "swigluoai", False, False))
    out = torch.empty_like(x)
    _replay_matches_eager(
        lambda: rocmoe.mxfp4_moe(x, weights, topk_weights, ids, out=out, backend="aiter"),
        lambda: x.copy_(torch.randn(x.shape, generator=gen).to(amd, x.dtype)),
        lambda: [rocmoe.mxfp4_moe(x, weights, topk_weights, ids, backend="aiter")], [out])


@pytest.mark.parametrize("tokens", [1, 8, 64])
@pytest.mark.parametrize("heads", [16, 128])
def test_aiter_mla_at_v32_shapes(amd, gen, tokens, heads):
    from rocmoe.backends.torch.sparse_mla_decode import sparse_mla_decode_torch
    from rocmoe.ops.sparse_mla_decode import problem_of

    dim, topk = 576, 2048
    q = torch.randn(tokens, heads, dim, generator=gen).to(amd, torch.bfloat16)
    cache = torch.randn(2 * tokens * topk // 64 + 1, 64, dim, generator=gen).to(amd, torch.bfloat16)
    idx = torch.randint(-1, cache.shape[0] * 64 + 100, (tokens, topk), generator=gen, dtype=torch.int32).to(amd)
    lengths = torch.randint(1, topk + 1, (tokens,), generator=gen, dtype=torch.int32).to(amd)
    sink = torch.randn(heads, generator=gen).to(amd)
    _require("sparse_mla_decode", problem_of(q, cache, idx, 512, lengths, sink, None, None))
    out, lse = poison(torch.empty(tokens, heads, 512, device=amd, dtype=torch.bfloat16)), poison(
        torch.empty(tokens, heads, device=amd))
    rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=dim ** -0.5, topk_length=lengths, attn_sink=sink,
                             out=out, lse_out=lse, backend="aiter")
    assert not is_poisoned(out).any() and not is_poisoned(lse).any()
    ref_out, ref_lse = sparse_mla_decode_torch(q, cache, idx, dim ** -0.5, 512, lengths, sink, None, None)
    torch.testing.assert_close(out.float(), ref_out, atol=2e-2, rtol=2e-2)
    assert float((out.float() - ref_out).norm() / ref_out.norm()) <= 5e-3
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=0)


def test_aiter_mla_graph_capture(amd, gen):
    from rocmoe.ops.sparse_mla_decode import problem_of

    q = torch.randn(4, 16, 576, device=amd, dtype=torch.bfloat16)
    cache = torch.randn(64, 64, 576, device=amd, dtype=torch.bfloat16)
    idx = torch.randint(-1, 4096, (4, 256), device=amd, dtype=torch.int32)
    _require("sparse_mla_decode", problem_of(q, cache, idx, 512, None, None, None, None))
    out = torch.empty(4, 16, 512, device=amd, dtype=torch.bfloat16)
    lse = torch.empty(4, 16, device=amd)

    def call(**bufs):
        return rocmoe.sparse_mla_decode(q, cache, idx, softmax_scale=0.07, backend="aiter", **bufs)

    _replay_matches_eager(lambda: call(out=out, lse_out=lse),
                          lambda: q.copy_(torch.randn(4, 16, 576, generator=gen).to(amd, torch.bfloat16)),
                          call, [out, lse])
