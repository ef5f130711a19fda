"""The AITER adapters' own logic, on the CPU: layout conversion, expert-mask and
id mapping, index compaction, the post-processing, and what each adapter
refuses. AITER itself cannot run here; a torch model of the contract the
adapters rely on (what AITER's fused_moe and MLA decode compute from their
arguments, per its documentation and reference code) stands in for it, and
the result must match SPEC's fp64 references. The calls into AITER run in
tests/test_rocm_aiter.py (marker rocm, ROCm container)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import is_poisoned, poison
from reference import mla_ref, moe_ref

import rocmoe
from rocmoe import registry
from rocmoe.backends.aiter import mxfp4_moe as aiter_moe, sparse_mla_decode as aiter_mla
from rocmoe.device import Device
from rocmoe.ops.mxfp4_moe import Mxfp4MoeProblem
from rocmoe.ops.sparse_mla_decode import SparseMlaProblem

E, H, I = 3, 64, 96


def _weights(gen, gate_up, bias=True, experts=E):
    w1b, w1s = rocmoe.quantize_mxfp4(torch.randn(experts, 2 * I, H, generator=gen) * 0.2)
    w2b, w2s = rocmoe.quantize_mxfp4(torch.randn(experts, H, I, generator=gen) * 0.2)
    b1 = torch.randn(experts, 2 * I, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(experts, H, generator=gen) * 0.1 if bias else None
    return rocmoe.Mxfp4MoeWeights(w1b, w1s, w2b, w2s, b1=b1, b2=b2, gate_up=gate_up)


@pytest.mark.parametrize("gate_up", ["interleaved", "concatenated"])
def test_conversion_orders_gate_then_up_and_pads_with_exact_zeros(gen, gate_up):
    w = _weights(gen, gate_up)
    order = aiter_moe.checkpoint_to_aiter_order(w)
    hp, ip = 256, 256
    assert order["w1"].shape == (E, 2 * ip, hp // 2) and order["w1_scale"].shape == (E, 2 * ip, hp // 32)
    assert order["w2"].shape == (E, hp, ip // 2) and order["w2_scale"].shape == (E, hp, ip // 32)
    dense1 = rocmoe.dequantize_mxfp4(w.w1_blocks, w.w1_scales, torch.float32)
    gate, up = (dense1[:, 0::2], dense1[:, 1::2]) if gate_up == "interleaved" else (dense1[:, :I], dense1[:, I:])
    want1 = torch.zeros(E, 2 * ip, hp)
    want1[:, :I, :H], want1[:, ip:ip + I, :H] = gate, up
    assert torch.equal(rocmoe.dequantize_mxfp4(order["w1"], order["w1_scale"], torch.float32), want1)
    want2 = torch.zeros(E, hp, ip)
    want2[:, :H, :I] = rocmoe.dequantize_mxfp4(w.w2_blocks, w.w2_scales, torch.float32)
    assert torch.equal(rocmoe.dequantize_mxfp4(order["w2"], order["w2_scale"], torch.float32), want2)
    # Padded scale bytes are 2**0, never the NaN byte: 0 * NaN would poison the sums.
    assert (order["w1_scale"][:, I:ip] == aiter_moe.E8M0_ONE).all()
    b_gate, b_up = (w.b1[:, 0::2], w.b1[:, 1::2]) if gate_up == "interleaved" else (w.b1[:, :I], w.b1[:, I:])
    assert torch.equal(order["b1"][:, :I], b_gate) and torch.equal(order["b1"][:, ip:ip + I], b_up)
    assert (order["b1"][:, I:ip] == 0).all() and (order["b2"][:, H:] == 0).all()


def _aiter_contract_moe(x, order, topk_weights, ids, mask, hidden):
    """What AITER's fused_moe (a16w4, Swiglu) computes from its arguments: local
    expert = cumsum(mask) - 1 of a global id whose mask is 1; W1's first half of
    rows is gate, second half up; Swiglu with alpha 1.702, limit 7; the
    activation in x's dtype; out = sum_j w_j * (W2 a + b2), rounded once."""
    local = torch.cumsum(mask, 0) - 1
    w1 = rocmoe.dequantize_mxfp4(order["w1"], order["w1_scale"], torch.float64)
    w2 = rocmoe.dequantize_mxfp4(order["w2"], order["w2_scale"], torch.float64)
    ip = w1.shape[1] // 2
    xp = torch.nn.functional.pad(x, (0, w1.shape[2] - x.shape[1])).double()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float64)
    for m in range(x.shape[0]):
        for j in range(ids.shape[1]):
            g = int(ids[m, j])
            if not mask[g]:
                continue
            e = int(local[g])
            h = w1[e] @ xp[m] + order["b1"][e].double()
            gate, up = h[:ip].clamp(max=7.0), h[ip:].clamp(-7.0, 7.0)
            a = (gate * torch.sigmoid(1.702 * gate) * (up + 1)).to(x.dtype).double()
            out[m] += float(topk_weights[m, j]) * (w2[e] @ a + order["b2"][e].double())
    return out[:, :hidden]


@pytest.mark.parametrize("expert_parallel", [False, True])
def test_argument_mapping_reproduces_the_spec_result(gen, expert_parallel):
    """Conversion + expert mask + id routing + padding, through the model of
    AITER's contract, against SPEC §2's fp64 reference - with id -1, ids past
    the global range and (with expert parallelism) remote experts."""
    w = _weights(gen, "interleaved")
    tokens, k = 6, 2
    x = torch.randn(tokens, H, generator=gen).to(torch.bfloat16)
    topk_weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1)
    if expert_parallel:
        expert_map = torch.tensor([-1, 0, -1, 1, 2, -1], dtype=torch.int32)  # 6 global, 3 local, in order
        ids = torch.stack([torch.randperm(6, generator=gen)[:k] for _ in range(tokens)]).int()
    else:
        expert_map = None
        ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).int()
    ids[0, 0], ids[0, 1], ids[3, 0] = 1, -1, 99  # global id 1 is local either way
    mask = aiter_moe.aiter_expert_mask(expert_map, E)
    routed = aiter_moe.route_ids(ids, mask.numel() - 1)
    got = _aiter_contract_moe(x, aiter_moe.checkpoint_to_aiter_order(w), topk_weights, routed, mask, H)
    ref = moe_ref(x, w.w1_blocks, w.w1_scales, w.w2_blocks, w.w2_scales, w.b1, w.b2, w.gate_up, topk_weights, ids,
                  "swigluoai", 1.702, 7.0, expert_map=expert_map)
    assert float((got - ref).norm() / ref.norm()) <= 1e-2
    assert got[0].abs().sum() > 0  # the token with one dropped slot still gets the other


def test_expert_mask_and_id_routing():
    mask = aiter_moe.aiter_expert_mask(None, 4)
    assert mask.tolist() == [1, 1, 1, 1, 0] and mask.dtype == torch.int32
    mask = aiter_moe.aiter_expert_mask(torch.tensor([-1, 0, 1, -1, 2], dtype=torch.int32), 3)
    assert mask.tolist() == [0, 1, 1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"expert_map must number the local experts 0\.\.1 in the order"):
        aiter_moe.aiter_expert_mask(torch.tensor([1, -1, 0], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="hold 3 of them; got 2"):
        aiter_moe.aiter_expert_mask(torch.tensor([0, -1, 1], dtype=torch.int32), 3)
    for dtype in (torch.int32, torch.int64):
        ids = torch.tensor([[0, -1], [5, 4], [-7, 2]], dtype=dtype)
        routed = aiter_moe.route_ids(ids, 5)
        assert routed.dtype == torch.int32 and routed.tolist() == [[0, 5], [5, 4], [5, 2]]


def test_expert_mask_is_checked_once_per_map_until_it_changes():
    impl = aiter_moe.AiterMxfp4Moe()
    expert_map = torch.tensor([0, -1, 1], dtype=torch.int32)
    first = impl.expert_mask(expert_map, 2, torch.device("cpu"))
    assert impl.expert_mask(expert_map, 2, torch.device("cpu")) is first
    expert_map[0], expert_map[2] = 1, 0  # written in place: out of order now
    with pytest.raises(ValueError, match="out of global order"):
        impl.expert_mask(expert_map, 2, torch.device("cpu"))


def _moe_problem(**changes):
    base = dict(x_dtype=torch.bfloat16, num_experts=32, hidden_size=2880, intermediate_size=2880, topk=4,
                gate_up="interleaved", activation="swigluoai", has_bias=True, expert_parallel=False,
                apply_router_weight_on_input=False, alpha=1.702, limit=7.0)
    return Mxfp4MoeProblem(**{**base, **changes})


@pytest.mark.parametrize("arch, changes, expected", [
    ("gfx950", {}, []),
    ("gfx950", {"expert_parallel": True}, []),
    ("gfx942", {}, ["built for gfx950 only, not gfx942"]),
    ("sm90", {}, ["does not run on hopper"]),
    ("gfx950", {"x_dtype": torch.float16}, ["bfloat16 activations"]),
    ("gfx950", {"activation": "silu", "limit": None}, ["quantises them to MXFP4 too"]),
    ("gfx950", {"limit": 10.0}, ["fixes alpha = 1.702 and limit = 7.0"]),
    ("gfx950", {"topk": 1, "apply_router_weight_on_input": True}, ["apply_router_weight_on_input"]),
])
def test_moe_adapter_declares_what_aiter_supports(arch, changes, expected):
    reasons = aiter_moe.IMPLEMENTATION.not_supported_reasons(Device.from_arch(arch), _moe_problem(**changes))
    assert len(reasons) == len(expected) and all(e in r for e, r in zip(expected, reasons)), reasons


def test_compaction_matches_a_loop(gen):
    tokens, topk, slots = 7, 12, 50
    indices = torch.randint(-3, slots + 6, (tokens, topk), generator=gen, dtype=torch.int32)
    indices[2] = -1  # a query with no key at all
    lengths = torch.randint(0, topk + 3, (tokens,), generator=gen, dtype=torch.int32)
    for topk_length in (None, lengths):
        indptr, flat, counts = aiter_mla.compact_indices(indices, topk_length, slots)
        assert indptr.dtype == flat.dtype == torch.int32 and flat.shape == (tokens * topk,)
        for t in range(tokens):
            cut = topk if topk_length is None else int(topk_length[t])
            want = [i for j, i in enumerate(indices[t].tolist()) if j < cut and 0 <= i < slots]
            assert flat[indptr[t]:indptr[t + 1]].tolist() == want and int(counts[t]) == len(want)
        assert int(indptr[0]) == 0 and int(indptr[-1]) == int(counts.sum())


def test_cache_pages_are_a_view_and_strided_caches_are_refused():
    cache = torch.randn(4, 16, 8)
    pages = aiter_mla.cache_as_pages(cache)
    assert pages.shape == (64, 1, 1, 8) and pages.data_ptr() == cache.data_ptr()
    assert torch.equal(pages[21, 0, 0], cache[1, 5])
    with pytest.raises(ValueError, match="kv_cache's rows contiguous"):
        aiter_mla.cache_as_pages(torch.randn(4, 8, 16).transpose(1, 2))


def _aiter_contract_mla(q, pages, kv_indptr, kv_indices, scale, d_v):
    """What AITER's MLA decode computes per query: softmax over the pages its
    ragged list names, V = the first d_v columns, natural-log lse."""
    out = torch.empty(q.shape[0], q.shape[1], d_v, dtype=torch.float64)
    lse = torch.empty(q.shape[0], q.shape[1], dtype=torch.float64)
    for t in range(q.shape[0]):
        keys = pages[kv_indices[kv_indptr[t]:kv_indptr[t + 1]].long(), 0, 0].double()
        s = scale * q[t].double() @ keys.T  # [H, n]
        lse[t] = torch.logsumexp(s, 1) if keys.shape[0] else float("nan")  # garbage for empty rows
        out[t] = torch.softmax(s, 1) @ keys[:, :d_v] if keys.shape[0] else float("nan")
    return out, lse


@pytest.mark.parametrize("sink", [False, True])
def test_compaction_and_finish_reproduce_the_spec_result(gen, sink):
    tokens, heads, dim, d_v, block, topk = 5, 4, 40, 32, 8, 9
    cache = torch.randn(6, block, dim, generator=gen)
    cache[5] = float("nan")  # never selected
    q = torch.randn(tokens, heads, dim, generator=gen)
    indices = torch.randint(-1, 5 * block + 3, (tokens, topk), generator=gen, dtype=torch.int32)
    indices[indices >= 5 * block] = 6 * block + 1  # past the cache
    indices[1] = -1  # no valid key
    topk_length = torch.randint(1, topk + 1, (tokens,), generator=gen, dtype=torch.int32)
    attn_sink = torch.randn(heads, generator=gen) if sink else None
    scale = 1 / math.sqrt(dim)
    pages = aiter_mla.cache_as_pages(cache)
    indptr, flat, counts = aiter_mla.compact_indices(indices, topk_length, pages.shape[0])
    out64, lse64 = _aiter_contract_mla(q, pages, indptr, flat, scale, d_v)
    out, lse = poison(torch.empty(tokens, heads, d_v)), poison(torch.empty(tokens, heads))
    out.copy_(out64)
    lse.copy_(lse64)
    aiter_mla.finish(out, lse, counts, attn_sink)
    ref_out, ref_lse = mla_ref(q, cache, indices, scale, d_v, topk_length=topk_length, sink=attn_sink)
    assert not is_poisoned(out).any() and not is_poisoned(lse).any()
    assert torch.allclose(out.double(), ref_out, atol=1e-5) and torch.equal(lse[1], torch.full((heads,), math.inf))
    assert torch.allclose(lse.double()[counts > 0], ref_lse[counts > 0], atol=1e-5)


@pytest.mark.parametrize("arch, changes, expected", [
    ("gfx942", {}, []),
    ("gfx950", {"num_heads": 16, "has_sink": True, "has_topk_length": True}, []),
    ("gfx942", {"num_heads": 64}, ["16 or 128 heads"]),
    ("gfx950", {"head_dim": 512}, ["D = 576 with d_v = 512"]),
    ("gfx942", {"extra_block_size": 64, "extra_topk": 128}, ["no second key set"]),
    ("gfx942", {"dtype": torch.float16}, ["bfloat16 q and cache"]),
    ("sm100", {}, ["does not run on blackwell"]),
])
def test_mla_adapter_declares_what_aiter_supports(arch, changes, expected):
    base = dict(dtype=torch.bfloat16, num_heads=128, head_dim=576, d_v=512, block_size=64, topk=2048,
                has_topk_length=False, has_sink=False, extra_block_size=None, extra_topk=None)
    problem = SparseMlaProblem(**{**base, **changes})
    reasons = aiter_mla.IMPLEMENTATION.not_supported_reasons(Device.from_arch(arch), problem)
    assert len(reasons) == len(expected) and all(e in r for e, r in zip(expected, reasons)), reasons


@pytest.mark.parametrize("op", ["gemma4_routing", "sparse_topk"])
def test_ops_without_an_aiter_kernel_say_why(op):
    impl = registry.implementation(op, "aiter")
    if isinstance(impl, list):  # AITER unavailable here: the backend's reason, not the op's
        impl = __import__(f"rocmoe.backends.aiter.{op}", fromlist=["IMPLEMENTATION"]).IMPLEMENTATION
    (reason,) = impl.not_supported_reasons(Device.from_arch("gfx950"), None)
    assert "the triton backend serves CDNA" in reason


def test_without_rocm_aiter_is_unavailable_with_the_true_reason():
    if torch.version.hip:
        pytest.skip("this torch is a ROCm build: AITER may well be available")
    reasons = registry.backend_reasons("aiter")
    assert reasons == ["AITER needs a ROCm build of torch (this torch was built without HIP)"]
    with pytest.raises(registry.BackendUnavailableError, match="AITER needs a ROCm build of torch"):
        registry.select("mxfp4_moe", Device.from_arch("gfx950"), _moe_problem(), backend="aiter")
