"""Triton kernels of ``mxfp4_moe``.

Two pipelines share the numerics helpers at the top:

* expert-grouped (any M): ``moe_count_kernel`` -> ``moe_plan_kernel`` ->
  ``moe_scatter_kernel`` sort the (token, slot) pairs by local expert on the
  GPU into row blocks of BLOCK_M, each block owned by one expert; then
  ``moe_grouped_gemm1_kernel`` (x rows gathered, W1 dequantised in registers,
  bias + activation in the epilogue, intermediate written once) and
  ``moe_grouped_gemm2_kernel`` (per-slot expert outputs in fp32) and
  ``moe_combine_kernel`` (the k slots of a token summed in slot order).
* token-major decode (small M*k): ``moe_decode_gemm1_kernel`` and
  ``moe_decode_gemm2_kernel``, one program per (slot, column block), then the
  same ``moe_combine_kernel`` - no routing metadata, no padding of a token to
  a tile.

MXFP4 bytes hold two E2M1 codes along K (low nibble = even element), so every
weight tile is consumed as an even half and an odd half against the matching
even/odd columns of the activations: no interleave in registers.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _e2m1_to_fp32(code):
    """E2M1 codes (int32 in [0, 16)) -> float32, by bits: a magnitude code
    ``m = 2e + f`` with ``e > 0`` is ``2**(e-1) * (1 + f/2)``, i.e. fp32 bits
    ``(m << 22) + (126 << 23)``; codes 0 and 1 are 0 and 0.5."""
    mag = code & 7
    bits = tl.where(mag > 1, (mag << 22) + 0x3F000000, mag * 0x3F000000)
    bits = bits | ((code & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_fp32(scale):
    """E8M0 bytes (int32) -> float32 ``2**(s-127)``; 0 is the subnormal
    2**-127 and 255 is NaN, as in rocmoe.formats.mxfp4."""
    bits = tl.where(scale == 0, 0x00400000, scale << 23)
    bits = tl.where(scale == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _mxfp4_bf16_bits(code, scale):
    """bf16 bits (int32) of E2M1 codes (int32 in [0, 16)) times ``2**(s-127)``
    for E8M0 bytes ``scale`` (int32): the scale is an add to the exponent
    field. A magnitude code ``m = 2e + f`` with ``e > 0`` is ``2**(e-1) * (1 +
    f/2)``: exponent field ``e + s - 1``, mantissa bit ``f``, i.e. ``(m << 6) +
    ((s - 1) << 7)``; code 1 (0.5) is exponent ``s - 1`` alone. Exact for
    ``2 <= s <= 252`` and NaN for 255. Past 252 the values are beyond bf16's
    range; at s <= 1 (2**-126 and below) the 0.5 code's subnormal reads 0 and
    s = 0 is read as 1 - a flush far below any weight's magnitude."""
    exp_base = (tl.maximum(scale, 1) - 1) << 7
    mag = code & 7
    bits = tl.where(mag > 1, (mag << 6) + exp_base, tl.where(mag == 1, exp_base, 0))
    return tl.where(scale == 255, 0x7FC0, bits | ((code & 8) << 12))


@triton.jit
def _dequant(packed, scale, BLOCK_KH: tl.constexpr, BLOCK_N: tl.constexpr, K_MAJOR: tl.constexpr,
             dtype: tl.constexpr):
    """(even, odd) tiles of ``dtype`` from packed bytes (int32, [BLOCK_KH,
    BLOCK_N] when K_MAJOR else [BLOCK_N, BLOCK_KH]) and their E8M0 bytes (one
    per 16 packed bytes along K, int32), broadcast in registers.

    bf16 is built from bits (no fp32 tile, half the registers); a NaN scale
    (255) gives NaN, a zero scale (2**-127) is read as 2**-126. Other dtypes
    (fp16, the interpreter's) go through exact fp32 products."""
    if K_MAJOR:
        scale = tl.reshape(tl.broadcast_to(scale[:, None, :], [BLOCK_KH // 16, 16, BLOCK_N]), [BLOCK_KH, BLOCK_N])
    else:
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], [BLOCK_N, BLOCK_KH // 16, 16]), [BLOCK_N, BLOCK_KH])
    if dtype == tl.bfloat16:
        even = _mxfp4_bf16_bits(packed & 15, scale).to(tl.int16).to(tl.bfloat16, bitcast=True)
        odd = _mxfp4_bf16_bits(packed >> 4, scale).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return even, odd
    else:
        mult = _e8m0_to_fp32(scale)
        return (_e2m1_to_fp32(packed & 15) * mult).to(dtype), (_e2m1_to_fp32(packed >> 4) * mult).to(dtype)


@triton.jit
def _mxfp4_tile(blocks_ptr, scales_ptr, rows, row_ok, byte0, k_bytes, BLOCK_KH: tl.constexpr,
                K_MAJOR: tl.constexpr, dtype: tl.constexpr):
    """Dequantised W[rows, 2*byte0 : 2*byte0 + 2*BLOCK_KH] of one expert's
    [N, K/2] packed bytes and [N, K/32] scales (``k_bytes`` = K/2) as (even,
    odd) tiles of ``dtype``: [BLOCK_KH, len(rows)] when K_MAJOR (a dot's right
    operand), else [len(rows), BLOCK_KH]. One scale byte is loaded per 16
    packed bytes."""
    BLOCK_N: tl.constexpr = rows.shape[0]
    kb = byte0 + tl.arange(0, BLOCK_KH)
    ks = byte0 // 16 + tl.arange(0, BLOCK_KH // 16)
    if K_MAJOR:
        packed = tl.load(blocks_ptr + rows[None, :] * k_bytes + kb[:, None],
                         mask=row_ok[None, :] & (kb < k_bytes)[:, None], other=0)
        scale = tl.load(scales_ptr + rows[None, :] * (k_bytes // 16) + ks[:, None],
                        mask=row_ok[None, :] & (ks < k_bytes // 16)[:, None], other=127)
    else:
        packed = tl.load(blocks_ptr + rows[:, None] * k_bytes + kb[None, :],
                         mask=row_ok[:, None] & (kb < k_bytes)[None, :], other=0)
        scale = tl.load(scales_ptr + rows[:, None] * (k_bytes // 16) + ks[None, :],
                        mask=row_ok[:, None] & (ks < k_bytes // 16)[None, :], other=127)
    return _dequant(packed.to(tl.int32), scale.to(tl.int32), BLOCK_KH, BLOCK_N, K_MAJOR, dtype)


@triton.jit
def _even_odd(ptr, row_starts, row_ok, byte0, BLOCK_KH: tl.constexpr, k_bytes):
    """Activation rows (element offsets ``row_starts``) from column 2*byte0,
    loaded contiguously as [rows, 2*BLOCK_KH] and split into the even and odd
    columns, each [rows, BLOCK_KH]."""
    BLOCK_M: tl.constexpr = row_starts.shape[0]
    cols = 2 * byte0 + tl.arange(0, 2 * BLOCK_KH)
    tile = tl.load(ptr + row_starts[:, None] + cols[None, :],
                   mask=row_ok[:, None] & (cols < 2 * k_bytes)[None, :], other=0.0)
    return tl.split(tl.reshape(tile, [BLOCK_M, BLOCK_KH, 2]))


@triton.jit
def _local_expert(ids, expert_map_ptr, num_global, num_experts, HAS_MAP: tl.constexpr):
    """Global expert ids (any int) -> local expert (int32), -1 where none."""
    if HAS_MAP:
        mapped = (ids >= 0) & (ids < num_global)
        ids = tl.load(expert_map_ptr + tl.where(mapped, ids, 0), mask=mapped, other=-1)
    return tl.where((ids >= 0) & (ids < num_experts), ids, -1).to(tl.int32)


@triton.jit
def _activate(gate, up, alpha, limit, ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr):
    """SPEC §2 activation on fp32 gate/up (ACTIVATION 0 = swigluoai, 1 = silu)."""
    if HAS_LIMIT:
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
    if ACTIVATION == 0:
        return gate / (1.0 + tl.exp(-alpha * gate)) * (up + 1.0)
    else:
        return gate / (1.0 + tl.exp(-gate)) * up


# --------------------------------------------------------------------------
# Routing metadata (expert-grouped pipeline)
# --------------------------------------------------------------------------

@triton.jit
def _chunk_experts(ids_ptr, ids_stride, expert_map_ptr, chunk, num_slots, num_global, num_experts,
                   TOPK: tl.constexpr, HAS_MAP: tl.constexpr, CHUNK: tl.constexpr):
    """Local expert of each slot of ``chunk`` (``num_experts`` where none)."""
    slot = chunk * CHUNK + tl.arange(0, CHUNK)
    live = slot < num_slots
    ids = tl.load(ids_ptr + (slot // TOPK) * ids_stride + slot % TOPK, mask=live, other=-1)
    expert = _local_expert(ids, expert_map_ptr, num_global, num_experts, HAS_MAP)
    return tl.where(expert >= 0, expert, num_experts)


@triton.jit(do_not_specialize=["num_slots"])
def moe_count_kernel(ids_ptr, ids_stride, expert_map_ptr, counts_ptr, num_slots, num_global, num_experts,
                     TOPK: tl.constexpr, HAS_MAP: tl.constexpr, CHUNK: tl.constexpr, E_PAD: tl.constexpr):
    """counts[chunk, e] = slots of ``chunk`` routed to local expert e."""
    chunk = tl.program_id(0)
    expert = _chunk_experts(ids_ptr, ids_stride, expert_map_ptr, chunk, num_slots, num_global, num_experts,
                            TOPK, HAS_MAP, CHUNK)
    tl.store(counts_ptr + chunk * E_PAD + tl.arange(0, E_PAD), tl.histogram(expert, E_PAD))


@triton.jit(do_not_specialize=["num_chunks"])
def moe_plan_kernel(counts_ptr, bases_ptr, expert_rows_ptr, expert_first_block_ptr, num_chunks, num_experts,
                    BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """One program: expert e owns blocks [first_block[e], first_block[e+1])
    (first_block[E] = blocks in use) and rows expert_rows[e]; bases[chunk, e]
    is where the chunk's e-slots start in the sorted order, minus their start
    in the chunk's own sorted order (so ``dest = base + sorted position``)."""
    expert = tl.arange(0, E_PAD)
    real = expert < num_experts
    total = tl.zeros([E_PAD], dtype=tl.int32)
    for chunk in range(num_chunks):
        total += tl.load(counts_ptr + chunk * E_PAD + expert)
    total = tl.where(real, total, 0)
    blocks = (total + BLOCK_M - 1) // BLOCK_M
    first_block = tl.cumsum(blocks, 0) - blocks
    tl.store(expert_rows_ptr + expert, total, mask=real)
    tl.store(expert_first_block_ptr + expert, first_block, mask=expert <= num_experts)
    running = first_block * BLOCK_M
    for chunk in range(num_chunks):
        count = tl.load(counts_ptr + chunk * E_PAD + expert)
        count = tl.where(real, count, 0)
        tl.store(bases_ptr + chunk * E_PAD + expert, running - (tl.cumsum(count, 0) - count))
        running += count


@triton.jit(do_not_specialize=["num_slots"])
def moe_scatter_kernel(ids_ptr, ids_stride, expert_map_ptr, bases_ptr, sorted_slots_ptr, block_expert_ptr,
                       num_slots, num_global, num_experts, TOPK: tl.constexpr, HAS_MAP: tl.constexpr,
                       CHUNK: tl.constexpr, E_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """Writes each routed slot to its row of the expert-sorted order (stable:
    by expert, then slot) and each block's expert at the block's first row."""
    chunk = tl.program_id(0)
    expert = _chunk_experts(ids_ptr, ids_stride, expert_map_ptr, chunk, num_slots, num_global, num_experts,
                            TOPK, HAS_MAP, CHUNK)
    key = tl.sort(expert * CHUNK + tl.arange(0, CHUNK))
    sorted_expert = key // CHUNK
    routed = sorted_expert < num_experts
    dest = tl.load(bases_ptr + chunk * E_PAD + sorted_expert, mask=routed, other=0) + tl.arange(0, CHUNK)
    tl.store(sorted_slots_ptr + dest, chunk * CHUNK + key % CHUNK, mask=routed)
    tl.store(block_expert_ptr + dest // BLOCK_M, sorted_expert, mask=routed & (dest % BLOCK_M == 0))


@triton.jit
def _block_rows(sorted_slots_ptr, block_expert_ptr, expert_rows_ptr, expert_first_block_ptr, block, num_experts,
                BLOCK_M: tl.constexpr):
    """(expert, slots [BLOCK_M], row mask) of a row block, or expert -1 when
    the block is past the blocks in use."""
    used = tl.load(expert_first_block_ptr + num_experts)
    in_use = block < used
    # Clamped rather than masked: a scalar masked load is not portable.
    expert = tl.load(block_expert_ptr + tl.maximum(tl.minimum(block, used - 1), 0))
    expert = tl.where(in_use, expert, -1)
    safe = tl.maximum(expert, 0)
    rows = tl.load(expert_rows_ptr + safe)
    first = tl.load(expert_first_block_ptr + safe)
    r = tl.arange(0, BLOCK_M)
    # in_use folded in as a vector compare: scalar & vector masks trip the interpreter.
    row_ok = ((block - first) * BLOCK_M + r < rows) & (block * BLOCK_M + r < used * BLOCK_M)
    slots = tl.load(sorted_slots_ptr + block * BLOCK_M + r, mask=row_ok, other=0)
    return expert, slots, row_ok


# --------------------------------------------------------------------------
# Expert-grouped GEMMs
# --------------------------------------------------------------------------

@triton.jit
def moe_grouped_gemm1_kernel(
    x_ptr, x_stride, router_w_ptr, w_blocks_ptr, w_scales_ptr, bias_ptr,
    sorted_slots_ptr, block_expert_ptr, expert_rows_ptr, expert_first_block_ptr, inter_ptr,
    hidden, inter, num_experts, alpha, limit,
    TOPK: tl.constexpr, ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr, HAS_BIAS: tl.constexpr,
    WEIGHT_ON_INPUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[block rows, n-block] = act(x[slots] @ W1[e]^T + b1[e]) for one row
    block (axis 0, fastest, so blocks sharing a weight tile run together) and
    BLOCK_N intermediate columns (axis 1). W1's rows are gate/up interleaved,
    so one [2*BLOCK_N]-row weight tile feeds one dot and the epilogue splits
    the accumulator's column pairs."""
    block = tl.program_id(0)
    n_block = tl.program_id(1)
    expert, slots, row_ok = _block_rows(sorted_slots_ptr, block_expert_ptr, expert_rows_ptr,
                                        expert_first_block_ptr, block, num_experts, BLOCK_M)
    if expert < 0:
        return
    dtype = x_ptr.dtype.element_ty
    x_rows = (slots // TOPK).to(tl.int64) * x_stride
    n2 = n_block * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    n2_ok = n2 < 2 * inter
    half_k = hidden // 2
    blocks_base = w_blocks_ptr + expert.to(tl.int64) * (2 * inter) * half_k
    scales_base = w_scales_ptr + expert.to(tl.int64) * (2 * inter) * (hidden // 32)
    if WEIGHT_ON_INPUT:
        row_scale = tl.load(router_w_ptr + slots, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, 2 * BLOCK_N], dtype=tl.float32)
    for byte0 in range(0, half_k, BLOCK_K // 2):
        x_even, x_odd = _even_odd(x_ptr, x_rows, row_ok, byte0, BLOCK_K // 2, half_k)
        if WEIGHT_ON_INPUT:
            x_even = (x_even.to(tl.float32) * row_scale[:, None]).to(dtype)
            x_odd = (x_odd.to(tl.float32) * row_scale[:, None]).to(dtype)
        w_even, w_odd = _mxfp4_tile(blocks_base, scales_base, n2, n2_ok, byte0, half_k, BLOCK_K // 2, True, dtype)
        acc = tl.dot(x_even, w_even, acc)
        acc = tl.dot(x_odd, w_odd, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * (2 * inter) + n2, mask=n2_ok, other=0.0)[None, :]
    gate, up = tl.split(tl.reshape(acc, [BLOCK_M, BLOCK_N, 2]))
    act = _activate(gate, up, alpha, limit, ACTIVATION, HAS_LIMIT)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(inter_ptr + rows[:, None] * inter + n[None, :], act.to(dtype),
             mask=row_ok[:, None] & (n < inter)[None, :])


@triton.jit
def moe_grouped_gemm2_kernel(
    inter_ptr, w_blocks_ptr, w_scales_ptr, bias_ptr,
    sorted_slots_ptr, block_expert_ptr, expert_rows_ptr, expert_first_block_ptr, contrib_ptr,
    hidden, inter, num_experts,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """contrib[slot, n-block] = inter[block rows] @ W2[e]^T + b2[e] in fp32."""
    block = tl.program_id(0)
    n_block = tl.program_id(1)
    expert, slots, row_ok = _block_rows(sorted_slots_ptr, block_expert_ptr, expert_rows_ptr,
                                        expert_first_block_ptr, block, num_experts, BLOCK_M)
    if expert < 0:
        return
    dtype = inter_ptr.dtype.element_ty
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    half_k = inter // 2
    blocks_base = w_blocks_ptr + expert.to(tl.int64) * hidden * half_k
    scales_base = w_scales_ptr + expert.to(tl.int64) * hidden * (inter // 32)
    a_rows = (block * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64) * inter
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for byte0 in range(0, half_k, BLOCK_K // 2):
        a_even, a_odd = _even_odd(inter_ptr, a_rows, row_ok, byte0, BLOCK_K // 2, half_k)
        w_even, w_odd = _mxfp4_tile(blocks_base, scales_base, n, n_ok, byte0, half_k, BLOCK_K // 2, True, dtype)
        acc = tl.dot(a_even, w_even, acc)
        acc = tl.dot(a_odd, w_odd, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * hidden + n, mask=n_ok, other=0.0)[None, :]
    dest = contrib_ptr + slots.to(tl.int64)[:, None] * hidden + n[None, :]
    tl.store(dest, acc, mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def moe_combine_kernel(contrib_ptr, router_w_ptr, ids_ptr, ids_stride, expert_map_ptr, out_ptr, out_stride,
                       hidden, num_global, num_experts, TOPK: tl.constexpr, HAS_MAP: tl.constexpr,
                       WEIGHT_ON_INPUT: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[token] = sum_j w[token, j] * contrib[token*k + j] in fp32, slot by
    slot (so the sum is bitwise reproducible), rounded once."""
    token = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < hidden
    acc = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOPK):
        expert = _local_expert(tl.load(ids_ptr + token * ids_stride + j), expert_map_ptr, num_global,
                               num_experts, HAS_MAP)
        if expert >= 0:
            y = tl.load(contrib_ptr + (token * TOPK + j) * hidden + h, mask=h_ok, other=0.0)
            if WEIGHT_ON_INPUT:
                acc += y
            else:
                acc += tl.load(router_w_ptr + token * TOPK + j) * y
    tl.store(out_ptr + token * out_stride + h, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


# --------------------------------------------------------------------------
# Token-major decode
# --------------------------------------------------------------------------

@triton.jit
def moe_decode_gemm1_kernel(
    x_ptr, x_stride, router_w_ptr, ids_ptr, ids_stride, expert_map_ptr, w_blocks_ptr, w_scales_ptr, bias_ptr,
    inter_ptr, hidden, inter, num_global, num_experts, alpha, limit,
    TOPK: tl.constexpr, HAS_MAP: tl.constexpr, ACTIVATION: tl.constexpr, HAS_LIMIT: tl.constexpr,
    HAS_BIAS: tl.constexpr, WEIGHT_ON_INPUT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """inter[slot, n-block] = act(W1[e] @ x[token] + b1[e]) for one slot
    (axis 1) and BLOCK_N intermediate columns (axis 0)."""
    n_block = tl.program_id(0)
    slot = tl.program_id(1)
    token = (slot // TOPK).to(tl.int64)
    expert = _local_expert(tl.load(ids_ptr + token * ids_stride + slot % TOPK), expert_map_ptr, num_global,
                           num_experts, HAS_MAP)
    if expert < 0:
        return
    dtype = x_ptr.dtype.element_ty
    n2 = n_block * 2 * BLOCK_N + tl.arange(0, 2 * BLOCK_N)
    n2_ok = n2 < 2 * inter
    half_k = hidden // 2
    blocks_base = w_blocks_ptr + expert.to(tl.int64) * (2 * inter) * half_k
    scales_base = w_scales_ptr + expert.to(tl.int64) * (2 * inter) * (hidden // 32)
    x_row = tl.zeros([1], dtype=tl.int64) + token * x_stride
    x_ok = tl.full([1], True, tl.int1)
    acc = tl.zeros([2 * BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    for byte0 in range(0, half_k, BLOCK_K // 2):
        x_even, x_odd = _even_odd(x_ptr, x_row, x_ok, byte0, BLOCK_K // 2, half_k)
        if WEIGHT_ON_INPUT:
            row_scale = tl.load(router_w_ptr + slot)
            x_even = (x_even.to(tl.float32) * row_scale).to(dtype)
            x_odd = (x_odd.to(tl.float32) * row_scale).to(dtype)
        w_even, w_odd = _mxfp4_tile(blocks_base, scales_base, n2, n2_ok, byte0, half_k, BLOCK_K // 2, False, dtype)
        acc += w_even.to(tl.float32) * x_even.to(tl.float32) + w_odd.to(tl.float32) * x_odd.to(tl.float32)
    h = tl.sum(acc, axis=1)
    if HAS_BIAS:
        h += tl.load(bias_ptr + expert * (2 * inter) + n2, mask=n2_ok, other=0.0)
    gate, up = tl.split(tl.reshape(h, [BLOCK_N, 2]))
    act = _activate(gate, up, alpha, limit, ACTIVATION, HAS_LIMIT)
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(inter_ptr + slot.to(tl.int64) * inter + n, act.to(dtype), mask=n < inter)


@triton.jit
def moe_decode_gemm2_kernel(
    inter_ptr, ids_ptr, ids_stride, expert_map_ptr, w_blocks_ptr, w_scales_ptr, bias_ptr, contrib_ptr,
    hidden, inter, num_global, num_experts,
    TOPK: tl.constexpr, HAS_MAP: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """contrib[slot, n-block] = W2[e] @ inter[slot] + b2[e] in fp32, one slot
    per program (axis 1): a token's k experts stream their weights in
    parallel; ``moe_combine_kernel`` then sums the slots in order."""
    n_block = tl.program_id(0)
    slot = tl.program_id(1)
    token = (slot // TOPK).to(tl.int64)
    expert = _local_expert(tl.load(ids_ptr + token * ids_stride + slot % TOPK), expert_map_ptr, num_global,
                           num_experts, HAS_MAP)
    if expert < 0:
        return
    n = n_block * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < hidden
    half_k = inter // 2
    blocks_base = w_blocks_ptr + expert.to(tl.int64) * hidden * half_k
    scales_base = w_scales_ptr + expert.to(tl.int64) * hidden * (inter // 32)
    a_row = tl.zeros([1], dtype=tl.int64) + slot.to(tl.int64) * inter
    a_ok = tl.full([1], True, tl.int1)
    acc = tl.zeros([BLOCK_N, BLOCK_K // 2], dtype=tl.float32)
    for byte0 in range(0, half_k, BLOCK_K // 2):
        a_even, a_odd = _even_odd(inter_ptr, a_row, a_ok, byte0, BLOCK_K // 2, half_k)
        w_even, w_odd = _mxfp4_tile(blocks_base, scales_base, n, n_ok, byte0, half_k, BLOCK_K // 2, False,
                                    inter_ptr.dtype.element_ty)
        acc += w_even.to(tl.float32) * a_even.to(tl.float32) + w_odd.to(tl.float32) * a_odd.to(tl.float32)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + expert * hidden + n, mask=n_ok, other=0.0)
    tl.store(contrib_ptr + slot.to(tl.int64) * hidden + n, y, mask=n_ok)
