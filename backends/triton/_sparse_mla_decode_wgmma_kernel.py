"""Sparse-MLA decode for NVIDIA sm90, written in Gluon: one program computes
each score once for 64 heads.

Why a second kernel. With ``tl.dot`` a chained dot (S = Q K^T feeding
O += P V) gets all its warps along M, so the 64 heads of a program cannot be
shared by two warpgroups without both computing the same scores; the
``tl`` kernel either does that or splits d_v over two programs that each
compute the whole score tile (DV_SPLIT = 2). Either way every score is
computed twice. Gluon states the layouts itself: here the two warpgroups of
a program split the score tile along the keys (each issues the wgmma for
its half of BLOCK_N), the probabilities go through shared memory, and each
warpgroup then accumulates its half of d_v from all BLOCK_N keys. No score
is computed twice and the fp32 [64, 512] accumulator is 128 registers a
thread on eight warps.

Data movement. Q (64 x D bf16) is copied to shared memory once. Key rows are
gathered by ``cp.async`` (16-byte vectors, one row per selected id) into a
ring of STAGES shared-memory tiles, STAGES - 1 tiles ahead of the one being
computed; rows that do not count (-1, out of range, past a length) are
zero-filled by the copy and their scores masked to -inf, so nothing from an
unselected row reaches the result. Both dots read their operands from
shared memory (wgmma): scores from Q and the key tile (viewed transposed),
the output from P and the first D_MAIN columns of the same key tile.

Everything else - the walk over the indexed keys and then the extra keys
in tiles that never straddle the two lists, the split into key chunks with
partial outputs for the reduce kernel, the sink, the lse - is the ``tl``
kernel's (``_sparse_mla_decode_kernel``), and the reduce is shared.

Gluon names differ between Triton releases: 3.6 has ``thread_barrier`` and
``async_copy_global_to_shared``, 3.9 ``barrier`` and ``async_load``; the
aliases below take whichever exists.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    warpgroup_mma,
)

from rocmoe.backends.triton._sparse_mla_decode_kernel import _normaliser, _softmax_step, _tile_bounds

_barrier = getattr(gl, "barrier", None) or gl.thread_barrier
_async_gather = getattr(async_copy, "async_load", None) or async_copy.async_copy_global_to_shared

_LN2 = gl.constexpr(0.6931471805599453)
_LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _tile_span(tile, main_tiles, start, stop, length, rows, idx_row, cache_ptr, xstart, xstop, xlength, xrows,
               xidx_row, xcache_ptr, BLOCK_N: gl.constexpr, HAS_EXTRA: gl.constexpr, LAYOUT: gl.constexpr):
    """The ``tl`` kernel's _tile_bounds with the tile's positions j [BLOCK_N] (in LAYOUT) in place
    of its first one."""
    first, end, limit, nrows, ids, src = _tile_bounds(tile, main_tiles, start, stop, length, rows, idx_row,
                                                      cache_ptr, xstart, xstop, xlength, xrows, xidx_row,
                                                      xcache_ptr, BLOCK_N, HAS_EXTRA)
    return first + gl.arange(0, BLOCK_N, layout=LAYOUT), end, limit, nrows, ids, src


@gluon.jit
def _tile_rows(tile, main_tiles, start, stop, length, rows, idx_row, cache_ptr, xstart, xstop, xlength, xrows,
               xidx_row, xcache_ptr, BLOCK_N: gl.constexpr, HAS_EXTRA: gl.constexpr, LAYOUT: gl.constexpr):
    """(whether each of the tile's BLOCK_N keys counts, its cache pointer's base, its row) in LAYOUT;
    a key that does not count points at row 0 (never read: its copy is masked)."""
    j, end, limit, nrows, ids, src = _tile_span(tile, main_tiles, start, stop, length, rows, idx_row, cache_ptr,
                                                xstart, xstop, xlength, xrows, xidx_row, xcache_ptr, BLOCK_N,
                                                HAS_EXTRA, LAYOUT)
    idx = gl.load(ids + j, mask=j < end, other=-1)
    valid = (j < end) & (j < limit) & (idx >= 0) & (idx < nrows)
    return valid, src, gl.where(valid, idx, 0)


@gluon.jit
def _row_pointers(src, idx, D: gl.constexpr, WIDE: gl.constexpr):
    """[rows, 1] pointers to the start of each cache row idx (int64 offsets where the cache passes 2^31
    elements)."""
    if WIDE:
        return src + idx.to(gl.int64)[:, None] * D
    return src + (idx * D)[:, None]


@gluon.jit
def _gather_tile(valid, src, idx, slot, k_main_smem, k_tail_smem, D: gl.constexpr, D_MAIN: gl.constexpr,
                 D_TAIL: gl.constexpr, WIDE: gl.constexpr, COPY: gl.constexpr):
    """Start the asynchronous copy of a key tile's rows (_tile_rows, in COPY's row slice) into
    ring slot ``slot``; rows that do not count (all of them past the last tile) are zero-filled."""
    row_ptr = _row_pointers(src, idx, D, WIDE)
    _async_gather(k_main_smem.index(slot), row_ptr + gl.arange(0, D_MAIN, layout=gl.SliceLayout(0, COPY))[None, :],
                  mask=valid[:, None])
    if D_TAIL > 0:
        _async_gather(k_tail_smem.index(slot),
                      row_ptr + D_MAIN + gl.arange(0, D_TAIL, layout=gl.SliceLayout(0, COPY))[None, :],
                      mask=valid[:, None])


@gluon.jit
def _program_coords(num_heads, split, BLOCK_H: gl.constexpr):
    """(head block, key chunk, token) of this program; the grid runs head blocks fastest, then
    chunks, then tokens."""
    head_blocks = gl.cdiv(num_heads, BLOCK_H)
    pid = gl.program_id(0)
    return pid % head_blocks, (pid // head_blocks) % split, pid // (head_blocks * split)


@gluon.jit
def _gather_q(q_main_smem, q_tail_smem, q_ptr, t64, head_block, num_heads, q_stride_t, q_stride_h,
              BLOCK_H: gl.constexpr, D_MAIN: gl.constexpr, D_TAIL: gl.constexpr, COPY: gl.constexpr):
    """Start the asynchronous copy of query t64's head block [BLOCK_H, D_MAIN (+ D_TAIL)] into
    shared memory; heads past num_heads are zero-filled."""
    q_heads = head_block * BLOCK_H + gl.arange(0, BLOCK_H, layout=gl.SliceLayout(1, COPY))
    q_rows = q_ptr + t64 * q_stride_t + q_heads[:, None].to(gl.int64) * q_stride_h
    q_ok = (q_heads < num_heads)[:, None]
    _async_gather(q_main_smem, q_rows + gl.arange(0, D_MAIN, layout=gl.SliceLayout(0, COPY))[None, :], mask=q_ok)
    if D_TAIL > 0:
        _async_gather(q_tail_smem, q_rows + D_MAIN + gl.arange(0, D_TAIL, layout=gl.SliceLayout(0, COPY))[None, :],
                      mask=q_ok)


@gluon.jit
def _walk(t, part, topk, xtopk, chunk, len_ptr, xlen_ptr, idx_ptr, xidx_ptr, idx_stride, xidx_stride,
          BLOCK_N: gl.constexpr, HAS_LEN: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_XLEN: gl.constexpr):
    """Query t's key chunk ``part``: (start, main_stop, length, idx_row, xstart, xstop, xlength,
    xidx_row, main_tiles, tiles), the scalars _tile_rows walks its BLOCK_N-key tiles with
    (the indexed keys, then V4's extra keys, in tiles that never straddle the two lists)."""
    t64 = t.to(gl.int64)
    length = gl.load(len_ptr + t) if HAS_LEN else topk
    xlength = gl.load(xlen_ptr + t) if HAS_XLEN else xtopk
    start = part * chunk
    stop = gl.minimum(start + chunk, topk + xtopk)
    idx_row = idx_ptr + t64 * idx_stride
    xidx_row = xidx_ptr + t64 * xidx_stride
    main_stop = gl.minimum(stop, topk)
    xstart = gl.maximum(start, topk) - topk
    xstop = stop - topk
    main_tiles = gl.cdiv(gl.maximum(main_stop - start, 0), BLOCK_N)
    tiles = main_tiles
    if HAS_EXTRA:
        tiles += gl.cdiv(gl.maximum(xstop - xstart, 0), BLOCK_N)
    return start, main_stop, length, idx_row, xstart, xstop, xlength, xidx_row, main_tiles, tiles


@gluon.jit
def _write_result(acc, l_i, m_i, heads, col0, t64, part, num_heads, d_v, split, sink_ptr, out_ptr, lse_ptr,
                  part_out_ptr, part_lse_ptr, out_stride_t, out_stride_h, lse_stride, HAS_SINK: gl.constexpr,
                  PARTIAL: gl.constexpr, WRITE_LSE: gl.constexpr):
    """Normalise acc [heads, columns col0 onwards] (fp32, at base-2 maximum m_i with softmax sum l_i
    per head) and store it: the output (and, if WRITE_LSE, the natural-log lse, +inf without a key; the sink
    applied), or for a split launch this chunk's partials [T, SPLIT, H, d_v] in part_out's dtype
    and fp32 base-2 lse [T, SPLIT, H]."""
    head_ok = heads < num_heads
    has_key, lse2, row_scale = _normaliser(l_i, m_i)
    if HAS_SINK and not PARTIAL:
        sink = gl.load(sink_ptr + heads, mask=head_ok, other=0.0)
        row_scale = row_scale / (1.0 + gl.exp2(sink * _LOG2E - lse2))
    cols = col0 + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    mask = head_ok[:, None] & (cols < d_v)[None, :]
    result = acc * row_scale[:, None]
    if not PARTIAL:
        out_rows = out_ptr + t64 * out_stride_t + heads[:, None].to(gl.int64) * out_stride_h
        gl.store(out_rows + cols[None, :], result.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_LSE:
            gl.store(lse_ptr + t64 * lse_stride + heads, gl.where(has_key, lse2 * _LN2, float("inf")), mask=head_ok)
    else:
        slot = t64 * split + part
        if WRITE_LSE:
            gl.store(part_lse_ptr + slot * num_heads + heads, lse2, mask=head_ok)
        part_rows = part_out_ptr + (slot * num_heads + heads[:, None].to(gl.int64)) * d_v
        gl.store(part_rows + cols[None, :], result.to(part_out_ptr.dtype.element_ty), mask=mask)


@gluon.jit(do_not_specialize=["rows", "xrows", "split"])
def sparse_mla_decode_wgmma_kernel(
    q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr,
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    num_heads, rows, xrows, topk, xtopk, qk_scale, d_v,
    q_stride_t, q_stride_h, idx_stride, xidx_stride, out_stride_t, out_stride_h, lse_stride,
    chunk, split,
    D: gl.constexpr, D_MAIN: gl.constexpr, D_TAIL: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
    HAS_LEN: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_XLEN: gl.constexpr, HAS_SINK: gl.constexpr,
    PARTIAL: gl.constexpr, WIDE: gl.constexpr, STAGES: gl.constexpr, P_SWIZZLE: gl.constexpr,
):
    """The ``tl`` kernel's arguments and grid (T * split * cdiv(H, BLOCK_H),
    head block fastest), for BLOCK_H = 64 on eight warps and bf16 inputs.
    P_SWIZZLE: the shared-memory swizzle of the [64, BLOCK_N] bf16 P tile
    (BLOCK_N * 2 bytes, at most 128)."""
    WARPS: gl.constexpr = gl.num_warps()
    # Scores [BLOCK_H, BLOCK_N]: warpgroup g holds keys g * BLOCK_N / 2 onwards, so each
    # issues the score wgmma for its own half of the tile.
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WARPS // 4],
                                                       instr_shape=[16, BLOCK_N * 4 // WARPS, 16])
    # Output [BLOCK_H, D_MAIN]: warpgroup g holds columns g * D_MAIN / 2 onwards.
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, WARPS // 4],
                                                       instr_shape=[16, D_MAIN * 4 // WARPS, 16])
    # Gathers: 16-byte vectors, eight lanes along a 128-byte run of a row.
    COPY: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [WARPS, 1], [1, 0])
    TILE_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    P_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=P_SWIZZLE, element_bitwidth=16, rank=2)
    ROWS_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROWS_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)

    head_block, part, t = _program_coords(num_heads, split, BLOCK_H)
    t64 = t.to(gl.int64)

    q_main_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_MAIN], TILE_SMEM)
    k_main_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_MAIN], TILE_SMEM)
    if D_TAIL > 0:
        q_tail_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, D_TAIL], TILE_SMEM)
        k_tail_smem = gl.allocate_shared_memory(gl.bfloat16, [STAGES, BLOCK_N, D_TAIL], TILE_SMEM)
    else:
        q_tail_smem = q_main_smem  # unused
        k_tail_smem = k_main_smem  # unused
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [BLOCK_H, BLOCK_N], P_SMEM)

    # Q joins the first copy group.
    _gather_q(q_main_smem, q_tail_smem, q_ptr, t64, head_block, num_heads, q_stride_t, q_stride_h, BLOCK_H, D_MAIN,
              D_TAIL, COPY)

    start, main_stop, length, idx_row, xstart, xstop, xlength, xidx_row, main_tiles, tiles = _walk(
        t, part, topk, xtopk, chunk, len_ptr, xlen_ptr, idx_ptr, xidx_ptr, idx_stride, xidx_stride, BLOCK_N,
        HAS_LEN, HAS_EXTRA, HAS_XLEN)

    for ahead in gl.static_range(STAGES - 1):
        first_valid, first_src, first_idx = _tile_rows(ahead, main_tiles, start, main_stop, length, rows, idx_row,
                                                       cache_ptr, xstart, xstop, xlength, xrows, xidx_row,
                                                       xcache_ptr, BLOCK_N, HAS_EXTRA, gl.SliceLayout(1, COPY))
        _gather_tile(first_valid, first_src, first_idx, ahead, k_main_smem, k_tail_smem, D, D_MAIN, D_TAIL, WIDE, COPY)
        async_copy.commit_group()
    # The ids of the tile gathered next are read one step before its gather is issued, so the
    # issue does not wait on them.
    next_valid, next_src, next_idx = _tile_rows(STAGES - 1, main_tiles, start, main_stop, length, rows, idx_row,
                                                cache_ptr, xstart, xstop, xlength, xrows, xidx_row, xcache_ptr,
                                                BLOCK_N, HAS_EXTRA, gl.SliceLayout(1, COPY))

    acc = gl.zeros([BLOCK_H, D_MAIN], gl.float32, O_LAYOUT)
    m_i = gl.full([BLOCK_H], float("-inf"), gl.float32, ROWS_S)
    l_i = gl.zeros([BLOCK_H], gl.float32, ROWS_S)
    for tile in range(0, tiles):
        slot = tile % STAGES
        # This thread's copies of the tile have landed; the fence hands them to the async proxy
        # (wgmma) and the barrier waits for every thread's. The barrier also sees both warpgroups
        # done with P and with the slot refilled next (their dots are synchronous).
        async_copy.wait_group(STAGES - 2)
        fence_async_shared()
        _barrier()
        _gather_tile(next_valid, next_src, next_idx, (tile + STAGES - 1) % STAGES, k_main_smem, k_tail_smem, D,
                     D_MAIN, D_TAIL, WIDE, COPY)
        async_copy.commit_group()
        next_valid, next_src, next_idx = _tile_rows(tile + STAGES, main_tiles, start, main_stop, length, rows,
                                                    idx_row, cache_ptr, xstart, xstop, xlength, xrows, xidx_row,
                                                    xcache_ptr, BLOCK_N, HAS_EXTRA, gl.SliceLayout(1, COPY))
        # Which keys count, per score column (the ids again, from cache; read before the dot so
        # the read overlaps it).
        valid, _, _ = _tile_rows(tile, main_tiles, start, main_stop, length, rows, idx_row, cache_ptr, xstart,
                                 xstop, xlength, xrows, xidx_row, xcache_ptr, BLOCK_N, HAS_EXTRA,
                                 gl.SliceLayout(0, S_LAYOUT))
        keys = k_main_smem.index(slot)
        s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
        if D_TAIL > 0:
            s = warpgroup_mma(q_tail_smem, k_tail_smem.index(slot).permute((1, 0)), s, use_acc=False)
            s = warpgroup_mma(q_main_smem, keys.permute((1, 0)), s)
        else:
            s = warpgroup_mma(q_main_smem, keys.permute((1, 0)), s, use_acc=False)
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        p, alpha, m_new = _softmax_step(s, m_i)
        l_i = l_i * alpha + gl.sum(p, 1)
        m_i = m_new
        p_smem.store(p.to(gl.bfloat16))
        fence_async_shared()
        _barrier()
        acc = warpgroup_mma(p_smem, keys, acc * gl.convert_layout(alpha, ROWS_O)[:, None])
    async_copy.wait_group(0)

    l_o = gl.convert_layout(l_i, ROWS_O)
    m_o = gl.convert_layout(m_i, ROWS_O)
    heads = head_block * BLOCK_H + gl.arange(0, BLOCK_H, layout=ROWS_O)
    _write_result(acc, l_o, m_o, heads, 0, t64, part, num_heads, d_v, split, sink_ptr, out_ptr, lse_ptr,
                  part_out_ptr, part_lse_ptr, out_stride_t, out_stride_h, lse_stride, HAS_SINK, PARTIAL, True)
