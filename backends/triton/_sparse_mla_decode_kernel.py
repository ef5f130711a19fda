"""Kernels of sparse-MLA decode: split-key flash decoding over gathered latent rows.

One latent KV head serves every query head, so a program takes one query
token and a block of BLOCK_H heads, gathers BLOCK_N selected cache rows at a
time (each row read once per program, for all its heads) and runs
``S = Q K^T`` and ``O += P V`` with ``tl.dot``. D = 576 is not a power of
two: the score dot is split into the first D_MAIN = 512 columns and a D_TAIL =
64 tail; V is the first d_v <= D_MAIN columns of the same loaded rows. The
D_MAIN columns are handled as two halves (two loads, two score dots, two
output accumulators): with 64 heads on sm90 (wgmma, the fp32 [64, 512]
accumulator at 128 registers a thread) one [64, 512] tile and its store
left no room for the rest and spilled; halves do not.

With DV_SPLIT = 2 the two halves of d_v go to two programs that share
the gathered rows through L2, each computing the whole score tile for its
heads and one [BLOCK_H, D_MAIN / 2] output. On sm90 this lets a program take
128 heads on eight warps: each warpgroup then owns 64 heads of the score dot
(Triton gives a chained dot's warps all to M, so 64 heads on eight warps
compute the same scores in both warpgroups) and issues it as m64n32 wgmma
instead of m64n16. The tensor work per key is the same; the score dot takes
half the wgmma instructions, and reads 0.6x the shared-memory bytes per flop
(both of its operands come from shared memory: 2 KB of Q per instruction
against 0.5 or 1 KB of keys).

The key list (the indexed keys, then the extra keys of DeepSeek-V4) is cut into
SPLIT chunks along the grid when T * H / BLOCK_H programs cannot fill the
device. With SPLIT = 1 a program writes the final output; otherwise it
writes a partial output (16-bit for a 16-bit output, else fp32) and an fp32
base-2 logsumexp per head, and the reduce kernel merges them, applies the
attention sink and writes out/lse.

Softmax runs in base 2 (scores pre-multiplied by log2(e)); a query or chunk
with no valid key has m = -inf and l = 0, which every step tolerates. Invalid
rows are never loaded (masked), so NaN there cannot reach the result.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr):
    """acc + a @ b, accumulated in place (one live accumulator)."""
    if IEEE:
        return tl.dot(a, b, acc=acc, input_precision="ieee")
    return tl.dot(a, b, acc=acc)


@triton.jit
def _row_offsets(rows, D: tl.constexpr, WIDE: tl.constexpr):
    """[N, 1] element offsets of cache rows: int64 only when a cache holds
    2^31 elements or more (WIDE), since 64-bit addresses per element double
    the address registers (and spill on CDNA)."""
    if WIDE:
        offsets = rows.to(tl.int64)[:, None] * D
    else:
        offsets = rows[:, None] * D
    return offsets


@triton.jit
def _tile_bounds(tile, main_tiles, start, stop, length, rows, idx_row, cache_ptr, xstart, xstop, xlength, xrows,
                 xidx_row, xcache_ptr, BLOCK_N: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """Key tile ``tile`` of the walk over both lists, as scalars: its first position, the end and
    the valid length of its list, the cache rows, and the list and cache pointers (also called by
    the Gluon kernel, which lays the positions out itself)."""
    if HAS_EXTRA:
        in_main = tile < main_tiles
        first = tl.where(in_main, start + tile * BLOCK_N, xstart + (tile - main_tiles) * BLOCK_N)
        end = tl.where(in_main, stop, xstop)
        limit = tl.where(in_main, length, xlength)
        nrows = tl.where(in_main, rows, xrows)
        ids = tl.where(in_main, idx_row, xidx_row)
        src = tl.where(in_main, cache_ptr, xcache_ptr)
    else:
        first = start + tile * BLOCK_N
        end = stop
        limit = length
        nrows = rows
        ids = idx_row
        src = cache_ptr
    return first, end, limit, nrows, ids, src


@triton.jit
def _tile_span(tile, main_tiles, start, stop, length, rows, idx_row, cache_ptr, xstart, xstop, xlength, xrows,
               xidx_row, xcache_ptr, BLOCK_N: tl.constexpr, HAS_EXTRA: tl.constexpr):
    """_tile_bounds with the tile's positions j [BLOCK_N] in place of its first one."""
    first, end, limit, nrows, ids, src = _tile_bounds(tile, main_tiles, start, stop, length, rows, idx_row,
                                                      cache_ptr, xstart, xstop, xlength, xrows, xidx_row,
                                                      xcache_ptr, BLOCK_N, HAS_EXTRA)
    return first + tl.arange(0, BLOCK_N), end, limit, nrows, ids, src


@triton.jit
def _attend(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, q_tail, cache_ptr, idx_row, length, rows, start, stop,
            xcache_ptr, xidx_row, xlength, xrows, xstart, xstop, qk_scale, lo_col, hi_col, D: tl.constexpr,
            D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_N: tl.constexpr, HAS_EXTRA: tl.constexpr,
            IEEE: tl.constexpr, WIDE: tl.constexpr, IDS_AHEAD: tl.constexpr, DV_SPLIT: tl.constexpr):
    """Online softmax over the indexed keys idx_row[start:stop] and then (V4)
    the extra keys xidx_row[xstart:xstop]; returns (acc_lo, acc_hi, m, l).
    The two halves of D_MAIN start at lo_col and hi_col; both enter the
    scores, and V is the lo half alone when DV_SPLIT = 2 (acc_hi untouched).
    Only the first ``length`` / ``xlength`` of each list count and -1 /
    out-of-range ids are skipped. One loop walks both lists in tiles of
    BLOCK_N that never straddle them, so a tile's base pointer, list and
    bounds are scalars: every load has one base, and the pipeliner turns it
    into asynchronous copies that feed the dots directly."""
    HALF: tl.constexpr = D_MAIN // 2
    cols = tl.arange(0, HALF)
    main_tiles = tl.cdiv(tl.maximum(stop - start, 0), BLOCK_N)
    tiles = main_tiles
    if HAS_EXTRA:
        tiles += tl.cdiv(tl.maximum(xstop - xstart, 0), BLOCK_N)
    if IDS_AHEAD:
        j, end, _, _, ids, _ = _tile_span(0, main_tiles, start, stop, length, rows, idx_row, cache_ptr, xstart, xstop,
                                          xlength, xrows, xidx_row, xcache_ptr, BLOCK_N, HAS_EXTRA)
        idx_next = tl.load(ids + j, mask=j < end, other=-1)
    for tile in range(0, tiles):
        j, end, limit, nrows, ids, src = _tile_span(tile, main_tiles, start, stop, length, rows, idx_row, cache_ptr,
                                                    xstart, xstop, xlength, xrows, xidx_row, xcache_ptr, BLOCK_N,
                                                    HAS_EXTRA)
        live = j < end
        if IDS_AHEAD:
            # The next tile's ids are read one step ahead, so each step's gather is not held up by
            # a dependent read of its own ids first.
            idx = idx_next
            j_next, end_next, _, _, ids_next, _ = _tile_span(tile + 1, main_tiles, start, stop, length, rows, idx_row,
                                                             cache_ptr, xstart, xstop, xlength, xrows, xidx_row,
                                                             xcache_ptr, BLOCK_N, HAS_EXTRA)
            # (Past the last tile the span is empty: j_next >= end_next.)
            idx_next = tl.load(ids_next + j_next, mask=j_next < end_next, other=-1)
        else:
            idx = tl.load(ids + j, mask=live, other=-1)
        valid = live & (j < limit) & (idx >= 0) & (idx < nrows)
        row_ptr = src + _row_offsets(tl.where(valid, idx, 0), D, WIDE)
        k_lo = tl.load(row_ptr + lo_col + cols[None, :], mask=valid[:, None], other=0.0)
        k_hi = tl.load(row_ptr + hi_col + cols[None, :], mask=valid[:, None], other=0.0)
        s = tl.zeros([q_lo.shape[0], BLOCK_N], dtype=tl.float32)
        if D_TAIL > 0:
            k_tail = tl.load(row_ptr + D_MAIN + tl.arange(0, D_TAIL)[None, :], mask=valid[:, None], other=0.0)
            s = _dot(q_tail, tl.trans(k_tail), s, IEEE)
        s = _dot(q_lo, tl.trans(k_lo), s, IEEE)
        s = _dot(q_hi, tl.trans(k_hi), s, IEEE)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        p, alpha, m_new = _softmax_step(s, m_i)
        l_i = l_i * alpha + tl.sum(p, 1)
        pb = p.to(k_lo.dtype)
        acc_lo = _dot(pb, k_lo, acc_lo * alpha[:, None], IEEE)
        if DV_SPLIT == 1:
            acc_hi = _dot(pb, k_hi, acc_hi * alpha[:, None], IEEE)
        m_i = m_new
    return acc_lo, acc_hi, m_i, l_i


@triton.jit
def _softmax_step(s, m_i):
    """One online-softmax step over scores s [heads, keys] (base 2, -inf where a key does not
    count) with the running row maximum m_i: (p = exp2(s - new max), the factor alpha that
    rescales what was accumulated so far, the new maximum). A row with no key so far keeps
    p = 0 and alpha = 1. (The Gluon kernel calls this too.)"""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    return tl.exp2(s - m_safe[:, None]), alpha, m_new


@triton.jit
def _normaliser(l_i, m_i):
    """From the softmax sum l_i and base-2 maximum m_i per head: (whether it saw a key, its
    base-2 lse, -inf without a key; 1 / l, 1 without a key)."""
    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    return has_key, tl.where(has_key, m_i + tl.log2(l_safe), float("-inf")), 1.0 / l_safe


@triton.jit
def _sink_factor(lse2, sink_ptr, heads, head_ok):
    """exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)) per head,
    from the base-2 lse; 0 for a head with no key (lse2 = -inf: its output is 0 anyway)."""
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
    return 1.0 / (1.0 + tl.exp2(sink * _LOG2E - lse2))


@triton.jit(do_not_specialize=["rows", "xrows", "split"])
def sparse_mla_decode_kernel(
    q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr,
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    num_heads, rows, xrows, topk, xtopk, qk_scale, d_v,
    q_stride_t, q_stride_h, idx_stride, xidx_stride, out_stride_t, out_stride_h, lse_stride,
    chunk, split,
    D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_XLEN: tl.constexpr, HAS_SINK: tl.constexpr,
    PARTIAL: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr, IDS_AHEAD: tl.constexpr = False,
    DV_SPLIT: tl.constexpr = 1,
):
    """Grid (T * split * cdiv(H, BLOCK_H) * DV_SPLIT,), the d_v half, then
    the head block fastest: the programs that gather the same key rows (one
    token's key chunk, every head block and d_v half) run side by side and
    share them through L2. PARTIAL when split > 1 (partials for the reduce
    instead of the output). qk_scale is softmax_scale * log2(e)."""
    head_blocks = tl.cdiv(num_heads, BLOCK_H)
    pid = tl.program_id(0)
    HALF: tl.constexpr = D_MAIN // 2
    # This program's d_v half starts at lo_col (the whole of d_v from 0 when DV_SPLIT = 1);
    # hi_col is the other half of D_MAIN, which only enters the scores when DV_SPLIT = 2.
    lo_col = (pid % DV_SPLIT) * HALF
    hi_col = HALF - lo_col
    pid = pid // DV_SPLIT
    heads = (pid % head_blocks) * BLOCK_H + tl.arange(0, BLOCK_H)
    part = (pid // head_blocks) % split
    t = pid // (head_blocks * split)
    head_ok = heads < num_heads
    t64 = t.to(tl.int64)

    q_rows = q_ptr + t64 * q_stride_t + heads[:, None].to(tl.int64) * q_stride_h
    q_lo = tl.load(q_rows + lo_col + tl.arange(0, HALF)[None, :], mask=head_ok[:, None], other=0.0)
    q_hi = tl.load(q_rows + hi_col + tl.arange(0, HALF)[None, :], mask=head_ok[:, None], other=0.0)
    if D_TAIL > 0:
        q_tail = tl.load(q_rows + D_MAIN + tl.arange(0, D_TAIL)[None, :], mask=head_ok[:, None], other=0.0)
    else:
        q_tail = q_lo  # unused

    acc_lo = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    acc_hi = tl.zeros([BLOCK_H, HALF], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)

    length = tl.load(len_ptr + t) if HAS_LEN else topk
    xlength = tl.load(xlen_ptr + t) if HAS_XLEN else xtopk
    start = part * chunk
    stop = tl.minimum(start + chunk, topk + xtopk)
    acc_lo, acc_hi, m_i, l_i = _attend(acc_lo, acc_hi, m_i, l_i, q_lo, q_hi, q_tail, cache_ptr,
                                       idx_ptr + t64 * idx_stride, length, rows, start, tl.minimum(stop, topk),
                                       xcache_ptr, xidx_ptr + t64 * xidx_stride, xlength, xrows,
                                       tl.maximum(start, topk) - topk, stop - topk, qk_scale, lo_col, hi_col, D,
                                       D_MAIN, D_TAIL, BLOCK_N, HAS_EXTRA, IEEE, WIDE, IDS_AHEAD, DV_SPLIT)

    # The epilogue's head indices are re-derived from the loop's result (l >= 0,
    # so this adds 0): computed before the loop, the per-head output
    # addresses and masks would stay live through it (and spill there).
    heads = heads + (l_i < 0).to(tl.int32)
    head_ok = heads < num_heads
    # One per-head factor (1 / l, times the sink's share for a final output)
    # and one multiply per element: fewer live values than a divide.
    has_key, lse2, row_scale = _normaliser(l_i, m_i)
    if HAS_SINK and not PARTIAL:
        row_scale = row_scale * _sink_factor(lse2, sink_ptr, heads, head_ok)
    dv_cols = tl.arange(0, HALF)
    lo_mask = head_ok[:, None] & (lo_col + dv_cols < d_v)[None, :]
    hi_mask = head_ok[:, None] & (hi_col + dv_cols < d_v)[None, :]
    # Both d_v halves of a head have the same lse: the first writes it. (The comparison is
    # broadcast over the heads first: a scalar mask term is refused by the interpreter.)
    lse_mask = head_ok & (heads * 0 + lo_col == 0)
    if not PARTIAL:
        out_rows = out_ptr + t64 * out_stride_t + heads[:, None].to(tl.int64) * out_stride_h
        tl.store(out_rows + lo_col + dv_cols[None, :], (acc_lo * row_scale[:, None]).to(out_ptr.dtype.element_ty),
                 mask=lo_mask)
        if DV_SPLIT == 1:
            tl.store(out_rows + hi_col + dv_cols[None, :],
                     (acc_hi * row_scale[:, None]).to(out_ptr.dtype.element_ty), mask=hi_mask)
        tl.store(lse_ptr + t64 * lse_stride + heads, tl.where(has_key, lse2 * _LN2, float("inf")), mask=lse_mask)
    else:
        # Partials: [T, SPLIT, H, d_v] in part_out's dtype (normalised by this chunk's l) and
        # [T, SPLIT, H] fp32 base-2 lse.
        slot = t64 * split + part
        tl.store(part_lse_ptr + slot * num_heads + heads, lse2, mask=lse_mask)
        part_rows = part_out_ptr + (slot * num_heads + heads[:, None].to(tl.int64)) * d_v
        tl.store(part_rows + lo_col + dv_cols[None, :],
                 (acc_lo * row_scale[:, None]).to(part_out_ptr.dtype.element_ty), mask=lo_mask)
        if DV_SPLIT == 1:
            tl.store(part_rows + hi_col + dv_cols[None, :],
                     (acc_hi * row_scale[:, None]).to(part_out_ptr.dtype.element_ty), mask=hi_mask)


@triton.jit(do_not_specialize=["split"])
def sparse_mla_reduce_kernel(part_out_ptr, part_lse_ptr, sink_ptr, out_ptr, lse_ptr, num_heads, d_v,
                             out_stride_t, out_stride_h, lse_stride, split,
                             BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_S: tl.constexpr,
                             HAS_SINK: tl.constexpr):
    """Merge ``split`` (<= BLOCK_S) partials per (token, head block, d_v
    block). Every partial is loaded at once (one memory round trip, not one per
    split: at small batch this kernel's latency is the decode's tail).
    Grid (T, cdiv(H, BLOCK_H), cdiv(d_v, BLOCK_DV))."""
    t64 = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = heads < num_heads
    cols = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    col_ok = cols < d_v
    parts = tl.arange(0, BLOCK_S)
    slots = t64 * split + parts  # [S]
    rows = slots[:, None] * num_heads + heads[None, :]  # [S, H]
    written = (parts < split)[:, None] & head_ok[None, :]
    lse_s = tl.load(part_lse_ptr + rows, mask=written, other=float("-inf"))
    has = lse_s > float("-inf")
    # Masked by what was written, not by ``has``: the two loads then go out
    # together instead of one waiting on the other. A chunk without keys wrote
    # zeros (and gets weight 0 below).
    part = tl.load(part_out_ptr + rows[:, :, None] * d_v + cols[None, None, :],
                   mask=written[:, :, None] & col_ok[None, None, :], other=0.0).to(tl.float32)  # [S, H, DV]
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(has, tl.exp2(lse_s - m_safe[None, :]), 0.0)
    total = tl.sum(w, axis=0)
    acc = tl.sum(w[:, :, None] * part, axis=0)  # [H, DV]
    any_key = total > 0
    lse2 = m_safe + tl.log2(tl.where(any_key, total, 1.0))
    out = acc / tl.where(any_key, total, 1.0)[:, None]
    if HAS_SINK:
        out = out * _sink_factor(lse2, sink_ptr, heads, head_ok)[:, None]
    out_rows = out_ptr + t64 * out_stride_t + heads[:, None].to(tl.int64) * out_stride_h
    tl.store(out_rows + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & col_ok[None, :])
    if tl.program_id(2) == 0:
        tl.store(lse_ptr + t64 * lse_stride + heads, tl.where(any_key, lse2 * _LN2, float("inf")), mask=head_ok)
