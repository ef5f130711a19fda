"""Triton backend of ``sparse_topk``: the window fill and a radix select.

- Short-circuit (the caller's ``max_seq_len <= topk``, no logits, or
  ``L <= topk``): one launch of the window fill; the scores are never read.
- General path: a radix select per row (see the kernel module). SPLIT = 1
  runs one program per row with every pass in one launch; SPLIT > 1 cuts each
  row into SPLIT chunks and runs NPASS histogram launches and one select
  launch over a zeroed workspace. Rows whose window fits in topk are filled
  in either path, so no host-side decision (and no sync) is needed: the op
  is CUDA-graph capturable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton._common import TritonOp, launch_device, next_power_of_2
from rocmoe.backends.triton._sparse_topk_kernel import (
    sparse_topk_hist_kernel,
    sparse_topk_row_kernel,
    sparse_topk_select_kernel,
    sparse_topk_window_kernel,
)
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["TopkConfig", "SPEC", "TUNING", "launch_window", "launch_select", "build_variants", "IMPLEMENTATION"]

WINDOW_BLOCK = 1024


@dataclass(frozen=True)
class TopkConfig:
    """BLOCK scores per step, SPLIT programs per row (1 = one fused launch),
    RADIX_BITS per pass (8: 4 passes of 256 bins; 11: 3 passes of 2048)."""

    BLOCK: int
    num_warps: int
    SPLIT: int = 1
    RADIX_BITS: int = 11

    @property
    def passes(self) -> int:
        """Histogram passes over a 32-bit key (the kernels' NPASS)."""
        return -(-32 // self.RADIX_BITS)


def _heuristic(warp_size: int, warps: int):
    def choose(regime: Mapping[str, int]) -> TopkConfig:
        tokens, seq_len, units = regime["tokens"], regime["seq_len"], regime["compute_units"]
        block = 2048 if seq_len >= 16384 else 1024
        # Enough programs for two per compute unit, but chunks of at least 4 steps.
        split = max(1, min(2 * units // max(tokens, 1), seq_len // (4 * block)))
        # 8-bit digits: four passes of 256 bins beat three of 2048 at every
        # shape the sm90 tune measured.
        return TopkConfig(block, warps, next_power_of_2(split) if split > 1 else 1, 8)

    return choose


SPEC = register_spec(ConfigSpec(
    op="sparse_topk",
    kernel="radix_select",
    params=TopkConfig,
    regime_keys=("tokens", "seq_len", "compute_units"),
    heuristics={
        "cdna3": _heuristic(64, 4),
        "cdna4": _heuristic(64, 4),
        "amd": _heuristic(64, 4),
        "default": _heuristic(32, 8),
    },
))


def _table_args(block_table: torch.Tensor | None, block_size: int | None, like: torch.Tensor):
    if block_table is None:
        # Never dereferenced (PAGED is off): any int32 tensor serves as the pointer.
        return like, 0, 0, 1, False
    return block_table, block_table.stride(0), block_table.shape[1], block_size, True


def launch_window(seq_lens: torch.Tensor, width: int, topk: int, out: torch.Tensor,
                  block_table: torch.Tensor | None = None, block_size: int | None = None) -> None:
    """out[t] = 0..min(seq_lens[t], width)-1 then -1 (or cache slots). One launch."""
    table, table_stride, max_blocks, bs, paged = _table_args(block_table, block_size, seq_lens)
    block = min(WINDOW_BLOCK, next_power_of_2(topk))
    grid = (seq_lens.shape[0], triton.cdiv(topk, block))
    with launch_device(seq_lens):
        sparse_topk_window_kernel[grid](seq_lens, out, table, width, topk, out.stride(0), table_stride, max_blocks,
                                        bs, PAGED=paged, BLOCK=block, num_warps=4)


def workspace_numel(num_tokens: int, config: TopkConfig) -> int:
    """int32 elements of the split path's workspace: [T, NPASS * BINS]
    histograms, then [T, 2] slot counters, zeroed by one memset."""
    return num_tokens * (config.passes * (1 << config.RADIX_BITS) + 2)


def launch_select(logits: torch.Tensor, seq_lens: torch.Tensor, topk: int, out: torch.Tensor,
                  config: TopkConfig, block_table: torch.Tensor | None = None, block_size: int | None = None,
                  workspace: torch.Tensor | None = None) -> None:
    """The general path with an explicit config (the tuner and build-check use this)."""
    num_tokens, width = logits.shape
    table, table_stride, max_blocks, bs, paged = _table_args(block_table, block_size, seq_lens)
    with launch_device(logits):
        if config.SPLIT == 1:
            sparse_topk_row_kernel[(num_tokens,)](
                logits, seq_lens, out, table, width, topk, logits.stride(0), out.stride(0), table_stride,
                max_blocks, bs, PAGED=paged, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
                num_warps=config.num_warps)
            return
        numel = workspace_numel(num_tokens, config)
        if workspace is None:
            workspace = torch.zeros(numel, dtype=torch.int32, device=logits.device)
        else:
            workspace = workspace.view(-1)[:numel]
            workspace.zero_()
        hist, counts = workspace[:numel - 2 * num_tokens], workspace[numel - 2 * num_tokens:]
        chunk = triton.cdiv(triton.cdiv(width, config.SPLIT), config.BLOCK) * config.BLOCK
        grid = (num_tokens, config.SPLIT)
        for p in range(config.passes):
            sparse_topk_hist_kernel[grid](logits, seq_lens, hist, width, topk, logits.stride(0), chunk,
                                          PASS=p, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
                                          num_warps=config.num_warps)
        sparse_topk_select_kernel[grid](
            logits, seq_lens, hist, counts, out, table, width, topk, logits.stride(0), out.stride(0),
            table_stride, max_blocks, bs, chunk, PAGED=paged, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
            num_warps=config.num_warps)


def _regime(device: Device, num_tokens: int, width: int) -> dict[str, int]:
    return {"tokens": num_tokens, "seq_len": next_power_of_2(width), "compute_units": device.limits.compute_units}


def choose_config(device: Device, num_tokens: int, width: int) -> TopkConfig:
    """The launch config for a live [T, L] call (table, else the family heuristic)."""
    config, _ = SPEC.choose(device, **_regime(device, num_tokens, width))
    return config


class TritonSparseTopk(TritonOp):
    op = "sparse_topk"

    def config_source(self, device: Device) -> str | None:
        return SPEC.source(device)

    def run(self, logits, seq_lens, topk, block_table, block_size, max_seq_len, out) -> None:
        width = None if logits is None else logits.shape[1]
        if logits is None and max_seq_len is None and not (seq_lens.is_cuda
                                                          and torch.cuda.is_current_stream_capturing()):
            # The caller promised every window fits; check it where a sync is allowed.
            longest = int(seq_lens.max())
            if longest > topk:
                raise ValueError(f"logits is None but seq_lens has max {longest} > topk={topk}: "
                                 f"the short-circuit does not apply, so the scores are needed")
        if logits is None or width <= topk or (max_seq_len is not None and max_seq_len <= topk):
            launch_window(seq_lens, 2**31 - 1 if width is None else width, topk, out, block_table, block_size)
            return
        config = choose_config(Device.of(logits), logits.shape[0], width)
        launch_select(logits, seq_lens, topk, out, config, block_table, block_size)


IMPLEMENTATION = TritonSparseTopk()


BENCH_SHAPES = tuple((tokens, width) for tokens in (1, 64) for width in (8192, 32768, 131072))
BENCH_TOPK = 2048
_KERNELS = "rocmoe.backends.triton._sparse_topk_kernel:"


def _configs_for(arch: str) -> set[TopkConfig]:
    device = Device.from_arch(arch)
    configs = {SPEC.heuristic(device)(_regime(device, tokens, width)) for tokens, width in BENCH_SHAPES}
    # One program per row (the tuner's other shape) with each radix width; a
    # 2048-bin histogram needs 8 warps of 64 lanes on CDNA not to spill.
    configs |= {TopkConfig(1024, 8, 1, 11), TopkConfig(1024, 4, 1, 8)}
    table = SPEC.table(arch)
    if table is not None:
        configs |= {params for _, params in table.entries}
    return configs


def build_variants(arch: str):
    """Every launch that shipped tables or heuristics can make on ``arch`` at the
    benchmark shapes (for ``rocmoe build-check``), paged and not."""
    from rocmoe.build_check import KernelBuild

    table_args = (("table_stride", "i32"), ("max_blocks", "i32"), ("block_size", "i32"))
    builds = []
    for paged in (False, True):
        builds.append(KernelBuild(
            op="sparse_topk", kernel=_KERNELS + "sparse_topk_window_kernel",
            signature=(("lens_ptr", "*i32"), ("out_ptr", "*i32"), ("table_ptr", "*i32"), ("width", "i32"),
                       ("topk", "i32"), ("out_stride", "i32"), *table_args),
            constexprs=(("PAGED", paged), ("BLOCK", WINDOW_BLOCK)), options=(("num_warps", 4),),
            label=f"window fill paged={paged}"))
    for cfg in sorted(_configs_for(arch), key=repr):
        common = (("RADIX_BITS", cfg.RADIX_BITS), ("BLOCK", cfg.BLOCK))
        options = (("num_warps", cfg.num_warps),)
        label = f"BLOCK={cfg.BLOCK} warps={cfg.num_warps} split={cfg.SPLIT} radix={cfg.RADIX_BITS}"
        if cfg.SPLIT == 1:
            for paged in (False, True):
                builds.append(KernelBuild(
                    op="sparse_topk", kernel=_KERNELS + "sparse_topk_row_kernel",
                    signature=(("logits_ptr", "*fp32"), ("lens_ptr", "*i32"), ("out_ptr", "*i32"),
                               ("table_ptr", "*i32"), ("width", "i32"), ("topk", "i32"),
                               ("logits_stride", "i32"), ("out_stride", "i32"), *table_args),
                    constexprs=(("PAGED", paged), *common), options=options, label=f"{label} paged={paged}"))
            continue
        for p in range(cfg.passes):
            builds.append(KernelBuild(
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_hist_kernel",
                signature=(("logits_ptr", "*fp32"), ("lens_ptr", "*i32"), ("hist_ptr", "*i32"), ("width", "i32"),
                           ("topk", "i32"), ("logits_stride", "i32"), ("chunk", "i32")),
                constexprs=(("PASS", p), *common), options=options, label=f"{label} pass={p}"))
        for paged in (False, True):
            builds.append(KernelBuild(
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_select_kernel",
                signature=(("logits_ptr", "*fp32"), ("lens_ptr", "*i32"), ("hist_ptr", "*i32"),
                           ("count_ptr", "*i32"), ("out_ptr", "*i32"), ("table_ptr", "*i32"), ("width", "i32"),
                           ("topk", "i32"), ("logits_stride", "i32"), ("out_stride", "i32"), *table_args,
                           ("chunk", "i32")),
                constexprs=(("PAGED", paged), *common), options=options, label=f"{label} select paged={paged}"))
    return builds


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[TopkConfig]:
    tokens, width = regime["tokens"], regime["seq_len"]
    cands = []
    for block in (1024, 2048):  # 4096-wide select steps spill on sm90 (build-check)
        for warps in (4, 8):
            for radix in (8, 11):
                for split in (1, 2, 4, 8, 16, 32, 64):
                    if split > 1 and (width // split < 2 * block or tokens * split > 8 * regime["compute_units"]):
                        continue
                    # One program per row holds the whole histogram: wider steps spill.
                    if split == 1 and (block > 1024 or (radix == 11 and warps < 8)):
                        continue
                    cands.append(TopkConfig(block, warps, split, radix))
    return cands


def _tune_inputs(regime: Mapping[str, int], device: torch.device, gen: torch.Generator):
    from rocmoe.backends.torch.sparse_topk import sparse_topk_torch
    from rocmoe.bench.timing import rotating_sets
    from rocmoe.tune import TuneInputs

    tokens, width, topk = regime["tokens"], regime["seq_len"], BENCH_TOPK
    sets = rotating_sets(device, tokens * width * 4)
    logits = [torch.randn(tokens, width, generator=gen).to(device) for _ in range(sets)]
    lens = torch.full((tokens,), width, dtype=torch.int32, device=device)
    outs = [torch.empty(tokens, topk, dtype=torch.int32, device=device) for _ in range(sets)]
    want = sparse_topk_torch(logits[0], lens, topk).sort(dim=1).values

    def run(params: TopkConfig, i: int) -> None:
        launch_select(logits[i], lens, topk, outs[i], params)

    def check(params: TopkConfig) -> bool:
        outs[0].fill_(-7)
        run(params, 0)
        return torch.equal(outs[0].sort(dim=1).values, want)

    return TuneInputs(sets, run, check)


def _tuning():
    from rocmoe.tune import Tuning

    def regimes(device: Device | None = None):
        device = device or Device.current()
        return [_regime(device, t, w) for t, w in BENCH_SHAPES]

    def regime_of_shape(shape, device: Device):
        # The window-fill calls (no logits, seq_len 0) have nothing to tune.
        if shape.get("seq_len", 0) <= shape.get("topk", 0):
            return None
        return _regime(device, shape["tokens"], shape["seq_len"])

    return Tuning(SPEC, regimes=regimes, candidates=_tune_candidates, make_inputs=_tune_inputs,
                  split_key="tokens", regime_of_shape=regime_of_shape)


TUNING = _tuning()
