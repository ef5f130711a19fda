"""Triton backend of ``sparse_topk``: the window fill and a radix select.

- Short-circuit (the caller's ``max_seq_len <= topk``, no logits, or
  ``L <= topk``): one launch of the window fill; the scores are never read.
- General path: a radix select per row (see the kernel module). SPLIT = 1
  runs one program per row with every pass in one launch; SPLIT > 1 first
  bounds each row's topk-th score (from a ranked sample, one program per row,
  or from a coarse histogram of the whole row over SPLIT programs after a
  memset: the config's SAMPLE), cuts each row into SPLIT chunks for a filter
  launch, then one program per row selects among the few candidates left:
  three or four launches. Rows whose window fits in
  topk are filled in either path, so no host-side decision (and no sync) is
  needed: the op is CUDA-graph capturable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import triton

from rocmoe.backends.triton._common import TritonOp, launch_device, next_power_of_2, pdl_kwargs, with_pdl
from rocmoe.backends.triton._sparse_topk_kernel import (
    HEAD_COUNTERS as _HEAD_COUNTERS,
    HEAD_STRIDE as _HEAD_STRIDE,
    sparse_topk_candidates_kernel,
    sparse_topk_coarse_hist_kernel,
    sparse_topk_filter_kernel,
    sparse_topk_row_kernel,
    sparse_topk_sample_kernel,
    sparse_topk_window_kernel,
)
from rocmoe.configs import ConfigSpec, register_spec
from rocmoe.device import Device

__all__ = ["TopkConfig", "SPEC", "TUNING", "launch_window", "launch_select", "build_variants", "IMPLEMENTATION"]

WINDOW_BLOCK = 1024
HEAD_STRIDE = int(_HEAD_STRIDE.value)
#: Where in a head row the int64 winner/candidate counter starts (int32 units).
HEAD_COUNTERS = int(_HEAD_COUNTERS.value)
#: Register ceiling of the sample and candidates kernels on NVIDIA. Left
#: alone, ptxas aims at 64-80 registers and spills the largest resident block
#: or sample; with room for 128 neither spills (build-check).
SELECT_MAX_REGISTERS = 128


#: Split-path programs per compute unit beyond which no config is tuned (the
#: tuner's candidates stop there) and the row kernel is the better use of a full device.
MAX_SPLIT_PROGRAMS_PER_UNIT = 32


def _select_options(device: Device) -> dict[str, int]:
    """Launch options of the sample and candidates kernels beyond num_warps, per vendor
    (the AMD compiler rejects ``maxnreg``)."""
    return {"maxnreg": SELECT_MAX_REGISTERS} if device.vendor == "nvidia" else {}


@dataclass(frozen=True)
class TopkConfig:
    """BLOCK scores per step, SPLIT programs per row (1 = one fused launch),
    RADIX_BITS per pass of a radix select over a whole row or over a
    candidate list too long for registers (8: 4 passes of 256 bins; 11: 3
    passes of 2048),
    RESIDENT: candidates the split path's last step keeps in registers
    (a power of two; more are streamed BLOCK at a time). How the split path
    finds its bounds, SAMPLE: the scores of a row it ranks (a power of two,
    at least 32), or 0 for a coarse histogram of the whole row (a memset and
    a launch more, but spread over SPLIT programs per row). AGGREGATE: the
    filter reserves a block's slots with one atomic after a scan (1), or with
    one atomic per moving score (0)."""

    BLOCK: int
    num_warps: int
    SPLIT: int = 1
    RADIX_BITS: int = 11
    RESIDENT: int = 4096
    SAMPLE: int = 4096
    AGGREGATE: int = 1

    def __post_init__(self):
        for name in ("BLOCK", "RESIDENT"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"TopkConfig.{name} must be a power of two, got {value}")
        if self.AGGREGATE not in (0, 1):
            raise ValueError(f"TopkConfig.AGGREGATE must be 0 or 1, got {self.AGGREGATE}")
        if self.RESIDENT > 32768:
            raise ValueError(f"TopkConfig.RESIDENT counts fit 16 bits: at most 32768, got {self.RESIDENT}")
        if self.SAMPLE and (self.SAMPLE < 32 or self.SAMPLE & (self.SAMPLE - 1)):
            raise ValueError(f"TopkConfig.SAMPLE must be 0 or a power of two >= 32, got {self.SAMPLE}")


def resident_candidates(num_warps: int, warp_size: int = 32) -> int:
    """Candidates the last step holds in registers: 16 per lane of a 32-wide
    warp, 4 per lane of a 64-wide one (more spills, build-check says)."""
    return (16 if warp_size == 32 else 4) * warp_size * num_warps


#: Sampled scores per lane of the sample kernel (it runs as many warps as
#: that needs): it is one program per row, so its latency is the op's.
SAMPLE_PER_LANE = 8


def sample_warps(sample: int, warp_size: int) -> int:
    """Warps of the sample kernel for a SAMPLE of ``sample`` scores (at most
    16: with the register ceiling, 512 lanes of 128 fill an NVIDIA SM)."""
    return max(1, min(16, sample // (SAMPLE_PER_LANE * warp_size)))


def _heuristic(warps: int, warp_size: int):
    def choose(regime: Mapping[str, int]) -> TopkConfig:
        tokens, seq_len, units = regime["tokens"], regime["seq_len"], regime["compute_units"]
        block = 1024
        # Short chunks (one step each) and up to 16 programs per compute unit:
        # the split path's passes are bound by latency, not bandwidth, below that.
        split = max(1, min(MAX_SPLIT_PROGRAMS_PER_UNIT // 2 * units // max(tokens, 1), seq_len // block))
        split = 1 << (split.bit_length() - 1)
        # Over whole rows 8-bit digits (256 bins) beat 11-bit ones; over a
        # streamed candidate list 6-bit ones won (an earlier sm90 tune).
        radix = 6 if split > 1 else 8
        # Few scores in all: the coarse histogram, spread over the row's
        # programs, costs less than one program ranking a sample; many: the
        # sample saves a full read of every row (sm90 measurements).
        scores = tokens * seq_len
        sample = 4096 if scores >= 1 << 21 else 0
        return TopkConfig(block, warps, split, radix, resident_candidates(warps, warp_size), sample,
                          AGGREGATE=int(scores < 1 << 22))

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
    device = Device.of(seq_lens)
    with launch_device(seq_lens):
        sparse_topk_window_kernel[grid](seq_lens, out, table, width, topk, out.stride(0), table_stride, max_blocks,
                                        bs, PAGED=paged, BLOCK=block, num_warps=4, **pdl_kwargs(device))


def candidate_capacity(width: int, topk: int, sample: int = 4096) -> int:
    """Candidates per row the split path keeps, or the whole row when it is
    shorter. Between two sampled keys (``sample`` > 0), for scores in random
    order, a row of L scores expects about (z^2 + 2 z sqrt(mu)) / f of them,
    with f = sample / L, mu = f topk and z = 5 (the kernel's margin):
    4 topk + 64 L / sample is at least 2.5 times that for every topk and L.
    In a coarse bin (``sample`` = 0) of normally distributed scores a few
    percent of a long row fall: 4 topk. A row that overflows it is selected
    whole by one program."""
    extra = 64 * triton.cdiv(width, sample) if sample else 0
    return min(width, 4 * topk + extra)


def workspace_numel(num_tokens: int, width: int, topk: int, capacity: int | None = None,
                    sample: int = 4096) -> int:
    """int32 elements of the split path's workspace: a [T, HEAD_STRIDE] head
    (the two bounds, two counters and the coarse histogram), then
    [T, capacity] int64 candidates (score bits and position); ``sample`` is
    the config's SAMPLE. Any contents: each call writes what it reads."""
    capacity = candidate_capacity(width, topk, sample) if capacity is None else capacity
    return num_tokens * (HEAD_STRIDE + 2 * capacity)


def launch_select(logits: torch.Tensor, seq_lens: torch.Tensor, topk: int, out: torch.Tensor,
                  config: TopkConfig, block_table: torch.Tensor | None = None, block_size: int | None = None,
                  workspace: torch.Tensor | None = None, capacity: int | None = None) -> None:
    """The general path with an explicit config (the tuner and build-check use
    this). ``workspace``: optional int32 scratch of at least
    :func:`workspace_numel` elements, any contents; ``capacity``
    overrides :func:`candidate_capacity` (tests use it to overflow the list)."""
    num_tokens, width = logits.shape
    table, table_stride, max_blocks, bs, paged = _table_args(block_table, block_size, seq_lens)
    device = Device.of(logits)
    pdl = pdl_kwargs(device)
    with launch_device(logits):
        if config.SPLIT == 1:
            sparse_topk_row_kernel[(num_tokens,)](
                logits, seq_lens, out, table, width, topk, logits.stride(0), out.stride(0), table_stride,
                max_blocks, bs, PAGED=paged, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
                num_warps=config.num_warps, **pdl)
            return
        capacity = candidate_capacity(width, topk, config.SAMPLE) if capacity is None else capacity
        numel = workspace_numel(num_tokens, width, topk, capacity)
        if workspace is None:
            workspace = torch.empty(numel, dtype=torch.int32, device=logits.device)
        elif workspace.dtype != torch.int32 or workspace.numel() < numel or workspace.device != logits.device:
            raise ValueError(f"workspace must be int32 on {logits.device} with at least {numel} elements "
                             f"(workspace_numel), got {workspace.dtype} on {workspace.device} with "
                             f"{workspace.numel()}")
        workspace = workspace.view(-1)[:numel]
        head = workspace[:num_tokens * HEAD_STRIDE]
        candidates = workspace[num_tokens * HEAD_STRIDE:].view(torch.int64)  # 8-byte aligned: HEAD_STRIDE is even
        chunk = triton.cdiv(triton.cdiv(width, config.SPLIT), config.BLOCK) * config.BLOCK
        grid = (num_tokens, config.SPLIT)
        if config.SAMPLE:
            sparse_topk_sample_kernel[(num_tokens,)](logits, seq_lens, head, width, topk, logits.stride(0),
                                                     SAMPLE=config.SAMPLE,
                                                     num_warps=sample_warps(config.SAMPLE, device.limits.warp_size),
                                                     **_select_options(device), **pdl)
        else:
            head.zero_()
            sparse_topk_coarse_hist_kernel[grid](logits, seq_lens, head, width, topk, logits.stride(0), chunk,
                                                 BLOCK=config.BLOCK, num_warps=config.num_warps, **pdl)
        sparse_topk_filter_kernel[grid](
            logits, seq_lens, head, candidates, out, table, width, topk, logits.stride(0), out.stride(0),
            table_stride, max_blocks, bs, chunk, capacity, PAGED=paged, BLOCK=config.BLOCK,
            AGGREGATE=bool(config.AGGREGATE), COARSE=not config.SAMPLE, num_warps=config.num_warps, **pdl)
        sparse_topk_candidates_kernel[(num_tokens,)](
            logits, seq_lens, head, candidates, out, table, width, topk, logits.stride(0), out.stride(0),
            table_stride, max_blocks, bs, capacity, PAGED=paged, RADIX_BITS=config.RADIX_BITS, BLOCK=config.BLOCK,
            RESIDENT=config.RESIDENT, num_warps=config.num_warps, **_select_options(device), **pdl)


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

    device = Device.from_arch(arch)
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
        if cfg.SAMPLE:
            builds.append(KernelBuild(
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_sample_kernel",
                signature=(("logits_ptr", "*fp32"), ("lens_ptr", "*i32"), ("head_ptr", "*i32"), ("width", "i32"),
                           ("topk", "i32"), ("logits_stride", "i32")),
                constexprs=(("SAMPLE", cfg.SAMPLE),),
                options=(("num_warps", sample_warps(cfg.SAMPLE, device.limits.warp_size)),
                         *_select_options(device).items()),
                label=f"sample={cfg.SAMPLE}"))
        else:
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
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_filter_kernel",
                signature=(*split_args, ("chunk", "i32"), ("capacity", "i32")),
                constexprs=(("PAGED", paged), ("BLOCK", cfg.BLOCK), ("AGGREGATE", bool(cfg.AGGREGATE)),
                            ("COARSE", not cfg.SAMPLE)),
                options=options, label=f"{label} sample={cfg.SAMPLE} aggregate={cfg.AGGREGATE} filter paged={paged}"))
            builds.append(KernelBuild(
                op="sparse_topk", kernel=_KERNELS + "sparse_topk_candidates_kernel",
                signature=(*split_args, ("capacity", "i32")),
                constexprs=(("PAGED", paged), *common, ("RESIDENT", cfg.RESIDENT)),
                options=(*options, *_select_options(device).items()),
                label=f"{label} resident={cfg.RESIDENT} candidates paged={paged}"))
    return with_pdl(builds, arch)


def _tune_candidates(regime: Mapping[str, int], device: Device) -> list[TopkConfig]:
    tokens, width, units = regime["tokens"], regime["seq_len"], regime["compute_units"]
    block = 1024  # 2048- and 4096-wide steps measured slower on sm90 in every split kernel
    cands = []
    for warps in (4, 8):
        resident = resident_candidates(warps, device.limits.warp_size)
        # One program per row holds the whole histogram: 2048 bins need 8 warps.
        for radix in (8, 11) if warps == 8 else (8,):
            cands.append(TopkConfig(block, warps, 1, radix, resident))
        for split in (2, 4, 8, 16, 32, 64, 128):
            if width // split < block or tokens * split > MAX_SPLIT_PROGRAMS_PER_UNIT * units:
                continue
            # RADIX_BITS only matters to a candidate list too long to keep in
            # registers there: 6-bit digits won every shape of an earlier tune.
            for sample in (0, 2048, 4096):
                for aggregate in (0, 1):
                    cands.append(TopkConfig(block, warps, split, 6, resident, sample, aggregate))
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
