"""Kernels of the indexer top-k: a window fill and a radix select.

Every score becomes a 32-bit unsigned key whose order is the float order
(NaN above +inf, -0.0 folded onto +0.0). The k-th largest key of a row, tau,
is found digit by digit, most significant first (RADIX_BITS per pass): a
histogram of the current digit over the keys that share the prefix found so
far says which bin holds the k-th key and how many keys lie strictly above
it. After the last pass tau is exact and ``need`` says how many keys equal to
tau still belong in the top k. The select pass then writes every key > tau and
the first ``need`` keys == tau. No sort, and every pass is a streaming read.

Two shapes of the same algorithm:
- ``sparse_topk_row_kernel``: one program per row, every pass inside it, the
  histograms in registers (no workspace, one launch). Best when T fills the GPU.
- ``sparse_topk_hist_kernel`` x NPASS + ``sparse_topk_select_kernel``: SPLIT
  programs per row, histograms merged with atomics in a zeroed workspace,
  slots reserved with atomic counters. For few rows and long windows.
Rows whose window fits in topk are filled with their window (the scores are
not read), so the general path needs no host-side decision.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _keys(x):
    """fp32 -> uint32 whose unsigned order is the float order."""
    x = tl.where(x == 0.0, 0.0, x)
    u = x.to(tl.uint32, bitcast=True)
    negative = (u >> 31) == 1
    key = tl.where(negative, ~u, u | 0x80000000)
    return tl.where(x != x, 0xFFFFFFFF, key).to(tl.uint32)


@triton.jit
def _pass_shifts(PASS: tl.constexpr, RADIX_BITS: tl.constexpr):
    """(low bit of this pass's digit, digit width) - the last pass may be narrower."""
    hi: tl.constexpr = 32 - RADIX_BITS * PASS
    lo: tl.constexpr = hi - RADIX_BITS if hi > RADIX_BITS else 0
    return lo, hi - lo


@triton.jit
def _threshold_bin(hist, need, BINS: tl.constexpr):
    """The bin holding the need-th largest key, and the count strictly above it."""
    bins = tl.arange(0, BINS)
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    chosen = tl.max(tl.where(at_or_above >= need, bins, -1), 0)
    above = tl.sum(tl.where(bins > chosen, hist, 0), 0)
    return chosen, above


@triton.jit
def _digit_hist(row_ptr, start, stop, prefix, PASS: tl.constexpr, RADIX_BITS: tl.constexpr,
                BLOCK: tl.constexpr):
    """Histogram of pass PASS's digit over keys[start:stop] that match ``prefix``."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    lo, width = _pass_shifts(PASS, RADIX_BITS)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for base in range(start, stop, BLOCK):
        offs = base + tl.arange(0, BLOCK)
        valid = offs < stop
        key = _keys(tl.load(row_ptr + offs, mask=valid, other=0.0))
        if PASS > 0:
            valid = valid & ((key >> (lo + width)) == prefix)
        digit = ((key >> lo) & ((1 << width) - 1)).to(tl.int32)
        hist += tl.histogram(digit, BINS, mask=valid)
    return hist


@triton.jit
def _store_positions(out_row, slots, positions, mask, table_row, max_blocks, block_size, PAGED: tl.constexpr):
    """out[slots] = positions (or their cache slots when PAGED); -1 stays -1."""
    if PAGED:
        block = positions // block_size
        ok = (positions >= 0) & (block < max_blocks)
        entry = tl.load(table_row + block, mask=mask & ok, other=-1)
        ok = ok & (entry >= 0)
        positions = tl.where(ok, entry.to(tl.int64) * block_size + positions % block_size, -1).to(tl.int32)
    tl.store(out_row + slots, positions, mask=mask)


@triton.jit
def _fill_window(out_row, first_slot, slot_stride, n, topk, table_row, max_blocks, block_size,
                 PAGED: tl.constexpr, BLOCK: tl.constexpr):
    for base in range(first_slot, topk, slot_stride):
        slots = base + tl.arange(0, BLOCK)
        _store_positions(out_row, slots, tl.where(slots < n, slots, -1), slots < topk, table_row, max_blocks,
                         block_size, PAGED)


@triton.jit
def _select(row_ptr, out_row, start, stop, tau, gt_base, eq_base, eq_limit, table_row, max_blocks, block_size,
            PAGED: tl.constexpr, BLOCK: tl.constexpr):
    """Write keys[start:stop] > tau at slots gt_base.., and those == tau at
    eq_base.. while below eq_limit. Returns the counts seen."""
    n_gt = 0
    n_eq = 0
    for base in range(start, stop, BLOCK):
        offs = base + tl.arange(0, BLOCK)
        valid = offs < stop
        key = _keys(tl.load(row_ptr + offs, mask=valid, other=0.0))
        gt = valid & (key > tau)
        eq = valid & (key == tau)
        gt_slot = gt_base + n_gt + tl.cumsum(gt.to(tl.int32), 0) - 1
        eq_slot = eq_base + n_eq + tl.cumsum(eq.to(tl.int32), 0) - 1
        _store_positions(out_row, gt_slot, offs, gt, table_row, max_blocks, block_size, PAGED)
        _store_positions(out_row, eq_slot, offs, eq & (eq_slot < eq_limit), table_row, max_blocks, block_size,
                         PAGED)
        n_gt += tl.sum(gt.to(tl.int32), 0)
        n_eq += tl.sum(eq.to(tl.int32), 0)
    return n_gt, n_eq


@triton.jit
def _window_length(lens_ptr, row, width):
    n = tl.load(lens_ptr + row)
    return tl.minimum(tl.maximum(n, 0), width)


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_window_kernel(lens_ptr, out_ptr, table_ptr, width, topk, out_stride, table_stride, max_blocks,
                              block_size, PAGED: tl.constexpr, BLOCK: tl.constexpr):
    """The short-circuit: out[t] = 0..n-1 then -1 (or cache slots). Grid (T, cdiv(topk, BLOCK))."""
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    table_row = table_ptr + row.to(tl.int64) * table_stride
    slots = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    _store_positions(out_row, slots, tl.where(slots < n, slots, -1), slots < topk, table_row, max_blocks,
                     block_size, PAGED)


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_row_kernel(logits_ptr, lens_ptr, out_ptr, table_ptr, width, topk, logits_stride, out_stride,
                           table_stride, max_blocks, block_size, PAGED: tl.constexpr, RADIX_BITS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """One program per row, every radix pass in registers. Grid (T,)."""
    NPASS: tl.constexpr = (32 + RADIX_BITS - 1) // RADIX_BITS
    BINS: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    table_row = table_ptr + row.to(tl.int64) * table_stride
    if n <= topk:
        _fill_window(out_row, 0, BLOCK, n, topk, table_row, max_blocks, block_size, PAGED, BLOCK)
    else:
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        prefix = tl.zeros([], dtype=tl.uint32)
        need = topk
        for p in tl.static_range(NPASS):
            _, width_p = _pass_shifts(p, RADIX_BITS)
            hist = _digit_hist(row_ptr, 0, n, prefix, p, RADIX_BITS, BLOCK)
            chosen, above = _threshold_bin(hist, need, BINS)
            need -= above
            prefix = (prefix << width_p) | chosen.to(tl.uint32)
        _select(row_ptr, out_row, 0, n, prefix, 0, topk - need, topk, table_row, max_blocks, block_size,
                PAGED, BLOCK)


@triton.jit
def _prefix_from_workspace(hist_row, topk, PASSES: tl.constexpr, RADIX_BITS: tl.constexpr):
    """tau's first PASSES digits (and what is still needed) from merged histograms."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    prefix = tl.zeros([], dtype=tl.uint32)
    need = topk
    for p in tl.static_range(PASSES):
        _, width_p = _pass_shifts(p, RADIX_BITS)
        hist = tl.load(hist_row + p * BINS + tl.arange(0, BINS))
        chosen, above = _threshold_bin(hist, need, BINS)
        need -= above
        prefix = (prefix << width_p) | chosen.to(tl.uint32)
    return prefix, need


@triton.jit(do_not_specialize=["width", "chunk"])
def sparse_topk_hist_kernel(logits_ptr, lens_ptr, hist_ptr, width, topk, logits_stride, chunk,
                            PASS: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Pass PASS of the split select: this program's chunk, merged with atomics.
    Grid (T, SPLIT); hist_ptr is [T, NPASS, BINS] int32, zero before pass 0."""
    NPASS: tl.constexpr = (32 + RADIX_BITS - 1) // RADIX_BITS
    BINS: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    start = tl.program_id(1) * chunk
    if (n > topk) & (start < n):
        hist_row = hist_ptr + row.to(tl.int64) * (NPASS * BINS)
        prefix, _ = _prefix_from_workspace(hist_row, topk, PASS, RADIX_BITS)
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        hist = _digit_hist(row_ptr, start, tl.minimum(start + chunk, n), prefix, PASS, RADIX_BITS, BLOCK)
        bins = tl.arange(0, BINS)
        tl.atomic_add(hist_row + PASS * BINS + bins, hist, mask=hist > 0)


@triton.jit(do_not_specialize=["width", "max_blocks", "chunk"])
def sparse_topk_select_kernel(logits_ptr, lens_ptr, hist_ptr, count_ptr, out_ptr, table_ptr, width, topk,
                              logits_stride, out_stride, table_stride, max_blocks, block_size, chunk,
                              PAGED: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """Last step of the split select: write the chunk's winners at slots
    reserved with atomic counters (count_ptr [T, 2] int32, zero). Grid (T, SPLIT)."""
    NPASS: tl.constexpr = (32 + RADIX_BITS - 1) // RADIX_BITS
    BINS: tl.constexpr = 1 << RADIX_BITS
    row = tl.program_id(0)
    part = tl.program_id(1)
    n = _window_length(lens_ptr, row, width)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    table_row = table_ptr + row.to(tl.int64) * table_stride
    if n <= topk:
        _fill_window(out_row, part * BLOCK, tl.num_programs(1) * BLOCK, n, topk, table_row, max_blocks,
                     block_size, PAGED, BLOCK)
    else:
        start = part * chunk
        stop = tl.minimum(start + chunk, n)
        if start < stop:
            hist_row = hist_ptr + row.to(tl.int64) * (NPASS * BINS)
            tau, need = _prefix_from_workspace(hist_row, topk, NPASS, RADIX_BITS)
            row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
            # Count this chunk's winners, reserve their slots, then write them.
            n_gt = 0
            n_eq = 0
            for base in range(start, stop, BLOCK):
                offs = base + tl.arange(0, BLOCK)
                key = _keys(tl.load(row_ptr + offs, mask=offs < stop, other=0.0))
                n_gt += tl.sum(((offs < stop) & (key > tau)).to(tl.int32), 0)
                n_eq += tl.sum(((offs < stop) & (key == tau)).to(tl.int32), 0)
            gt_base = tl.atomic_add(count_ptr + row.to(tl.int64) * 2, n_gt)
            eq_base = tl.atomic_add(count_ptr + row.to(tl.int64) * 2 + 1, n_eq)
            _select(row_ptr, out_row, start, stop, tau, gt_base, topk - need + eq_base, topk, table_row,
                    max_blocks, block_size, PAGED, BLOCK)
