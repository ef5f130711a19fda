"""Triton backend of ``mxfp4_moe``: MXFP4 experts dequantised in registers.

Two pipelines, picked per call by :func:`launch_config` (the arch's table,
else the family heuristic):

* **decode** (``DECODE=1``, few tokens): GEMV kernels with one program per
  (slot, column block) for GEMM1 and GEMM2, so a token's k experts stream
  their weights side by side, then the combine. No routing metadata, no token
  padded to a tile; every needed weight byte is read once per slot using it.
* **grouped** (``DECODE=0``): the (token, slot) pairs are sorted by local
  expert on the GPU (count -> plan -> scatter, no host sync), then two
  expert-grouped tensor-core GEMMs and a combine that sums the k slots of a
  token in slot order. Tokens are processed in passes of :data:`PASS_TOKENS`
  so the workspace stays bounded whatever M is.

Results are bitwise reproducible run to run: no float atomics anywhere, and
the k contributions are always summed in slot order in fp32.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton import _mxfp4_moe_kernel as kernels
from rocmoe.backends.triton._common import TritonOp, launch_device, next_power_of_2
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["MoeConfig", "TritonMoeWeights", "SPEC", "TUNING", "PASS_TOKENS", "check_config", "launch",
           "launch_config", "workspace_bytes", "to_triton_layout", "build_variants", "IMPLEMENTATION"]

#: Tokens per pass of the grouped pipeline: bounds the fp32 per-slot outputs
#: (PASS_TOKENS * k * H * 4 bytes) and the intermediate, whatever M is.
PASS_TOKENS = 4096
#: Slots per program of the routing-metadata kernels.
METADATA_CHUNK = 1024
#: The tallest row block a config may use (sizes the workspace).
MAX_BLOCK_M = 128
COMBINE_BLOCK_H = 512
_ALIGN = 256
_CDNA = frozenset({"cdna3", "cdna4", "amd"})
_ACTIVATION_CODES = {"swigluoai": 0, "silu": 1}


@dataclass(frozen=True)
class MoeConfig:
    """A launch of the whole op.

    DECODE: 1 = token-major GEMV kernels, 0 = expert-grouped tiles of BLOCK_M
    rows. ``*1`` fields are GEMM1's (BLOCK_N1 columns of each of gate and up),
    ``*2`` GEMM2's. ``waves_per_eu`` / ``matrix_instr_nonkdim`` / ``kpack``
    are AMD compiler options (0 = leave to Triton).
    """

    DECODE: int
    BLOCK_M: int
    BLOCK_N1: int
    BLOCK_K1: int
    warps1: int
    stages1: int
    BLOCK_N2: int
    BLOCK_K2: int
    warps2: int
    stages2: int
    waves_per_eu: int = 0
    matrix_instr_nonkdim: int = 0
    kpack: int = 0


def _column_block(programs_per_column_block: int, columns: int, units: int, widest: int) -> int:
    """The widest column block (16..widest) that still gives two programs per
    compute unit; 16 when none does."""
    block = widest
    while block > 16 and programs_per_column_block * -(-columns // block) < 2 * units:
        block //= 2
    return block


def _heuristic(amd: bool):
    """Decode for up to four tokens, columns spread over every compute unit;
    else grouped tiles of 64 columns (and 2 x 64 weight rows in GEMM1) by
    64-deep K steps on eight warps, row blocks sized to the mean rows per
    expert (at most 64 on CDNA, with ``waves_per_eu=2``, without which the
    64-row GEMM1 spills on gfx942, and 16-wide MFMA). Every shape here compiles
    without spills on sm90, sm100, gfx942 and gfx950 (build-check); wider tiles
    spill on sm90, where the dequantised weight tile lives in registers next to
    the accumulator. Heuristic on CDNA until measured on MI300/MI355."""

    def choose(regime: Mapping[str, int]) -> MoeConfig:
        tokens, experts, topk = regime["tokens"], regime["experts"], regime["topk"]
        hidden, inter, units = regime["hidden"], regime["intermediate"], regime["compute_units"]
        slots = tokens * topk
        if tokens <= 4:
            return MoeConfig(1, 16, _column_block(slots, inter, units, 32), 128, 8, 2,
                             _column_block(slots, hidden, units, 32), 128, 8, 2)
        block_m = min(64 if amd else MAX_BLOCK_M, max(16, next_power_of_2(-(-slots // experts))))
        return MoeConfig(0, block_m, 64, 64, 8, 2, 64, 64, 8, 2, 2 if amd else 0, 16 if amd else 0)

    return choose


SPEC = register_spec(ConfigSpec(
    op="mxfp4_moe",
    kernel="mxfp4_moe",
    params=MoeConfig,
    regime_keys=("tokens", "experts", "topk", "hidden", "intermediate", "compute_units"),
    heuristics={"cdna3": _heuristic(True), "cdna4": _heuristic(True), "amd": _heuristic(True),
                "default": _heuristic(False)},
))


def _regime(device: Device, tokens: int, experts: int, topk: int, hidden: int, inter: int) -> dict[str, int]:
    return {"tokens": tokens, "experts": experts, "topk": topk, "hidden": hidden, "intermediate": inter,
            "compute_units": device.limits.compute_units}


def launch_config(device: Device, tokens: int, experts: int, topk: int, hidden: int, inter: int) -> MoeConfig:
    """The launch for a live shape (the grouped pipeline past PASS_TOKENS)."""
    config, _ = SPEC.choose(device, **_regime(device, tokens, experts, topk, hidden, inter))
    if config.DECODE and tokens > PASS_TOKENS:
        config = _heuristic(device.family in _CDNA)(_regime(device, PASS_TOKENS, experts, topk, hidden, inter))
    return config


# --------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class TritonMoeWeights:
    """W1 rows gate/up interleaved (row 2j = gate j, row 2j+1 = up j: gpt-oss's
    own order, so one weight tile and one dot serve both halves), biases in
    fp32 or None; blocks/scales as in the checkpoint layout otherwise."""

    w1_blocks: torch.Tensor  # uint8 [E, 2I, H/2]
    w1_scales: torch.Tensor  # uint8 [E, 2I, H/32]
    w2_blocks: torch.Tensor  # uint8 [E, H, I/2]
    w2_scales: torch.Tensor  # uint8 [E, H, I/32]
    b1: torch.Tensor | None  # fp32 [E, 2I]
    b2: torch.Tensor | None  # fp32 [E, H]

    @property
    def dims(self) -> tuple[int, int, int]:
        """(E, H, I)."""
        experts, two_inter, half_hidden = self.w1_blocks.shape
        return experts, half_hidden * 2, two_inter // 2

    def bias_args(self) -> tuple[torch.Tensor, torch.Tensor]:
        """b1 and b2 as kernel arguments: a bias that is absent is never read
        (HAS_BIAS is off), so any tensor stands in for its pointer."""
        return (self.b1 if self.b1 is not None else self.w1_blocks,
                self.b2 if self.b2 is not None else self.w2_blocks)


def to_triton_layout(weights) -> TritonMoeWeights:
    """Mxfp4MoeWeights -> TritonMoeWeights; run once per weights object."""
    w1_blocks, w1_scales, b1 = weights.w1_blocks, weights.w1_scales, weights.b1
    if weights.gate_up == "concatenated":
        inter = weights.intermediate_size
        gate = torch.arange(inter, device=weights.device)
        rows = torch.stack((gate, gate + inter), dim=1).flatten()
        w1_blocks, w1_scales = w1_blocks[:, rows].contiguous(), w1_scales[:, rows].contiguous()
        b1 = b1[:, rows] if b1 is not None else None
    b1 = b1.float().contiguous() if b1 is not None else None
    b2 = weights.b2.float().contiguous() if weights.b2 is not None else None
    return TritonMoeWeights(w1_blocks, w1_scales, weights.w2_blocks, weights.w2_scales, b1, b2)


# --------------------------------------------------------------------------
# Workspace


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


_METADATA = ("counts", "bases", "expert_rows", "first_block", "sorted_slots", "block_expert")


def _grouped_regions(slots: int, experts: int, hidden: int, inter: int,
                     x_dtype: torch.dtype) -> list[tuple[str, int, torch.dtype]]:
    """(name, elements, dtype) of one grouped pass of ``slots`` slots."""
    chunks = -(-slots // METADATA_CHUNK)
    e_pad = next_power_of_2(experts + 1)
    rows = slots + min(experts, slots) * (MAX_BLOCK_M - 1)
    sizes = (chunks * e_pad, chunks * e_pad, e_pad, e_pad, rows, -(-rows // 16))
    return [*((name, n, torch.int32) for name, n in zip(_METADATA, sizes)),
            ("inter", rows * inter, x_dtype), ("contrib", slots * hidden, torch.float32)]


def _decode_regions(slots: int, hidden: int, inter: int,
                    x_dtype: torch.dtype) -> list[tuple[str, int, torch.dtype]]:
    return [("inter", slots * inter, x_dtype), ("contrib", slots * hidden, torch.float32)]


def _bytes(regions) -> int:
    return sum(_aligned(n * dtype.itemsize) for _, n, dtype in regions)


def workspace_bytes(tokens: int, topk: int, experts: int, hidden: int, inter: int,
                    x_dtype: torch.dtype = torch.bfloat16) -> int:
    """Workspace bytes for up to ``tokens`` tokens, whichever pipeline runs;
    non-decreasing in ``tokens``."""
    slots = min(tokens, PASS_TOKENS) * topk
    return max(_bytes(_grouped_regions(slots, experts, hidden, inter, x_dtype)),
               _bytes(_decode_regions(slots, hidden, inter, x_dtype)))


def _carve(workspace: torch.Tensor, regions) -> dict[str, torch.Tensor]:
    """``workspace`` split into the regions' typed views, each 256-byte aligned."""
    views, offset = {}, 0
    for name, numel, dtype in regions:
        views[name] = workspace[offset:offset + numel * dtype.itemsize].view(dtype)
        offset += _aligned(numel * dtype.itemsize)
    return views


# --------------------------------------------------------------------------
# Launch


def _amd_options(config: MoeConfig) -> dict[str, int]:
    options = {}
    if config.waves_per_eu:
        options["waves_per_eu"] = config.waves_per_eu
    if config.matrix_instr_nonkdim:
        options["matrix_instr_nonkdim"] = config.matrix_instr_nonkdim
    if config.kpack:
        options["kpack"] = config.kpack
    return options


@functools.cache
def check_config(config: MoeConfig) -> MoeConfig:
    """Reject a config the kernels or the workspace layout cannot serve (a
    user's table could hold one): power-of-two tiles, ``BLOCK_M`` within
    [16, MAX_BLOCK_M] (the workspace is sized for it), K steps of at least
    32 (one scale byte per 16 packed bytes)."""
    def pow2(v: int) -> bool:
        return v > 0 and v & (v - 1) == 0

    problems = []
    if not (pow2(config.BLOCK_M) and 16 <= config.BLOCK_M <= MAX_BLOCK_M):
        problems.append(f"BLOCK_M={config.BLOCK_M} (a power of two in [16, {MAX_BLOCK_M}])")
    for name in ("BLOCK_N1", "BLOCK_N2"):
        if not (pow2(getattr(config, name)) and getattr(config, name) >= 16):
            problems.append(f"{name}={getattr(config, name)} (a power of two >= 16)")
    for name in ("BLOCK_K1", "BLOCK_K2"):
        if not (pow2(getattr(config, name)) and getattr(config, name) >= 32):
            problems.append(f"{name}={getattr(config, name)} (a power of two >= 32)")
    if problems:
        raise ValueError(f"mxfp4_moe config {config} is not usable: " + "; ".join(problems))
    return config


def launch(x, weights: TritonMoeWeights, topk_weights, topk_ids, expert_map, activation: str, alpha: float,
           limit: float | None, apply_router_weight_on_input: bool, out, workspace, config: MoeConfig,
           amd: bool = False) -> None:
    """Run the op with an explicit config. ``workspace`` uint8 of at least
    :func:`workspace_bytes` (or None: allocated here, for this call only);
    ``topk_ids`` [M, k] and ``topk_weights`` [M, k] with unit column stride."""
    check_config(config)
    tokens, topk = topk_ids.shape
    experts, hidden, inter = weights.dims
    has_map = expert_map is not None
    common = dict(
        activation=_ACTIVATION_CODES[activation], alpha=float(alpha), limit=float(limit or 0.0),
        has_limit=limit is not None, on_input=bool(apply_router_weight_on_input), has_map=has_map,
        # Without a map the kernels never read it; the ids stand in for the pointer.
        map_ptr=expert_map if has_map else topk_ids, num_global=expert_map.shape[0] if has_map else experts,
        options=_amd_options(config) if amd else {},
    )
    with launch_device(x):
        if config.DECODE:
            regions = _decode_regions(tokens * topk, hidden, inter, x.dtype)
            if workspace is None:
                workspace = torch.empty(_bytes(regions), dtype=torch.uint8, device=x.device)
            _launch_decode(x, weights, topk_weights, topk_ids, out, _carve(workspace, regions), config, **common)
            return
        if workspace is None:  # the first pass is the largest
            first = _grouped_regions(min(tokens, PASS_TOKENS) * topk, experts, hidden, inter, x.dtype)
            workspace = torch.empty(_bytes(first), dtype=torch.uint8, device=x.device)
        for start in range(0, tokens, PASS_TOKENS):
            stop = min(tokens, start + PASS_TOKENS)
            regions = _grouped_regions((stop - start) * topk, experts, hidden, inter, x.dtype)
            _launch_grouped(x[start:stop], weights, topk_weights[start:stop], topk_ids[start:stop],
                            out[start:stop], _carve(workspace, regions), config, **common)


def _launch_decode(x, w: TritonMoeWeights, topk_weights, topk_ids, out, views, config: MoeConfig, *,
                   activation, alpha, limit, has_limit, on_input, has_map, map_ptr, num_global, options) -> None:
    tokens, topk = topk_ids.shape
    experts, hidden, inter = w.dims
    b1, b2 = w.bias_args()
    kernels.moe_decode_gemm1_kernel[(triton.cdiv(inter, config.BLOCK_N1), tokens * topk)](
        x, x.stride(0), topk_weights, topk_ids, topk_ids.stride(0), map_ptr, w.w1_blocks, w.w1_scales, b1,
        views["inter"], hidden, inter, num_global, experts, alpha, limit,
        TOPK=topk, HAS_MAP=has_map, ACTIVATION=activation, HAS_LIMIT=has_limit,
        HAS_BIAS=w.b1 is not None, WEIGHT_ON_INPUT=on_input, BLOCK_N=config.BLOCK_N1, BLOCK_K=config.BLOCK_K1,
        num_warps=config.warps1, num_stages=config.stages1, **options,
    )
    kernels.moe_decode_gemm2_kernel[(triton.cdiv(hidden, config.BLOCK_N2), tokens * topk)](
        views["inter"], topk_ids, topk_ids.stride(0), map_ptr, w.w2_blocks, w.w2_scales, b2, views["contrib"],
        hidden, inter, num_global, experts,
        TOPK=topk, HAS_MAP=has_map, HAS_BIAS=w.b2 is not None,
        BLOCK_N=config.BLOCK_N2, BLOCK_K=config.BLOCK_K2, num_warps=config.warps2, num_stages=config.stages2,
        **options,
    )
    _launch_combine(views["contrib"], topk_weights, topk_ids, map_ptr, has_map, num_global, experts, on_input, out)


def _launch_combine(contrib, topk_weights, topk_ids, map_ptr, has_map: bool, num_global: int, experts: int,
                    on_input: bool, out) -> None:
    tokens, topk = topk_ids.shape
    hidden = out.shape[1]
    kernels.moe_combine_kernel[(tokens, triton.cdiv(hidden, COMBINE_BLOCK_H))](
        contrib, topk_weights, topk_ids, topk_ids.stride(0), map_ptr, out, out.stride(0),
        hidden, num_global, experts, TOPK=topk, HAS_MAP=has_map, WEIGHT_ON_INPUT=on_input,
        BLOCK_H=COMBINE_BLOCK_H, num_warps=4)


def grouped_grid_rows(slots: int, experts: int, block_m: int) -> int:
    """Row blocks the grouped GEMMs launch: the most that ``slots`` slots over
    at most ``min(experts, slots)`` non-empty experts can fill."""
    return (slots + min(experts, slots) * (block_m - 1)) // block_m


def _launch_grouped(x, w: TritonMoeWeights, topk_weights, topk_ids, out, views, config: MoeConfig, *,
                    activation, alpha, limit, has_limit, on_input, has_map, map_ptr, num_global, options) -> None:
    tokens, topk = topk_ids.shape
    experts, hidden, inter = w.dims
    slots = tokens * topk
    chunks = triton.cdiv(slots, METADATA_CHUNK)
    e_pad = next_power_of_2(experts + 1)
    b1, b2 = w.bias_args()
    block_m = config.BLOCK_M
    kernels.moe_count_kernel[(chunks,)](
        topk_ids, topk_ids.stride(0), map_ptr, views["counts"], slots, num_global, experts,
        TOPK=topk, HAS_MAP=has_map, CHUNK=METADATA_CHUNK, E_PAD=e_pad, num_warps=4)
    kernels.moe_plan_kernel[(1,)](
        views["counts"], views["bases"], views["expert_rows"], views["first_block"], chunks, experts,
        BLOCK_M=block_m, E_PAD=e_pad, num_warps=4)
    kernels.moe_scatter_kernel[(chunks,)](
        topk_ids, topk_ids.stride(0), map_ptr, views["bases"], views["sorted_slots"], views["block_expert"],
        slots, num_global, experts, TOPK=topk, HAS_MAP=has_map, CHUNK=METADATA_CHUNK, E_PAD=e_pad,
        BLOCK_M=block_m, num_warps=4)
    row_blocks = grouped_grid_rows(slots, experts, block_m)
    inter_buf = views["inter"]
    kernels.moe_grouped_gemm1_kernel[(row_blocks, triton.cdiv(inter, config.BLOCK_N1))](
        x, x.stride(0), topk_weights, w.w1_blocks, w.w1_scales, b1,
        views["sorted_slots"], views["block_expert"], views["expert_rows"], views["first_block"], inter_buf,
        hidden, inter, experts, alpha, limit,
        TOPK=topk, ACTIVATION=activation, HAS_LIMIT=has_limit, HAS_BIAS=w.b1 is not None,
        WEIGHT_ON_INPUT=on_input, BLOCK_M=block_m, BLOCK_N=config.BLOCK_N1, BLOCK_K=config.BLOCK_K1,
        num_warps=config.warps1, num_stages=config.stages1, **options,
    )
    kernels.moe_grouped_gemm2_kernel[(row_blocks, triton.cdiv(hidden, config.BLOCK_N2))](
        inter_buf, w.w2_blocks, w.w2_scales, b2,
        views["sorted_slots"], views["block_expert"], views["expert_rows"], views["first_block"], views["contrib"],
        hidden, inter, experts,
        HAS_BIAS=w.b2 is not None, BLOCK_M=block_m, BLOCK_N=config.BLOCK_N2, BLOCK_K=config.BLOCK_K2,
        num_warps=config.warps2, num_stages=config.stages2, **options,
    )
    _launch_combine(views["contrib"], topk_weights, topk_ids, map_ptr, has_map, num_global, experts, on_input, out)


class TritonMxfp4Moe(TritonOp):
    op = "mxfp4_moe"

    def config_source(self, device: Device) -> str | None:
        return SPEC.source(device)

    def prepare(self, weights) -> TritonMoeWeights:
        return weights.converted("triton", to_triton_layout)

    def workspace_bytes(self, problem, num_tokens: int) -> int:
        return workspace_bytes(num_tokens, problem.topk, problem.num_experts, problem.hidden_size,
                               problem.intermediate_size, problem.x_dtype)

    def run(self, x, weights, topk_weights, topk_ids, expert_map, activation, alpha, limit,
            apply_router_weight_on_input, out, workspace) -> None:
        converted = self.prepare(weights)
        device = Device.of(x)
        tokens, topk = topk_ids.shape
        config = launch_config(device, tokens, weights.num_experts, topk, weights.hidden_size,
                               weights.intermediate_size)
        # The kernels index slots as token * k + j.
        if topk_ids.stride(1) != 1:
            topk_ids = topk_ids.contiguous()
        if not topk_weights.is_contiguous():
            topk_weights = topk_weights.contiguous()
        launch(x, converted, topk_weights, topk_ids, expert_map, activation, alpha, limit,
               apply_router_weight_on_input, out, workspace, config, amd=device.family in _CDNA)


IMPLEMENTATION = TritonMxfp4Moe()


# --------------------------------------------------------------------------
# build-check and tuning

#: (name, experts, topk, hidden, inter, activation, limit, bias) at SPEC §2's benchmark shapes.
BENCH_MODELS = (
    ("gpt-oss-20b", 32, 4, 2880, 2880, "swigluoai", 7.0, True),
    ("gpt-oss-120b", 128, 4, 2880, 2880, "swigluoai", 7.0, True),
    ("dsv4-flash", 256, 6, 4096, 2048, "silu", 10.0, False),
    ("gemma4-26b-a4b", 128, 8, 2816, 704, "silu", None, False),
)
BENCH_TOKENS = (1, 8, 64, 512, 4096, 16384)
_KERNELS = "rocmoe.backends.triton._mxfp4_moe_kernel:"


def _combine_build(topk: int):
    from rocmoe.build_check import KernelBuild

    return KernelBuild(
        op="mxfp4_moe", kernel=_KERNELS + "moe_combine_kernel",
        signature=(("contrib_ptr", "*fp32"), ("router_w_ptr", "*fp32"), ("ids_ptr", "*i32"), ("ids_stride", "i32"),
                   ("expert_map_ptr", "*i32"), ("out_ptr", "*bf16"), ("out_stride", "i32"), ("hidden", "i32"),
                   ("num_global", "i32"), ("num_experts", "i32")),
        constexprs=(("TOPK", topk), ("HAS_MAP", False), ("WEIGHT_ON_INPUT", False), ("BLOCK_H", COMBINE_BLOCK_H)),
        options=(("num_warps", 4),), label=f"combine k={topk}")


def _kernel_builds(config: MoeConfig, topk: int, experts: int, activation: str, has_limit: bool, bias: bool,
                   options: tuple[tuple[str, int], ...]):
    """The KernelBuilds one launch of ``config`` compiles (bf16 activations,
    int32 ids, no expert map)."""
    from rocmoe.build_check import KernelBuild

    act = _ACTIVATION_CODES[activation]
    bias_t = "*fp32" if bias else "*u8"
    feats = f"k={topk} {activation}{' limit' if has_limit else ''}{' bias' if bias else ''}"
    if config.DECODE:
        return [
            KernelBuild(
                op="mxfp4_moe", kernel=_KERNELS + "moe_decode_gemm1_kernel",
                signature=(("x_ptr", "*bf16"), ("x_stride", "i32"), ("router_w_ptr", "*fp32"), ("ids_ptr", "*i32"),
                           ("ids_stride", "i32"), ("expert_map_ptr", "*i32"), ("w_blocks_ptr", "*u8"),
                           ("w_scales_ptr", "*u8"), ("bias_ptr", bias_t), ("inter_ptr", "*bf16"), ("hidden", "i32"),
                           ("inter", "i32"), ("num_global", "i32"), ("num_experts", "i32"), ("alpha", "fp32"),
                           ("limit", "fp32")),
                constexprs=(("TOPK", topk), ("HAS_MAP", False), ("ACTIVATION", act), ("HAS_LIMIT", has_limit),
                            ("HAS_BIAS", bias), ("WEIGHT_ON_INPUT", False), ("BLOCK_N", config.BLOCK_N1),
                            ("BLOCK_K", config.BLOCK_K1)),
                options=(("num_warps", config.warps1), ("num_stages", config.stages1), *options),
                label=f"decode gemm1 {feats} N={config.BLOCK_N1} K={config.BLOCK_K1} warps={config.warps1}"),
            KernelBuild(
                op="mxfp4_moe", kernel=_KERNELS + "moe_decode_gemm2_kernel",
                signature=(("inter_ptr", "*bf16"), ("ids_ptr", "*i32"), ("ids_stride", "i32"),
                           ("expert_map_ptr", "*i32"), ("w_blocks_ptr", "*u8"), ("w_scales_ptr", "*u8"),
                           ("bias_ptr", bias_t), ("contrib_ptr", "*fp32"), ("hidden", "i32"), ("inter", "i32"),
                           ("num_global", "i32"), ("num_experts", "i32")),
                constexprs=(("TOPK", topk), ("HAS_MAP", False), ("HAS_BIAS", bias), ("BLOCK_N", config.BLOCK_N2),
                            ("BLOCK_K", config.BLOCK_K2)),
                options=(("num_warps", config.warps2), ("num_stages", config.stages2), *options),
                label=f"decode gemm2 k={topk}{' bias' if bias else ''} N={config.BLOCK_N2} K={config.BLOCK_K2} "
                      f"warps={config.warps2}"),
            _combine_build(topk),
        ]
    e_pad = next_power_of_2(experts + 1)
    meta = (("TOPK", topk), ("HAS_MAP", False), ("CHUNK", METADATA_CHUNK), ("E_PAD", e_pad))
    rows = (("sorted_slots_ptr", "*i32"), ("block_expert_ptr", "*i32"), ("expert_rows_ptr", "*i32"),
            ("expert_first_block_ptr", "*i32"))
    tile = f"M={config.BLOCK_M}"
    return [
        KernelBuild(
            op="mxfp4_moe", kernel=_KERNELS + "moe_count_kernel",
            signature=(("ids_ptr", "*i32"), ("ids_stride", "i32"), ("expert_map_ptr", "*i32"), ("counts_ptr", "*i32"),
                       ("num_slots", "i32"), ("num_global", "i32"), ("num_experts", "i32")),
            constexprs=meta, options=(("num_warps", 4),), label=f"count k={topk} E_PAD={e_pad}"),
        KernelBuild(
            op="mxfp4_moe", kernel=_KERNELS + "moe_plan_kernel",
            signature=(("counts_ptr", "*i32"), ("bases_ptr", "*i32"), ("expert_rows_ptr", "*i32"),
                       ("expert_first_block_ptr", "*i32"), ("num_chunks", "i32"), ("num_experts", "i32")),
            constexprs=(("BLOCK_M", config.BLOCK_M), ("E_PAD", e_pad)), options=(("num_warps", 4),),
            label=f"plan {tile} E_PAD={e_pad}"),
        KernelBuild(
            op="mxfp4_moe", kernel=_KERNELS + "moe_scatter_kernel",
            signature=(("ids_ptr", "*i32"), ("ids_stride", "i32"), ("expert_map_ptr", "*i32"), ("bases_ptr", "*i32"),
                       ("sorted_slots_ptr", "*i32"), ("block_expert_ptr", "*i32"), ("num_slots", "i32"),
                       ("num_global", "i32"), ("num_experts", "i32")),
            constexprs=(*meta, ("BLOCK_M", config.BLOCK_M)), options=(("num_warps", 4),),
            label=f"scatter k={topk} {tile} E_PAD={e_pad}"),
        KernelBuild(
            op="mxfp4_moe", kernel=_KERNELS + "moe_grouped_gemm1_kernel",
            signature=(("x_ptr", "*bf16"), ("x_stride", "i32"), ("router_w_ptr", "*fp32"), ("w_blocks_ptr", "*u8"),
                       ("w_scales_ptr", "*u8"), ("bias_ptr", bias_t), *rows, ("inter_ptr", "*bf16"),
                       ("hidden", "i32"), ("inter", "i32"), ("num_experts", "i32"), ("alpha", "fp32"),
                       ("limit", "fp32")),
            constexprs=(("TOPK", topk), ("ACTIVATION", act), ("HAS_LIMIT", has_limit), ("HAS_BIAS", bias),
                        ("WEIGHT_ON_INPUT", False), ("BLOCK_M", config.BLOCK_M), ("BLOCK_N", config.BLOCK_N1),
                        ("BLOCK_K", config.BLOCK_K1)),
            options=(("num_warps", config.warps1), ("num_stages", config.stages1), *options),
            label=f"grouped gemm1 {feats} {tile} N={config.BLOCK_N1} K={config.BLOCK_K1} warps={config.warps1} "
                  f"stages={config.stages1}",
            expects_dot=True),
        KernelBuild(
            op="mxfp4_moe", kernel=_KERNELS + "moe_grouped_gemm2_kernel",
            signature=(("inter_ptr", "*bf16"), ("w_blocks_ptr", "*u8"), ("w_scales_ptr", "*u8"), ("bias_ptr", bias_t),
                       *rows, ("contrib_ptr", "*fp32"), ("hidden", "i32"), ("inter", "i32"), ("num_experts", "i32")),
            constexprs=(("HAS_BIAS", bias), ("BLOCK_M", config.BLOCK_M), ("BLOCK_N", config.BLOCK_N2),
                        ("BLOCK_K", config.BLOCK_K2)),
            options=(("num_warps", config.warps2), ("num_stages", config.stages2), *options),
            label=f"grouped gemm2{' bias' if bias else ''} {tile} N={config.BLOCK_N2} K={config.BLOCK_K2} "
                  f"warps={config.warps2} stages={config.stages2}",
            expects_dot=True),
        _combine_build(topk),
    ]


def build_variants(arch: str):
    """Every launch the shipped table or the heuristic makes on ``arch`` at the
    benchmark shapes (bf16, each model's activation, limit and biases)."""
    device = Device.from_arch(arch)
    table = SPEC.table(arch)
    amd = device.family in _CDNA
    builds = {}
    for _, experts, topk, hidden, inter, activation, limit, bias in BENCH_MODELS:
        configs = {launch_config(device, t, experts, topk, hidden, inter) for t in BENCH_TOKENS}
        if table is not None:
            configs |= {cfg for when, cfg in table.entries
                        if "experts" not in when or when["experts"][0] <= experts <= (when["experts"][1] or experts)}
        for cfg in sorted(configs, key=repr):
            options = tuple(_amd_options(cfg).items()) if amd else ()
            for build in _kernel_builds(cfg, topk, experts, activation, limit is not None, bias, options):
                builds.setdefault((build.kernel, build.constexprs, build.options, build.signature), build)
    return list(builds.values())


# (BLOCK_N, BLOCK_K, warps) per GEMM that compile without spills on sm90
# (probed with build-check over a grid; stages make no difference there, the
# weight tile being dequantised through registers).
_DECODE_TILES = ((16, 128, 4), (16, 128, 8), (16, 256, 4), (16, 256, 8), (32, 128, 8))
_GROUPED_TILES = {
    16: ((64, 64, 8), (32, 128, 8), (128, 64, 8), (64, 128, 8)),
    32: ((64, 64, 8), (32, 64, 8), (128, 64, 8)),
    64: ((64, 64, 8), (32, 128, 8)),
    128: ((64, 64, 8), (32, 64, 8)),
}


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[MoeConfig]:
    tokens, experts, topk = regime["tokens"], regime["experts"], regime["topk"]
    cands = []
    if tokens <= 64:
        cands += [MoeConfig(1, 16, n1, k1, w1, 2, n2, k2, w2, 2)
                  for n1, k1, w1 in _DECODE_TILES for n2, k2, w2 in _DECODE_TILES]
    fit = min(MAX_BLOCK_M, max(16, next_power_of_2(-(-tokens * topk // experts))))
    for block_m in sorted({max(16, fit // 2), fit}):
        cands += [MoeConfig(0, block_m, n1, k1, w1, 2, n2, k2, w2, 2)
                  for n1, k1, w1 in _GROUPED_TILES[block_m] for n2, k2, w2 in _GROUPED_TILES[block_m]]
    return cands


def _tune_inputs(regime: Mapping[str, int], device: torch.device, gen: torch.Generator):
    from rocmoe.backends.torch.mxfp4_moe import mxfp4_moe_torch, to_torch_layout
    from rocmoe.bench.cases import moe_case
    from rocmoe.bench.timing import rotating_sets
    from rocmoe.tune import TuneInputs

    name = next((n for n, e, k, h, i, *_ in BENCH_MODELS
                 if (e, k, h, i) == (regime["experts"], regime["topk"], regime["hidden"], regime["intermediate"])),
                None)
    if name is None:
        raise ValueError(f"mxfp4_moe tuning has inputs only for the benchmark models, got {dict(regime)}")
    model = next(m for m in BENCH_MODELS if m[0] == name)
    activation, limit = model[5], model[6]
    case = moe_case(name, regime["tokens"])
    sets = rotating_sets(device, case.set_bytes)
    inputs = [case.make_inputs(device, gen) for _ in range(sets)]
    outputs = [case.make_outputs(inp) for inp in inputs]
    weights = [to_triton_layout(inp["weights"]) for inp in inputs]
    first = inputs[0]
    ref = mxfp4_moe_torch(first["x"], to_torch_layout(first["weights"]), first["topk_weights"], first["ids"],
                          activation=activation, limit=limit)

    workspace = torch.empty(workspace_bytes(regime["tokens"], regime["topk"], regime["experts"], regime["hidden"],
                                            regime["intermediate"]), dtype=torch.uint8, device=device)

    def run(params: MoeConfig, i: int) -> None:
        inp = inputs[i]
        launch(inp["x"], weights[i], inp["topk_weights"], inp["ids"], None, activation, 1.702, limit, False,
               outputs[i]["out"], workspace, params)

    def check(params: MoeConfig) -> bool:
        out = outputs[0]["out"]
        out.fill_(float("nan"))
        run(params, 0)
        return float((out.float() - ref).norm() / ref.norm()) <= 1e-2

    return TuneInputs(sets, run, check)


def _tuning():
    from rocmoe.tune import Tuning

    def regimes(device: Device | None = None):
        device = device or Device.current()
        # 16384 tokens costs minutes per regime and lands in the 4096 bucket's range anyway.
        return [_regime(device, t, e, k, h, i) for _, e, k, h, i, *_ in BENCH_MODELS for t in BENCH_TOKENS[:-1]]

    def regime_of_shape(shape, device: Device):
        return _regime(device, shape["tokens"], shape["experts"], shape["topk"], shape["hidden"],
                       shape["intermediate"])

    return Tuning(SPEC, regimes=regimes, candidates=_tune_candidates, make_inputs=_tune_inputs, split_key="tokens",
                  regime_of_shape=regime_of_shape)


TUNING = _tuning()
