"""sparse_topk, every backend that runs here (torch; triton under the
interpreter): the short-circuit, the general path, block tables."""

from __future__ import annotations

import pytest
import torch
from conftest import is_poisoned, on_device, poison

import rocmoe


def _window_ref(lens, topk):
    return [[p for p in range(max(0, min(n, topk)))] + [-1] * (topk - max(0, min(n, topk))) for n in lens]


def _call(backend, logits, seq_lens, topk, *, out=None, block_table=None, **kwargs):
    """rocmoe.sparse_topk on the backend's device; CPU tensors in and out."""
    name, device = backend

    moved = on_device(device)
    dev_out = moved(out)
    got = rocmoe.sparse_topk(moved(logits), moved(seq_lens), topk, out=dev_out, block_table=moved(block_table),
                             backend=name, **kwargs)
    assert dev_out is None or got is dev_out
    if out is not None:
        return out.copy_(got)
    return got.cpu()


class _Untouchable(torch.Tensor):
    """A logits tensor whose every torch use fails: proves the short-circuit never reads it."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.dim, torch.Tensor.shape.__get__, torch.Tensor.stride, torch.Tensor.device.__get__,
                    torch.Tensor.dtype.__get__, torch.Tensor.size):
            return super().__torch_function__(func, types, args, kwargs or {})
        raise AssertionError(f"logits were read: {func}")


@pytest.mark.parametrize("max_hint", [None, "exact"])
def test_short_circuit_writes_the_window(backend, gen, max_hint):
    topk, tokens = 16, 9
    lens = torch.randint(0, topk + 1, (tokens,), generator=gen, dtype=torch.int32)
    lens[0] = topk
    hint = None if max_hint is None else int(lens.max())
    out = poison(torch.empty(tokens, topk, dtype=torch.int32))
    got = _call(backend, None, lens, topk, max_seq_len=hint, out=out)
    assert got is out and got.tolist() == _window_ref(lens.tolist(), topk)


@pytest.mark.parametrize("hint", [None, 8])
def test_short_circuit_never_reads_logits(gen, hint):
    from rocmoe.backends.torch.sparse_topk import sparse_topk_torch

    topk = 8
    lens = torch.randint(0, topk + 1, (5,), generator=gen, dtype=torch.int32)
    logits = torch.randn(5, 64, generator=gen).as_subclass(_Untouchable)
    got = sparse_topk_torch(logits, lens, topk, max_seq_len=hint)
    assert got.tolist() == _window_ref(lens.tolist(), topk)


@pytest.mark.parametrize("tokens, width, topk", [(1, 40, 8), (6, 300, 32), (4, 2048, 100)])
def test_general_path_picks_the_top_positions(backend, gen, tokens, width, topk):
    # Distinct scores make the expected set unique.
    logits = torch.stack([torch.randperm(width, generator=gen).float() for _ in range(tokens)])
    lens = torch.randint(1, width + 1, (tokens,), generator=gen, dtype=torch.int32)
    lens[0] = width  # at least one row exceeds topk, so the general path runs
    out = poison(torch.empty(tokens, topk, dtype=torch.int32))
    _call(backend, logits, lens, topk, out=out)
    for t in range(tokens):
        n = int(lens[t])
        window = logits[t, :n].tolist()
        want = set(sorted(range(n), key=lambda p: -window[p])[:topk])
        row = out[t].tolist()
        assert set(p for p in row if p >= 0) == want
        assert row.count(-1) == topk - len(want)
        assert all(p == -1 for p in row[len(want):])  # -1 padding at the end


def test_ties_and_neg_inf_stay_inside_the_window(backend, gen):
    tokens, width, topk = 5, 64, 12
    logits = torch.randint(0, 3, (tokens, width), generator=gen).float()
    logits[:, ::3] = float("-inf")
    lens = torch.tensor([64, 20, 13, 40, 5], dtype=torch.int32)
    out = _call(backend, logits, lens, topk)
    for t in range(tokens):
        n = min(int(lens[t]), width)
        chosen = [p for p in out[t].tolist() if p >= 0]
        assert len(chosen) == min(n, topk) and len(set(chosen)) == len(chosen)
        assert all(0 <= p < n for p in chosen)  # a valid -inf outranks the masked tail
        vals = sorted(logits[t, :n].tolist(), reverse=True)[: len(chosen)]
        assert sorted(logits[t, chosen].tolist(), reverse=True) == vals


def test_window_wider_than_logits_is_clamped(backend, gen):
    logits = torch.randn(2, 10, generator=gen)
    lens = torch.tensor([50, 3], dtype=torch.int32)  # beyond L: only L positions exist
    out = _call(backend, logits, lens, 16)
    assert out.tolist() == _window_ref([10, 3], 16)


@pytest.mark.parametrize("general", [False, True])
def test_block_table_conversion(backend, gen, general):
    tokens, block_size, max_blocks, topk = 4, 16, 6, 24
    width = max_blocks * block_size
    table = torch.stack([torch.randperm(50, generator=gen)[:max_blocks] for _ in range(tokens)]).int()
    table[1, 2] = -1  # an unallocated block gives -1
    if general:
        logits = torch.randn(tokens, width, generator=gen)
        lens = torch.full((tokens,), width, dtype=torch.int32)
    else:
        logits = None
        lens = torch.randint(0, topk + 1, (tokens,), generator=gen, dtype=torch.int32)
    positions = _call(backend, logits, lens, topk)
    slots = _call(backend, logits, lens, topk, block_table=table, block_size=block_size)
    for t in range(tokens):
        for p, s in zip(positions[t].tolist(), slots[t].tolist()):
            if p < 0 or table[t, p // block_size] < 0:
                assert s == -1
            else:
                assert s == int(table[t, p // block_size]) * block_size + p % block_size


def test_logits_none_when_window_does_not_fit(backend):
    lens = torch.tensor([3, 40], dtype=torch.int32)
    with pytest.raises(ValueError, match="logits is None but seq_lens has max 40 > topk=8"):
        _call(backend, None, lens, 8)
    with pytest.raises(ValueError, match="logits is None but max_seq_len=40 > topk=8"):
        _call(backend, None, lens, 8, max_seq_len=40)


def test_zero_tokens(backend):
    assert _call(backend, None, torch.empty(0, dtype=torch.int32), 4).shape == (0, 4)


@pytest.mark.parametrize("change, exc, message", [
    (dict(seq_lens=torch.ones(3, dtype=torch.int64)), TypeError, "seq_lens must have dtype int32"),
    (dict(logits=torch.randn(2, 64)), ValueError, r"logits must have shape \[3, L\]"),
    (dict(logits=torch.randn(3, 64, dtype=torch.float64)), TypeError, "logits must have dtype float32"),
    (dict(logits=torch.randn(64, 3).t()), ValueError, "logits must have unit stride"),
    (dict(topk=0), ValueError, "topk must be in"),
    (dict(block_table=torch.zeros(3, 4, dtype=torch.int32)), ValueError, "must be given together"),
    (dict(block_table=torch.zeros(3, 4, dtype=torch.int32), block_size=0), ValueError, "block_size must be in"),
    (dict(block_table=torch.zeros(2, 4, dtype=torch.int32), block_size=16), ValueError,
     r"block_table must have shape \[3, \*\]"),
    (dict(max_seq_len=-1), ValueError, "max_seq_len must be in"),
    (dict(out=torch.empty(3, 9, dtype=torch.int32)), ValueError, r"out must have shape \[3, 8\]"),
])
def test_bad_inputs_raise_and_write_nothing(gen, change, exc, message):
    out = poison(torch.empty(3, 8, dtype=torch.int32))
    args = dict(logits=torch.randn(3, 64, generator=gen), seq_lens=torch.full((3,), 30, dtype=torch.int32),
                topk=8, out=out)
    args.update(change)
    with pytest.raises(exc, match=message):
        rocmoe.sparse_topk(args.pop("logits"), args.pop("seq_lens"), args.pop("topk"), **args)
    assert is_poisoned(out).all()
