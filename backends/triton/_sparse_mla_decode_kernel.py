"""Kernels of sparse-MLA decode: split-key flash decoding over gathered latent rows.

One latent KV head serves every query head, so a program takes one query
token and a block of BLOCK_H heads, gathers BLOCK_N selected cache rows at a
time (each row read once per program, for all its heads) and runs
``S = Q K^T`` and ``O += P V`` with ``tl.dot``. D = 576 is not a power of
two: the score dot is split into the first D_MAIN = 512 columns and a D_TAIL =
64 tail; V is the first d_v <= D_MAIN columns of the same loaded rows.

The key list (the indexed keys, then the extra keys of DeepSeek-V4) is cut into
SPLIT chunks along a third grid axis when T * H / BLOCK_H programs cannot fill
the device. With SPLIT = 1 a program writes the final output; otherwise it
writes an fp32 partial output and a base-2 logsumexp per head, and the reduce
kernel merges them, applies the attention sink and writes out/lse.

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
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


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
def _attend(acc, m_i, l_i, q_main, q_tail, cache_ptr, idx_row, length, rows, xcache_ptr, xidx_row, xlength, xrows,
            topk, start, stop, qk_scale, D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
            BLOCK_N: tl.constexpr, HAS_EXTRA: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr):
    """Online softmax over keys[start:stop] of the combined key list (the
    indexed keys, then the extra keys: one loop, so one set of live
    registers); returns (acc, m, l)."""
    cols = tl.arange(0, D_MAIN)
    for base in range(start, stop, BLOCK_N):
        j = base + tl.arange(0, BLOCK_N)
        in_chunk = j < stop
        is_main = j < topk
        idx = tl.load(idx_row + j, mask=in_chunk & is_main, other=-1)
        valid = in_chunk & is_main & (j < length) & (idx >= 0) & (idx < rows)
        row_ptr = cache_ptr + _row_offsets(tl.where(valid, idx, 0), D, WIDE)
        k_main = tl.load(row_ptr + cols[None, :], mask=valid[:, None], other=0.0)
        if D_TAIL > 0:
            k_tail = tl.load(row_ptr + D_MAIN + tl.arange(0, D_TAIL)[None, :], mask=valid[:, None], other=0.0)
        if HAS_EXTRA:
            # A second masked load (each from one uniform base) rather than a
            # per-row choice of base pointer, which spills on CDNA.
            jx = j - topk
            xidx = tl.load(xidx_row + jx, mask=in_chunk & ~is_main, other=-1)
            xvalid = in_chunk & ~is_main & (jx < xlength) & (xidx >= 0) & (xidx < xrows)
            xrow_ptr = xcache_ptr + _row_offsets(tl.where(xvalid, xidx, 0), D, WIDE)
            k_main = tl.where(xvalid[:, None], tl.load(xrow_ptr + cols[None, :], mask=xvalid[:, None], other=0.0),
                              k_main)
            if D_TAIL > 0:
                k_tail = tl.where(xvalid[:, None], tl.load(xrow_ptr + D_MAIN + tl.arange(0, D_TAIL)[None, :],
                                                           mask=xvalid[:, None], other=0.0), k_tail)
            valid = valid | xvalid
        s = _dot(q_main, tl.trans(k_main), IEEE)
        if D_TAIL > 0:
            s += _dot(q_tail, tl.trans(k_tail), IEEE)
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(k_main.dtype), k_main, IEEE)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sink_factor(lse2, sink_ptr, heads, head_ok):
    """exp(lse) / (exp(lse) + exp(sink)) = 1 / (1 + exp(sink - lse)) per head,
    from the base-2 lse; 0 for a head with no key (lse2 = -inf: its output is 0 anyway)."""
    sink = tl.load(sink_ptr + heads, mask=head_ok, other=0.0)
    return 1.0 / (1.0 + tl.exp2(sink * _LOG2E - lse2))


@triton.jit(do_not_specialize=["rows", "xrows"])
def sparse_mla_decode_kernel(
    q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr,
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    num_heads, rows, xrows, topk, xtopk, qk_scale, d_v,
    q_stride_t, q_stride_h, idx_stride, xidx_stride, out_stride_t, out_stride_h, lse_stride,
    chunk,
    D: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_XLEN: tl.constexpr, HAS_SINK: tl.constexpr,
    PARTIAL: tl.constexpr, IEEE: tl.constexpr, WIDE: tl.constexpr,
):
    """Grid (T, cdiv(H, BLOCK_H), SPLIT); PARTIAL when SPLIT > 1 (partials for
    the reduce instead of the output). qk_scale is softmax_scale * log2(e)."""
    t = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    part = tl.program_id(2)
    head_ok = heads < num_heads
    t64 = t.to(tl.int64)

    q_rows = q_ptr + t64 * q_stride_t + heads[:, None].to(tl.int64) * q_stride_h
    q_main = tl.load(q_rows + tl.arange(0, D_MAIN)[None, :], mask=head_ok[:, None], other=0.0)
    if D_TAIL > 0:
        q_tail = tl.load(q_rows + D_MAIN + tl.arange(0, D_TAIL)[None, :], mask=head_ok[:, None], other=0.0)
    else:
        q_tail = q_main  # unused

    acc = tl.zeros([BLOCK_H, D_MAIN], dtype=tl.float32)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)

    length = tl.load(len_ptr + t) if HAS_LEN else topk
    xlength = tl.load(xlen_ptr + t) if HAS_XLEN else xtopk
    start = part * chunk
    acc, m_i, l_i = _attend(acc, m_i, l_i, q_main, q_tail, cache_ptr, idx_ptr + t64 * idx_stride, length, rows,
                            xcache_ptr, xidx_ptr + t64 * xidx_stride, xlength, xrows, topk, start,
                            tl.minimum(start + chunk, topk + xtopk), qk_scale, D, D_MAIN, D_TAIL, BLOCK_N,
                            HAS_EXTRA, IEEE, WIDE)

    has_key = l_i > 0
    l_safe = tl.where(has_key, l_i, 1.0)
    lse2 = tl.where(has_key, m_i + tl.log2(l_safe), float("-inf"))
    out = acc / l_safe[:, None]
    dv_cols = tl.arange(0, D_MAIN)
    dv_mask = head_ok[:, None] & (dv_cols < d_v)[None, :]
    if not PARTIAL:
        if HAS_SINK:
            out = out * _sink_factor(lse2, sink_ptr, heads, head_ok)[:, None]
        out_rows = out_ptr + t64 * out_stride_t + heads[:, None].to(tl.int64) * out_stride_h
        tl.store(out_rows + dv_cols[None, :], out.to(out_ptr.dtype.element_ty), mask=dv_mask)
        tl.store(lse_ptr + t64 * lse_stride + heads, tl.where(has_key, lse2 * _LN2, float("inf")), mask=head_ok)
    else:
        # Partials: [T, SPLIT, H, d_v] fp32 (normalised by this chunk's l) and [T, SPLIT, H] base-2 lse.
        slot = t64 * tl.num_programs(2) + part
        tl.store(part_lse_ptr + slot * num_heads + heads, lse2, mask=head_ok)
        part_rows = part_out_ptr + (slot * num_heads + heads[:, None].to(tl.int64)) * d_v
        tl.store(part_rows + dv_cols[None, :], out, mask=dv_mask)


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
    lse_s = tl.load(part_lse_ptr + rows, mask=(parts < split)[:, None] & head_ok[None, :], other=float("-inf"))
    has = lse_s > float("-inf")
    part = tl.load(part_out_ptr + rows[:, :, None] * d_v + cols[None, None, :],
                   mask=has[:, :, None] & col_ok[None, None, :], other=0.0)  # [S, H, DV]
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
