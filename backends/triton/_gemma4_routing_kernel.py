"""The Gemma 4 routing kernel: one launch, several tokens per program.

Layout. A program loads its logits as [NCHUNK * BLOCK_T, CHUNK] (chunk c of
token t in row c * BLOCK_T + t) and views them as [NCHUNK, BLOCK_T, CHUNK].
CHUNK is LANES vectors of VEC logits (16 bytes where the row is long
enough), so LANES consecutive lanes read one token's chunk (coalesced), a
2-D load has the same layout in every Triton version (threads along CHUNK,
then along the tokens), and, because BLOCK_T is a multiple of the tokens the
threads cover, each thread's repeats are the same token's other chunks. A
thread therefore holds NCHUNK * VEC logits of one token and a token spans
LANES lanes: a reduction over the token is register work plus log2(LANES)
shuffles (one `redux` when a token fills a warp).

Keys. Each logit becomes a key whose order is SPEC §1's order: the logit's
signed magnitude (its bits read as sign and magnitude, so -0.0 and +0.0 meet)
above ``BLOCK_E - 1 - expert`` in the low LOG_E bits, so the largest key is
the largest logit and, among equal logits, the lowest expert id. Every key of
a token is distinct (padding columns too), which makes the selection a
chain: the next key is the largest key below the previous one, found as the
smallest non-negative difference ``previous - 1 - key`` (a subtract and an
unsigned min per element). Keys stay below 2^30 in magnitude so the
difference cannot overflow; where they fit in 23 bits they are kept as exact
fp32 integers instead (KEY_KIND 2), because NVIDIA runs float adds at twice
the rate of integer adds.

Width. bf16 and fp16 logits keep all 16 bits: selection, order and the
logits recovered from the keys are exact. fp32 logits keep VALUE_BITS of
their 32 (GUARD), and one extra key is selected: if no two adjacent keys
among the top K+1 share their value bits, those bits strictly decrease, every
other logit is strictly smaller than the K-th, and selection and order are
exact; otherwise the tile is redone with 64-bit keys (KEY_KIND 1, all 32
bits). The fp32 softmax reads the exact logits back by id (the row is still
in cache), never the truncated keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

from rocmoe.backends.triton._common import pdl_prologue


@triton.jit
def _signed_magnitude(raw, INPUT_BITS: tl.constexpr):
    """Raw float bits (sign-extended to int32) -> the signed integer whose
    order is the float order: +magnitude or -magnitude, so -0.0 and +0.0 meet
    at 0. Range [-(2^(INPUT_BITS-1) - 1), 2^(INPUT_BITS-1) - 1]."""
    negative = raw >> 31  # 0 or -1
    return (raw ^ (negative & ((1 << (INPUT_BITS - 1)) - 1))) - negative


@triton.jit
def _logits_from_value(value, INPUT_BITS: tl.constexpr, INPUT_DTYPE: tl.constexpr):
    """Inverse of _signed_magnitude (int32 -> the float, as fp32)."""
    raw = tl.where(value < 0, (-value) | (-(1 << (INPUT_BITS - 1))), value)
    if INPUT_BITS == 16:
        return raw.to(tl.int16).to(INPUT_DTYPE, bitcast=True).to(tl.float32)
    return raw.to(tl.float32, bitcast=True)


@triton.jit
def _row_max(tile):
    """[NCHUNK, BLOCK_T, CHUNK] -> [BLOCK_T]: the chunk axis (registers) first, then CHUNK
    (registers, then across the token's lanes)."""
    return tl.max(tl.max(tile, axis=0), axis=1)


@triton.jit
def _row_min(tile):
    return tl.min(tl.min(tile, axis=0), axis=1)


@triton.jit
def _per_row(value):
    """[BLOCK_T] -> [1, BLOCK_T, 1], expanded in the reverse order of _row_max's
    reductions so the layout is the tile's own (no conversion per step)."""
    return tl.expand_dims(tl.expand_dims(value, 1), 0)


# Float keys are exact integers in [2^23, 2^24): this bit pattern is 2^23 (exponent 23, mantissa 0).
_FLOAT_KEY_BASE = tl.constexpr(0x4B000000)


@triton.jit
def _make_keys(raw, col, col_ok, INPUT_BITS: tl.constexpr, LOG_E: tl.constexpr, VALUE_BITS: tl.constexpr,
               KEY_KIND: tl.constexpr, PAD: tl.constexpr):
    """Distinct per-token keys for a [NCHUNK, BLOCK_T, CHUNK] tile of raw bits:
    the value part (VALUE_BITS of the signed magnitude) above LOG_E id bits.
    Padding columns get the value part -2^(VALUE_BITS-1), below every logit's.
    KEY_KIND 0: int32; 1: int64 (exact fp32); 2: fp32 holding the int32 key
    plus 2^(VALUE_BITS+LOG_E-1), an integer below 2^23, plus 2^23 - so a
    float add forms the differences (on NVIDIA's full-rate pipe, where an
    integer add runs at half rate)."""
    value = _signed_magnitude(raw, INPUT_BITS)
    if KEY_KIND == 1:
        value = value.to(tl.int64)
    elif VALUE_BITS < INPUT_BITS:
        value = value >> (INPUT_BITS - VALUE_BITS)
    if PAD:
        value = tl.where(col_ok, value, -(1 << (VALUE_BITS - 1)))
    ids = (1 << LOG_E) - 1 - col
    if KEY_KIND == 2:
        keys = (value * (1 << LOG_E) + (ids + ((1 << (VALUE_BITS + LOG_E - 1)) + _FLOAT_KEY_BASE))).to(
            tl.float32, bitcast=True)
    else:
        keys = (value << LOG_E) | ids
    return keys


@triton.jit
def _key_bits(top, LOG_E: tl.constexpr, VALUE_BITS: tl.constexpr, KEY_KIND: tl.constexpr):
    """Selected keys -> (id part, value part) as int32."""
    if KEY_KIND == 2:
        top = top.to(tl.int32, bitcast=True) - ((1 << (VALUE_BITS + LOG_E - 1)) + _FLOAT_KEY_BASE)
    ids = ((1 << LOG_E) - 1 - (top & ((1 << LOG_E) - 1))).to(tl.int32)
    return ids, (top >> LOG_E).to(tl.int32)


@triton.jit
def _slot_tile(col, CHUNK: tl.constexpr, VEC: tl.constexpr, SPL: tl.constexpr):
    """[NCHUNK, BLOCK_T, CHUNK] int32: the output slot each register keeps
    (-1: none). Slot ``lane * SPL + s`` sits in the first chunk, at the
    lane's element ``s * VEC / SPL``, so which register it is is known at
    compile time."""
    inner = col % VEC
    step: tl.constexpr = VEC // SPL
    return tl.where((col < CHUNK) & (inner % step == 0), (col // VEC) * SPL + inner // step, -1)


@triton.jit
def _compact(tile, BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, VEC: tl.constexpr, SPL: tl.constexpr):
    """[NCHUNK, BLOCK_T, CHUNK] with one live register per slot -> [BLOCK_T, CHUNK / VEC * SPL],
    column = slot (max-combines the registers; the dead ones hold the dtype's minimum)."""
    step: tl.constexpr = VEC // SPL
    return tl.max(tl.reshape(tl.max(tile, axis=0), [BLOCK_T, CHUNK // step, step]), axis=2)


@triton.jit
def _select_top(keys, slot, COUNT: tl.constexpr, OUT: tl.constexpr, LOG_E: tl.constexpr, TRACK_TIES: tl.constexpr,
                BLOCK_T: tl.constexpr, CHUNK: tl.constexpr, VEC: tl.constexpr, SPL: tl.constexpr):
    """The COUNT largest keys of each token, descending, chained; the first
    OUT come back as [BLOCK_T, columns] with column = slot (SPL > 0: the
    compact layout of _slot_tile; SPL == 0, when a lane's first chunk cannot
    hold its slots: [BLOCK_T, OUT], every lane of a token keeping every
    slot), and per token whether two adjacent keys share their value bits
    (only when TRACK_TIES)."""
    unsigned: tl.constexpr = tl.uint64 if keys.dtype == tl.int64 else tl.uint32
    lowest: tl.constexpr = float("-inf") if keys.dtype == tl.float32 else (
        -(2**63) if keys.dtype == tl.int64 else -(2**31))
    if keys.dtype == tl.float32:
        # Float keys are positive, so their bits order like them: an integer max takes 3 inputs.
        best = _row_max(keys.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    else:
        best = _row_max(keys)
    if SPL > 0:
        kept = tl.where(slot == 0, _per_row(best), lowest)
    else:
        columns = tl.arange(0, OUT)[None, :]
        top = tl.broadcast_to(best[:, None], [BLOCK_T, OUT])
    tie = tl.zeros(best.shape, tl.int1)
    for j in tl.static_range(1, COUNT):
        below = best - 1
        # Keys >= best give negative gaps, huge as unsigned bits (int: by wrapping; float: by the
        # sign bit), so the smallest gap is the next key down. Float gaps are exact integers.
        gap = _row_min((_per_row(below) - keys).to(unsigned, bitcast=True))
        following = below - gap.to(keys.dtype, bitcast=True)
        if TRACK_TIES:
            tie = tie | ((following >> LOG_E) == (best >> LOG_E))
        best = following
        if j < OUT:
            if SPL > 0:
                kept = tl.where(slot == j, _per_row(best), kept)
            else:
                top = tl.where(columns == j, best[:, None], top)
    if SPL > 0:
        top = _compact(kept, BLOCK_T, CHUNK, VEC, SPL)
    return top, tie


@triton.jit(do_not_specialize=["num_tokens"])
def gemma4_routing_kernel(
    logits_ptr,  # [T, E] fp32/bf16/fp16, unit stride along E
    scale_ptr,  # [E] fp32/bf16
    weights_ptr,  # [T, TOPK] fp32 out
    ids_ptr,  # [T, TOPK] int32 out
    num_tokens,
    num_experts,
    row_stride,
    TOPK: tl.constexpr,
    BLOCK_T: tl.constexpr,
    NCHUNK: tl.constexpr,
    LANES: tl.constexpr,
    VEC: tl.constexpr,
    SPL: tl.constexpr,
    OUT: tl.constexpr,
    LOG_E: tl.constexpr,
    PAD: tl.constexpr,
    VALUE_BITS: tl.constexpr,
    KEY_KIND: tl.constexpr,
    GUARD: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl_prologue(PDL)
    INPUT_DTYPE: tl.constexpr = logits_ptr.dtype.element_ty
    INPUT_BITS: tl.constexpr = INPUT_DTYPE.primitive_bitwidth
    RAW_DTYPE: tl.constexpr = tl.int16 if INPUT_BITS == 16 else tl.int32
    CHUNK: tl.constexpr = LANES * VEC
    first = tl.program_id(0).to(tl.int64) * BLOCK_T
    flat = tl.arange(0, NCHUNK * BLOCK_T)
    flat_rows = first + flat % BLOCK_T
    flat_col = (flat // BLOCK_T * CHUNK)[:, None] + tl.arange(0, CHUNK)[None, :]
    flat_ok = (flat_rows < num_tokens)[:, None]
    if PAD:
        flat_ok = flat_ok & (flat_col < num_experts)
    flat_raw = tl.load(logits_ptr.to(tl.pointer_type(RAW_DTYPE)) + flat_rows[:, None] * row_stride + flat_col,
                       mask=flat_ok, other=0)
    raw = tl.reshape(flat_raw, [NCHUNK, BLOCK_T, CHUNK]).to(tl.int32)
    # Each register's column is a compile-time function of its lane; the `& 0` (folded away)
    # ties col, and so every per-column tile, to the logits' layout.
    col = (tl.arange(0, NCHUNK)[:, None, None] * CHUNK + tl.arange(0, CHUNK)[None, None, :]) | (raw & 0)
    col_ok = col < num_experts
    rows = first + tl.arange(0, BLOCK_T)
    row_ok = rows < num_tokens
    slot = _slot_tile(col, CHUNK, VEC, max(SPL, 1))

    top, tie = _select_top(_make_keys(raw, col, col_ok, INPUT_BITS, LOG_E, VALUE_BITS, KEY_KIND, PAD), slot,
                           TOPK + 1 if GUARD else TOPK, OUT, LOG_E, GUARD, BLOCK_T, CHUNK, VEC, SPL)
    ids, values = _key_bits(top, LOG_E, VALUE_BITS, KEY_KIND)
    if GUARD:  # noqa: SIM102 - a compile-time branch around a runtime one
        # fp32 logits with truncated keys: redo the tile with exact 64-bit keys on a near-tie.
        if tl.max((tie & row_ok).to(tl.int32)) > 0:
            wide, _ = _select_top(_make_keys(raw, col, col_ok, INPUT_BITS, LOG_E, 32, 1, PAD), slot, TOPK, OUT,
                                  LOG_E, False, BLOCK_T, CHUNK, VEC, SPL)
            ids, _ = _key_bits(wide, LOG_E, 32, 1)

    if SPL > 0:
        slots = _compact(slot, BLOCK_T, CHUNK, VEC, SPL)
    else:
        slots = tl.broadcast_to(tl.arange(0, OUT)[None, :], [BLOCK_T, OUT])
    slot_ok = (slots >= 0) & (slots < TOPK)
    out_ok = row_ok[:, None] & slot_ok
    ids = tl.where(slot_ok, ids, 0)
    if GUARD:
        # Truncated keys: the exact logits by id (this row was just read, so they come from cache).
        logits = tl.load(logits_ptr + rows[:, None] * row_stride + ids, mask=out_ok, other=0.0).to(tl.float32)
    else:
        logits = _logits_from_value(values, INPUT_BITS, INPUT_DTYPE)
    scale = tl.load(scale_ptr + ids, mask=out_ok, other=0.0).to(tl.float32)
    # Softmax over the K selected logits only (the others cancel out).
    logits = tl.where(slot_ok, logits, float("-inf"))
    peak = tl.max(logits, axis=1)
    e = tl.where(slot_ok, tl.exp(logits - peak[:, None]), 0.0)
    weights = e / tl.sum(e, axis=1)[:, None]
    out = rows[:, None] * TOPK + slots
    tl.store(weights_ptr + out, weights * scale, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)
