"""The Triton mxfp4_moe on a GPU at SPEC §2's model shapes (``pytest -m gpu``):
against the torch backend's fp32 computation, bitwise run to run, under
CUDA-graph capture and torch.compile, and without allocating when the caller
gives ``out`` and ``workspace``."""

from __future__ import annotations

import pytest
import torch
from conftest import is_poisoned, poison

import rocmoe
from rocmoe.backends.torch.mxfp4_moe import mxfp4_moe_torch, to_torch_layout
from rocmoe.bench.cases import MOE_MODELS, random_mxfp4_weights

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU"),
]

_weight_cache: dict[str, rocmoe.Mxfp4MoeWeights] = {}


def _model_inputs(name: str, tokens: int, gen: torch.Generator, device="cuda"):
    m = MOE_MODELS[name]
    if name not in _weight_cache:  # one layer per model for the whole module: building them dominates
        _weight_cache.clear()
        _weight_cache[name] = random_mxfp4_weights(m.experts, m.hidden, m.inter, m.gate_up, m.bias, device,
                                                   torch.Generator().manual_seed(len(name)))
    x = torch.randn(tokens, m.hidden, generator=gen).to(device, torch.bfloat16)
    ids = torch.rand(tokens, m.experts, generator=gen).topk(m.topk, dim=1).indices.int().to(device)
    tw = torch.softmax(torch.randn(tokens, m.topk, generator=gen), -1).to(device)
    return m, _weight_cache[name], x, tw, ids


@pytest.mark.parametrize("tokens", [1, 8, 64, 512, 4096])
@pytest.mark.parametrize("name", list(MOE_MODELS))
def test_triton_moe_at_spec_shapes(gen, name, tokens):
    m, w, x, tw, ids = _model_inputs(name, tokens, gen)
    out = poison(torch.empty_like(x))
    rocmoe.mxfp4_moe(x, w, tw, ids, activation=m.activation, limit=m.limit, out=out, backend="triton")
    assert not is_poisoned(out).any()
    ref = mxfp4_moe_torch(x, to_torch_layout(w), tw, ids, activation=m.activation, limit=m.limit)
    err = float((out.float() - ref).norm() / ref.norm())
    assert err <= 1e-2, f"rel-L2 {err:.2e}"
    again = rocmoe.mxfp4_moe(x, w, tw, ids, activation=m.activation, limit=m.limit, backend="triton")
    assert torch.equal(again, out), "not bitwise reproducible run to run"


@pytest.mark.parametrize("tokens", [2, 300])  # the decode and the grouped pipeline
def test_triton_moe_graph_capture_and_no_allocation(gen, tokens):
    m, w, x, tw, ids = _model_inputs("gpt-oss-20b", tokens, gen)
    need = rocmoe.mxfp4_moe_workspace_size(tokens, m.topk, w, backend="triton")
    workspace = torch.empty(need, dtype=torch.uint8, device="cuda")
    out = torch.empty_like(x)

    def call():
        rocmoe.mxfp4_moe(x, w, tw, ids, out=out, workspace=workspace, backend="triton")

    call()  # selection and weight conversion happen here, once
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocation.all.allocated"]
    call()
    torch.cuda.synchronize()
    assert torch.cuda.memory_stats()["allocation.all.allocated"] == before, "allocated on the hot path"

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    for _ in range(2):
        x.copy_(torch.randn(x.shape, generator=gen).to(x))
        ids.copy_(torch.rand(tokens, m.experts, generator=gen).topk(m.topk, dim=1).indices.int())
        poison(out)
        graph.replay()
        torch.cuda.synchronize()
        assert not is_poisoned(out).any()
        assert torch.equal(out, rocmoe.mxfp4_moe(x, w, tw, ids, backend="triton"))


def test_triton_moe_under_torch_compile(gen):
    m, w, x, tw, ids = _model_inputs("gemma4-26b-a4b", 24, gen)
    torch._dynamo.reset()

    def layer(x, tw, ids):
        return rocmoe.mxfp4_moe(x * 2, w, tw, ids, activation=m.activation, limit=m.limit, backend="triton") + 1

    compiled = torch.compile(layer, fullgraph=True)
    assert torch.equal(compiled(x, tw, ids), layer(x, tw, ids))
