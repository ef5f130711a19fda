"""AITER backend of ``mxfp4_moe``: AITER's fused MoE with bf16 activations and
MXFP4 (per-1x32) weights - its CK tile "a16w4" kernels, gfx950 only.

What AITER computes there, and what it does not:
- activation: its Swiglu is gpt-oss's ``swigluoai`` with alpha 1.702 and limit
  7.0 fixed; other alphas and limits, and ``silu`` (for which AITER quantises
  the activations to MXFP4 as well, a4w4, outside SPEC's tolerance), are
  refused with a reason;
- W1's rows are gate rows then up rows (``concatenated``): gpt-oss's
  interleaved rows are reordered once, at conversion;
- H and I are padded to multiples of 256 (its shuffles and tiles); padded
  weights are E2M1 zeros (scale byte 127), padded x columns are zeros, so the
  result is exact; the output is sliced back to H;
- expert parallelism: AITER takes a 0/1 ``expert_mask`` over global ids and
  numbers the local experts in global order, so ``expert_map`` must do the
  same (checked once per map); id -1 and out-of-range ids are routed to one
  extra global slot whose mask is 0 (no host sync);
- ``apply_router_weight_on_input``: AITER's ``doweight_stage1`` scales after
  the activation, which is not SPEC's x * w before W1; refused.

Everything here but :func:`to_aiter_layout` and :meth:`AiterMxfp4Moe.run` is
plain torch and is tested on the CPU; those two call AITER and run in the
``rocm``-marked tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from rocmoe.device import Device
from rocmoe.registry import BackendOp

__all__ = ["AiterMoeWeights", "padded", "checkpoint_to_aiter_order", "to_aiter_layout", "aiter_expert_mask",
           "route_ids", "IMPLEMENTATION"]

#: Archs with AITER's a16w4 MoE kernels (CK tile, native MXFP4 matrix cores).
A16W4_ARCHS = frozenset({"gfx950"})
#: AITER's Swiglu constants (fixed in its kernels).
SWIGLU_ALPHA = 1.702
SWIGLU_LIMIT = 7.0
#: H and I are padded to this: shuffle_scale_a16w4 needs K/32 % 8 == 0 and K >= 256.
PAD_TO = 256
#: E8M0 byte of 2**0, used for padded scales (255 would be NaN, and 0 * NaN = NaN).
E8M0_ONE = 127


def padded(n: int, multiple: int = PAD_TO) -> int:
    """``n`` rounded up to a multiple of ``multiple``."""
    return -(-n // multiple) * multiple


@dataclass(frozen=True)
class AiterMoeWeights:
    """One layer's experts in AITER's layout (after :func:`to_aiter_layout`).

    w1: float4_e2m1fn_x2 [E, 2*Ip, Hp/2], gate rows then up rows, a16w4-shuffled.
    w1_scale: float8_e8m0fnu [E*2*Ip, Hp/32], shuffled. w2: [E, Hp, Ip/2];
    w2_scale: [E*Hp, Ip/32]. b1: float32 [E, 2*Ip] or None; b2: float32 [E, Hp].
    """

    w1: torch.Tensor
    w1_scale: torch.Tensor
    w2: torch.Tensor
    w2_scale: torch.Tensor
    b1: torch.Tensor | None
    b2: torch.Tensor | None
    hidden: int
    hidden_padded: int
    inter: int
    inter_padded: int


def _pad_rows_cols(t: torch.Tensor, rows: int, cols: int, value: int | float) -> torch.Tensor:
    """Pad the last two dims of ``t`` to [rows, cols] with ``value``."""
    return F.pad(t, (0, cols - t.shape[-1], 0, rows - t.shape[-2]), value=value)


def checkpoint_to_aiter_order(weights) -> dict[str, torch.Tensor | None]:
    """The checkpoint tensors reordered and padded for AITER, before its shuffles.

    Returns uint8 ``w1`` [E, 2*Ip, Hp/2] (gate rows [0, Ip), up rows [Ip, 2Ip)),
    ``w1_scale`` [E, 2*Ip, Hp/32], ``w2`` [E, Hp, Ip/2], ``w2_scale`` [E, Hp, Ip/32],
    float32 ``b1`` [E, 2*Ip] and ``b2`` [E, Hp] (or None), where Hp and Ip are
    H and I padded to :data:`PAD_TO`. Padding is E2M1 zero with scale 2**0 and
    zero bias, so padded rows and columns contribute exactly nothing.
    """
    experts, hidden, inter = weights.num_experts, weights.hidden_size, weights.intermediate_size
    hp, ip = padded(hidden), padded(inter)

    def gate_up_halves(t: torch.Tensor) -> torch.Tensor:  # [E, 2I, ...] -> [E, 2, I, ...]
        if weights.gate_up == "interleaved":
            return t.unflatten(1, (inter, 2)).transpose(1, 2)
        return t.unflatten(1, (2, inter))

    def w1_like(t: torch.Tensor, cols: int, value: int) -> torch.Tensor:
        halves = gate_up_halves(t)  # [E, 2, I, k]
        return _pad_rows_cols(halves, ip, cols, value).reshape(experts, 2 * ip, cols).contiguous()

    order = {
        "w1": w1_like(weights.w1_blocks, hp // 2, 0),
        "w1_scale": w1_like(weights.w1_scales, hp // 32, E8M0_ONE),
        "w2": _pad_rows_cols(weights.w2_blocks, hp, ip // 2, 0).contiguous(),
        "w2_scale": _pad_rows_cols(weights.w2_scales, hp, ip // 32, E8M0_ONE).contiguous(),
        "b1": None,
        "b2": None,
    }
    if weights.b1 is not None:
        b1 = gate_up_halves(weights.b1.float())  # [E, 2, I]
        order["b1"] = F.pad(b1, (0, ip - inter)).reshape(experts, 2 * ip).contiguous()
    if weights.b2 is not None:
        order["b2"] = F.pad(weights.b2.float(), (0, hp - hidden)).contiguous()
    return order


def to_aiter_layout(weights) -> AiterMoeWeights:
    """Convert once (``Mxfp4MoeWeights.converted``): reorder and pad, then
    AITER's own a16w4 weight and scale shuffles, viewed as its fp4/e8m0 dtypes."""
    from aiter import dtypes
    from aiter.ops.shuffle import shuffle_scale_a16w4, shuffle_weight_a16w4

    order = checkpoint_to_aiter_order(weights)
    experts = weights.num_experts
    w1 = shuffle_weight_a16w4(order["w1"], 16, True).view(dtypes.fp4x2)
    w2 = shuffle_weight_a16w4(order["w2"], 16, False).view(dtypes.fp4x2)
    w1_scale = shuffle_scale_a16w4(order["w1_scale"].flatten(0, 1), experts, True).view(dtypes.fp8_e8m0)
    w2_scale = shuffle_scale_a16w4(order["w2_scale"].flatten(0, 1), experts, False).view(dtypes.fp8_e8m0)
    return AiterMoeWeights(w1, w1_scale, w2, w2_scale, order["b1"], order["b2"], weights.hidden_size,
                           padded(weights.hidden_size), weights.intermediate_size, padded(weights.intermediate_size))


def aiter_expert_mask(expert_map: torch.Tensor | None, num_local: int) -> torch.Tensor:
    """AITER's ``expert_mask``: int32 [E_global + 1], 1 where the global expert is
    local; the extra last slot (always 0) is where :func:`route_ids` sends id -1
    and out-of-range ids. Without ``expert_map`` every one of the ``num_local``
    experts is local.

    AITER numbers the local experts in global order (``cumsum(mask) - 1``), so
    ``expert_map``'s local ids must be 0, 1, 2... in the order of the global
    ids; anything else raises ValueError (this reads the map: a host sync).
    """
    if expert_map is None:
        mask = torch.ones(num_local + 1, dtype=torch.int32)
        mask[-1] = 0
        return mask
    local = expert_map >= 0
    ranks = torch.cumsum(local.to(torch.int32), 0) - 1
    consistent = bool(torch.equal(torch.where(local, ranks, -1), expert_map.to(torch.int32)))
    count = int(local.sum())
    if not consistent or count != num_local:
        raise ValueError(
            f"expert_map must number the local experts 0..{num_local - 1} in the order of their global ids "
            f"(AITER's expert_mask convention) and hold {num_local} of them; got {count} local experts"
            f"{'' if consistent else ' out of global order'}; use backend='triton' for another numbering")
    return torch.cat([local.to(torch.int32), local.new_zeros(1, dtype=torch.int32)])


def route_ids(topk_ids: torch.Tensor, num_global: int) -> torch.Tensor:
    """int32 ids with -1 and out-of-range ids sent to slot ``num_global`` (the
    mask's extra, never-local slot); no host sync."""
    valid = (topk_ids >= 0) & (topk_ids < num_global)
    return torch.where(valid, topk_ids, num_global).to(torch.int32)


class AiterMxfp4Moe(BackendOp):
    op = "mxfp4_moe"
    backend = "aiter"
    families: ClassVar[frozenset[str]] = frozenset({"cdna3", "cdna4"})

    def __init__(self) -> None:
        # expert_map tensors already checked (and their masks), by identity and version.
        self._masks: dict[tuple[int, int, int, int], torch.Tensor] = {}

    def not_supported_reasons(self, device: Device, problem) -> list[str]:
        reasons = super().not_supported_reasons(device, problem)
        if device.family in self.families and device.arch not in A16W4_ARCHS:
            reasons.append(f"AITER's MoE kernels for bf16 activations with MXFP4 weights (CK a16w4) are built for "
                           f"{', '.join(sorted(A16W4_ARCHS))} only, not {device.arch}")
        if problem is None:
            return reasons
        if problem.x_dtype != torch.bfloat16:
            reasons.append(f"AITER's a16w4 MoE takes bfloat16 activations, got {problem.x_dtype}")
        if problem.activation != "swigluoai":
            reasons.append(f"AITER's MXFP4 MoE keeps activations in bf16 only with its Swiglu (swigluoai); "
                           f"for {problem.activation} it quantises them to MXFP4 too (a4w4)")
        elif (problem.alpha, problem.limit) != (SWIGLU_ALPHA, SWIGLU_LIMIT):
            reasons.append(f"AITER's Swiglu fixes alpha = {SWIGLU_ALPHA} and limit = {SWIGLU_LIMIT}, "
                           f"got alpha = {problem.alpha}, limit = {problem.limit}")
        if problem.apply_router_weight_on_input:
            reasons.append("AITER applies a stage-1 router weight after the activation, not to x before W1 "
                           "(apply_router_weight_on_input)")
        return reasons

    def workspace_bytes(self, problem, num_tokens: int) -> int:
        return 0  # AITER allocates its own buffers

    def prepare(self, weights) -> AiterMoeWeights:
        return weights.converted("aiter", to_aiter_layout)

    def expert_mask(self, expert_map: torch.Tensor | None, num_local: int, device: torch.device) -> torch.Tensor:
        """:func:`aiter_expert_mask` on ``device``, checked once per map tensor
        (until it is written again); the first call for a map syncs."""
        key = (0, 0, 0, num_local) if expert_map is None else (
            expert_map.data_ptr(), expert_map._version, expert_map.numel(), num_local)
        mask = self._masks.get(key)
        if mask is None or mask.device != device:
            if expert_map is not None and expert_map.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the aiter mxfp4_moe checks a new expert_map once, with a host sync: "
                                   "call it once before capturing a CUDA graph")
            mask = self._masks[key] = aiter_expert_mask(expert_map, num_local).to(device)
        return mask

    def run(self, x, weights, topk_weights, topk_ids, expert_map, activation, alpha, limit,
            apply_router_weight_on_input, out, workspace) -> None:
        from aiter import ActivationType, QuantType
        from aiter.fused_moe import fused_moe

        converted = self.prepare(weights)
        mask = self.expert_mask(expert_map, weights.num_experts, x.device)
        ids = route_ids(topk_ids, mask.numel() - 1)
        if converted.hidden_padded != converted.hidden:
            x = F.pad(x, (0, converted.hidden_padded - converted.hidden))
        y = fused_moe(x, converted.w1, converted.w2, topk_weights.contiguous(), ids, expert_mask=mask,
                      activation=ActivationType.Swiglu, quant_type=QuantType.per_1x32, doweight_stage1=False,
                      w1_scale=converted.w1_scale, w2_scale=converted.w2_scale, bias1=converted.b1,
                      bias2=converted.b2)
        out.copy_(y[:, : converted.hidden])


IMPLEMENTATION = AiterMxfp4Moe()
