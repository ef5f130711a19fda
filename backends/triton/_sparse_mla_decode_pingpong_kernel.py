"""Sparse-MLA decode for NVIDIA sm90 with warp-specialised partitions (Gluon): the
``PINGPONG`` variant of the wgmma kernel (``_sparse_mla_decode_wgmma_kernel``), chosen by
a config's ``PINGPONG`` flag.

Why. The wgmma kernel splits each 64-key tile's scores between its two
warpgroups, so every step crosses them twice (row max, P), and the gather is
issued by the same warps that wait on it. Here:

- a producer partition (4 warps) only gathers: Q once, then key tiles into
  two buffers, half a tile (256 columns, the second with the rope tail) at a
  time, each half signalled on its own mbarrier by ``cp.async`` arrives and
  refilled as soon as the warpgroup that reads it last releases it (half g of
  buffer g is free once warpgroup g's own P V is done, mid-pair);
- two compute warpgroups take alternate 64-key tiles (warpgroup g owns the
  tiles of parity g, buffer g), so each score dot is ``m64n64k16`` over a whole
  tile and the row max of a tile never crosses warpgroups. Per pair of tiles,
  warpgroup 0 hands its new running max to warpgroup 1, which hands back the
  pair's max; each then rescales what it holds to that max;
- each warpgroup accumulates its half of d_v (256 columns) from both tiles of
  a pair: its own P from registers, the other warpgroup's P from shared
  memory.

Same arguments and grid as the wgmma kernel (64 heads, bf16, D = 576
or 512); launched with num_warps = 4 (the default partition is warpgroup 0)
plus two 4-warp workers, maxnreg = MAXNREG.

Synchronisation. An mbarrier arrive from a compute partition follows all its
threads' shared stores (Triton emits a partition barrier, then one elected
arrive); a consumer fences the async proxy after each wait, so its wgmma sees
the producer's ``cp.async`` rows; a chunk with an odd number of tiles ends
with a tile of no keys (all masked), so both warpgroups run every pair. No
barrier can complete two phases before its waiter has seen the first (a
parity wait would then miss one): every arrive of pair i + 1 depends on the
waiter having passed its wait of pair i. The producer refills a half only
once it is released, which follows the reader's wait on that half; a
warpgroup writes its next max or P only after the other has handed over
its own P of this pair, which follows its wait on the max and P received.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, warpgroup_mma

from rocmoe.backends.triton._sparse_mla_decode_wgmma_kernel import (
    _async_gather,
    _gather_q,
    _program_coords,
    _row_pointers,
    _tile_rows,
    _walk,
    _write_result,
)

# Registers per thread of each partition (multiples of 8; the three sum to 504 = 65536 / 128 with
# the kernel's maxnreg = 168 over 12 warps).
PRODUCER_REGS = gl.constexpr(40)
CONSUMER_REGS = gl.constexpr(232)
MAXNREG = 168


@gluon.jit
def _this_program(num_heads, topk, xtopk, chunk, split, len_ptr, xlen_ptr, idx_ptr, xidx_ptr, idx_stride, xidx_stride,
                  BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr, HAS_LEN: gl.constexpr, HAS_EXTRA: gl.constexpr,
                  HAS_XLEN: gl.constexpr):
    """(head block, token, part, _walk tuple) of this program (_program_coords); every
    partition works it out for itself."""
    head_block, part, t = _program_coords(num_heads, split, BLOCK_H)
    walk = _walk(t, part, topk, xtopk, chunk, len_ptr, xlen_ptr, idx_ptr, xidx_ptr, idx_stride, xidx_stride, BLOCK_N,
                 HAS_LEN, HAS_EXTRA, HAS_XLEN)
    return head_block, t, part, walk


@gluon.jit
def _rows(tile, walk, rows, xrows, cache_ptr, xcache_ptr, BLOCK_N: gl.constexpr, HAS_EXTRA: gl.constexpr,
          LAYOUT: gl.constexpr):
    """The shipped kernel's _tile_rows for a _walk tuple (a tile past the last one counts no key)."""
    start, main_stop, length, idx_row, xstart, xstop, xlength, xidx_row, main_tiles, _ = walk
    return _tile_rows(tile, main_tiles, start, main_stop, length, rows, idx_row, cache_ptr, xstart, xstop, xlength,
                      xrows, xidx_row, xcache_ptr, BLOCK_N, HAS_EXTRA, LAYOUT)


@gluon.jit
def _producer(q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, num_heads, rows, xrows, topk,
              xtopk, q_stride_t, q_stride_h, idx_stride, xidx_stride, chunk, split, smem, bars,
              D: gl.constexpr, D_MAIN: gl.constexpr, D_TAIL: gl.constexpr, BLOCK_H: gl.constexpr,
              BLOCK_N: gl.constexpr, HAS_LEN: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_XLEN: gl.constexpr,
              WIDE: gl.constexpr):
    """Gathers Q, then tile 2i + g into buffer g for every pair i, half a tile at a time, each
    half refilled once the compute warpgroups have released it. Masked rows are zero-filled."""
    q_main, q_tail, k_main, k_tail = smem[0], smem[1], smem[2], smem[3]
    q_ready, k_ready, k_free = bars[0], bars[1], bars[2]
    COPY: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [4, 1], [1, 0])
    head_block, t, _, walk = _this_program(num_heads, topk, xtopk, chunk, split, len_ptr, xlen_ptr, idx_ptr, xidx_ptr,
                                           idx_stride, xidx_stride, BLOCK_H, BLOCK_N, HAS_LEN, HAS_EXTRA, HAS_XLEN)
    tiles = walk[9]

    _gather_q(q_main.index(0), q_tail.index(0), q_ptr, t.to(gl.int64), head_block, num_heads, q_stride_t, q_stride_h,
              BLOCK_H, D_MAIN, D_TAIL, COPY)
    async_copy.mbarrier_arrive(q_ready, increment_count=False)

    HALF: gl.constexpr = D_MAIN // 2
    for pair in range(0, gl.cdiv(tiles, 2)):
        phase = pair & 1
        valid0, src0, idx0 = _rows(2 * pair, walk, rows, xrows, cache_ptr, xcache_ptr, BLOCK_N, HAS_EXTRA,
                                   gl.SliceLayout(1, COPY))
        valid1, src1, idx1 = _rows(2 * pair + 1, walk, rows, xrows, cache_ptr, xcache_ptr, BLOCK_N, HAS_EXTRA,
                                   gl.SliceLayout(1, COPY))
        rows0 = _row_pointers(src0, idx0, D, WIDE)
        rows1 = _row_pointers(src1, idx1, D, WIDE)
        # Half g of buffer g is released first (by warpgroup g, after its own P V), so it is
        # refilled first; the other halves follow once the other warpgroup's P V is done.
        _gather_half(rows0, valid0, 0, 0, k_main, k_tail, k_ready, k_free, phase, HALF, D_TAIL, COPY)
        _gather_half(rows1, valid1, 1, 1, k_main, k_tail, k_ready, k_free, phase, HALF, D_TAIL, COPY)
        _gather_half(rows0, valid0, 0, 1, k_main, k_tail, k_ready, k_free, phase, HALF, D_TAIL, COPY)
        _gather_half(rows1, valid1, 1, 0, k_main, k_tail, k_ready, k_free, phase, HALF, D_TAIL, COPY)


@gluon.jit
def _gather_half(row_ptr, valid, buffer: gl.constexpr, half: gl.constexpr, k_main, k_tail, k_ready, k_free, phase,
                 HALF: gl.constexpr, D_TAIL: gl.constexpr, COPY: gl.constexpr):
    """Once it is free, gather half ``half`` of a key tile into buffer ``buffer``: main columns
    [half * HALF, (half + 1) * HALF), plus the rope tail with the second half; signal it on
    k_ready[buffer * 2 + half] when the copies land."""
    # Buffers start free: the first wait (phase 1) passes at once.
    mbarrier.wait(k_free.index(buffer * 2 + half), phase ^ 1)
    cols = half * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(0, COPY))
    _async_gather(k_main.index(buffer).slice(half * HALF, HALF, dim=1), row_ptr + cols[None, :], mask=valid[:, None])
    if D_TAIL > 0 and half == 1:
        _async_gather(k_tail.index(buffer),
                      row_ptr + 2 * HALF + gl.arange(0, D_TAIL, layout=gl.SliceLayout(0, COPY))[None, :],
                      mask=valid[:, None])
    async_copy.mbarrier_arrive(k_ready.index(buffer * 2 + half), increment_count=False)


@gluon.jit
def _score_half(s, q_main, q_tail, own, k_tail, k_ready, G: gl.constexpr, half: gl.constexpr, zero, phase,
                USE_ACC: gl.constexpr, HALF: gl.constexpr, D_TAIL: gl.constexpr):
    """s (+)= the score dot over half ``half`` of warpgroup G's tile, once that half has landed."""
    mbarrier.wait(k_ready.index(G * 2 + half), phase)
    fence_async_shared()
    s = warpgroup_mma(q_main.index(zero).slice(half * HALF, HALF, dim=1),
                      own.slice(half * HALF, HALF, dim=1).permute((1, 0)), s, use_acc=USE_ACC)
    if D_TAIL > 0 and half == 1:
        s = warpgroup_mma(q_tail.index(zero), k_tail.index(G + zero).permute((1, 0)), s)
    return s


@gluon.jit
def _p_buffer(p_smem, k_tail, owner: gl.constexpr, zero, D_TAIL: gl.constexpr):
    """Where warpgroup ``owner`` hands over its P [64, 64] bf16. At D = 576, warpgroup 0's goes in
    buffer 0's rope columns: only warpgroup 0's score dot reads them, before P is written, and
    they are refilled only after warpgroup 1's P V has read P (the half they belong to is released
    then). That keeps D = 576 within sm90's 227 KiB."""
    if D_TAIL > 0:
        if owner == 0:
            return k_tail.index(0 + zero)
        return p_smem.index(0 + zero)
    return p_smem.index(owner + zero)


@gluon.jit
def _compute(q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr, out_ptr, lse_ptr,
             part_out_ptr, part_lse_ptr, num_heads, rows, xrows, topk, xtopk, qk_scale, d_v, idx_stride, xidx_stride,
             out_stride_t, out_stride_h, lse_stride, chunk, split, smem, bars,
             G: gl.constexpr, D_MAIN: gl.constexpr, D_TAIL: gl.constexpr, BLOCK_H: gl.constexpr,
             BLOCK_N: gl.constexpr, HAS_LEN: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_XLEN: gl.constexpr,
             HAS_SINK: gl.constexpr, PARTIAL: gl.constexpr):
    """Compute warpgroup G: scores and softmax of the tiles of parity G, and columns
    G * D_MAIN / 2 onwards of the output from every tile."""
    q_main, q_tail, k_main, k_tail, p_smem, m_smem, l_smem = smem
    q_ready, k_ready, k_free, m_ready, p_ready, p_free, l_ready = bars
    HALF: gl.constexpr = D_MAIN // 2
    S_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    O_LAYOUT: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HALF, 16])
    P_OPERAND: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=O_LAYOUT, k_width=2)
    ROWS_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
    ROWS_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
    head_block, t, part, walk = _this_program(num_heads, topk, xtopk, chunk, split, len_ptr, xlen_ptr, idx_ptr,
                                              xidx_ptr, idx_stride, xidx_stride, BLOCK_H, BLOCK_N, HAS_LEN, HAS_EXTRA,
                                              HAS_XLEN)
    t64 = t.to(gl.int64)
    tiles = walk[9]

    acc = gl.zeros([BLOCK_H, HALF], gl.float32, O_LAYOUT)
    m_run = gl.full([BLOCK_H], float("-inf"), gl.float32, ROWS_S)  # the running max of both warpgroups
    l_own = gl.zeros([BLOCK_H], gl.float32, ROWS_S)  # the softmax sum over this warpgroup's tiles
    mbarrier.wait(q_ready, 0)
    for pair in range(0, gl.cdiv(tiles, 2)):
        phase = pair & 1
        zero = pair >> 30  # 0, but not known to the compiler (see the Q allocation)
        own = k_main.index(G + zero)
        other = k_main.index(1 - G + zero)
        valid, _, _ = _rows(2 * pair + G, walk, rows, xrows, cache_ptr, xcache_ptr, BLOCK_N, HAS_EXTRA,
                            gl.SliceLayout(0, S_LAYOUT))
        # The score dot over this warpgroup's own half first (it lands first), then the other.
        s = gl.zeros([BLOCK_H, BLOCK_N], gl.float32, S_LAYOUT)
        s = _score_half(s, q_main, q_tail, own, k_tail, k_ready, G, G, zero, phase, False, HALF, D_TAIL)
        s = _score_half(s, q_main, q_tail, own, k_tail, k_ready, G, 1 - G, zero, phase, True, HALF, D_TAIL)
        s = gl.where(valid[None, :], s * qk_scale, float("-inf"))
        tile_max = gl.max(s, 1)
        if G == 0:
            # Warpgroup 0 goes first: its max joins the running one and goes to warpgroup 1.
            m_mine = gl.maximum(m_run, tile_max)
            m_smem.index(0).store(m_mine)
            mbarrier.arrive(m_ready.index(0), count=1)
        else:
            mbarrier.wait(m_ready.index(0), phase)
            m_mine = gl.maximum(m_smem.index(0).load(ROWS_S), tile_max)  # the pair's max
            m_smem.index(1).store(m_mine)
            mbarrier.arrive(m_ready.index(1), count=1)
        m_safe = gl.where(m_mine == float("-inf"), 0.0, m_mine)
        alpha = gl.exp2(m_run - m_safe)
        p = gl.exp2(s - m_safe[:, None])
        l_own = l_own * alpha + gl.sum(p, 1)
        acc = acc * gl.convert_layout(alpha, ROWS_O)[:, None]
        # Own tile: P from registers, this warpgroup's half of d_v.
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), P_OPERAND), own.slice(G * HALF, HALF, dim=1), acc)
        mbarrier.arrive(k_free.index(G * 2 + G), count=1)
        if G == 0:
            # The pair's max, from warpgroup 1: rescale what this warpgroup holds to it.
            mbarrier.wait(m_ready.index(1), phase)
            m_pair = m_smem.index(1).load(ROWS_S)
            m_pair_safe = gl.where(m_pair == float("-inf"), 0.0, m_pair)
            beta = gl.exp2(m_mine - m_pair_safe)
            p = p * beta[:, None]
            l_own = l_own * beta
            acc = acc * gl.convert_layout(beta, ROWS_O)[:, None]
            m_run = m_pair
        else:
            m_run = m_mine
        # Hand P (at the pair's max) to the other warpgroup, once it is done with the last one.
        mbarrier.wait(p_free.index(G), phase ^ 1)
        _p_buffer(p_smem, k_tail, G, zero, D_TAIL).store(p.to(gl.bfloat16))
        fence_async_shared()
        mbarrier.arrive(p_ready.index(G), count=1)
        # The other tile: its P from shared memory, this warpgroup's half of its values.
        mbarrier.wait(p_ready.index(1 - G), phase)
        acc = warpgroup_mma(_p_buffer(p_smem, k_tail, 1 - G, zero, D_TAIL), other.slice(G * HALF, HALF, dim=1), acc)
        mbarrier.arrive(p_free.index(1 - G), count=1)
        mbarrier.arrive(k_free.index((1 - G) * 2 + G), count=1)

    # Both warpgroups' sums make the softmax denominator.
    l_smem.index(G).store(l_own)
    mbarrier.arrive(l_ready.index(G), count=1)
    mbarrier.wait(l_ready.index(1 - G), 0)
    l_i = l_own + l_smem.index(1 - G).load(ROWS_S)

    heads = head_block * BLOCK_H + gl.arange(0, BLOCK_H, layout=ROWS_O)
    _write_result(acc, gl.convert_layout(l_i, ROWS_O), gl.convert_layout(m_run, ROWS_O), heads, G * HALF, t64, part,
                  num_heads, d_v, split, sink_ptr, out_ptr, lse_ptr, part_out_ptr, part_lse_ptr, out_stride_t,
                  out_stride_h, lse_stride, HAS_SINK, PARTIAL, G == 0)


@gluon.jit(do_not_specialize=["rows", "xrows", "split"])
def sparse_mla_decode_pingpong_kernel(
    q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr,
    out_ptr, lse_ptr, part_out_ptr, part_lse_ptr,
    num_heads, rows, xrows, topk, xtopk, qk_scale, d_v,
    q_stride_t, q_stride_h, idx_stride, xidx_stride, out_stride_t, out_stride_h, lse_stride,
    chunk, split,
    D: gl.constexpr, D_MAIN: gl.constexpr, D_TAIL: gl.constexpr, BLOCK_H: gl.constexpr, BLOCK_N: gl.constexpr,
    HAS_LEN: gl.constexpr, HAS_EXTRA: gl.constexpr, HAS_XLEN: gl.constexpr, HAS_SINK: gl.constexpr,
    PARTIAL: gl.constexpr, WIDE: gl.constexpr,
):
    """The shipped Gluon kernel's arguments and grid (T * split * cdiv(H, 64), head block
    fastest) for BLOCK_H = BLOCK_N = 64, bf16; num_warps = 4, maxnreg = MAXNREG."""
    TILE_SMEM: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    # Q has a leading unit dimension so that the compute warpgroups can address it through a
    # loop-variant zero: otherwise Triton 3.6 hoists all 36 wgmma descriptors of the loop-invariant
    # Q out of the loop and keeps them in 72 registers, and the warpgroups spill.
    q_main = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_MAIN], TILE_SMEM)
    k_main = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, D_MAIN], TILE_SMEM)
    if D_TAIL > 0:
        q_tail = gl.allocate_shared_memory(gl.bfloat16, [1, BLOCK_H, D_TAIL], TILE_SMEM)
        k_tail = gl.allocate_shared_memory(gl.bfloat16, [2, BLOCK_N, D_TAIL], TILE_SMEM)
    else:
        q_tail = q_main  # unused
        k_tail = k_main  # unused
    P_BUFFERS: gl.constexpr = 1 if D_TAIL > 0 else 2  # see _p_buffer
    p_smem = gl.allocate_shared_memory(gl.bfloat16, [P_BUFFERS, BLOCK_H, BLOCK_N], TILE_SMEM)
    m_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    l_smem = gl.allocate_shared_memory(gl.float32, [2, BLOCK_H], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # Per buffer and half (index buffer * 2 + half).
    k_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    k_free = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    m_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    p_free = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    l_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    # cp.async arrivals: one per producer thread (4 warps).
    mbarrier.init(q_ready, count=128)
    for h in gl.static_range(4):
        # A half is released by the one warpgroup that reads it last.
        mbarrier.init(k_ready.index(h), count=128)
        mbarrier.init(k_free.index(h), count=1)
    for g in gl.static_range(2):
        mbarrier.init(m_ready.index(g), count=1)
        mbarrier.init(p_ready.index(g), count=1)
        mbarrier.init(p_free.index(g), count=1)
        mbarrier.init(l_ready.index(g), count=1)
    smem = (q_main, q_tail, k_main, k_tail, p_smem, m_smem, l_smem)
    bars = (q_ready, k_ready, k_free, m_ready, p_ready, p_free, l_ready)
    gl.warp_specialize([
        (_compute, (q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr, out_ptr, lse_ptr,
                    part_out_ptr, part_lse_ptr, num_heads, rows, xrows, topk, xtopk, qk_scale, d_v, idx_stride,
                    xidx_stride, out_stride_t, out_stride_h, lse_stride, chunk, split, smem, bars, 0, D_MAIN, D_TAIL,
                    BLOCK_H, BLOCK_N, HAS_LEN, HAS_EXTRA, HAS_XLEN, HAS_SINK, PARTIAL)),
        (_compute, (q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, sink_ptr, out_ptr, lse_ptr,
                    part_out_ptr, part_lse_ptr, num_heads, rows, xrows, topk, xtopk, qk_scale, d_v, idx_stride,
                    xidx_stride, out_stride_t, out_stride_h, lse_stride, chunk, split, smem, bars, 1, D_MAIN, D_TAIL,
                    BLOCK_H, BLOCK_N, HAS_LEN, HAS_EXTRA, HAS_XLEN, HAS_SINK, PARTIAL)),
        (_producer, (q_ptr, cache_ptr, idx_ptr, len_ptr, xcache_ptr, xidx_ptr, xlen_ptr, num_heads, rows, xrows, topk,
                     xtopk, q_stride_t, q_stride_h, idx_stride, xidx_stride, chunk, split, smem, bars, D, D_MAIN,
                     D_TAIL, BLOCK_H, BLOCK_N, HAS_LEN, HAS_EXTRA, HAS_XLEN, WIDE)),
    ], [4, 4], [CONSUMER_REGS, PRODUCER_REGS])
