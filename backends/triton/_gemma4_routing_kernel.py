"""The Gemma 4 routing kernel: one launch, several tokens per program.

Each logit becomes a 64-bit key: the float's order-preserving integer image in
the high half, ``0xFFFF - expert`` in the low half. The largest key is then the
largest logit, and among equal logits the lowest expert id - exactly SPEC §1's
order - and every key in a row is distinct, so "remove the winner" is one
comparison. The top K keys come either from K successive max-reductions
(METHOD 0) or from Triton's bitonic top-k (METHOD 1); which is faster depends
on K, E and the device, so it is a launch parameter.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Below every real key: real keys carry 0xFFFF - expert >= 0xFC00 in their low half.
_EMPTY_KEY = tl.constexpr(-(2**63))


@triton.jit
def _order_preserving_bits(x):
    """fp32 -> int32 whose signed order is the float order (-0.0 folded onto +0.0)."""
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _float_from_order_bits(ordered):
    bits = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
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
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < num_tokens
    col_ok = cols < num_experts
    x = tl.load(logits_ptr + rows[:, None] * row_stride + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    # Loaded now, beside the logits, so no dependent memory round trip follows the selection.
    scale_row = tl.load(scale_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)

    high = _order_preserving_bits(x).to(tl.int64) << 32
    keys = high | (0xFFFF - cols).to(tl.int64)[None, :]
    keys = tl.where(col_ok[None, :], keys, _EMPTY_KEY)

    slots = tl.arange(0, BLOCK_K)
    if METHOD == 0 or BLOCK_K == 1:  # (Triton 3.6's top-k cannot return a single column)
        top = tl.full([BLOCK_T, BLOCK_K], _EMPTY_KEY, tl.int64)
        for j in tl.static_range(TOPK):
            best = tl.max(keys, axis=1)
            top = tl.where(slots[None, :] == j, best[:, None], top)
            keys = tl.where(keys == best[:, None], _EMPTY_KEY, keys)
    else:
        top = tl.topk(keys, BLOCK_K)

    ids = 0xFFFF - (top & 0xFFFF).to(tl.int32)
    values = _float_from_order_bits((top >> 32).to(tl.int32))
    slot_ok = slots < TOPK
    out_ok = row_ok[:, None] & slot_ok[None, :]
    # Softmax over the K selected logits only (the others cancel out).
    values = tl.where(slot_ok[None, :], values, float("-inf"))
    peak = tl.max(values, axis=1)
    e = tl.where(slot_ok[None, :], tl.exp(values - peak[:, None]), 0.0)
    weights = e / tl.sum(e, axis=1)[:, None]
    # Unused slots (K < BLOCK_K) hold the empty key, whose id is out of range.
    gather_ids = tl.where(slot_ok[None, :], ids, 0)
    scale = tl.gather(tl.broadcast_to(scale_row[None, :], [BLOCK_T, BLOCK_E]), gather_ids, axis=1)
    out = rows[:, None] * TOPK + slots[None, :]
    tl.store(weights_ptr + out, weights * scale, mask=out_ok)
    tl.store(ids_ptr + out, ids, mask=out_ok)
