"""The Triton mxfp4_moe, pipeline by pipeline and config by config: the
interpreter on the CPU (fp16 activations), compiled on a GPU (bf16 too).
Checked against the token-by-token fp64 loop of tests/reference.py."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from conftest import is_poisoned, poison
from reference import moe_ref

import rocmoe
from rocmoe.backends.triton import _mxfp4_moe_kernel as kernels, mxfp4_moe as triton_moe
from rocmoe.backends.triton.mxfp4_moe import MoeConfig, launch, to_triton_layout, workspace_bytes

H, I = 64, 96  # I = 96: a 64-wide K step of GEMM2 ends in a masked half step

DECODE = MoeConfig(1, 16, 32, 64, 4, 1, 32, 64, 4, 1)
GROUPED = MoeConfig(0, 16, 32, 64, 4, 1, 32, 64, 4, 1)
GROUPED_WIDE = MoeConfig(0, 32, 64, 128, 4, 2, 64, 32, 4, 2)
CONFIGS = {"decode": DECODE, "grouped": GROUPED, "grouped-wide": GROUPED_WIDE}


def _activation_dtype(device: torch.device) -> torch.dtype:
    # numpy has no bfloat16: the interpreter runs fp16 activations.
    return torch.bfloat16 if device.type == "cuda" else torch.float16


def _weights(gen, experts, gate_up="interleaved", bias=True, hidden=H, inter=I):
    w1b, w1s = rocmoe.quantize_mxfp4(torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.2)
    w2b, w2s = rocmoe.quantize_mxfp4(torch.randn(experts, hidden, inter, generator=gen) * 0.2)
    b1 = torch.randn(experts, 2 * inter, generator=gen) * 0.1 if bias else None
    b2 = torch.randn(experts, hidden, generator=gen) * 0.1 if bias else None
    return w1b, w1s, w2b, w2s, b1, b2


def _distinct_ids(gen, tokens, topk, experts):
    return torch.stack([torch.randperm(experts, generator=gen)[:topk] for _ in range(tokens)]).int()


def _tokens(gen, device, tokens, topk, experts, scale=1.0):
    """(x [tokens, H] of the device's activation dtype, router weights, ids of
    k distinct experts per token), on the CPU."""
    x = (torch.randn(tokens, H, generator=gen) * scale).to(_activation_dtype(device))
    return x, torch.rand(tokens, topk, generator=gen), _distinct_ids(gen, tokens, topk, experts)


def _run(device, parts, gate_up, x, tw, ids, config, activation="swigluoai", alpha=1.702, limit=7.0,
         expert_map=None, on_input=False, workspace=None):
    on = [None if t is None else t.to(device) for t in parts]
    weights = rocmoe.Mxfp4MoeWeights(*on[:4], b1=on[4], b2=on[5], gate_up=gate_up)
    out = poison(torch.empty(x.shape, dtype=x.dtype, device=device))
    launch(x.to(device), to_triton_layout(weights), tw.to(device), ids.to(device),
           None if expert_map is None else expert_map.to(device), activation, alpha, limit, on_input, out,
           workspace, config)
    assert not is_poisoned(out).any(), "rows left unwritten"
    return out.cpu()


def _check(got, x, parts, gate_up, tw, ids, activation="swigluoai", alpha=1.702, limit=7.0, **kw):
    ref = moe_ref(x, *parts[:4], parts[4], parts[5], gate_up, tw, ids, activation, alpha, limit, **kw)
    err = float((got.double() - ref).norm() / ref.norm())
    assert err <= 1e-2, f"rel-L2 {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("gate_up, activation, limit, bias", [
    ("interleaved", "swigluoai", 7.0, True),       # gpt-oss
    ("concatenated", "silu", 10.0, False),         # DeepSeek-V4
    ("concatenated", "silu", None, True),          # Gemma 4
    ("interleaved", "swigluoai", None, False),
])
def test_matches_reference(kernel_device, gen, config, gate_up, activation, limit, bias):
    experts, tokens, topk = 6, 7, 3
    parts = _weights(gen, experts, gate_up, bias)
    x, tw, ids = _tokens(gen, kernel_device, tokens, topk, experts, scale=3)  # large enough to reach the clamp
    got = _run(kernel_device, parts, gate_up, x, tw, ids, config, activation, 1.3, limit)
    _check(got, x, parts, gate_up, tw, ids, activation, 1.3, limit)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_expert_map_remote_experts_and_minus_one(kernel_device, gen, config):
    experts = 4  # this rank holds global experts 7, 2, 9, 4 of 10
    parts = _weights(gen, experts)
    expert_map = torch.full((10,), -1, dtype=torch.int32)
    expert_map[torch.tensor([7, 2, 9, 4])] = torch.arange(experts, dtype=torch.int32)
    tokens, topk = 9, 3
    ids = torch.randint(0, 10, (tokens, topk), generator=gen, dtype=torch.int32)
    ids[0, 1] = -1
    ids[3] = torch.tensor([0, 1, 3], dtype=torch.int32)  # all remote: the row is zero, biases included
    ids[5, 2] = 12  # past the global range
    tw = torch.rand(tokens, topk, generator=gen)
    x = torch.randn(tokens, H, generator=gen).to(_activation_dtype(kernel_device))
    got = _run(kernel_device, parts, "interleaved", x, tw, ids, config, expert_map=expert_map)
    assert (got[3] == 0).all()
    _check(got, x, parts, "interleaved", tw, ids, expert_map=expert_map)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_router_weight_on_input_with_int64_ids(kernel_device, gen, config):
    experts, tokens = 5, 6
    parts = _weights(gen, experts)
    ids = torch.randint(0, experts, (tokens, 1), generator=gen)
    ids[2, 0] = -1
    tw = torch.rand(tokens, 1, generator=gen) + 0.5
    x = torch.randn(tokens, H, generator=gen).to(_activation_dtype(kernel_device))
    got = _run(kernel_device, parts, "concatenated", x, tw, ids, config, on_input=True)
    assert (got[2] == 0).all()
    _check(got, x, parts, "concatenated", tw, ids, apply_on_input=True)


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
@pytest.mark.parametrize("routing", ["one_token", "all_on_one_expert", "idle_experts"])
def test_routing_extremes(kernel_device, gen, config, routing):
    experts = 6
    parts = _weights(gen, experts)
    if routing == "one_token":
        ids, tw = _distinct_ids(gen, 1, 4, experts), torch.rand(1, 4, generator=gen)
    elif routing == "all_on_one_expert":  # 40 rows of one expert: several row blocks
        ids, tw = torch.full((40, 1), 3, dtype=torch.int32), torch.rand(40, 1, generator=gen)
    else:  # experts 0, 1, 5 receive nothing
        ids = torch.randint(2, 5, (7, 2), generator=gen, dtype=torch.int32)
        tw = torch.rand(7, 2, generator=gen)
    x = torch.randn(ids.shape[0], H, generator=gen).to(_activation_dtype(kernel_device))
    got = _run(kernel_device, parts, "interleaved", x, tw, ids, config)
    _check(got, x, parts, "interleaved", tw, ids)


def test_passes_and_metadata_chunks(kernel_device, gen, monkeypatch):
    """Several token passes, each with several metadata chunks, and a dirty
    caller workspace sized by workspace_bytes: same result as one pass."""
    experts, tokens, topk = 5, 23, 3
    parts = _weights(gen, experts)
    x, tw, ids = _tokens(gen, kernel_device, tokens, topk, experts)
    whole = _run(kernel_device, parts, "interleaved", x, tw, ids, GROUPED)
    monkeypatch.setattr(triton_moe, "PASS_TOKENS", 8)
    monkeypatch.setattr(triton_moe, "METADATA_CHUNK", 16)
    need = workspace_bytes(tokens, topk, experts, H, I, x.dtype)
    workspace = torch.full((need,), 0xFF, dtype=torch.uint8, device=kernel_device)
    passes = _run(kernel_device, parts, "interleaved", x, tw, ids, GROUPED, workspace=workspace)
    assert torch.equal(passes, whole)
    _check(passes, x, parts, "interleaved", tw, ids)


@pytest.mark.parametrize("config", [DECODE, GROUPED], ids=["decode", "grouped"])
def test_bitwise_reproducible(kernel_device, gen, config):
    experts, tokens, topk = 4, 12, 4
    parts = _weights(gen, experts)
    x, tw, ids = _tokens(gen, kernel_device, tokens, topk, experts)
    first = _run(kernel_device, parts, "interleaved", x, tw, ids, config)
    assert torch.equal(first, _run(kernel_device, parts, "interleaved", x, tw, ids, config))


@pytest.mark.parametrize("chunk", [16, 64])
def test_routing_metadata_is_a_stable_sort_by_expert(kernel_device, gen, chunk):
    """count -> plan -> scatter against a Python model: every routed slot in
    its expert's segment, segments block-aligned and in expert order, slots in
    ascending order inside a segment, and each block's expert recorded."""
    experts, block_m, topk, tokens = 7, 4, 3, 30
    ids = torch.randint(-1, experts + 2, (tokens, topk), generator=gen, dtype=torch.int32)
    slots = tokens * topk
    chunks = -(-slots // chunk)
    e_pad = 8 if experts < 8 else 16
    dev = kernel_device
    counts = torch.full((chunks * e_pad,), -7, dtype=torch.int32, device=dev)
    bases = torch.full_like(counts, -7)
    expert_rows = torch.full((e_pad,), -7, dtype=torch.int32, device=dev)
    first_block = torch.full((e_pad,), -7, dtype=torch.int32, device=dev)
    rows_bound = slots + experts * (block_m - 1)
    sorted_slots = torch.full((rows_bound,), -7, dtype=torch.int32, device=dev)
    block_expert = torch.full((rows_bound // block_m + 1,), -7, dtype=torch.int32, device=dev)
    ids_dev = ids.to(dev)
    kernels.moe_count_kernel[(chunks,)](ids_dev, topk, ids_dev, counts, slots, experts, experts, TOPK=topk,
                                        HAS_MAP=False, CHUNK=chunk, E_PAD=e_pad)
    kernels.moe_plan_kernel[(1,)](counts, bases, expert_rows, first_block, chunks, experts, BLOCK_M=block_m,
                                  E_PAD=e_pad)
    kernels.moe_scatter_kernel[(chunks,)](ids_dev, topk, ids_dev, bases, sorted_slots, block_expert, slots,
                                          experts, experts, TOPK=topk, HAS_MAP=False, CHUNK=chunk, E_PAD=e_pad,
                                          BLOCK_M=block_m)
    flat = ids.flatten().tolist()
    want_rows = [sum(1 for e in flat if e == x) for x in range(experts)]
    assert expert_rows.cpu()[:experts].tolist() == want_rows
    want_first, start = [], 0
    for rows in want_rows:
        want_first.append(start)
        start += -(-rows // block_m)
    assert first_block.cpu()[: experts + 1].tolist() == [*want_first, start]
    got_slots, got_blocks = sorted_slots.cpu().tolist(), block_expert.cpu().tolist()
    for e in range(experts):
        begin = want_first[e] * block_m
        assert got_slots[begin:begin + want_rows[e]] == [s for s in range(slots) if flat[s] == e]
        for b in range(want_first[e], want_first[e] + -(-want_rows[e] // block_m)):
            assert got_blocks[b] == e


def test_workspace_bytes_is_monotone_and_bounded():
    sizes = [workspace_bytes(m, 4, 128, 2880, 2880) for m in (1, 2, 8, 64, 1000, 4096, 4097, 100_000)]
    assert sizes == sorted(sizes)
    assert sizes[-1] == sizes[-3]  # passes of PASS_TOKENS tokens: M beyond one pass costs nothing more


def test_public_op_runs_triton_and_uses_caller_buffers(kernel_device, gen):
    experts, tokens, topk = 4, 5, 2
    w1b, w1s, w2b, w2s, b1, b2 = (t.to(kernel_device) for t in _weights(gen, experts))
    weights = rocmoe.Mxfp4MoeWeights(w1b, w1s, w2b, w2s, b1=b1, b2=b2)
    assert weights.prepare(topk=topk, backend="triton") == "triton"
    converted = weights._converted["triton"]
    x, tw, ids = (t.to(kernel_device) for t in _tokens(gen, kernel_device, tokens, topk, experts))
    need = rocmoe.mxfp4_moe_workspace_size(tokens, topk, weights, x_dtype=x.dtype, backend="triton")
    workspace = torch.full((need,), 0xFF, dtype=torch.uint8, device=kernel_device)
    out = poison(torch.empty_like(x))
    got = rocmoe.mxfp4_moe(x, weights, tw, ids, out=out, workspace=workspace, backend="triton")
    assert got is out and not is_poisoned(out).any()
    assert weights._converted["triton"] is converted
    _check(out.cpu(), x.cpu(), [t.cpu() for t in (w1b, w1s, w2b, w2s, b1, b2)], "interleaved", tw.cpu(), ids.cpu())
    assert rocmoe.mxfp4_moe(x[:0], weights, tw[:0], ids[:0], backend="triton").shape == (0, H)


@triton.jit
def _bf16_bits_kernel(codes_ptr, scales_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    bits = kernels._mxfp4_bf16_bits(tl.load(codes_ptr + i), tl.load(scales_ptr + i))
    tl.store(out_ptr + i, bits)


def test_bf16_dequant_bits_match_the_format(kernel_device):
    """The GPU's bf16 path builds weights from bits (no fp32 tile): every code
    at scales across the exact range [2, 252], NaN for 255, against
    rocmoe.dequantize_mxfp4 (the interpreter has no bf16, so compare bits)."""
    scales = torch.tensor([2, 3, 100, 119, 127, 128, 200, 252, 255], dtype=torch.int32)
    codes = torch.arange(16, dtype=torch.int32)
    c, s = torch.meshgrid(codes, scales, indexing="ij")
    c, s = c.flatten(), s.flatten()
    n = 256
    c = torch.cat((c, torch.zeros(n - c.numel(), dtype=torch.int32)))
    s = torch.cat((s, torch.full((n - s.numel(),), 127, dtype=torch.int32)))
    out = torch.full((n,), -1, dtype=torch.int32, device=kernel_device)
    _bf16_bits_kernel[(1,)](c.to(kernel_device), s.to(kernel_device), out, N=n)
    got = out.cpu().to(torch.int16).view(torch.bfloat16).float()
    # one code per byte (the even element), one scale per 32 elements
    want = rocmoe.dequantize_mxfp4(c.to(torch.uint8).view(-1, 1).repeat(1, 16), s.to(torch.uint8).view(-1, 1),
                                   torch.bfloat16)[:, 0].float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


@pytest.mark.parametrize("change, message", [
    (dict(BLOCK_M=256), "BLOCK_M=256"), (dict(BLOCK_M=24), "BLOCK_M=24"), (dict(BLOCK_N2=8), "BLOCK_N2=8"),
    (dict(BLOCK_K1=16), "BLOCK_K1=16"),
])
def test_unusable_config_is_refused_before_any_launch(change, message):
    """A user's table could hold a config the workspace is not sized for."""
    import dataclasses

    with pytest.raises(ValueError, match=message):
        triton_moe.check_config(dataclasses.replace(GROUPED, **change))
    assert triton_moe.check_config(GROUPED) is GROUPED
