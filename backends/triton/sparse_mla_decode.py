"""Triton backend of ``sparse_mla_decode``: split-key flash decoding with one
gather of each selected latent row per program, shared by a block of heads.

The launch (heads per program, keys per step, warps, stages, split count) is
chosen from the live shape - queries, heads, keys per query - by
:func:`launch_config`: the shipped table for the arch, else the family's
heuristic (``_nvidia_heuristic`` / ``_cdna_heuristic``).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton._common import INTERPRET, TritonOp, launch_device, next_power_of_2
from rocmoe.backends.triton._sparse_mla_decode_kernel import sparse_mla_decode_kernel, sparse_mla_reduce_kernel
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["MlaConfig", "SPEC", "TUNING", "launch", "launch_config", "split_dims", "build_variants",
           "IMPLEMENTATION"]

#: The reduce runs many small programs: two heads and 2048 fp32 partial
#: elements (split x heads x d_v block) on one warp. Each program's time is one
#: round trip, so what shortens the reduce is more programs in flight. On the
#: H100 (ci/mla_small_t.py: whole calls under CUDA-graph replay, one run) this
#: took V3.2 H = 128 T = 8 from 51.9 to 41.9 us, V4-Flash T = 8 from 20.8 to
#: 15.8 us and T = 1 from 10.8 to 9.8 us against the previous eight heads x
#: 4096 elements on four warps; the tiles and warp counts around it measured
#: within 0.4 us of it.
REDUCE_BLOCK_H = 2
REDUCE_TILE = 2048
REDUCE_WARPS = 1

#: Whether a split launch stores its partial outputs in the output's dtype when
#: that is 16-bit (fp32 otherwise, and always while this is off). The partials are
#: written once and read once, and at small batch they outweigh the gathered keys
#: (V3.2, 128 heads, T = 8, 8 chunks: 16.8 MB in fp32 against 18.9 MB of keys), so
#: halving them should shorten both kernels. The cost is one more rounding per
#: chunk before the merge: in an fp64 emulation (V3.2, 128 heads, 2048 N(0, 1)
#: keys, 16 chunks, bf16 output) the output's relative L2 error went from 1.66e-3
#: to 2.01e-3 (SPEC allows 5e-3). Off until a GPU run times it
#: (``bash ci/gpu_check.sh partials``); the tests run both choices.
HALF_PARTIALS = False


def partial_dtype(out_dtype: torch.dtype) -> torch.dtype:
    """dtype of the [T, SPLIT, H, d_v] partial outputs for an output of ``out_dtype``
    (the partial lse [T, SPLIT, H] is always fp32)."""
    if HALF_PARTIALS and out_dtype in (torch.bfloat16, torch.float16):
        return out_dtype
    return torch.float32


def reduce_blocks(split: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_DV) of the reduce for ``split`` partials: all of them at
    once, and as much of d_v as the tile leaves room for."""
    block_s = next_power_of_2(split)
    return block_s, max(16, REDUCE_TILE // (block_s * REDUCE_BLOCK_H))


@dataclass(frozen=True)
class MlaConfig:
    """BLOCK_H heads and BLOCK_N keys per step in a program; SPLIT programs per
    (token, head block) along the key set."""

    BLOCK_H: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    #: at most this many chunks, of whole key steps; only those that hold keys are launched
    SPLIT: int
    #: read each key tile's ids one step ahead of its gather
    IDS_AHEAD: bool = False
    #: programs per (token, head block, chunk), one per part of d_v (1 or 2)
    DV_SPLIT: int = 1
    #: run the Gluon wgmma kernel (sm90; 64 heads on eight warps, each score computed once)
    #: instead of the ``tl`` one; where it cannot (:func:`wgmma_unsupported_reasons`) the
    #: ``tl`` kernel runs.
    WGMMA: bool = False
    #: with WGMMA and 64 keys a step: the warp-specialised Gluon kernel instead (a gathering
    #: warpgroup and two computing ones on alternate tiles; 4 + 4 + 4 warps, whatever num_warps says);
    #: where only it cannot run, the wgmma kernel runs (:func:`launched_config`)
    PINGPONG: bool = False


def split_dims(head_dim: int) -> tuple[int, int] | None:
    """(D_MAIN, D_TAIL) with both powers of two (tail may be 0), or None."""
    main = 1 << (head_dim.bit_length() - 1)
    tail = head_dim - main
    if tail and tail & (tail - 1):
        return None
    return main, tail


def _split_for(tokens: int, head_blocks: int, keys: int, block_n: int, units: int, waves: float) -> int:
    """Chunks per (token, head block): none when the batch alone fills the
    device, else enough for ``waves`` programs per compute unit, each chunk at
    least two key steps."""
    programs = tokens * head_blocks
    if programs >= units:
        return 1  # the batch fills the device: a reduce would only cost
    want = math.ceil(waves * units / programs)
    most = max(1, keys // (2 * block_n))
    split = max(1, min(want, most, 64))
    return next_power_of_2(split) if split > 1 else 1


#: The Gluon kernel's fixed shape: 64 heads a program on two warpgroups.
WGMMA_BLOCK_H = 64
WGMMA_WARPS = 8


def _nvidia_heuristic(regime: Mapping[str, int]) -> MlaConfig:
    """Ampere/Blackwell/other NVIDIA (unmeasured): 32 heads share a gather,
    32 keys per step, eight warps, a double-buffered gather (the cp.async
    pipeline: 76 KB of shared memory, within every arch's limit); split to
    two programs per SM when the batch cannot fill the device."""
    heads = regime["heads"]
    block_h = 32 if heads > 16 else 16
    block_n = 32
    split = _split_for(regime["tokens"], -(-heads // block_h), regime["keys"], block_n, regime["compute_units"], 2)
    return MlaConfig(block_h, block_n, 8 if block_h == 32 else 4, 2, split)


def _hopper_heuristic(regime: Mapping[str, int]) -> MlaConfig:
    """sm90 shapes without a measured entry (another SM count than the H100
    SXM's 132, or keys and D the benchmark models lack), from the H100's
    table: with 64 heads or more from T = 3, the ping-pong Gluon kernel (64
    heads a program, 64-key tiles), which the tuner picked in every such
    regime (1.18-1.24x the wgmma kernel at 128 heads, T >= 64). One program
    fills an SM, so the split aims at one program per SM. Otherwise (fewer
    heads, or T <= 2, where each query's keys must spread over many programs)
    16-head blocks, four warps, 64 keys, two stages, two programs per SM."""
    heads, tokens = regime["heads"], regime["tokens"]
    if heads >= WGMMA_BLOCK_H and tokens >= 3:
        split = _split_for(tokens, -(-heads // WGMMA_BLOCK_H), regime["keys"], _PINGPONG_SHAPE[0],
                           regime["compute_units"], 1)
        return pingpong_config(split)
    split = _split_for(tokens, -(-heads // 16), regime["keys"], 64, regime["compute_units"], 2)
    return MlaConfig(16, 64, 4, 2, split)


def _cdna_heuristic(regime: Mapping[str, int]) -> MlaConfig:
    """CDNA: 16 heads and 16 keys per step with four waves (32-head blocks, or
    eight waves, spill on gfx950 in build-check). Heuristic until measured
    on MI300/MI355."""
    block_h, block_n = 16, 16
    split = _split_for(regime["tokens"], -(-regime["heads"] // block_h), regime["keys"], block_n,
                       regime["compute_units"], 2)
    return MlaConfig(block_h, block_n, 4, 1, split)


SPEC = register_spec(ConfigSpec(
    op="sparse_mla_decode",
    kernel="split_key_decode",
    params=MlaConfig,
    regime_keys=("tokens", "heads", "keys", "head_dim", "compute_units"),
    heuristics={"cdna3": _cdna_heuristic, "cdna4": _cdna_heuristic, "amd": _cdna_heuristic,
                "hopper": _hopper_heuristic, "default": _nvidia_heuristic},
))


def _regime(device: Device, tokens: int, heads: int, keys: int, head_dim: int) -> dict[str, int]:
    return {"tokens": tokens, "heads": heads, "keys": keys, "head_dim": head_dim,
            "compute_units": device.limits.compute_units}


def launch_config(device: Device, tokens: int, heads: int, keys: int, head_dim: int) -> MlaConfig:
    """The launch for a live shape: ``keys`` = topk (+ extra topk) per query."""
    config, _ = SPEC.choose(device, **_regime(device, tokens, heads, keys, head_dim))
    return config


def _gluon_kernel():
    """The Gluon sm90 kernel, or None where this Triton has no Gluon for Hopper."""
    try:
        from rocmoe.backends.triton._sparse_mla_decode_wgmma_kernel import sparse_mla_decode_wgmma_kernel
    except (ImportError, AttributeError):  # pragma: no cover - a Triton without Gluon's Hopper API
        return None
    return sparse_mla_decode_wgmma_kernel


def _pingpong_kernel():
    """The warp-specialised Gluon sm90 kernel and its maxnreg, or None where this Triton lacks it."""
    try:
        from rocmoe.backends.triton._sparse_mla_decode_pingpong_kernel import (
            MAXNREG,
            sparse_mla_decode_pingpong_kernel,
        )
    except (ImportError, AttributeError):  # pragma: no cover - a Triton without Gluon's warp_specialize
        return None
    return sparse_mla_decode_pingpong_kernel, MAXNREG


def wgmma_unsupported_reasons(q: torch.Tensor, cache: torch.Tensor, extra_cache: torch.Tensor | None,
                              config: MlaConfig) -> list[str]:
    """Why the Gluon wgmma kernel cannot take this launch (empty: it can).
    It copies Q and the key rows with 16-byte ``cp.async`` vectors, so their
    rows must start 16-byte aligned."""
    reasons = []
    if INTERPRET:
        reasons.append("Gluon kernels do not run under TRITON_INTERPRET")
    elif q.device.type == "meta":
        pass  # a compile-only launch (rocmoe precompile, tune's compile-ahead): the target is set there
    elif q.device.type != "cuda" or torch.version.cuda is None or torch.cuda.get_device_capability(q.device)[0] != 9:
        reasons.append("the wgmma kernel is for NVIDIA sm90")
    if _gluon_kernel() is None:
        reasons.append("this Triton has no Gluon Hopper API")
    if split_dims(q.shape[-1]) not in ((512, 64), (512, 0)):
        reasons.append(f"the wgmma kernel takes the models' D = 576 or 512, got {q.shape[-1]}")
    if q.dtype != torch.bfloat16 or cache.dtype != torch.bfloat16:
        reasons.append(f"the wgmma kernel takes bf16 q and cache, got {q.dtype} / {cache.dtype}")
    if (config.BLOCK_H, config.num_warps, config.DV_SPLIT) != (WGMMA_BLOCK_H, WGMMA_WARPS, 1):
        reasons.append(f"the wgmma kernel runs {WGMMA_BLOCK_H} heads on {WGMMA_WARPS} warps without a d_v split")
    if config.BLOCK_N < 32 or config.num_stages < 2:
        reasons.append("the wgmma kernel takes 32+ keys a step and 2+ stages")
    if config.PINGPONG and config.BLOCK_N != 64:
        reasons.append("the ping-pong kernel takes 64 keys a step")
    if config.PINGPONG and _pingpong_kernel() is None:
        reasons.append("this Triton has no Gluon warp_specialize")
    tensors = [("q", q), ("kv_cache", cache)] + ([("extra_kv_cache", extra_cache)] if extra_cache is not None else [])
    for name, tensor in tensors:
        misaligned = tensor.device.type != "meta" and tensor.data_ptr() % 16
        if misaligned or tensor.stride(-1) != 1 or any(stride % 8 for stride in tensor.stride()[:-1]):
            reasons.append(f"{name} rows are not 16-byte aligned and contiguous")
    return reasons


def tl_fallback(config: MlaConfig) -> MlaConfig:
    """The ``tl`` launch that runs a WGMMA config where the Gluon kernel cannot: the same heads,
    warps and split, at most 32 keys a step and two stages (64 keys spill there at 64 heads)."""
    return dataclasses.replace(config, WGMMA=False, PINGPONG=False, BLOCK_N=min(config.BLOCK_N, 32), num_stages=2)


def launched_config(q: torch.Tensor, cache: torch.Tensor, extra_cache: torch.Tensor | None,
                    config: MlaConfig) -> MlaConfig:
    """The launch that runs ``config`` for these tensors: a PINGPONG config whose
    ping-pong kernel cannot run here (only that kernel's needs unmet, e.g. a
    Triton without ``warp_specialize``) runs the wgmma kernel at the same
    launch; a WGMMA config the Gluon kernels cannot take runs :func:`tl_fallback`."""
    if not config.WGMMA:
        return config
    reasons = wgmma_unsupported_reasons(q, cache, extra_cache, config)
    if reasons and config.PINGPONG:
        config = dataclasses.replace(config, PINGPONG=False)
        reasons = wgmma_unsupported_reasons(q, cache, extra_cache, config)
    return tl_fallback(config) if reasons else config


def key_chunks(keys: int, config: MlaConfig) -> tuple[int, int]:
    """(keys per chunk, chunks launched) for ``keys`` keys a query under ``config``. Chunks are
    whole key steps, so the last of SPLIT can be empty (V4-Flash's 640 keys in 8 chunks of 128:
    five hold keys); only those with keys get programs, partials and a place in the reduce."""
    chunk = triton.cdiv(triton.cdiv(keys, config.SPLIT), config.BLOCK_N) * config.BLOCK_N
    return chunk, triton.cdiv(keys, chunk)


def launch(q, cache, indices, softmax_scale, d_v, topk_length, attn_sink, extra_cache, extra_indices,
           extra_topk_length, out, lse_out, config: MlaConfig) -> None:
    """Launch with an explicit config (the tuner and build-check use this).
    ``cache``/``extra_cache`` are 3-D [num_blocks, block_size, D]. A Gluon
    config that this launch cannot take runs another kernel with the same
    heads and split (:func:`launched_config`)."""
    num_tokens, num_heads, head_dim = q.shape
    config = launched_config(q, cache, extra_cache, config)
    main, tail = split_dims(head_dim)
    topk = indices.shape[1]
    has_extra = extra_cache is not None
    extra_topk = extra_indices.shape[1] if has_extra else 0
    chunk, split = key_chunks(topk + extra_topk, config)
    if split > 1:
        part_out = torch.empty((num_tokens, split, num_heads, d_v), dtype=partial_dtype(out.dtype), device=q.device)
        part_lse = torch.empty((num_tokens, split, num_heads), dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = lse_out  # never touched
    grid = (num_tokens * split * triton.cdiv(num_heads, config.BLOCK_H) * config.DV_SPLIT,)
    if config.WGMMA and config.PINGPONG:
        kernel, maxnreg = _pingpong_kernel()
        kernel_args = {"maxnreg": maxnreg, "num_warps": 4}  # the default partition; the workers add 8
    elif config.WGMMA:
        kernel, kernel_args = _gluon_kernel(), {"STAGES": config.num_stages, "P_SWIZZLE": min(128, 2 * config.BLOCK_N),
                                                "num_warps": config.num_warps}
    else:
        kernel, kernel_args = sparse_mla_decode_kernel, {
            "IEEE": q.dtype == torch.float32, "IDS_AHEAD": config.IDS_AHEAD, "DV_SPLIT": config.DV_SPLIT,
            "num_stages": config.num_stages, "num_warps": config.num_warps}
    with launch_device(q):
        kernel[grid](
            q, cache, indices,
            indices if topk_length is None else topk_length,
            cache if not has_extra else extra_cache,
            indices if not has_extra else extra_indices,
            indices if extra_topk_length is None else extra_topk_length,
            lse_out if attn_sink is None else attn_sink,
            out, lse_out, part_out, part_lse,
            num_heads, cache.shape[0] * cache.shape[1],
            extra_cache.shape[0] * extra_cache.shape[1] if has_extra else 0,
            topk, extra_topk, float(softmax_scale) * 1.4426950408889634, d_v,
            q.stride(0), q.stride(1), indices.stride(0), extra_indices.stride(0) if has_extra else 0,
            out.stride(0), out.stride(1), lse_out.stride(0),
            chunk, split,
            D=head_dim, D_MAIN=main, D_TAIL=tail, BLOCK_H=config.BLOCK_H, BLOCK_N=config.BLOCK_N,
            HAS_LEN=topk_length is not None, HAS_EXTRA=has_extra, HAS_XLEN=extra_topk_length is not None,
            HAS_SINK=attn_sink is not None, PARTIAL=split > 1,
            WIDE=max(cache.numel(), extra_cache.numel() if has_extra else 0) >= 2**31,
            **kernel_args,
        )
        if split > 1:
            block_s, block_dv = reduce_blocks(split)
            sparse_mla_reduce_kernel[(num_tokens, triton.cdiv(num_heads, REDUCE_BLOCK_H), triton.cdiv(d_v, block_dv))](
                part_out, part_lse, lse_out if attn_sink is None else attn_sink, out, lse_out, num_heads, d_v,
                out.stride(0), out.stride(1), lse_out.stride(0), split,
                BLOCK_H=REDUCE_BLOCK_H, BLOCK_DV=block_dv, BLOCK_S=block_s, HAS_SINK=attn_sink is not None,
                num_warps=REDUCE_WARPS,
            )


class TritonSparseMlaDecode(TritonOp):
    op = "sparse_mla_decode"

    def not_supported_reasons(self, device: Device, problem) -> list[str]:
        reasons = super().not_supported_reasons(device, problem)
        if problem is None:
            return reasons
        dims = split_dims(problem.head_dim)
        if dims is None or dims[0] < 16:
            reasons.append(f"triton sparse_mla_decode needs D = a power of two (>= 16) plus a power-of-two "
                           f"tail (576 = 512 + 64, 512); got D = {problem.head_dim}")
        elif problem.d_v > dims[0]:
            reasons.append(f"triton sparse_mla_decode needs d_v <= {dims[0]} (the power-of-two part of "
                           f"D = {problem.head_dim}); got d_v = {problem.d_v}")
        return reasons

    def config_source(self, device: Device) -> str | None:
        return SPEC.source(device)

    def run(self, q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink,
            extra_kv_cache, extra_indices, extra_topk_length, out, lse_out) -> None:
        keys = indices.shape[1] + (0 if extra_indices is None else extra_indices.shape[1])
        config = launch_config(Device.of(q), q.shape[0], q.shape[1], keys, q.shape[2])
        launch(q, kv_cache, indices, softmax_scale, d_v, topk_length, attn_sink, extra_kv_cache, extra_indices,
               extra_topk_length, out, lse_out, config)


IMPLEMENTATION = TritonSparseMlaDecode()


# (name, head_dim, heads, topk, extra topk) at SPEC §3's benchmark shapes, and V3.2 at 64 heads,
# which issue 5's small-batch goal names (T <= 8 at H = 64 and 128).
BENCH_SHAPES = (("dsv32", 576, 16, 2048, 0), ("dsv32", 576, 64, 2048, 0), ("dsv32", 576, 128, 2048, 0),
                ("dsv4-flash", 512, 64, 512, 128), ("dsv4-pro", 512, 128, 1024, 128))
BENCH_TOKENS = (1, 8, 64, 128, 512)
_KERNELS = "rocmoe.backends.triton._sparse_mla_decode_kernel:"
_WGMMA_KERNEL = "rocmoe.backends.triton._sparse_mla_decode_wgmma_kernel:sparse_mla_decode_wgmma_kernel"
_PINGPONG_KERNEL = "rocmoe.backends.triton._sparse_mla_decode_pingpong_kernel:sparse_mla_decode_pingpong_kernel"


def _partial_pointer() -> str:
    """Triton pointer type of the partial outputs that a bf16 launch stores."""
    return "*bf16" if partial_dtype(torch.bfloat16) == torch.bfloat16 else "*fp32"


def _decode_signature() -> tuple[tuple[str, str], ...]:
    """The decode kernels' arguments as a bf16 launch passes them (for build-check)."""
    return tuple((name, _partial_pointer() if name == "part_out_ptr" else kind) for name, kind in _DECODE_SIGNATURE)


_DECODE_SIGNATURE = (
    ("q_ptr", "*bf16"), ("cache_ptr", "*bf16"), ("idx_ptr", "*i32"), ("len_ptr", "*i32"), ("xcache_ptr", "*bf16"),
    ("xidx_ptr", "*i32"), ("xlen_ptr", "*i32"), ("sink_ptr", "*fp32"), ("out_ptr", "*bf16"), ("lse_ptr", "*fp32"),
    ("part_out_ptr", "*fp32"), ("part_lse_ptr", "*fp32"), ("num_heads", "i32"), ("rows", "i32"), ("xrows", "i32"),
    ("topk", "i32"), ("xtopk", "i32"), ("qk_scale", "fp32"), ("d_v", "i32"), ("q_stride_t", "i32"),
    ("q_stride_h", "i32"), ("idx_stride", "i32"), ("xidx_stride", "i32"), ("out_stride_t", "i32"),
    ("out_stride_h", "i32"), ("lse_stride", "i32"), ("chunk", "i32"), ("split", "i32"))
# Arguments a launch specialises as multiples of 16 (so the build-check compiles them so).
_DECODE_ALIGNED = ("num_heads", "topk", "xtopk", "d_v", "q_stride_t", "q_stride_h", "idx_stride", "xidx_stride",
                   "out_stride_t", "out_stride_h", "lse_stride", "chunk")


def _wgmma_builds():
    """The Gluon kernel under every ``_WGMMA_TUNE_SHAPES`` entry and the ping-pong one (sm90
    only): D = 576 (V3.2) and D = 512 with the extra keys and sink (V4), final and partial, int32
    and int64 cache offsets."""
    from rocmoe.build_check import KernelBuild

    if _gluon_kernel() is None:  # pragma: no cover - a Triton without Gluon's Hopper API
        return []
    # Per kernel: (its path, keys a step, its own constexprs, launch options, label head, label launch).
    kernels = [(_WGMMA_KERNEL, block_n, (("STAGES", stages), ("P_SWIZZLE", min(128, 2 * block_n))),
                (("num_warps", WGMMA_WARPS),), "wgmma", f"warps={WGMMA_WARPS} stages={stages}")
               for block_n, stages in _WGMMA_TUNE_SHAPES]
    pingpong = _pingpong_kernel()
    if pingpong is not None:  # None on a Triton without Gluon's warp_specialize
        kernels.append((_PINGPONG_KERNEL, _PINGPONG_SHAPE[0], (), (("num_warps", 4), ("maxnreg", pingpong[1])),
                        "pingpong", "warps=4+4+4"))
    builds = []
    for (kernel, block_n, own, options, name, launch_text), (dim, extra), partial, wide in itertools.product(
            kernels, ((576, False), (512, True)), (False, True), (False, True)):
        main, tail = split_dims(dim)
        builds.append(KernelBuild(
            op="sparse_mla_decode", kernel=kernel, signature=_decode_signature(),
            constexprs=(("D", dim), ("D_MAIN", main), ("D_TAIL", tail), ("BLOCK_H", WGMMA_BLOCK_H),
                        ("BLOCK_N", block_n), ("HAS_LEN", extra), ("HAS_EXTRA", extra), ("HAS_XLEN", extra),
                        ("HAS_SINK", extra), ("PARTIAL", partial), ("WIDE", wide), *own),
            options=options, aligned=_DECODE_ALIGNED,
            label=(f"{name} D={dim}{' +extra +sink' if extra else ''} BLOCK_H={WGMMA_BLOCK_H} BLOCK_N={block_n} "
                   f"{launch_text} {'partial' if partial else 'final'}{' int64' if wide else ''}"),
            expects_dot=True))
    return builds


def build_variants(arch: str):
    """Every launch the shipped table or the heuristic makes on ``arch`` at the
    benchmark shapes (bf16), with the features each model uses; on sm90 also
    every shape the tuner may write into its table (``_TUNE_SHAPES``, whose
    claim to compile without spills is thereby checked)."""
    from rocmoe.build_check import KernelBuild

    device = Device.from_arch(arch)
    table = SPEC.table(arch)
    jobs = set()
    for _, dim, heads, topk, extra in BENCH_SHAPES:
        jobs |= {(dim, has_extra, SPEC.heuristic(device)(_regime(device, t, heads, topk + extra, dim)))
                 for t in BENCH_TOKENS for has_extra in {False, extra > 0}}
    if table is not None:
        # A measured entry is built the way its model runs: D = 576 (V3.2)
        # without the extra key set, D = 512 (V4) with and without it.
        for when, cfg in table.entries:
            dims = (when["head_dim"][0],) if "head_dim" in when else tuple({dim for _, dim, *_ in BENCH_SHAPES})
            jobs |= {(dim, has_extra, cfg) for dim in dims for has_extra in (False, True)
                     if not has_extra or any(d == dim and extra for _, d, _, _, extra in BENCH_SHAPES)}
    if arch == "sm90":
        jobs |= {(dim, has_extra, tune_config(shape, split)) for dim, has_extra in ((576, False), (512, True))
                 for shape in tune_shapes(dim) for split in (1, 2)}
    # The split count is a runtime argument of the decode kernel: one build per
    # "partial or not"; the reduce is built per power of two up to the largest split (its block
    # shapes follow next_power_of_2(split), and a launch may run fewer chunks than its SPLIT).
    # A WGMMA launch runs the Gluon kernel (every shape of it is in _wgmma_builds) or, where that
    # cannot take the inputs, the tl kernel with tl_fallback's config: that is its tl build.
    largest = max(cfg.SPLIT for *_, cfg in jobs)
    reduce_splits = [1 << i for i in range(1, next_power_of_2(largest).bit_length())]
    jobs = {(dim, has_extra, dataclasses.replace(tl_fallback(cfg) if cfg.WGMMA else cfg, SPLIT=min(cfg.SPLIT, 2)))
            for dim, has_extra, cfg in jobs}
    builds = []
    for (dim, has_extra, cfg), wide in itertools.product(sorted(jobs, key=repr), (False, True)):
        main, tail = split_dims(dim)
        builds.append(KernelBuild(
            op="sparse_mla_decode", kernel=_KERNELS + "sparse_mla_decode_kernel", signature=_decode_signature(),
            constexprs=(("D", dim), ("D_MAIN", main), ("D_TAIL", tail), ("BLOCK_H", cfg.BLOCK_H),
                        ("BLOCK_N", cfg.BLOCK_N), ("HAS_LEN", has_extra), ("HAS_EXTRA", has_extra),
                        ("HAS_XLEN", has_extra), ("HAS_SINK", has_extra), ("PARTIAL", cfg.SPLIT > 1),
                        ("IEEE", False), ("WIDE", wide), ("IDS_AHEAD", cfg.IDS_AHEAD),
                        ("DV_SPLIT", cfg.DV_SPLIT)),
            options=(("num_warps", cfg.num_warps), ("num_stages", cfg.num_stages)),
            aligned=_DECODE_ALIGNED,
            label=(f"D={dim}{' +extra +sink' if has_extra else ''} BLOCK_H={cfg.BLOCK_H} BLOCK_N={cfg.BLOCK_N} "
                   f"warps={cfg.num_warps} stages={cfg.num_stages}{' ids-ahead' if cfg.IDS_AHEAD else ''}"
                   f"{' dv-split' if cfg.DV_SPLIT > 1 else ''} "
                   f"{'partial' if cfg.SPLIT > 1 else 'final'}"
                   f"{' int64' if wide else ''}"),
            expects_dot=True))
    if arch == "sm90":
        builds += _wgmma_builds()
    for split, sink in itertools.product(reduce_splits, (False, True)):
        block_s, block_dv = reduce_blocks(split)
        builds.append(KernelBuild(
            op="sparse_mla_decode", kernel=_KERNELS + "sparse_mla_reduce_kernel",
            signature=(("part_out_ptr", _partial_pointer()), ("part_lse_ptr", "*fp32"), ("sink_ptr", "*fp32"),
                       ("out_ptr", "*bf16"), ("lse_ptr", "*fp32"), ("num_heads", "i32"), ("d_v", "i32"),
                       ("out_stride_t", "i32"), ("out_stride_h", "i32"), ("lse_stride", "i32"), ("split", "i32")),
            constexprs=(("BLOCK_H", REDUCE_BLOCK_H), ("BLOCK_DV", block_dv), ("BLOCK_S", block_s),
                        ("HAS_SINK", sink)),
            aligned=("num_heads", "d_v", "out_stride_t", "out_stride_h", "lse_stride"),
            options=(("num_warps", REDUCE_WARPS),),
            label=f"reduce split={split} BLOCK_H={REDUCE_BLOCK_H} BLOCK_DV={block_dv} sink={sink}"))
    return builds


# (BLOCK_H, BLOCK_N, warps, stages, IDS_AHEAD, DV_SPLIT) that compile without
# spills on sm90 with Triton 3.6 and 3.9, final and partial, with int32 and
# int64 cache offsets: _TUNE_SHAPES for D = 576 and for D = 512 with the extra
# key set, _TUNE_SHAPES_D576 for D = 576 alone (build_variants builds each
# for its D on sm90, so CI checks this claim).
# - 64 heads sit at 255 registers on 3.9: 64-key steps, a third stage with
#   32-key steps, or reading ids ahead (24-64 B of stack on 3.9, none on 3.6
#   or 3.8) spill there.
# - 16 heads on four warps spill with ids ahead and 64-key steps at D = 576.
# - 128 heads with d_v in two programs take 186-237 registers (a [128, 256]
#   accumulator on eight warps) and up to 221 KB of shared memory at D = 576,
#   147 KB of it Q, so no third stage of 32-key tiles fits.
# - 64 heads with d_v halves on four warps (one warpgroup, two programs an SM:
#   214-247 registers, 98-111 KB) fit with 16-key steps; 32-key steps spill on
#   3.9.
# - 16 heads on eight warps (106-183 registers, ids ahead included): for
#   T <= 8, where one four-warp program per SM leaves each scheduler one
#   warp. Nsight Compute on the H100 (V3.2, H = 128, T = 1, 16 heads on four
#   warps) counted 3300 instructions per warp, about 4.7 cycles apart: the
#   program waits on each instruction's latency. Eight warps split that work;
#   in the first re-tune with them they won V3.2 at 64 heads, T <= 2. With
#   64-key steps they spill 8 B on 3.9 at D = 512 with the extra keys (final
#   output, int64 offsets), so those two are offered at D = 576 only.
_TUNE_SHAPES = ((16, 32, 4, 3, False, 1), (16, 64, 4, 2, False, 1),
                (32, 64, 8, 2, False, 1), (64, 16, 8, 3, False, 1), (64, 32, 8, 2, False, 1),
                (16, 16, 4, 4, True, 1), (16, 32, 4, 3, True, 1), (16, 32, 4, 4, True, 1), (32, 32, 8, 2, True, 1),
                (128, 16, 8, 3, False, 2), (128, 32, 8, 2, False, 2), (128, 32, 8, 2, True, 2),
                (64, 16, 4, 2, False, 2), (64, 16, 4, 3, False, 2),
                (16, 32, 8, 3, False, 1), (16, 32, 8, 3, True, 1), (16, 16, 8, 4, True, 1))
_TUNE_SHAPES_D576 = ((16, 64, 8, 2, False, 1), (16, 64, 8, 2, True, 1))


def tune_shapes(head_dim: int) -> tuple[tuple[int, int, int, int, bool, int], ...]:
    """The ``tl`` kernel's launch shapes the tuner may take at ``head_dim`` (all compile without
    spills there on sm90, Triton 3.6 and 3.9)."""
    return _TUNE_SHAPES + (_TUNE_SHAPES_D576 if head_dim == 576 else ())


# (BLOCK_N, stages) of the Gluon wgmma kernel (64 heads, eight warps) that fit sm90's 227 KiB of
# shared memory: Q (64 x D) plus STAGES key tiles (BLOCK_N x D) plus P; at D = 576, 224.5 KiB (64 keys,
# two stages) and 184.5 KiB (32 keys, three). No spills on 3.6 or 3.9 (built for sm90 by build_variants,
# so CI checks this). On the H100 the first won every regime it was tuned for (ci/mla_sweep.py: 1.13-1.34x
# the second).
_WGMMA_TUNE_SHAPES = ((64, 2), (32, 3))
# The ping-pong kernel's (BLOCK_N, stages): 64-key tiles in two buffers, one per computing warpgroup.
_PINGPONG_SHAPE = (64, 2)


def tune_config(shape: tuple[int, int, int, int, bool, int], split: int) -> MlaConfig:
    """The launch of a ``_TUNE_SHAPES`` entry with ``split`` key chunks."""
    block_h, block_n, warps, stages, ahead, dv_split = shape
    return MlaConfig(block_h, block_n, warps, stages, split, ahead, dv_split)


def wgmma_config(shape: tuple[int, int], split: int) -> MlaConfig:
    """The launch of a ``_WGMMA_TUNE_SHAPES`` entry with ``split`` key chunks."""
    block_n, stages = shape
    return MlaConfig(WGMMA_BLOCK_H, block_n, WGMMA_WARPS, stages, split, WGMMA=True)


def pingpong_config(split: int) -> MlaConfig:
    """The warp-specialised kernel's launch with ``split`` key chunks (64 keys a step, two buffers)."""
    return dataclasses.replace(wgmma_config(_PINGPONG_SHAPE, split), PINGPONG=True)


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[MlaConfig]:
    heads, keys, tokens = regime["heads"], regime["keys"], regime["tokens"]
    cands = []
    for shape in tune_shapes(regime["head_dim"]):
        block_h, block_n, *_, dv_split = shape
        if block_h > max(16, next_power_of_2(heads)):
            continue
        for split in (1, 2, 4, 8, 16, 32, 64):
            programs = tokens * -(-heads // block_h) * dv_split * split
            if split > 1 and (keys // split < block_n or programs > 4 * device.limits.compute_units):
                continue
            cands.append(tune_config(shape, split))
    if device.arch == "sm90" and heads >= WGMMA_BLOCK_H and regime["head_dim"] in (576, 512):
        for shape, split in itertools.product(_WGMMA_TUNE_SHAPES, (1, 2, 4, 8, 16, 32, 64)):
            programs = tokens * -(-heads // WGMMA_BLOCK_H) * split
            if split == 1 or (keys // split >= shape[0] and programs <= 4 * device.limits.compute_units):
                cands.append(wgmma_config(shape, split))
                if shape == _PINGPONG_SHAPE:
                    cands.append(pingpong_config(split))
    return cands


def _tune_inputs(regime: Mapping[str, int], device: torch.device, gen: torch.Generator):
    from rocmoe.backends.torch.sparse_mla_decode import sparse_mla_decode_torch
    from rocmoe.bench.cases import mla_case
    from rocmoe.bench.timing import rotating_sets
    from rocmoe.tune import TuneInputs

    case = mla_case(_bench_model(regime), regime["heads"], regime["tokens"])
    sets = rotating_sets(device, case.set_bytes)
    inputs = [case.make_inputs(device, gen) for _ in range(sets)]
    outputs = [case.make_outputs(inp) for inp in inputs]

    def run(params: MlaConfig, i: int) -> None:
        inp, out = inputs[i], outputs[i]
        launch(inp["q"], inp["cache"], inp["indices"], case.extra["scale"], 512, None, None, inp.get("extra_cache"),
               inp.get("extra_indices"), None, out["out"], out["lse"], params)

    # The fp32 reference once per regime, on the device (the bench's fp64 CPU
    # check per candidate would cost more than the sweep).
    first = inputs[0]
    ref_out, ref_lse = sparse_mla_decode_torch(first["q"], first["cache"], first["indices"], case.extra["scale"],
                                               512, None, None, first.get("extra_cache"), first.get("extra_indices"))

    def check(params: MlaConfig) -> bool:
        out, lse = outputs[0]["out"], outputs[0]["lse"]
        out.fill_(float("nan"))
        run(params, 0)
        got = out.float()
        return (torch.allclose(got, ref_out, atol=2e-2, rtol=2e-2)
                and float((got - ref_out).norm() / ref_out.norm()) <= 5e-3
                and float((lse - ref_lse).abs().max()) <= 1e-3)

    return TuneInputs(sets, run, check)


def _bench_model(regime: Mapping[str, int]) -> str:
    name = next((n for n, dim, _, topk, extra in BENCH_SHAPES
                 if (dim, topk + extra) == (regime["head_dim"], regime["keys"])), None)
    if name is None:
        raise ValueError(f"sparse_mla_decode tuning has inputs only for the benchmark models' (D, keys); "
                         f"got D={regime['head_dim']}, keys={regime['keys']}")
    return name


def _tune_meta_launch(regime: Mapping[str, int], params: MlaConfig) -> None:
    """The tuner's launch of ``params`` on meta tensors shaped as _tune_inputs' (for compile_ahead)."""
    from rocmoe.bench.cases import mla_shapes

    name = _bench_model(regime)
    shapes = mla_shapes(name, regime["heads"], regime["tokens"])
    meta = {k: torch.empty(shape, dtype=torch.int32 if k.endswith("indices") else torch.bfloat16, device="meta")
            for k, shape in shapes.items()}
    tokens, heads, dim = shapes["q"]
    out = torch.empty(tokens, heads, 512, dtype=torch.bfloat16, device="meta")
    lse = torch.empty(tokens, heads, dtype=torch.float32, device="meta")
    launch(meta["q"], meta["cache"], meta["indices"], dim ** -0.5, 512, None, None, meta.get("extra_cache"),
           meta.get("extra_indices"), None, out, lse, params)


def _tuning():
    from rocmoe.tune import Tuning

    def regimes(device: Device | None = None):
        device = device or Device.current()
        return [_regime(device, t, h, topk + extra, dim)
                for _, dim, h, topk, extra in BENCH_SHAPES for t in BENCH_TOKENS]

    def regime_of_shape(shape, device: Device):
        return _regime(device, shape["tokens"], shape["heads"], shape["topk"] + shape["extra_topk"],
                       shape["head_dim"])

    return Tuning(SPEC, regimes=regimes, candidates=_tune_candidates, make_inputs=_tune_inputs, split_key="tokens",
                  regime_of_shape=regime_of_shape, meta_launch=_tune_meta_launch)


TUNING = _tuning()
