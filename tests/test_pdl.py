"""Programmatic dependent launch: where it is on (pure logic, on the CPU), that
the builds of the ops using it carry it the way the launch does, and (GPU) that a chain
of kernels each reading the previous one's output gives the same bits inside a
CUDA graph with PDL as eagerly without it."""

from __future__ import annotations

import pytest
import torch

from rocmoe.backends.triton import _common
from rocmoe.build_check import collect_variants
from rocmoe.device import Device


@pytest.mark.parametrize("arch, expected", [("sm90", True), ("sm100", True), ("sm120", True), ("sm80", False),
                                            ("gfx942", False), ("gfx950", False), ("xpu", False), ("cpu", False)])
def test_pdl_only_on_hopper_and_newer(arch, expected):
    device = Device.from_arch(arch)
    assert _common.uses_pdl(device) is expected
    assert _common.pdl_kwargs(device) == ({"PDL": True, "launch_pdl": True} if expected else {"PDL": False})


def test_rocmoe_pdl_0_turns_it_off(monkeypatch):
    monkeypatch.setattr(_common, "PDL_ALLOWED", False)
    assert not _common.uses_pdl(Device.from_arch("sm90"))
    assert _common.pdl_kwargs(Device.from_arch("sm90")) == {"PDL": False}


#: the ops whose kernels use PDL where the device has it (the others measured no faster)
PDL_OPS = ("gemma4_routing", "sparse_topk")


@pytest.mark.parametrize("arch", ["sm90", "gfx942"])
def test_every_build_carries_pdl_as_launched(arch):
    """A kernel without the PDL constexpr, or a build without the launch option,
    would be another kernel than the one the GPU runs (and precompile would
    warm the wrong cache entries)."""
    on = arch == "sm90"
    builds = collect_variants(arch)
    with_pdl = {b.kernel.split(":")[1] for b in builds if b.op in PDL_OPS}
    assert {"gemma4_routing_kernel", "sparse_topk_window_kernel", "sparse_topk_sample_kernel",
            "sparse_topk_filter_kernel", "sparse_topk_candidates_kernel"} <= with_pdl
    for b in builds:
        if b.op in PDL_OPS:
            pdl = dict(b.constexprs)["PDL"]
            assert dict(b.options).get("launch_pdl", False) is pdl, b.label
            # Routing launches large grids without PDL (pdl_for_grid), so it is built both ways.
            assert pdl is on or (on and b.op == "gemma4_routing"), b.label
        else:
            assert "PDL" not in dict(b.constexprs) and "launch_pdl" not in dict(b.options), b.label
    routing = [b for b in builds if b.op == "gemma4_routing"]
    with_it = {b.label for b in routing if dict(b.constexprs)["PDL"]}
    without = {b.label.removesuffix(" no-pdl") for b in routing if not dict(b.constexprs)["PDL"]}
    assert with_it == (without if on else set()) and without


def test_routing_uses_pdl_only_for_grids_that_fit_at_once(monkeypatch):
    from rocmoe.backends.triton.gemma4_routing import PDL_PROGRAMS_PER_UNIT, pdl_for_grid

    h100 = Device.from_arch("sm90")
    fits = PDL_PROGRAMS_PER_UNIT * h100.limits.compute_units
    assert pdl_for_grid(h100, 1) == pdl_for_grid(h100, fits) == {"PDL": True, "launch_pdl": True}
    assert pdl_for_grid(h100, fits + 1) == {"PDL": False}
    assert pdl_for_grid(Device.from_arch("gfx942"), 1) == {"PDL": False}
    monkeypatch.setattr(_common, "PDL_ALLOWED", False)
    assert pdl_for_grid(h100, 1) == {"PDL": False}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_dependent_chain_in_a_graph_matches_eager_without_pdl(gen, monkeypatch):
    """Routing over 8 experts with k = 8 keeps the shape: each call's weights are
    the next call's logits, so a kernel that read before its predecessor had
    written would change the result. Back to back in a graph is where PDL lets
    the next kernel start early."""
    import rocmoe

    cuda = torch.device("cuda")
    tokens, steps = 4096, 12
    scale = (torch.rand(8, generator=gen) + 0.5).to(cuda)
    first = torch.randn(tokens, 8, generator=gen).to(cuda)
    bufs = [torch.empty(tokens, 8, device=cuda) for _ in range(steps)]
    ids = [torch.empty(tokens, 8, dtype=torch.int32, device=cuda) for _ in range(steps)]

    def chain(source):
        for i in range(steps):
            rocmoe.gemma4_routing(source if i == 0 else bufs[i - 1], 8, scale, out_weights=bufs[i],
                                  out_ids=ids[i], backend="triton")

    monkeypatch.setattr(_common, "PDL_ALLOWED", False)
    chain(first)
    torch.cuda.synchronize()
    want = [b.clone() for b in bufs], [i.clone() for i in ids]

    monkeypatch.setattr(_common, "PDL_ALLOWED", True)
    source = torch.empty_like(first)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(source)  # compiles the PDL variant outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain(source)
    for _ in range(3):
        for b in bufs:
            b.fill_(float("nan"))
        source.copy_(first)
        graph.replay()
        torch.cuda.synchronize()
        for got, expected in zip(bufs, want[0]):
            assert torch.equal(got, expected)
        for got, expected in zip(ids, want[1]):
            assert torch.equal(got, expected)
