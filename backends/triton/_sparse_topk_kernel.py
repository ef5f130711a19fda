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
  1. Two bounds of each row's topk-th score, one of two ways (the config's
     SAMPLE says which):
     - ``sparse_topk_sample_kernel`` (SAMPLE > 0): one program per row ranks
       a sample of its scores (SAMPLE of them: groups of 32 neighbours spread
       evenly over the window, or the whole window when it is that short) and
       takes two keys from it, ``hi`` and ``lo``, chosen so that with a margin
       of SAMPLE_MARGIN_SIGMAS standard deviations of the sampling error fewer
       than topk scores lie above ``hi`` and at least topk at or above ``lo``.
       It also zeroes the row's counters, so no memset is needed. A window of
       at most SAMPLE scores is ranked exactly: its keys bracket the topk-th
       score within 2^14 keys (a relative 2^-9).
     - ``sparse_topk_coarse_hist_kernel`` (SAMPLE = 0): SPLIT programs per
       row build one 256-bin histogram of a coarse digit of every score (the
       top byte of its fp16 order key: sign, exponent, two mantissa bits),
       merged with atomics into a zeroed head. Rounding to fp16 is monotone,
       so the bins order like the scores; the bin holding the topk-th score
       is the bound. It reads the whole row, but spread over its programs,
       which wins when the rows are few.
  2. ``sparse_topk_filter_kernel``: every score above the bounds is a
     winner and goes straight to the output, every score between them (or in
     the coarse bin) is a candidate and (position, score) is appended to the
     row's candidate list (slots taken with atomic counters). The one full
     read of the row after the sample.
  3. ``sparse_topk_candidates_kernel``: checks what the bounds promised
     (winners <= topk <= winners + candidates, and the candidates fit in
     ``capacity``); then one program per row finds the threshold among the
     candidates only (for normally distributed scores and topk 2048: about
     0.1-3 thousand), held in registers, by a counting search (no histogram:
     Triton 3.6 builds those from warp votes at a cost per score that grows
     with the bins), and writes the remaining slots.
  A row the sample misjudged (scores arranged against the sample's positions)
  or with too many candidates (a very narrow spread: many ties) is selected
  whole by that one program instead: correct for any input, slower only there.
Rows whose window fits in topk are filled with their window (the scores are
not read), so neither path needs a host-side decision.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rocmoe.backends.triton._common import pdl_prologue

#: int32 elements per row of the split path's head: the keys hi and lo, then
#: the winner and candidate counters as one int64 (winners in its low half),
#: padded to 128 bytes so that no two rows' counters share a cache line;
#: then the coarse histogram (COARSE_BINS) when the bounds come from one.
HEAD_COUNTERS = tl.constexpr(2)
HEAD_HISTOGRAM = tl.constexpr(32)
COARSE_BINS = tl.constexpr(256)
HEAD_STRIDE = tl.constexpr(288)
#: Scores per sample group: one 128-byte line of fp32.
SAMPLE_GROUP = tl.constexpr(32)
#: How far (in standard deviations of the sampling error) the sample's two
#: keys stay from the topk-th score: a normal tail of 3e-7 per side, so a row
#: falls back to the whole-row select about once in a million for scores in
#: random order.
SAMPLE_MARGIN_SIGMAS = tl.constexpr(5.0)
#: The sample's histograms: three levels of 6-bit digits, the top 18 bits of
#: a key, so each rank's key is located to within a relative 2^-9.
SAMPLE_LEVELS = tl.constexpr(3)
SAMPLE_DIGIT_BITS = tl.constexpr(6)
SAMPLE_BINS = tl.constexpr(64)
#: Points per step of the resident select's counting search, 2^SEARCH_BITS
#: (the counts' packing is written for 4):
#: 2, 4 and 8 measured 14.6, 12.8 and 13.9 µs over 2090 candidates on sm90
#: (a version that compared a [WAYS, SIZE] tile, before the counts were packed).
SEARCH_BITS = tl.constexpr(2)
SEARCH_WAYS = tl.constexpr(4)


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
def _add_pair(a_low, a_high, b_low, b_high):
    return a_low + b_low, a_high + b_high


@triton.jit
def _counted_threshold(keys, valid, need):
    """(tau, need - #keys > tau) for keys held in registers: tau is the
    need-th largest of keys[valid] (1 <= need <= their count). A search over
    key values that counts instead of building histograms: each step
    counts the keys at or above SEARCH_WAYS points spread over [lo, hi] (one
    compare and add per key and point, one reduction for all; the first point
    is lo itself) and keeps the part holding the need-th largest key. About
    21 / log2(SEARCH_WAYS) steps for a row's candidates, 32 / that at most."""
    WAYS: tl.constexpr = SEARCH_WAYS
    tl.static_assert(WAYS == 4, "the counts' packing below is written for four points")
    lo = tl.min(tl.where(valid, keys, 0xFFFFFFFF), 0)
    hi = tl.max(tl.where(valid, keys, 0), 0)
    above_hi = tl.zeros([], dtype=tl.int32)  # keys > hi
    step = tl.arange(0, WAYS).to(tl.uint32)
    while lo < hi:
        # Points lo + ceil(width * step / WAYS) in [lo, hi], increasing
        # (repeats only when the part is short), without overflowing 32 bits.
        width = hi - lo
        part = (width >> SEARCH_BITS) * step + (((width & (WAYS - 1)) * step + WAYS - 1) >> SEARCH_BITS)
        points = lo + part
        # The first point is lo, whose count is >= need: count the others,
        # two per int32 (16 bits each, SIZE < 2^16), all in one reduction (a
        # [WAYS, SIZE] compare takes stack on sm90 with Triton 3.9, one sum
        # per point waits on a barrier each, int64 adds cost two).
        low = tl.zeros(keys.shape, dtype=tl.int32)
        high = tl.zeros(keys.shape, dtype=tl.int32)
        for way in tl.static_range(1, WAYS):
            point = tl.sum(tl.where(step == way, points, 0), 0)
            bit = (valid & (keys >= point)).to(tl.int32) << (16 * ((way - 1) % 2))
            if way <= 2:
                low += bit
            else:
                high += bit
        low, high = tl.reduce((low, high), 0, _add_pair)
        field = (tl.where(step <= 2, low, high) >> (16 * ((step.to(tl.int32) + 1) % 2))) & 0xFFFF
        at_or_above = tl.where(step == 0, need, field)
        enough = at_or_above >= need
        lo = tl.maximum(lo, tl.max(tl.where(enough, points, 0), 0))
        # The first point with too few keys at or above it, if any, caps hi.
        any_short = tl.max((~enough).to(tl.int32), 0) > 0
        hi = tl.where(any_short, tl.min(tl.where(enough, 0xFFFFFFFF, points), 0) - 1, hi)
        above_hi = tl.maximum(above_hi, tl.max(tl.where(enough, 0, at_or_above), 0))
    return lo, need - above_hi


@triton.jit
def _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row, table_row, max_blocks,
                     block_size, PAGED: tl.constexpr, SIZE: tl.constexpr):
    """The top topk - first_slot of entries [0, stop) (stop <= SIZE, loaded
    once and held in registers) into slots first_slot..topk: the counting
    search and the select without a reload."""
    positions, keys, valid = _load_keys(row_ptr, cand_row, tl.arange(0, SIZE), stop, listed, True)
    tau, need = _counted_threshold(keys, valid, topk - first_slot)
    _write_winners(out_row, positions, keys, valid, tau, first_slot, topk - need, topk, table_row, max_blocks,
                   block_size, PAGED)


@triton.jit
def _window_length(lens_ptr, row, width):
    n = tl.load(lens_ptr + row)
    return tl.minimum(tl.maximum(n, 0), width)


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_window_kernel(lens_ptr, out_ptr, table_ptr, width, topk, out_stride, table_stride, max_blocks,
                              block_size, PAGED: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """The short-circuit: out[t] = 0..n-1 then -1 (or cache slots). Grid (T, cdiv(topk, BLOCK))."""
    pdl_prologue(PDL)
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
                           BLOCK: tl.constexpr, PDL: tl.constexpr):
    """One program per row, every radix pass over the row. Grid (T,)."""
    pdl_prologue(PDL)
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
                                   BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Step 1 of the split path: the coarse histogram of this program's chunk,
    added into the row's zeroed head histogram. Grid (T, SPLIT)."""
    pdl_prologue(PDL)
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
        head_row = head_ptr + row.to(tl.int64) * HEAD_STRIDE
        tl.atomic_add(head_row + HEAD_HISTOGRAM + bins, hist, mask=hist > 0, sem="relaxed")


@triton.jit
def _coarse_split(head_row, topk):
    """From a row's merged coarse histogram: (the bin holding the topk-th
    score, the count of scores above that bin, the count inside it)."""
    bins = tl.arange(0, COARSE_BINS)
    hist = tl.load(head_row + HEAD_HISTOGRAM + bins)
    chosen, above = _threshold_bin(hist, topk, COARSE_BINS)
    inside = tl.sum(tl.where(bins == chosen, hist, 0), 0)
    return chosen, above, inside


@triton.jit
def _sample_ranks(count, n, topk):
    """(r_hi, r_lo): the ranks in a sample of ``count`` of the row's ``n``
    scores whose keys bound the row's topk-th score with the margin.

    A score above the row's topk-th is in the sample with probability
    f = count / n, so the sample's rank r of a threshold estimates a row rank
    of r / f with a relative error of about sqrt((1 - f) / r). r_hi is the
    largest r with r + z sqrt((1 - f) r) <= f topk, r_lo the smallest with
    r - z sqrt((1 - f) r) >= f topk. A sample of the whole row (f = 1) gives
    both as topk. r_hi may be 0 (no winners), r_lo may exceed ``count`` (the
    sample is too small: the row falls back)."""
    f = count.to(tl.float32) / n.to(tl.float32)
    expected = f * topk
    variance = SAMPLE_MARGIN_SIGMAS * SAMPLE_MARGIN_SIGMAS * (1.0 - f)
    # Correctly rounded roots: the interpreter and every GPU pick the same ranks.
    root = tl.sqrt_rn(variance + 4.0 * expected)
    spread = tl.sqrt_rn(variance)
    low = (root - spread) * 0.5
    high = (root + spread) * 0.5
    r_hi = (low * low).to(tl.int32)  # floor: the value is >= 0
    high = high * high
    r_lo = high.to(tl.int32)
    r_lo += (r_lo.to(tl.float32) < high).to(tl.int32)  # ceil
    exact = count == n
    return tl.where(exact, topk, r_hi), tl.where(exact, topk, r_lo)


@triton.jit
def _split_halves(both, pick_upper):
    """Rows 0 and 1 of a [2, B] histogram: (row 1, row ``pick_upper``)."""
    half = tl.arange(0, 2)[:, None]
    upper = tl.sum(tl.where(half == 1, both, 0), 0)
    chosen = tl.sum(tl.where(half == pick_upper.to(tl.int32), both, 0), 0)
    return upper, chosen


@triton.jit
def _sample_bounds(keys, valid, r_hi, r_lo):
    """(key_hi, key_lo) with at most r_hi - 1 of keys[valid] above key_hi and
    at least r_lo at or above key_lo (1 <= r_hi, r_lo <= their count).

    The ranks need not be exact: SAMPLE_LEVELS digits of SAMPLE_DIGIT_BITS
    (the top 18 bits of a key: a float's sign, exponent and 9 mantissa bits)
    locate each rank's key to within a relative 2^-9, and the bounds are that
    range's far ends. Each level is one histogram shared by both ranks (the
    lo rank's bins in its upper half; the lo rank takes the keys when both
    ranks share a prefix). Small digits, because Triton 3.6 builds a
    histogram from warp votes at a cost that grows with its bins."""
    BINS: tl.constexpr = SAMPLE_BINS
    prefix_hi = tl.zeros([], dtype=tl.uint32)
    prefix_lo = tl.zeros([], dtype=tl.uint32)
    need_hi = r_hi
    need_lo = r_lo
    for level in tl.static_range(SAMPLE_LEVELS):
        shift = 32 - SAMPLE_DIGIT_BITS * (level + 1)
        digit = ((keys >> shift) & (BINS - 1)).to(tl.int32)
        if level == 0:
            hist_lo = tl.histogram(digit, BINS, mask=valid)
            hist_hi = hist_lo
        else:
            prefix = keys >> (shift + SAMPLE_DIGIT_BITS)
            in_lo = prefix == prefix_lo
            both = tl.histogram(digit + in_lo.to(tl.int32) * BINS, 2 * BINS,
                                mask=valid & (in_lo | (prefix == prefix_hi)))
            hist_lo, hist_hi = _split_halves(tl.reshape(both, (2, BINS)), prefix_hi == prefix_lo)
        bin_hi, above_hi = _threshold_bin(hist_hi, need_hi, BINS)
        bin_lo, above_lo = _threshold_bin(hist_lo, need_lo, BINS)
        need_hi -= above_hi
        need_lo -= above_lo
        prefix_hi = (prefix_hi << SAMPLE_DIGIT_BITS) | bin_hi.to(tl.uint32)
        prefix_lo = (prefix_lo << SAMPLE_DIGIT_BITS) | bin_lo.to(tl.uint32)
    low_bits: tl.constexpr = 32 - SAMPLE_DIGIT_BITS * SAMPLE_LEVELS
    low_ones = (tl.full([], 1, tl.uint32) << low_bits) - 1
    return (prefix_hi << low_bits) | low_ones, prefix_lo << low_bits


@triton.jit(do_not_specialize=["width"])
def sparse_topk_sample_kernel(logits_ptr, lens_ptr, head_ptr, width, topk, logits_stride, SAMPLE: tl.constexpr,
                              PDL: tl.constexpr):
    """Step 1 of the split path: the keys hi and lo of each row from a sample
    of its scores, into head[row, 0:2]; zeroes head[row, 2:4]. Grid (T,)."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    if n > topk:
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        index = tl.arange(0, SAMPLE)
        # Groups of neighbours spread evenly over the window: whole cache
        # lines, and no part of the window left unsampled for long.
        spacing = n // (SAMPLE // SAMPLE_GROUP)
        spread_out = (index // SAMPLE_GROUP) * spacing + index % SAMPLE_GROUP
        exact = n <= SAMPLE
        positions = tl.where(exact, index, spread_out)
        valid = positions < n
        keys = _keys(tl.load(row_ptr + positions, mask=valid, other=0.0))
        count = tl.minimum(n, SAMPLE)
        r_hi, r_lo = _sample_ranks(count, n, topk)
        key_hi, key_lo = _sample_bounds(keys, valid, tl.maximum(r_hi, 1), tl.minimum(r_lo, count))
        key_hi = tl.where(r_hi >= 1, key_hi, 0xFFFFFFFF)
        head_row = head_ptr + row.to(tl.int64) * HEAD_STRIDE
        slots = tl.arange(0, 4)
        values = tl.where(slots == 0, key_hi.to(tl.int32, bitcast=True),
                          tl.where(slots == 1, key_lo.to(tl.int32, bitcast=True), 0))
        tl.store(head_row + slots, values)


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_filter_kernel(logits_ptr, lens_ptr, head_ptr, cand_ptr, out_ptr, table_ptr, width, topk,
                              logits_stride, out_stride, table_stride, max_blocks, block_size, chunk, capacity,
                              PAGED: tl.constexpr, BLOCK: tl.constexpr, AGGREGATE: tl.constexpr,
                              COARSE: tl.constexpr, PDL: tl.constexpr):
    """Step 2 of the split path: this chunk's winners to the output (slots
    0.. of the row), its candidates to the list cand[row, :capacity] (int64
    entries); the slots are reserved with the row's int64 counter. Slots
    past topk or capacity are counted, not written. Winners have a key above
    hi and candidates one in [lo, hi], or (COARSE) a coarse digit above
    (winners) or equal to (candidates) the bin holding the topk-th score (a
    row whose bin overflows the list is skipped: the last step selects it
    whole). Rows that fit in topk get their window. Grid (T, SPLIT)."""
    pdl_prologue(PDL)
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
            head_row = head_ptr + row.to(tl.int64) * HEAD_STRIDE
            if COARSE:
                chosen, _, inside = _coarse_split(head_row, topk)
                bound_hi = chosen
                bound_lo = chosen
                stop = tl.where(inside <= capacity, stop, start)
            else:
                bound_hi = tl.load(head_row).to(tl.uint32, bitcast=True)
                bound_lo = tl.load(head_row + 1).to(tl.uint32, bitcast=True)
            row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
            cand_row = cand_ptr + row.to(tl.int64) * capacity
            counters = (head_row + HEAD_COUNTERS).to(tl.pointer_type(tl.int64), bitcast=True)
            # The next block's load is issued before this block's atomic, so
            # their round trips overlap.
            scores = tl.load(row_ptr + start + tl.arange(0, BLOCK), mask=start + tl.arange(0, BLOCK) < stop,
                             other=0.0)
            for base in range(start, stop, BLOCK):
                offs = base + tl.arange(0, BLOCK)
                valid = offs < stop
                ahead = offs + BLOCK
                next_scores = tl.load(row_ptr + ahead, mask=ahead < stop, other=0.0)
                rank = _coarse_digit(scores) if COARSE else _keys(scores)
                win = valid & (rank > bound_hi)
                maybe = valid & (rank >= bound_lo) & (rank <= bound_hi)
                if AGGREGATE:
                    # One scan for both kinds (blocks are far below 2**16
                    # scores) and one atomic per block for both counters.
                    packed = win.to(tl.int32) + (maybe.to(tl.int32) << 16)
                    before = tl.cumsum(packed, 0) - packed
                    total = tl.sum(packed, 0)
                    taken = tl.atomic_add(counters, (total & 0xFFFF).to(tl.int64) | ((total >> 16).to(tl.int64) << 32),
                                          sem="relaxed")
                    win_slot = (taken & 0xFFFFFFFF).to(tl.int32) + (before & 0xFFFF)
                    maybe_slot = (taken >> 32).to(tl.int32) + (before >> 16)
                else:
                    # Each score that moves takes its slot with its own atomic.
                    lanes = counters + tl.zeros([BLOCK], dtype=tl.int32)
                    win_taken = tl.atomic_add(lanes, 1, mask=win, sem="relaxed")
                    maybe_taken = tl.atomic_add(lanes, 1 << 32, mask=maybe, sem="relaxed")
                    win_slot = (win_taken & 0xFFFFFFFF).to(tl.int32)
                    maybe_slot = (maybe_taken >> 32).to(tl.int32)
                _store_positions(out_row, win_slot, offs, win & (win_slot < topk), table_row, max_blocks,
                                 block_size, PAGED)
                # The score travels with its position: the last step then
                # reads the list alone, with no dependent gather from the row.
                entry = (scores.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs.to(tl.int64)
                tl.store(cand_row + maybe_slot, entry, mask=maybe & (maybe_slot < capacity))
                scores = next_scores


@triton.jit(do_not_specialize=["width", "max_blocks"])
def sparse_topk_candidates_kernel(logits_ptr, lens_ptr, head_ptr, cand_ptr, out_ptr, table_ptr, width, topk,
                                  logits_stride, out_stride, table_stride, max_blocks, block_size, capacity,
                                  PAGED: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr,
                                  RESIDENT: tl.constexpr, PDL: tl.constexpr):
    """Step 3 of the split path: a select over the row's candidates fills the
    slots the filter left; a row the sample misjudged, or whose candidates
    overflowed the list, is selected whole here. Up to RESIDENT entries are
    held in registers for the counting search (in a block of RESIDENT / 16,
    / 4, / 2 or RESIDENT); more are radix-selected, streamed BLOCK at a time.
    Grid (T,)."""
    pdl_prologue(PDL)
    row = tl.program_id(0)
    n = _window_length(lens_ptr, row, width)
    if n > topk:
        head_row = head_ptr + row.to(tl.int64) * HEAD_STRIDE
        # The int64 counter's halves (little-endian): winners, candidates.
        above = tl.load(head_row + HEAD_COUNTERS)
        inside = tl.load(head_row + HEAD_COUNTERS + 1)
        row_ptr = logits_ptr + row.to(tl.int64) * logits_stride
        out_row = out_ptr + row.to(tl.int64) * out_stride
        table_row = table_ptr + row.to(tl.int64) * table_stride
        # The list's entries [0, inside) with the filter's winners before
        # them, or (the sample misjudged, the list overflowed, or the coarse
        # bin did and the filter skipped the row) the whole row [0, n) from
        # slot 0.
        listed = (above <= topk) & (above + inside >= topk) & (inside <= capacity)
        stop = tl.where(listed, inside, n)
        first_slot = tl.where(listed, above, 0)
        cand_row = cand_ptr + row.to(tl.int64) * capacity
        # The usual cases: every entry stays in registers for the whole
        # search, in the smallest block of a ladder that holds the list (each
        # step costs per slot, used or not).
        if stop <= RESIDENT // 16:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RESIDENT // 16)
        elif stop <= RESIDENT // 4:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RESIDENT // 4)
        elif stop <= RESIDENT // 2:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RESIDENT // 2)
        elif stop <= RESIDENT:
            _select_resident(row_ptr, cand_row, stop, listed, first_slot, topk, out_row,
                             table_row, max_blocks, block_size, PAGED, RESIDENT)
        else:
            tau, need = _radix_threshold(row_ptr, cand_row, stop, listed, topk - first_slot, RADIX_BITS, BLOCK,
                                         True)
            _select(row_ptr, cand_row, out_row, stop, listed, tau, first_slot, topk - need, topk, table_row,
                    max_blocks, block_size, PAGED, BLOCK, True)
