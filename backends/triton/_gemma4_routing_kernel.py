"""The Gemma 4 routing kernel: one launch, several tokens per program.

Each logit becomes a key whose integer order is SPEC §1's order: the float's
order-preserving integer image in the high bits, ``mask - expert`` in the low
bits, so the largest key is the largest logit and, among equal logits, the
lowest expert id; keys in a row are distinct, so "remove the winner" is one
comparison. The top K keys come from K successive max-reductions (METHOD 0)
or Triton's bitonic top-k (METHOD 1).

Keys are 64-bit (exact: all 32 float bits, then the id) or 32-bit (KEY_BITS):
the float's low log2(BLOCK_E) bits make room for the id. For bf16 and fp16
logits those bits are zero after widening, so 32-bit keys are exact. For fp32
logits (GUARD) one extra key is selected: if no two adjacent keys among the
top K+1 share their high part, the high parts are strictly decreasing, every
other element is strictly smaller than the K-th, and selection and order are
exact; otherwise the tile is redone with 64-bit keys. The softmax always uses
the exact logits (gathered by id), never the truncated keys.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Below every real key: real 64-bit keys carry 0xFFFF - expert >= 0xFC00 in the
# low half; real 32-bit keys are clamped above it.
_EMPTY64 = tl.constexpr(-(2**63))
_EMPTY32 = tl.constexpr(-(2**31))


@triton.jit
def _order_preserving_bits(x):
    """fp32 -> int32 whose signed order is the float order (-0.0 folded onto +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _top_keys(keys, empty, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, COUNT: tl.constexpr,
              METHOD: tl.constexpr):
    """The COUNT largest keys of each row, descending, in a [BLOCK_T, BLOCK_K] tile."""
    slots = tl.arange(0, BLOCK_K)
    if METHOD == 0 or BLOCK_K == 1:  # (Triton 3.6's top-k cannot return a single column)
        top = tl.full([BLOCK_T, BLOCK_K], empty, keys.dtype)
        for j in tl.static_range(COUNT):
            best = tl.max(keys, axis=1)
            top = tl.where(slots[None, :] == j, best[:, None], top)
            keys = tl.where(keys == best[:, None], empty, keys)
    else:
        top = tl.topk(keys, BLOCK_K)
    return top


@triton.jit
def _select_exact(x, cols, col_ok, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, TOPK: tl.constexpr,
                  METHOD: tl.constexpr):
    """64-bit keys: ids of the TOPK largest logits, [BLOCK_T, BLOCK_K] int32."""
    keys = (_order_preserving_bits(x).to(tl.int64) << 32) | (0xFFFF - cols).to(tl.int64)[None, :]
    keys = tl.where(col_ok[None, :], keys, _EMPTY64)
    top = _top_keys(keys, _EMPTY64, BLOCK_T, BLOCK_K, TOPK, METHOD)
    return 0xFFFF - (top & 0xFFFF).to(tl.int32)


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
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    METHOD: tl.constexpr,
    KEY_BITS: tl.constexpr,
    GUARD: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    x = tl.load(logits_ptr + rows[:, None] * row_stride + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # Loaded now, beside the logits, so no dependent memory round trip follows the selection.
    scale_row = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    slots = tl.arange(0, BLOCK_K)
    slot_ok = slots < TOPK

    if KEY_BITS == 64:
        ids = _select_exact(x, cols, col_ok, BLOCK_T, BLOCK_K, TOPK, METHOD)
    else:
        id_mask: tl.constexpr = BLOCK_E - 1
        high = tl.maximum(_order_preserving_bits(x) & (-BLOCK_E), _EMPTY32 + BLOCK_E)
        keys = tl.where(col_ok[None, :], high | (id_mask - cols)[None, :], _EMPTY32)
        if GUARD:
            # One extra key (the K+1-th) shows whether the boundary is a near-tie.
            top = _top_keys(keys, _EMPTY32, BLOCK_T, BLOCK_K, TOPK + 1, 0)
            next_slot = tl.broadcast_to(tl.minimum(slots + 1, BLOCK_K - 1)[None, :], [BLOCK_T, BLOCK_K])
            following = tl.gather(top, next_slot, axis=1)
            near_tie = (top & (-BLOCK_E)) == (following & (-BLOCK_E))
            near_tie = near_tie & slot_ok[None, :] & row_ok[:, None] & (following != _EMPTY32)
            ids = id_mask - (top & id_mask)
            if tl.max(near_tie.to(tl.int32)) > 0:
                ids = _select_exact(x, cols, col_ok, BLOCK_T, BLOCK_K, TOPK, METHOD)
        else:
            top = _top_keys(keys, _EMPTY32, BLOCK_T, BLOCK_K, TOPK, METHOD)
            ids = id_mask - (top & id_mask)

    out_ok = row_ok[:, None] & slot_ok[None, :]
    # Unused slots (K < BLOCK_K) hold the empty key, whose id is out of range.
    ids = tl.where(slot_ok[None, :], ids, 0)
    values = tl.gather(x, ids, axis=1)
    scale = tl.gather(tl.broadcast_to(scale_row[None, :], [BLOCK_T, BLOCK_E]), ids, axis=1)
    # Softmax over the K selected logits only (the others cancel out).
    values = tl.where(slot_ok[None, :], values, float("-inf"))
    peak = tl.max(values, axis=1)
    e = tl.where(slot_ok[None, :], tl.exp(values - peak[:, None]), 0.0)
    weights = e / tl.sum(e, axis=1)[:, None]
    out = rows[:, None] * TOPK + slots[None, :]
    tl.store(weights_ptr + out, weights * scale, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)
