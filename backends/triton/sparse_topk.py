"""Triton backend of ``sparse_topk``: the window fill and a radix select.

- Short-circuit (the caller's ``max_seq_len <= topk``, no logits, or
  ``L <= topk``): one launch of the window fill; the scores are never read.
- General path: a radix select per row (see the kernel module). SPLIT = 1
  runs one program per row with every pass in one launch; SPLIT > 1 cuts each
  row into SPLIT chunks for a coarse histogram and a partition launch (each
  reads the row once), then one program per row selects among the few
  candidates left: a memset and three launches. Rows whose window fits in
  topk are filled in either path, so no host-side decision (and no sync) is
  needed: the op is CUDA-graph capturable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton._common import TritonOp, launch_device, next_power_of_2
from rocmoe.backends.triton._sparse_topk_kernel import (
    HEAD_STRIDE as _HEAD_STRIDE,
    sparse_topk_candidates_kernel,
    sparse_topk_coarse_hist_kernel,
    sparse_topk_partition_kernel,
    sparse_topk_row_kernel,
    sparse_topk_window_kernel,
)
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["TopkConfig", "SPEC", "TUNING", "launch_window", "launch_select", "build_variants", "IMPLEMENTATION"]

WINDOW_BLOCK = 1024
HEAD_STRIDE = int(_HEAD_STRIDE.value)
#: Register ceiling of the candidates kernel on NVIDIA. Left alone, ptxas
#: aims at 64 registers and spills the largest resident block; with room for
#: 78 it spills nothing (build-check).
SELECT_MAX_REGISTERS = 128


#: Split-path programs per compute unit beyond which no config is tuned (the
#: tuner's candidates stop there) and the row kernel is the better use of a full device.
MAX_SPLIT_PROGRAMS_PER_UNIT = 32


def _select_options(device: Device) -> dict[str, int]:
    """Launch options of the candidates kernel beyond num_warps, per vendor
    (the AMD compiler rejects ``maxnreg``)."""
    return {"maxnreg": SELECT_MAX_REGISTERS} if device.vendor == "nvidia" else {}


@dataclass(frozen=True)
class TopkConfig:
    """BLOCK scores per step, SPLIT programs per row (1 = one fused launch),
    RADIX_BITS per pass (8: 4 passes of 256 bins; 11: 3 passes of 2048),
    RESIDENT: candidates the split path's last step keeps in registers
    (a power of two; more are streamed BLOCK at a time)."""

    BLOCK: int
    num_warps: int
    SPLIT: int = 1
    RADIX_BITS: int = 11
    RESIDENT: int = 4096


def resident_candidates(num_warps: int, warp_size: int = 32) -> int:
    """Candidates the last step holds in registers: 16 per lane of a 32-wide
    warp, 4 per lane of a 64-wide one (more spills, build-check says)."""
    return (16 if warp_size == 32 else 4) * warp_size * num_warps


def _heuristic(warps: int, warp_size: int):
    def choose(regime: Mapping[str, int]) -> TopkConfig:
        tokens, seq_len, units = regime["tokens"], regime["seq_len"], regime["compute_units"]
        block = 1024
        # Short chunks (one step each) and up to 16 programs per compute unit:
        # the split path's passes are bound by latency, not bandwidth, below that.
        split = max(1, min(MAX_SPLIT_PROGRAMS_PER_UNIT // 2 * units // max(tokens, 1), seq_len // block))
        split = 1 << (split.bit_length() - 1)
        # Over whole rows 8-bit digits (256 bins) beat 11-bit ones; over the
        # split path's candidates 6-bit ones win (the sm90 tune, every shape).
        radix = 6 if split > 1 else 8
        return TopkConfig(block, warps, split, radix, resident_candidates(warps, warp_size))

    return choose


SPEC = register_spec(ConfigSpec(
    op="sparse_topk",
    kernel="radix_select",
    params=TopkConfig,
    regime_keys=("tokens", "seq_len", "compute_units"),
    heuristics={
        "cdna3": _heuristic(4, 64),
        "cdna4": _heuristic(4, 64),
        "amd": _heuristic(4, 64),
        "default": _heuristic(8, 32),
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


def candidate_capacity(width: int, topk: int) -> int:
    """Candidates per row the split path keeps (the scores in the threshold
    bin): 4 * topk (a few percent of a long row of normally distributed
    scores fall there), or the whole row when it is shorter. A row whose bin
    overflows it is selected whole by one program."""
    return min(width, 4 * topk)


def workspace_numel(num_tokens: int, width: int, topk: int, capacity: int | None = None) -> int:
    """int32 elements of the split path's workspace: a zeroed [T, HEAD_STRIDE]
    head (coarse histograms and two counters), then [T, capacity] int64
    candidates (score bits and position)."""
    capacity = candidate_capacity(width, topk) if capacity is None else capacity
    return num_tokens * (HEAD_STRIDE + 2 * capacity)


def launch_select(logits: torch.Tensor, seq_lens: torch.Tensor, topk: int, out: torch.Tensor,
                  config: TopkConfig, block_table: torch.Tensor | None = None, block_size: int | None = None,
                  workspace: torch.Tensor | None = None, capacity: int | None = None) -> None:
    """The general path with an explicit config (the tuner and build-check use
    this). ``workspace``: optional int32 scratch of at least
    :func:`workspace_numel` elements (its head is zeroed here); ``capacity``
    overrides :func:`candidate_capacity` (tests use it to overflow the list)."""
    num_tokens, width = logits.shape
    table, table_stride, max_blocks, bs, paged = _table_args(block_table, block_size, seq_lens)
    with launch_device(logits):
        if config.SPLIT == 1:
            sparse_topk_row_kernel[(num_tokens,)](
                logits, seq_lens, out, table, width, topk, logits.stride(0), out.stride(0), table_stride,
                max_blocks, bs, PAGED=paged, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
                num_warps=config.num_warps)
            return
        capacity = candidate_capacity(width, topk) if capacity is None else capacity
        numel = workspace_numel(num_tokens, width, topk, capacity)
        if workspace is None:
            workspace = torch.empty(numel, dtype=torch.int32, device=logits.device)
        workspace = workspace.view(-1)[:numel]
        head = workspace[:num_tokens * HEAD_STRIDE]
        candidates = workspace[num_tokens * HEAD_STRIDE:].view(torch.int64)  # 8-byte aligned: HEAD_STRIDE is even
        head.zero_()
        chunk = triton.cdiv(triton.cdiv(width, config.SPLIT), config.BLOCK) * config.BLOCK
        grid = (num_tokens, config.SPLIT)
        sparse_topk_coarse_hist_kernel[grid](logits, seq_lens, head, width, topk, logits.stride(0), chunk,
                                             BLOCK=config.BLOCK, num_warps=config.num_warps)
        sparse_topk_partition_kernel[grid](
            logits, seq_lens, head, candidates, out, table, width, topk, logits.stride(0), out.stride(0),
            table_stride, max_blocks, bs, chunk, capacity, PAGED=paged, BLOCK=config.BLOCK,
            num_warps=config.num_warps)
        sparse_topk_candidates_kernel[(num_tokens,)](
            logits, seq_lens, head, candidates, out, table, width, topk, logits.stride(0), out.stride(0),
            table_stride, max_blocks, bs, capacity, PAGED=paged, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
            RESIDENT=config.RESIDENT, num_warps=config.num_warps, **_select_options(Device.of(logits)))


def _regime(device: Device, num_tokens: int, width: int) -> dict[str, int]:
    return {"tokens": num_tokens, "seq_len": next_power_of_2(width), "compute_units": device.limits.compute_units}


def choose_config(device: Device, num_tokens: int, width: int) -> TopkConfig:
    """The launch config for a live [T, L] call (table, else the family heuristic).

    A table entry's bucket runs on past the largest batch the tuner measured;
    a split config is not stretched beyond the grid the tuner would consider
    (the heuristic decides there, and large batches get the row kernel), so
    neither the grid nor the workspace grows without bound with T."""
    regime = _regime(device, num_tokens, width)
    config, _ = SPEC.choose(device, **regime)
    if config.SPLIT > 1 and num_tokens * config.SPLIT > MAX_SPLIT_PROGRAMS_PER_UNIT * device.limits.compute_units:
        config = SPEC.heuristic(device)(regime)
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
        builds.append(KernelBuild(
            op="sparse_topk", kernel=_KERNELS + "sparse_topk_coarse_hist_kernel",
            signature=(("logits_ptr", "*fp32"), ("lens_ptr", "*i32"), ("head_ptr", "*i32"), ("width", "i32"),
                       ("topk", "i32"), ("logits_stride", "i32"), ("chunk", "i32")),
            constexprs=(("BLOCK", cfg.BLOCK),), options=options, label=f"{label} coarse histogram"))
        split_args = (("logits_ptr", "*fp32"), ("lens_ptr", "*i32"), ("head_ptr", "*i32"), ("cand_ptr", "*i64"),
                      ("out_ptr", "*i32"), ("table_ptr", "*i32"), ("width", "i32"), ("topk", "i32"),
                      ("logits_stride", "i32"), ("out_stride", "i32"), *table_args)
        for paged in (False, True):
            builds.append(KernelBuild(
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_partition_kernel",
                signature=(*split_args, ("chunk", "i32"), ("capacity", "i32")),
                constexprs=(("PAGED", paged), ("BLOCK", cfg.BLOCK)), options=options,
                label=f"{label} partition paged={paged}"))
            builds.append(KernelBuild(
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_candidates_kernel",
                signature=(*split_args, ("capacity", "i32")),
                constexprs=(("PAGED", paged), *common, ("RESIDENT", cfg.RESIDENT)),
                options=(*options, *_select_options(Device.from_arch(arch)).items()),
                label=f"{label} resident={cfg.RESIDENT} candidates paged={paged}"))
    return builds


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[TopkConfig]:
    tokens, width = regime["tokens"], regime["seq_len"]
    cands = []
    for block in (1024, 2048):  # 4096-wide select steps spill on sm90 (build-check)
        for warps in (4, 8):
            for radix in (6, 8, 11):
                for split in (1, 2, 4, 8, 16, 32, 64, 128):
                    # 2048-bin histograms only pay off over whole rows, 64-bin
                    # ones only over the split path's few candidates.
                    if (split > 1 and radix == 11) or (split == 1 and radix == 6):
                        continue
                    if split > 1 and (width // split < block
                                      or tokens * split > MAX_SPLIT_PROGRAMS_PER_UNIT * regime["compute_units"]):
                        continue
                    # One program per row holds the whole histogram: wider steps spill.
                    if split == 1 and (block > 1024 or (radix == 11 and warps < 8)):
                        continue
                    resident = resident_candidates(warps, device.limits.warp_size)
                    cands.append(TopkConfig(block, warps, split, radix, resident))
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
