"""Kernels of the indexer top-k: a window fill and a radix select.

Every score becomes a 32-bit unsigned key whose order is the float order
(NaN above +inf, -0.0 folded onto +0.0). The k-th largest key of a set, tau,
is found digit by digit, most significant first (RADIX_BITS per pass): a
histogram of the current digit over the keys that share the prefix found so
far says which bin holds the k-th key and how many keys lie strictly above
it. After the last pass tau is exact and ``need`` says how many keys equal to
tau still belong in the top k. A select pass then writes every key > tau and
the first ``need`` keys == tau. No sort.

Two shapes of it:
- ``sparse_topk_row_kernel``: one program per row, every pass inside it, the
  histograms in registers (no workspace, one launch). Best when T fills the GPU.
- The split path, for few rows and long windows (SPLIT programs per row):
  1. ``sparse_topk_coarse_hist_kernel``: one 256-bin histogram per row of a
     coarse digit (the top byte of the score's fp16 order key: sign, exponent,
     two mantissa bits), merged with atomics into a zeroed workspace. Rounding
     to fp16 is monotone, so the coarse bins order like the scores.
  2. ``sparse_topk_partition_kernel``: the bin b holding the k-th score is
     known; every score in a higher bin is a winner and goes straight to the
     output, every score in bin b is a candidate and (position, score) is
     appended to the row's candidate list (slots taken with atomic counters).
  3. ``sparse_topk_candidates_kernel``: one program per row runs the radix
     select over the candidates only (for normally distributed scores and
     topk 2048: 50-300 of an 8192 row, 1-3 thousand of a 131072 one), held
     in registers, and writes the remaining slots.
  The row is read twice whatever the radix width. A row whose bin b holds more
  than ``capacity`` scores (a very narrow spread: many ties) skips step 2 and
  step 3 runs the one-program select over the whole row instead: correct for
  any input, slower only there.
Rows whose window fits in topk are filled with their window (the scores are
not read), so neither path needs a host-side decision.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Bins of the split path's coarse histogram (one byte of the fp16 order key).
COARSE_BINS = tl.constexpr(256)
#: int32 elements per row of the split path's zeroed head: the coarse
#: histogram, then the winner and candidate counters (padded to 32 bytes).
HEAD_STRIDE = tl.constexpr(264)


@triton.jit
def _keys(x):
    """fp32 -> uint32 whose unsigned order is the float order."""
    x = tl.where(x == 0.0, 0.0, x)
    u = x.to(tl.uint32, bitcast=True)
    negative = (u >> 31) == 1
    key = tl.where(negative, ~u, u | 0x80000000)
    return tl.where(x != x, 0xFFFFFFFF, key).to(tl.uint32)


@triton.jit
def _coarse_digit(x):
    """fp32 -> int32 in [0, 256): the top byte of the order key of x rounded
    to fp16. Non-decreasing in x (NaN on top), so a higher digit means a
    strictly higher score."""
    x = tl.where(x == 0.0, 0.0, x)
    h = x.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    negative = (h >> 15) == 1
    key = tl.where(negative, ~h & 0xFFFF, h | 0x8000)
    return tl.where(x != x, 255, key >> 8).to(tl.int32)


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
def _load_keys(row_ptr, index_ptr, offs, stop, listed, INDIRECT: tl.constexpr):
    """(positions, keys, valid) of entries ``offs`` below ``stop``: the
    positions are ``offs`` themselves and the scores are read from the row,
    or (INDIRECT and ``listed``, a runtime flag) both come from a candidate
    list of int64 entries (score bits << 32 | position)."""
    valid = offs < stop
    if INDIRECT:
        from_list = offs < tl.where(listed, stop, 0)
        entry = tl.load(index_ptr + offs, mask=from_list, other=0)
        positions = tl.where(from_list, (entry & 0xFFFFFFFF).to(tl.int32), offs)
        listed_scores = (entry >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        row_scores = tl.load(row_ptr + offs, mask=valid & ~from_list, other=0.0)
        keys = _keys(tl.where(from_list, listed_scores, row_scores))
    else:
        positions = offs
        keys = _keys(tl.load(row_ptr + positions, mask=valid, other=0.0))
    return positions, keys, valid


@triton.jit
def _digit_hist(row_ptr, index_ptr, stop, listed, prefix, PASS: tl.constexpr, RADIX_BITS: tl.constexpr,
                BLOCK: tl.constexpr, INDIRECT: tl.constexpr):
    """Histogram of pass PASS's digit over entries [0, stop) whose keys match ``prefix``."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    lo, width = _pass_shifts(PASS, RADIX_BITS)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for base in range(0, stop, BLOCK):
        _, key, valid = _load_keys(row_ptr, index_ptr, base + tl.arange(0, BLOCK), stop, listed, INDIRECT)
        if PASS > 0:
            valid = valid & ((key >> (lo + width)) == prefix)
        digit = ((key >> lo) & ((1 << width) - 1)).to(tl.int32)
        hist += tl.histogram(digit, BINS, mask=valid)
    return hist


@triton.jit
def _radix_threshold(row_ptr, index_ptr, stop, listed, need, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr,
                     INDIRECT: tl.constexpr):
    """(tau, need - #keys > tau): tau is the need-th largest key of entries [0, stop)."""
    NPASS: tl.constexpr = (32 + RADIX_BITS - 1) // RADIX_BITS
    BINS: tl.constexpr = 1 << RADIX_BITS
    prefix = tl.zeros([], dtype=tl.uint32)
    for p in tl.static_range(NPASS):
        _, width_p = _pass_shifts(p, RADIX_BITS)
        hist = _digit_hist(row_ptr, index_ptr, stop, listed, prefix, p, RADIX_BITS, BLOCK, INDIRECT)
        chosen, above = _threshold_bin(hist, need, BINS)
        need -= above
        prefix = (prefix << width_p) | chosen.to(tl.uint32)
    return prefix, need


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
def _select(row_ptr, index_ptr, out_row, stop, listed, tau, gt_base, eq_base, eq_limit, table_row, max_blocks,
            block_size, PAGED: tl.constexpr, BLOCK: tl.constexpr, INDIRECT: tl.constexpr):
    """Write the positions of entries [0, stop) with key > tau at slots
    gt_base.., and of those == tau at eq_base.. while below eq_limit."""
    # Loop-carried: a literal base (a constexpr) must become a tensor first.
    gt_base += tl.zeros([], dtype=tl.int32)
    eq_base += tl.zeros([], dtype=tl.int32)
    for base in range(0, stop, BLOCK):
        positions, key, valid = _load_keys(row_ptr, index_ptr, base + tl.arange(0, BLOCK), stop, listed,
                                           INDIRECT)
        gt_base, eq_base = _write_winners(out_row, positions, key, valid, tau, gt_base, eq_base, eq_limit,
                                          table_row, max_blocks, block_size, PAGED)


@triton.jit
def _write_winners(out_row, positions, key, valid, tau, gt_base, eq_base, eq_limit, table_row, max_blocks,
                   block_size, PAGED: tl.constexpr):
    """One block of the select: keys > tau to slots gt_base.., keys == tau to
    eq_base.. below eq_limit. Returns the next free slot of each kind."""
    gt = valid & (key > tau)
    eq = valid & (key == tau)
    # One scan for both counts: blocks are far below 2**16 entries.
    packed = gt.to(tl.int32) + (eq.to(tl.int32) << 16)
    before = tl.cumsum(packed, 0) - packed
    gt_slot = gt_base + (before & 0xFFFF)
    eq_slot = eq_base + (before >> 16)
    _store_positions(out_row, gt_slot, positions, gt, table_row, max_blocks, block_size, PAGED)
    _store_positions(out_row, eq_slot, positions, eq & (eq_slot < eq_limit), table_row, max_blocks,
                     block_size, PAGED)
    total = tl.sum(packed, 0)
    return gt_base + (total & 0xFFFF), eq_base + (total >> 16)


@triton.jit
def _select_whole_row(row_ptr, out_row, n, topk, table_row, max_blocks, block_size, PAGED: tl.constexpr,
                      RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr):
    """The top ``topk`` of keys[0, n) into out_row[0, topk), by one program."""
    tau, need = _radix_threshold(row_ptr, row_ptr, n, False, topk, RADIX_BITS, BLOCK, False)
    _select(row_ptr, row_ptr, out_row, n, False, tau, 0, topk - need, topk, table_row, max_blocks, block_size,
            PAGED, BLOCK, False)


@triton.jit
def _bits_from(hi):
    """uint32 mask of bits hi..31 (0 when hi is 32)."""
    return (tl.full([], 0xFFFFFFFF, dtype=tl.uint64) << hi.to(tl.uint64)).to(tl.uint32)


@triton.jit
def _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row, table_row, max_blocks,
                     block_size, PAGED: tl.constexpr, RADIX_BITS: tl.constexpr, SIZE: tl.constexpr):
    """The top topk - first_slot of entries [0, stop) (stop <= SIZE, loaded
    once and held in registers) into slots first_slot..topk: every radix pass
    and the select without a reload.

    Candidates share their coarse bin, so their keys agree on the top bits;
    the passes start below the highest bit where the smallest and largest
    key differ, not at bit 31."""
    BINS: tl.constexpr = 1 << RADIX_BITS
    need = topk - first_slot
    positions, keys, valid = _load_keys(row_ptr, cand_row, tl.arange(0, SIZE), stop, listed, True)
    smallest = tl.min(tl.where(valid, keys, 0xFFFFFFFF), 0)
    spread = tl.max(tl.where(valid, keys, 0), 0) ^ smallest
    # Bit length of the spread, from its float exponent; rounding up near a
    # power of two only adds one harmless bit.
    exponent = (spread.to(tl.float32).to(tl.uint32, bitcast=True) >> 23).to(tl.int32)
    hi = tl.where(spread == 0, 0, tl.minimum(exponent - 126, 32))
    tau = smallest & _bits_from(hi)
    while hi > 0:
        lo = tl.maximum(hi - RADIX_BITS, 0)
        live = valid & ((keys & _bits_from(hi)) == tau)
        digit = ((keys >> lo.to(tl.uint32)) & ((1 << (hi - lo)) - 1).to(tl.uint32)).to(tl.int32)
        chosen, above = _threshold_bin(tl.histogram(digit, BINS, mask=live), need, BINS)
        need -= above
        tau = tau | (chosen.to(tl.uint32) << lo.to(tl.uint32))
        hi = lo
    _write_winners(out_row, positions, keys, valid, tau, first_slot, topk - need, topk, table_row, max_blocks,
                   block_size, PAGED)


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
    """One program per row, every radix pass over the row. Grid (T,)."""
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    table_row = table_ptr + row.to(tl.int64) * table_stride
    if n <= topk:
        _fill_window(out_row, 0, BLOCK, n, topk, table_row, max_blocks, block_size, PAGED, BLOCK)
    else:
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        _select_whole_row(row_ptr, out_row, n, topk, table_row, max_blocks, block_size, PAGED, RADIX_BITS, BLOCK)


@triton.jit(do_not_specialize=["width"])
def sparse_topk_coarse_hist_kernel(logits_ptr, lens_ptr, head_ptr, width, topk, logits_stride, chunk,
                                   BLOCK: tl.constexpr):
    """Step 1 of the split path: the coarse histogram of this program's chunk,
    added into head[row, :256] (zero before). Grid (T, SPLIT)."""
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    start = tl.program_id(1) * chunk
    if (n > topk) & (start < n):
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        stop = tl.minimum(start + chunk, n)
        hist = tl.zeros([COARSE_BINS], dtype=tl.int32)
        scores = tl.load(row_ptr + start + tl.arange(0, BLOCK), mask=start + tl.arange(0, BLOCK) < stop, other=0.0)
        for base in range(start, stop, BLOCK):
            offs = base + tl.arange(0, BLOCK)
            ahead = offs + BLOCK
            next_scores = tl.load(row_ptr + ahead, mask=ahead < stop, other=0.0)  # in flight during the histogram
            hist += tl.histogram(_coarse_digit(scores), COARSE_BINS, mask=offs < stop)
            scores = next_scores
        bins = tl.arange(0, COARSE_BINS)
        tl.atomic_add(head_ptr + row.to(tl.int64) * HEAD_STRIDE + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _coarse_split(head_row, topk):
    """From a row's merged coarse histogram: (the bin holding the topk-th
    score, the count of scores above that bin, the count inside it)."""
    bins = tl.arange(0, COARSE_BINS)
    hist = tl.load(head_row + bins)
    chosen, above = _threshold_bin(hist, topk, COARSE_BINS)
    inside = tl.sum(tl.where(bins == chosen, hist, 0), 0)
    return chosen, above, inside


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_partition_kernel(logits_ptr, lens_ptr, head_ptr, cand_ptr, out_ptr, table_ptr, width, topk,
                                 logits_stride, out_stride, table_stride, max_blocks, block_size, chunk, capacity,
                                 PAGED: tl.constexpr, BLOCK: tl.constexpr):
    """Step 2 of the split path: this chunk's scores above the threshold bin
    to the output (slots 0.. of the row, reserved with head[row, 256]), its
    scores inside the bin to the candidate list cand[row, :capacity] (int64
    entries, reserved with head[row, 257]). Rows that fit in topk get their window.
    Grid (T, SPLIT)."""
    row = tl.program_id(0)
    part = tl.program_id(1)
    n = _window_length(lens_ptr, row, width)
    out_row = out_ptr + row.to(tl.int64) * out_stride
    table_row = table_ptr + row.to(tl.int64) * table_stride
    if n <= topk:
        _fill_window(out_row, part * BLOCK, tl.num_programs(1) * BLOCK, n, topk, table_row, max_blocks,
                     block_size, PAGED, BLOCK)
    else:
        head_row = head_ptr + row.to(tl.int64) * HEAD_STRIDE
        chosen, _, inside = _coarse_split(head_row, topk)
        start = part * chunk
        stop = tl.minimum(start + chunk, n)
        if (inside <= capacity) & (start < stop):
            row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
            cand_row = cand_ptr + row.to(tl.int64) * capacity
            # Each score that moves takes its slot with its own atomic: only a
            # few percent of the lanes are active, and a block-wide scan to
            # share one atomic costs more than those (measured on sm90).
            counters = head_row + COARSE_BINS + tl.zeros([BLOCK], dtype=tl.int32)
            # The next block's load is issued before this block's atomics, so
            # their round trips overlap.
            scores = tl.load(row_ptr + start + tl.arange(0, BLOCK), mask=start + tl.arange(0, BLOCK) < stop,
                             other=0.0)
            for base in range(start, stop, BLOCK):
                offs = base + tl.arange(0, BLOCK)
                valid = offs < stop
                ahead = offs + BLOCK
                next_scores = tl.load(row_ptr + ahead, mask=ahead < stop, other=0.0)
                digit = _coarse_digit(scores)
                win = valid & (digit > chosen)
                maybe = valid & (digit == chosen)
                win_slot = tl.atomic_add(counters, 1, mask=win, sem="relaxed")
                maybe_slot = tl.atomic_add(counters + 1, 1, mask=maybe, sem="relaxed")
                _store_positions(out_row, win_slot, offs, win, table_row, max_blocks, block_size, PAGED)
                # The score travels with its position: the last step then
                # reads the list alone, with no dependent gather from the row.
                entry = (scores.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs.to(tl.int64)
                tl.store(cand_row + maybe_slot, entry, mask=maybe)
                scores = next_scores


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_candidates_kernel(logits_ptr, lens_ptr, head_ptr, cand_ptr, out_ptr, table_ptr, width, topk,
                                  logits_stride, out_stride, table_stride, max_blocks, block_size, capacity,
                                  PAGED: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr,
                                  RESIDENT: tl.constexpr):
    """Step 3 of the split path: the radix select over the row's candidates
    fills the slots the partition left; a row whose threshold bin overflowed
    the candidate list is selected whole here. Up to RESIDENT entries are
    held in registers across the passes (in a block of RESIDENT / 16, / 4,
    / 2 or RESIDENT); more are streamed BLOCK at a time.
    Grid (T,)."""
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    if n > topk:
        head_row = head_ptr + row.to(tl.int64) * HEAD_STRIDE
        _, above, inside = _coarse_split(head_row, topk)
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        out_row = out_ptr + row.to(tl.int64) * out_stride
        table_row = table_ptr + row.to(tl.int64) * table_stride
        # The list's entries [0, inside) with the partition's winners before
        # them, or (the list overflowed) the whole row [0, n) from slot 0.
        listed = inside <= capacity
        stop = tl.where(listed, inside, n)
        first_slot = tl.where(listed, above, 0)
        cand_row = cand_ptr + row.to(tl.int64) * capacity
        # The usual cases: every entry stays in registers for all passes, in
        # the smallest block of a ladder that holds the list (a histogram
        # costs per slot, used or not).
        if stop <= RESIDENT // 16:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RADIX_BITS, RESIDENT // 16)
        elif stop <= RESIDENT // 4:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RADIX_BITS, RESIDENT // 4)
        elif stop <= RESIDENT // 2:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RADIX_BITS, RESIDENT // 2)
        elif stop <= RESIDENT:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RADIX_BITS, RESIDENT)
        else:
            tau, need = _radix_threshold(row_ptr, cand_row, stop, listed, topk - first_slot, RADIX_BITS, BLOCK,
                                         True)
            _select(row_ptr, cand_row, out_row, stop, listed, tau, first_slot, topk - need, topk, table_row,
                    max_blocks, block_size, PAGED, BLOCK, True)
