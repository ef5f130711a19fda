"""Triton backend of ``gemma4_routing``: one launch for top-k + softmax + scale."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton._common import TritonOp, launch_device, next_power_of_2, pdl_kwargs, uses_pdl, with_pdl
from rocmoe.backends.triton._gemma4_routing_kernel import gemma4_routing_kernel
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["RoutingConfig", "SPEC", "TUNING", "launch", "build_variants", "IMPLEMENTATION", "MAX_EXPERTS"]

# Keys spend log2(E) bits on the expert id: at E = 1024 fp32 keys still keep 21 value bits.
MAX_EXPERTS = 1024


@dataclass(frozen=True)
class RoutingConfig:
    """BLOCK_T tokens per program; LANES threads share one token's row (each
    holds E / LANES logits, so fewer lanes = more register work, fewer
    shuffles); KEY_BITS 32 (exact for bf16/fp16, guarded for fp32) or 64 (exact)."""

    BLOCK_T: int
    num_warps: int
    LANES: int = 8
    KEY_BITS: int = 32


def _lanes_for(experts: int, wanted: int, warp_size: int) -> int:
    """Lanes per token: ``wanted``, but no more than the warp and enough that a
    thread holds at most 32 logits (register pressure at large E)."""
    return max(1, min(warp_size, max(wanted, next_power_of_2(experts) // 32)))


def _heuristic(warp_size: int):
    def choose(regime: Mapping[str, int]) -> RoutingConfig:
        tokens, experts, bits = regime["tokens"], regime["experts"], regime["logit_bits"]
        if tokens <= 256:
            # Latency regime: one token per warp (its row across the lanes), one warp per program.
            lanes = _lanes_for(experts, 32, warp_size)
            return RoutingConfig(max(1, warp_size // lanes), 1, lanes, 32)
        # Throughput regime (measured on sm90): a token over 8 lanes (fp32) or 4 (16-bit), so most
        # of each reduction is register work; 16-bit rows are half the bytes, so two tokens per thread.
        lanes = _lanes_for(experts, 8 if bits == 32 else 4, warp_size)
        rows_per_warp = max(1, warp_size // lanes)
        return RoutingConfig(rows_per_warp * (1 if bits == 32 else 2), 1, lanes, 32)

    return choose


#: Tokens per program under the CPU interpreter (see _interpreter_heuristic).
INTERPRETER_BLOCK_T = 64


def _interpreter_heuristic(regime: Mapping[str, int]) -> RoutingConfig:
    """The CPU, where Triton kernels only run under TRITON_INTERPRET=1 (the
    tests): the interpreter runs a program's tiles as array operations and the
    programs one after another, so a program takes the NVIDIA throughput
    layout's lanes with INTERPRETER_BLOCK_T tokens. (T = 1000, E = 1024 fp32:
    68 s in one-token programs, 1.5 s in 64-token ones.) The GPU launch shapes
    themselves are tested config by config."""
    gpu = _heuristic(32)({**regime, "tokens": max(regime["tokens"], 257)})
    return dataclasses.replace(gpu, BLOCK_T=INTERPRETER_BLOCK_T)


SPEC = register_spec(ConfigSpec(
    op="gemma4_routing",
    kernel="topk_softmax",
    params=RoutingConfig,
    regime_keys=("tokens", "experts", "logit_bits"),
    heuristics={
        "cdna3": _heuristic(64),
        "cdna4": _heuristic(64),
        "amd": _heuristic(64),
        "cpu": _interpreter_heuristic,
        "default": _heuristic(32),
    },
))


#: Programs per compute unit up to which a launch uses PDL: 32 is the most
#: programs an SM holds at once, which the one-warp programs of the large-T
#: configs reach, so larger grids run in waves. PDL hides the launch latency
#: of a short kernel; under a grid of many waves it measured slower on the H100
#: for fp32 logits (ci/pdl_compare.py, CUDA-graph replay, one run: 0.86x at
#: T = 65536 and 0.75x at T = 262144, against 1.14-1.19x at T <= 1024; bf16
#: 1.16-1.25x up to T = 8192 and 1.01-1.02x above).
PDL_PROGRAMS_PER_UNIT = 32


def pdl_for_grid(device: Device, programs: int) -> dict[str, bool]:
    """The PDL launch keywords for a grid of ``programs`` on ``device``: PDL only
    where the device has it and the grid fits on it at once."""
    if programs > PDL_PROGRAMS_PER_UNIT * device.limits.compute_units:
        return {"PDL": False}
    return pdl_kwargs(device)


def launch(gating_output: torch.Tensor, topk: int, per_expert_scale: torch.Tensor, out_weights: torch.Tensor,
           out_ids: torch.Tensor, config: RoutingConfig) -> None:
    """Launch the kernel with an explicit config (the tuner and build-check use this).

    A program takes at least as many tokens as its threads cover (num_warps x
    warp size / lanes): fewer would leave threads holding copies, a layout
    the compiler does not reduce correctly everywhere."""
    num_tokens, num_experts = gating_output.shape
    layout = kernel_layout(gating_output.dtype, config, topk, num_experts)
    device = Device.of(gating_output)
    block_t = program_tokens(config, layout, device.limits.warp_size)
    grid = (triton.cdiv(num_tokens, block_t),)
    with launch_device(gating_output):
        gemma4_routing_kernel[grid](
            gating_output, per_expert_scale, out_weights, out_ids,
            num_tokens, num_experts, gating_output.stride(0),
            TOPK=topk, BLOCK_T=block_t, num_warps=config.num_warps, **layout, **pdl_for_grid(device, grid[0]),
        )


def program_tokens(config: RoutingConfig, layout: Mapping[str, int | bool], warp_size: int) -> int:
    """BLOCK_T as launched: at least the tokens the program's threads cover."""
    return max(config.BLOCK_T, config.num_warps * warp_size // int(layout["LANES"]))


def kernel_layout(dtype: torch.dtype, config: RoutingConfig, topk: int, experts: int) -> dict[str, int | bool]:
    """The kernel's tile and key constexprs.

    A token's logits are spread over LANES lanes, NCHUNK * VEC per lane,
    loaded VEC at a time; each lane keeps SPL of the OUT output slots.
    Keys hold VALUE_BITS of the logit's signed magnitude above log2(BLOCK_E)
    id bits, at most 31 bits in all so key differences cannot overflow:
    every bit of a bf16/fp16 logit (exact; as fp32 integers when they fit in
    23 bits, KEY_KIND 2), but not of an fp32 one, which is guarded with a
    K+1-th key - and when K+1 exceeds the row there is no boundary to guard,
    so 64-bit keys (KEY_KIND 1) are used instead."""
    block_e = next_power_of_2(experts)
    log_e = block_e.bit_length() - 1
    input_bits = 8 * dtype.itemsize
    value_bits = min(input_bits, 31 - log_e)
    guard = value_bits < input_bits
    key_kind = 0
    if config.KEY_BITS == 64 or (guard and topk + 1 > block_e):
        key_kind, guard, value_bits = 1, False, 32
    elif not guard and value_bits + log_e <= 23:
        key_kind = 2
    # 16-byte vectors, unless the row is too short to give LANES lanes one each (then a whole
    # warp can still reduce a token with one instruction).
    lanes = min(config.LANES, block_e)
    vec = min(16 // dtype.itemsize, block_e // lanes)
    chunk = lanes * vec
    out = next_power_of_2(topk)
    # Each lane of a token keeps SPL output slots, so the softmax and stores run once per slot;
    # they must fit in its registers of the first chunk, else (SPL 0) every lane keeps every slot.
    spl = max(1, out // lanes)
    spl = spl if spl <= vec else 0
    return {"NCHUNK": block_e // chunk, "LANES": lanes, "VEC": vec, "SPL": spl, "OUT": out, "LOG_E": log_e,
            "PAD": experts != block_e, "VALUE_BITS": value_bits, "KEY_KIND": key_kind, "GUARD": guard}


BENCH_TOKENS = (1, 16, 128, 1024, 8192, 65536, 262144)


def build_variants(arch: str):
    """Every launch of this kernel that shipped tables or heuristics can make on
    ``arch`` (for ``rocmoe build-check``): benchmark shapes E=128 K=8 and the
    largest supported E, fp32 and bf16 logits."""
    from rocmoe.build_check import KernelBuild

    device = Device.from_arch(arch)
    table = SPEC.table(arch)
    heuristic = SPEC.heuristic(device)
    configs = {(128, bits, heuristic({"tokens": t, "experts": 128, "logit_bits": bits}))
               for t in BENCH_TOKENS for bits in (16, 32)}
    configs |= {(MAX_EXPERTS, bits, heuristic({"tokens": t, "experts": MAX_EXPERTS, "logit_bits": bits}))
                for t in (1, 65536) for bits in (16, 32)}
    if table is not None:
        configs |= {(128, when.get("logit_bits", (32, 32))[0], params) for when, params in table.entries}
    builds = []
    for experts, bits, cfg in sorted(configs, key=repr):
        for torch_dtype, dtype in ((torch.float32, "fp32"),) if bits == 32 else (
                (torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            keys = kernel_layout(torch_dtype, cfg, 8, experts)
            block_t = program_tokens(cfg, keys, device.limits.warp_size)
            builds.append(KernelBuild(
                op="gemma4_routing",
                kernel="rocmoe.backends.triton._gemma4_routing_kernel:gemma4_routing_kernel",
                signature=(("logits_ptr", f"*{dtype}"), ("scale_ptr", "*fp32"), ("weights_ptr", "*fp32"),
                           ("ids_ptr", "*i32"), ("num_tokens", "i32"), ("num_experts", "i32"),
                           ("row_stride", "i32")),
                constexprs=(("TOPK", 8), ("BLOCK_T", block_t), *keys.items()),
                options=(("num_warps", cfg.num_warps),),
                # Both experts counts built are multiples of 16, as is the stride of a contiguous row:
                # the launch specialises them so, and only then are the loads vectorised.
                aligned=("num_experts", "row_stride"),
                label=(f"E={experts} K=8 {dtype} BLOCK_T={block_t} warps={cfg.num_warps} "
                       f"lanes={cfg.LANES} keys={keys['KEY_KIND']}"),
            ))
    if not uses_pdl(device):
        return with_pdl(builds, arch)
    # Under PDL, large grids launch without it (pdl_for_grid): both kernels of every config.
    return with_pdl(builds, arch) + [dataclasses.replace(b, constexprs=(*b.constexprs, ("PDL", False)),
                                                         label=f"{b.label} no-pdl") for b in builds]


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[RoutingConfig]:
    warp = device.limits.warp_size
    block_e = next_power_of_2(regime["experts"])
    # Taller tiles than this leave compute units idle; no point measuring them.
    tallest = next_power_of_2(max(1, -(-regime["tokens"] // device.limits.compute_units)))
    cands = set()
    for wanted in (4, 8, 16, 32):
        lanes = _lanes_for(regime["experts"], wanted, warp)
        for warps in (1, 2, 4):
            # Fewer tokens than the threads cover would leave lanes holding copies.
            shortest = max(1, warps * warp // lanes)
            for rows_per_thread in (1, 2, 4):
                block_t = shortest * rows_per_thread
                if block_t <= max(shortest, tallest) and block_t * block_e <= 16384:
                    # fp32 logits: 64-bit keys skip the guard's extra key and the read-back of the
                    # exact logits, for twice the key work. On sm90 they won no regime, not even
                    # T = 1 (rocmoe tune, 2026-11-23); other archs measure them too.
                    for key_bits in (32, 64) if regime["logit_bits"] == 32 else (32,):
                        cands.add(RoutingConfig(block_t, warps, lanes, key_bits))
    return sorted(cands, key=repr)


def _tune_inputs(regime: Mapping[str, int], device: torch.device, gen: torch.Generator):
    from rocmoe.backends.torch.gemma4_routing import gemma4_routing_torch
    from rocmoe.bench.timing import rotating_sets
    from rocmoe.tune import TuneInputs

    tokens, experts, topk = regime["tokens"], regime["experts"], 8
    # 16-bit: bf16 as the models produce it (fp16 on the CPU, whose interpreter has no bf16).
    dtype = torch.float32 if regime["logit_bits"] == 32 else (torch.float16 if device.type == "cpu" else torch.bfloat16)
    sets = rotating_sets(device, tokens * experts * dtype.itemsize)
    logits = [torch.randn(tokens, experts, generator=gen).to(dtype).to(device) for _ in range(sets)]
    scale = (torch.rand(experts, generator=gen) + 0.5).to(device)
    weights = [torch.empty(tokens, topk, device=device) for _ in range(sets)]
    ids = [torch.empty(tokens, topk, dtype=torch.int32, device=device) for _ in range(sets)]
    ref_w, ref_ids = gemma4_routing_torch(logits[0], topk, scale)

    def run(params: RoutingConfig, i: int) -> None:
        launch(logits[i], topk, scale, weights[i], ids[i], params)

    def check(params: RoutingConfig) -> bool:
        weights[0].fill_(float("nan"))
        run(params, 0)
        return torch.equal(ids[0], ref_ids) and torch.allclose(weights[0], ref_w, rtol=1e-5, atol=1e-6)

    return TuneInputs(sets, run, check)


def logit_bits(dtype: torch.dtype) -> int:
    """The regime key for a logits dtype: 32 (fp32) or 16 (bf16, fp16)."""
    return 8 * dtype.itemsize


def _tuning():
    from rocmoe.tune import Tuning

    def regime_of_shape(shape, device: Device):
        dtype = getattr(torch, shape.get("dtype", "float32"), torch.float32)
        return {"tokens": int(shape["tokens"]), "experts": int(shape["experts"]), "logit_bits": logit_bits(dtype)}

    return Tuning(SPEC, regimes=lambda: [{"tokens": t, "experts": 128, "logit_bits": bits}
                                         for bits in (32, 16) for t in BENCH_TOKENS],
                  candidates=_tune_candidates, make_inputs=_tune_inputs, split_key="tokens",
                  regime_of_shape=regime_of_shape)


class TritonGemma4Routing(TritonOp):
    op = "gemma4_routing"

    def not_supported_reasons(self, device: Device, problem) -> list[str]:
        reasons = super().not_supported_reasons(device, problem)
        if problem is not None and problem.num_experts > MAX_EXPERTS:
            reasons.append(f"triton gemma4_routing supports E <= {MAX_EXPERTS}, got E = {problem.num_experts}")
        return reasons

    def config_source(self, device: Device) -> str | None:
        return SPEC.source(device)

    def run(self, gating_output, topk, per_expert_scale, out_weights, out_ids) -> None:
        device = Device.of(gating_output)
        config, _ = SPEC.choose(device, tokens=gating_output.shape[0], experts=gating_output.shape[1],
                                logit_bits=logit_bits(gating_output.dtype))
        launch(gating_output, topk, per_expert_scale, out_weights, out_ids, config)


IMPLEMENTATION = TritonGemma4Routing()

TUNING = _tuning()
