"""sparse_mla_decode, every backend that runs here (torch; triton under the
interpreter, fp32/fp16 there), against the fp64 loop reference of SPEC §3."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import is_poisoned, on_device, poison
from reference import mla_ref

import rocmoe


def _inputs(gen, tokens=3, heads=4, dim=80, d_v=64, blocks=6, block_size=16, topk=12, dtype=torch.float32):
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    cache = torch.randn(blocks, block_size, dim, generator=gen).to(dtype)
    rows = blocks * block_size
    indices = torch.randint(-1, rows + 5, (tokens, topk), generator=gen, dtype=torch.int32)  # -1 and out of range
    return q, cache, indices, d_v


def _call(backend, q, cache, indices, *, out=None, lse_out=None, **kwargs):
    """rocmoe.sparse_mla_decode on the backend's device; CPU tensors in and out."""
    name, device = backend

    moved = on_device(device)
    dev_out, dev_lse = moved(out), moved(lse_out)
    got, got_lse = rocmoe.sparse_mla_decode(moved(q), moved(cache), moved(indices), out=dev_out, lse_out=dev_lse,
                                            backend=name, **{k: moved(v) for k, v in kwargs.items()})
    assert (dev_out is None or got is dev_out) and (dev_lse is None or got_lse is dev_lse)
    if out is not None:
        return out.copy_(got), lse_out.copy_(got_lse)
    return got.cpu(), got_lse.cpu()


def _assert_matches(out, lse, ref_out, ref_lse):
    tol = dict(atol=2e-2, rtol=2e-2) if out.dtype == torch.bfloat16 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.double(), ref_out, **tol)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-3, rtol=0)
    assert (lse[~finite] == math.inf).all()


# The Triton interpreter computes bf16 dots wrongly (DESIGN.md): bf16 goes
# through Triton only where it compiles.
_BACKEND_DTYPES = [("torch", torch.float32), ("torch", torch.float16), ("torch", torch.bfloat16),
                   ("triton", torch.float32), ("triton", torch.float16)]
if torch.cuda.is_available():
    _BACKEND_DTYPES.append(("triton", torch.bfloat16))


@pytest.mark.parametrize("backend, dtype", _BACKEND_DTYPES, indirect=["backend"])
@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_matches_reference(backend, gen, dtype, block_size):
    q, cache, indices, d_v = _inputs(gen, block_size=block_size, blocks=max(2, 96 // block_size), dtype=dtype)
    out = poison(torch.empty(q.shape[0], q.shape[1], d_v, dtype=dtype))
    lse = poison(torch.empty(q.shape[0], q.shape[1]))
    got, got_lse = _call(backend, q, cache, indices, softmax_scale=0.11, d_v=d_v, out=out, lse_out=lse)
    assert got is out and got_lse is lse and not is_poisoned(out).any() and not is_poisoned(lse).any()
    _assert_matches(got, got_lse, *mla_ref(q, cache, indices, 0.11, d_v))


@pytest.mark.parametrize("dim, d_v", [(576, 512), (512, 448)])
def test_deepseek_head_dims(backend, gen, dim, d_v):
    q, cache, indices, _ = _inputs(gen, tokens=2, heads=2, dim=dim, blocks=4, block_size=64, topk=40)
    four_d = cache.unsqueeze(2)  # FlashMLA's [blocks, bs, 1, D] view
    out, lse = _call(backend, q, four_d, indices, softmax_scale=dim ** -0.5, d_v=d_v)
    _assert_matches(out, lse, *mla_ref(q, cache, indices, dim ** -0.5, d_v))


def test_topk_length_extra_keys_and_sink(backend, gen):
    q, cache, indices, d_v = _inputs(gen, tokens=4)
    extra = torch.randn(3, 8, q.shape[2], generator=gen)
    extra_idx = torch.randint(-1, 24, (4, 5), generator=gen, dtype=torch.int32)
    length = torch.tensor([12, 0, 5, 3], dtype=torch.int32)
    extra_length = torch.tensor([5, 2, 0, 4], dtype=torch.int32)
    sink = torch.randn(q.shape[1], generator=gen)
    out, lse = _call(backend, q, cache, indices, softmax_scale=0.2, d_v=d_v, topk_length=length,
                                        attn_sink=sink, extra_kv_cache=extra, extra_indices=extra_idx,
                                        extra_topk_length=extra_length)
    _assert_matches(out, lse, *mla_ref(q, cache, indices, 0.2, d_v, length, sink, extra, extra_idx, extra_length))


def test_query_without_keys_gets_zero_and_inf(backend, gen):
    q, cache, indices, d_v = _inputs(gen, tokens=3)
    indices[1] = -1
    indices[2, :] = 10_000  # all out of range
    sink = torch.randn(q.shape[1], generator=gen)
    out, lse = _call(backend, q, cache, indices, softmax_scale=0.1, d_v=d_v, attn_sink=sink)
    assert (out[1:] == 0).all() and (lse[1:] == math.inf).all()
    assert torch.isfinite(lse[0]).all()


def test_nan_in_unselected_rows_never_leaks(backend, gen):
    q, cache, indices, d_v = _inputs(gen, tokens=2, blocks=4, block_size=16, topk=10)
    indices = torch.randint(0, 32, (2, 10), generator=gen, dtype=torch.int32)  # rows 0..31 only
    dirty = cache.clone()
    dirty.view(-1, cache.shape[2])[32:] = float("nan")
    length = torch.tensor([10, 4], dtype=torch.int32)
    indices[1, 4:] = 40  # past topk_length: selected slots that do not count point at NaN rows
    out, lse = _call(backend, q, dirty, indices, softmax_scale=0.1, d_v=d_v, topk_length=length)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    _assert_matches(out, lse, *mla_ref(q, cache, indices, 0.1, d_v, length))


def test_zero_tokens():
    out, lse = rocmoe.sparse_mla_decode(torch.empty(0, 4, 64), torch.randn(2, 16, 64),
                                        torch.empty(0, 8, dtype=torch.int32), softmax_scale=0.1, d_v=32)
    assert out.shape == (0, 4, 32) and lse.shape == (0, 4)


@pytest.mark.parametrize("change, exc, message", [
    (dict(q=torch.randn(3, 4, 80, dtype=torch.float64)), TypeError, "q must have dtype"),
    (dict(q=torch.randn(3, 80)), ValueError, "q must have 3 dimensions"),
    (dict(kv_cache=torch.randn(6, 16, 64)), ValueError, "kv_cache must have head dim D=80"),
    (dict(kv_cache=torch.randn(6, 16, 2, 80)), ValueError, "one latent head"),
    (dict(kv_cache=torch.randn(6, 16, 80, dtype=torch.float16)), TypeError, "kv_cache must have dtype float32"),
    (dict(kv_cache=torch.randn(16, 6, 80).transpose(0, 1)), ValueError, "kv_cache must be contiguous"),
    (dict(indices=torch.zeros(3, 12, dtype=torch.int64)), TypeError, "indices must have dtype int32"),
    (dict(indices=torch.zeros(2, 12, dtype=torch.int32)), ValueError, r"indices must have shape \[3, topk"),
    (dict(d_v=81), ValueError, r"d_v must be in \[1, 80\]"),
    (dict(softmax_scale=float("nan")), ValueError, "softmax_scale must be a finite float"),
    (dict(topk_length=torch.zeros(4, dtype=torch.int32)), ValueError, r"topk_length must have shape \[3\]"),
    (dict(attn_sink=torch.zeros(4, dtype=torch.bfloat16)), TypeError, "attn_sink must have dtype float32"),
    (dict(extra_indices=torch.zeros(3, 2, dtype=torch.int32)), ValueError, "need extra_kv_cache"),
    (dict(extra_kv_cache=torch.randn(2, 8, 80)), ValueError, "extra_kv_cache needs extra_indices"),
    (dict(out=torch.empty(3, 4, 64, dtype=torch.float16)), TypeError, "out must have dtype float32"),
    (dict(lse_out=torch.empty(3, 5)), ValueError, r"lse_out must have shape \[3, 4\]"),
])
def test_bad_inputs_raise_and_write_nothing(gen, change, exc, message):
    q, cache, indices, d_v = _inputs(gen)
    out = poison(torch.empty(3, 4, 64))
    lse = poison(torch.empty(3, 4))
    args = dict(q=q, kv_cache=cache, indices=indices, softmax_scale=0.1, d_v=d_v, out=out, lse_out=lse)
    args.update(change)
    with pytest.raises(exc, match=message):
        rocmoe.sparse_mla_decode(args.pop("q"), args.pop("kv_cache"), args.pop("indices"), **args)
    assert is_poisoned(out).all() and is_poisoned(lse).all()
