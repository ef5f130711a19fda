"""Triton backend of ``gemma4_routing``: one launch for top-k + softmax + scale."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton._common import TritonOp, launch_device, next_power_of_2
from rocmoe.backends.triton._gemma4_routing_kernel import gemma4_routing_kernel
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["RoutingConfig", "SPEC", "TUNING", "launch", "build_variants", "IMPLEMENTATION", "MAX_EXPERTS"]

MAX_EXPERTS = 1024  # the low half of a key holds 0xFFFF - expert; registers bound it first


@dataclass(frozen=True)
class RoutingConfig:
    """BLOCK_T tokens per program; METHOD 0 = K max-reductions, 1 = bitonic
    top-k; KEY_BITS 32 (exact via the near-tie guard) or 64."""

    BLOCK_T: int
    num_warps: int
    METHOD: int = 0
    KEY_BITS: int = 32


def _elements_per_program(target: int, experts: int) -> int:
    return max(1, min(64, target // next_power_of_2(experts)))


def _heuristic(warp_size: int):
    def choose(regime: Mapping[str, int]) -> RoutingConfig:
        tokens, experts = regime["tokens"], regime["experts"]
        if tokens <= 256:
            # Latency regime: one token per program keeps every SM busy early.
            return RoutingConfig(1, 1 if experts * 32 <= 128 * warp_size else 4, 0, 32)
        return RoutingConfig(_elements_per_program(1024, experts), 4, 0, 32)

    return choose


SPEC = register_spec(ConfigSpec(
    op="gemma4_routing",
    kernel="topk_softmax",
    params=RoutingConfig,
    regime_keys=("tokens", "experts"),
    heuristics={
        "cdna3": _heuristic(64),
        "cdna4": _heuristic(64),
        "amd": _heuristic(64),
        "default": _heuristic(32),
    },
))


def launch(gating_output: torch.Tensor, topk: int, per_expert_scale: torch.Tensor, out_weights: torch.Tensor,
           out_ids: torch.Tensor, config: RoutingConfig) -> None:
    """Launch the kernel with an explicit config (the tuner and build-check use this)."""
    num_tokens, num_experts = gating_output.shape
    grid = (triton.cdiv(num_tokens, config.BLOCK_T),)
    with launch_device(gating_output):
        gemma4_routing_kernel[grid](
            gating_output, per_expert_scale, out_weights, out_ids,
            num_tokens, num_experts, gating_output.stride(0),
            TOPK=topk, BLOCK_T=config.BLOCK_T, METHOD=config.METHOD, num_warps=config.num_warps,
            **_key_layout(gating_output.dtype, config, topk, num_experts),
        )


def _key_layout(dtype: torch.dtype, config: RoutingConfig, topk: int, experts: int) -> dict[str, int | bool]:
    """The kernel's key constexprs. 32-bit keys drop the low log2(E) bits of
    the fp32 image: zero for bf16/fp16 logits (exact), possibly not for fp32,
    which is guarded with a K+1-th key - and when K+1 exceeds the row there is
    no boundary to guard, so 64-bit keys are used instead."""
    block_e = next_power_of_2(experts)
    key_bits = config.KEY_BITS
    if key_bits == 32 and next_power_of_2(topk + 1) > block_e:
        key_bits = 64
    guard = key_bits == 32 and dtype == torch.float32
    return {"BLOCK_E": block_e, "BLOCK_K": next_power_of_2(topk + 1 if guard else topk), "KEY_BITS": key_bits,
            "GUARD": guard}


BENCH_TOKENS = (1, 16, 128, 1024, 8192, 65536, 262144)


def build_variants(arch: str):
    """Every launch of this kernel that shipped tables or heuristics can make on
    ``arch`` (for ``rocmoe build-check``): benchmark shapes E=128 K=8 and the
    largest supported E, fp32 and bf16 logits."""
    from rocmoe.build_check import KernelBuild

    device = Device.from_arch(arch)
    table = SPEC.table(arch)
    configs = {(128, SPEC.heuristic(device)({"tokens": t, "experts": 128})) for t in BENCH_TOKENS}
    configs |= {(MAX_EXPERTS, SPEC.heuristic(device)({"tokens": t, "experts": MAX_EXPERTS})) for t in (1, 65536)}
    if table is not None:
        configs |= {(128, params) for _, params in table.entries}
    builds = []
    for experts, cfg in sorted(configs, key=repr):
        for dtype in ("fp32", "bf16"):
            keys = _key_layout(torch.float32 if dtype == "fp32" else torch.bfloat16, cfg, 8, experts)
            builds.append(KernelBuild(
                op="gemma4_routing",
                kernel="rocmoe.backends.triton._gemma4_routing_kernel:gemma4_routing_kernel",
                signature=(("logits_ptr", f"*{dtype}"), ("scale_ptr", "*fp32"), ("weights_ptr", "*fp32"),
                           ("ids_ptr", "*i32"), ("num_tokens", "i32"), ("num_experts", "i32"),
                           ("row_stride", "i32")),
                constexprs=(("TOPK", 8), ("BLOCK_T", cfg.BLOCK_T), ("METHOD", cfg.METHOD), *keys.items()),
                options=(("num_warps", cfg.num_warps),),
                label=(f"E={experts} K=8 {dtype} BLOCK_T={cfg.BLOCK_T} warps={cfg.num_warps} "
                       f"method={cfg.METHOD} keys={keys['KEY_BITS']}"),
            ))
    return builds


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[RoutingConfig]:
    block_e = next_power_of_2(regime["experts"])
    # Taller tiles than this leave compute units idle; no point measuring them.
    tallest = next_power_of_2(max(1, -(-regime["tokens"] // device.limits.compute_units)))
    cands = []
    for block_t in (1, 2, 4, 8, 16, 32, 64):
        if block_t > max(4, tallest) or block_t * block_e > 16384:
            continue
        for warps in (1, 2, 4, 8):
            if warps * device.limits.warp_size > block_t * block_e:
                continue
            # 32-bit keys on fp32 logits always take the max path (the guard needs K+1 keys).
            cands += [RoutingConfig(block_t, warps, 0, 32)]
            cands += [RoutingConfig(block_t, warps, method, 64) for method in (0, 1)]
    return cands


def _tune_inputs(regime: Mapping[str, int], device: torch.device, gen: torch.Generator):
    from rocmoe.backends.torch.gemma4_routing import gemma4_routing_torch
    from rocmoe.bench.timing import rotating_sets
    from rocmoe.tune import TuneInputs

    tokens, experts, topk = regime["tokens"], regime["experts"], 8
    sets = rotating_sets(device, tokens * experts * 4)
    logits = [torch.randn(tokens, experts, generator=gen).to(device) for _ in range(sets)]
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


def _tuning():
    from rocmoe.tune import Tuning

    return Tuning(SPEC, regimes=lambda: [{"tokens": t, "experts": 128} for t in BENCH_TOKENS],
                  candidates=_tune_candidates, make_inputs=_tune_inputs, split_key="tokens")


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
        config, _ = SPEC.choose(device, tokens=gating_output.shape[0], experts=gating_output.shape[1])
        launch(gating_output, topk, per_expert_scale, out_weights, out_ids, config)


IMPLEMENTATION = TritonGemma4Routing()

TUNING = _tuning()
