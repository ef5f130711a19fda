"""MXFP4 (OCP Microscaling v1.0): E2M1 elements sharing one E8M0 scale per 32.

Packed layout (OpenAI gpt-oss checkpoints): ``blocks`` uint8 [..., K/2], two
E2M1 codes per byte along the reduction axis, low nibble = even element, high
nibble = odd element; ``scales`` uint8 [..., K/32], E8M0 (value ``2**(s-127)``,
``s = 255`` is NaN).
"""

from __future__ import annotations

import torch

__all__ = [
    "E2M1_VALUES",
    "MXFP4_BLOCK",
    "e2m1_lut",
    "e8m0_to_float32",
    "dequantize_mxfp4",
    "quantize_mxfp4",
]

MXFP4_BLOCK = 32
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def e2m1_lut(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 16 E2M1 code values as a [16] tensor."""
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def e8m0_to_float32(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 multipliers ``2**(s-127)``, exact (s=0 gives the
    subnormal 2**-127, s=255 gives NaN). Built from IEEE bits, not exp2, so no
    rounding or flush-to-zero can creep in."""
    if scales.dtype != torch.uint8:
        raise TypeError(f"scales must be uint8 (E8M0), got {scales.dtype}")
    s = scales.to(torch.int32)
    bits = torch.where(s == 0, torch.full_like(s, 0x00400000), s << 23)
    bits = torch.where(s == 255, torch.full_like(s, 0x7FC00000), bits)
    return bits.view(torch.float32)


def dequantize_mxfp4(
    blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Decode MXFP4 to ``dtype``.

    Args:
        blocks: uint8 [..., K/2], packed E2M1 codes.
        scales: uint8 [..., K/32], E8M0 exponents.
        dtype: the output dtype (bfloat16, float16, float32 or float64).

    Returns:
        [..., K] tensor of ``dtype``. Exact for every representable value of
        ``dtype`` (the product is formed in float32/float64, then rounded once).
    """
    if blocks.dtype != torch.uint8:
        raise TypeError(f"blocks must be uint8 (packed E2M1), got {blocks.dtype}")
    if scales.dtype != torch.uint8:
        raise TypeError(f"scales must be uint8 (E8M0), got {scales.dtype}")
    if blocks.shape[:-1] != scales.shape[:-1] or blocks.shape[-1] * 2 != scales.shape[-1] * MXFP4_BLOCK:
        raise ValueError(
            f"blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not describe the same "
            f"MXFP4 tensor (expected scales [..., K/32] for blocks [..., K/2])"
        )
    work = torch.float64 if dtype == torch.float64 else torch.float32
    values = _byte_lut(blocks.device, work)[blocks.to(torch.int32)]  # [..., K/2, 2]
    mult = e8m0_to_float32(scales).to(work)
    values = values.view(*blocks.shape[:-1], -1, MXFP4_BLOCK) * mult.unsqueeze(-1)
    return values.flatten(-2).to(dtype)


_byte_luts: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2] table: byte -> (value of its low nibble, value of its high nibble)."""
    key = (torch.device(device), dtype)
    if key not in _byte_luts:
        lut = e2m1_lut("cpu", dtype)
        byte = torch.arange(256)
        _byte_luts[key] = torch.stack((lut[byte & 0xF], lut[byte >> 4]), dim=-1).to(device)
    return _byte_luts[key]


# Rounding |x| (already divided by the block scale) onto the E2M1 magnitudes
# 0, .5, 1, 1.5, 2, 3, 4, 6 with ties to the even code (mantissa bit 0): each
# midpoint between codes i and i+1 is counted with ">" when the tie goes down
# (i even) and ">=" when it goes up (i odd).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def _round_to_e2m1_codes(q: torch.Tensor) -> torch.Tensor:
    mag = q.abs()
    code = torch.zeros(q.shape, dtype=torch.int64, device=q.device)
    for i, mid in enumerate(_MIDPOINTS):
        code += (mag >= mid) if i % 2 == 1 else (mag > mid)
    return code | torch.where(torch.signbit(q), 8, 0)


def quantize_mxfp4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last axis to MXFP4 (OCP MX v1.0).

    Per block of 32: shared exponent ``floor(log2(amax)) - 2`` (E2M1's largest
    exponent is 2), clamped to E8M0's [-127, 127]; elements divided by
    ``2**exponent`` are rounded to nearest E2M1 (ties to even) and saturate at
    ±6. An all-zero block gets scale byte 0. A block holding NaN or ±inf gets
    scale 255 (NaN), as OCP MX prescribes for NaN.

    Args:
        w: [..., K] float tensor (float32, bfloat16, float16 or float64), K a
            multiple of 32.

    Returns:
        (blocks uint8 [..., K/2], scales uint8 [..., K/32]).
    """
    if not w.is_floating_point():
        raise TypeError(f"w must be a floating-point tensor, got {w.dtype}")
    if w.dim() == 0 or w.shape[-1] % MXFP4_BLOCK:
        raise ValueError(f"w's last dimension must be a multiple of 32, got shape {tuple(w.shape)}")
    x = w.to(torch.float64).unflatten(-1, (-1, MXFP4_BLOCK))
    finite = torch.isfinite(x).all(dim=-1)
    amax = torch.where(torch.isfinite(x), x.abs(), 0.0).amax(dim=-1)
    _, exponent = torch.frexp(amax)  # amax = m * 2**e with m in [0.5, 1): floor(log2) = e - 1
    shared = torch.where(amax > 0, exponent.to(torch.int64) - 1 - 2, torch.full_like(amax, -127, dtype=torch.int64))
    shared = shared.clamp(-127, 127)
    q = x * torch.pow(2.0, -shared.to(torch.float64)).unsqueeze(-1)
    codes = _round_to_e2m1_codes(torch.nan_to_num(q, nan=0.0)).flatten(-2)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = torch.where(finite, shared + 127, torch.full_like(shared, 255)).to(torch.uint8)
    return packed, scales
