"""The Triton sparse-MLA decode kernel config by config (head blocks, key
steps, split-key chunks with and without the reduce), interpreter on CPU and
compiled on a GPU, against the fp64 loop reference."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import is_poisoned, poison
from reference import mla_ref

from rocmoe.backends.triton.sparse_mla_decode import SPEC, MlaConfig, launch, launch_config, split_dims
from rocmoe.device import Device

CONFIGS = [
    MlaConfig(16, 16, 4, 1, 1),
    MlaConfig(16, 16, 4, 1, 3),   # chunks that end mid-block
    MlaConfig(32, 32, 4, 1, 4),   # more chunks than some queries have keys
    MlaConfig(16, 16, 2, 1, 8),
    MlaConfig(64, 32, 8, 2, 2),   # sm90's shape for 64+ heads: wgmma, pipelined gather; most heads masked here
    MlaConfig(16, 16, 4, 2, 3, IDS_AHEAD=True),  # each tile's ids read a step ahead, across both key lists
    MlaConfig(16, 16, 2, 3, 1, IDS_AHEAD=True),
    # d_v in two programs (sm90's 128-head blocks): both halves of D enter the scores of each, and
    # the second half of d_v is partly or wholly past d_v at these sizes
    MlaConfig(16, 16, 4, 2, 1, DV_SPLIT=2),
    MlaConfig(16, 32, 4, 2, 3, IDS_AHEAD=True, DV_SPLIT=2),
    MlaConfig(128, 32, 8, 2, 2, DV_SPLIT=2),
]


def _dtype(device):
    return torch.bfloat16 if device.type == "cuda" else torch.float16


def _problem(gen, tokens, heads, dim, topk, extra=0, rows=200, dtype=torch.float16):
    q = torch.randn(tokens, heads, dim, generator=gen).to(dtype)
    cache = torch.randn(rows // 8, 8, dim, generator=gen).to(dtype)
    idx = torch.randint(-1, rows + 3, (tokens, topk), generator=gen, dtype=torch.int32)
    extra_args = {}
    if extra:
        extra_args["extra_kv_cache"] = torch.randn(5, 4, dim, generator=gen).to(dtype)
        extra_args["extra_indices"] = torch.randint(-1, 22, (tokens, extra), generator=gen, dtype=torch.int32)
    return q, cache, idx, extra_args


def _launch(device, q, cache, idx, d_v, config, scale=0.125, **kw):
    moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    out = poison(torch.empty(q.shape[0], q.shape[1], d_v, dtype=q.dtype, device=device))
    lse = poison(torch.empty(q.shape[0], q.shape[1], device=device))
    launch(q.to(device), cache.to(device), idx.to(device), scale, d_v, moved.get("topk_length"),
           moved.get("attn_sink"), moved.get("extra_kv_cache"), moved.get("extra_indices"),
           moved.get("extra_topk_length"), out, lse, config)
    assert not is_poisoned(out).any() and not is_poisoned(lse).any()
    return out.cpu(), lse.cpu()


def _check(out, lse, q, cache, idx, d_v, scale=0.125, **kw):
    ref_out, ref_lse = mla_ref(q, cache, idx, scale, d_v, kw.get("topk_length"), kw.get("attn_sink"),
                               kw.get("extra_kv_cache"), kw.get("extra_indices"), kw.get("extra_topk_length"))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-2, rtol=2e-2)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite) and (lse[~finite] == math.inf).all()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-3, rtol=0)
    err = (out.double() - ref_out).norm() / ref_out.norm().clamp(min=1e-30)
    assert err <= 5e-3, f"rel-L2 {err:.2e}"


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
@pytest.mark.parametrize("heads, dim, d_v", [(4, 80, 64), (20, 64, 48), (5, 80, 40)])
def test_configs_with_every_feature(kernel_device, gen, config, heads, dim, d_v):
    tokens = 5
    q, cache, idx, extra = _problem(gen, tokens, heads, dim, topk=37, extra=9, dtype=_dtype(kernel_device))
    kw = dict(extra,
              topk_length=torch.tensor([37, 0, 20, 1, 36], dtype=torch.int32),
              extra_topk_length=torch.tensor([9, 3, 0, 0, 5], dtype=torch.int32),
              attn_sink=torch.randn(heads, generator=gen))
    idx[3, 0] = -1  # token 3: no key at all (its one slot is empty, its extra keys are cut to 0)
    out, lse = _launch(kernel_device, q, cache, idx, d_v, config, **kw)
    _check(out, lse, q, cache, idx, d_v, **kw)
    assert (out[3] == 0).all() and (lse[3] == math.inf).all()


@pytest.mark.parametrize("config", [c for c in CONFIGS if c.SPLIT > 1], ids=repr)
def test_the_other_partial_dtype_with_every_feature(kernel_device, gen, monkeypatch, config):
    # The split launches again with the partial-output dtype that is not shipped (16-bit
    # partials for a 16-bit output, or fp32), so both choices of HALF_PARTIALS stay tested.
    from rocmoe.backends.triton import sparse_mla_decode as mla

    monkeypatch.setattr(mla, "HALF_PARTIALS", not mla.HALF_PARTIALS)
    heads, dim, d_v, tokens = 20, 80, 64, 5
    q, cache, idx, extra = _problem(gen, tokens, heads, dim, topk=37, extra=9, dtype=_dtype(kernel_device))
    kw = dict(extra, topk_length=torch.tensor([37, 0, 20, 1, 36], dtype=torch.int32),
              attn_sink=torch.randn(heads, generator=gen))
    out, lse = _launch(kernel_device, q, cache, idx, d_v, config, **kw)
    _check(out, lse, q, cache, idx, d_v, **kw)


@pytest.mark.parametrize("config, launched", [(MlaConfig(16, 16, 4, 1, 8), 3), (MlaConfig(16, 64, 4, 1, 8), 1)],
                         ids=["three-of-eight", "one-of-eight"])
def test_a_split_launches_only_the_chunks_that_hold_keys(kernel_device, gen, monkeypatch, config, launched):
    # 46 keys (37 + 9 extra) in chunks of whole key steps: 16 keys a step fill three of eight
    # chunks, 64 keys a step one, which then writes the output itself, without partials or a reduce.
    from rocmoe.backends.triton import sparse_mla_decode as mla

    grids, reduces = [], []

    class Recorder:
        def __init__(self, kernel, seen):
            self.kernel, self.seen = kernel, seen

        def __getitem__(self, grid):
            self.seen.append(grid)
            return self.kernel[grid]

    monkeypatch.setattr(mla, "sparse_mla_decode_kernel", Recorder(mla.sparse_mla_decode_kernel, grids))
    monkeypatch.setattr(mla, "sparse_mla_reduce_kernel", Recorder(mla.sparse_mla_reduce_kernel, reduces))
    heads, dim, d_v, tokens = 20, 80, 64, 3
    q, cache, idx, extra = _problem(gen, tokens, heads, dim, topk=37, extra=9, dtype=_dtype(kernel_device))
    kw = dict(extra, attn_sink=torch.randn(heads, generator=gen))
    out, lse = _launch(kernel_device, q, cache, idx, d_v, config, **kw)
    _check(out, lse, q, cache, idx, d_v, **kw)
    assert grids == [(tokens * launched * 2,)]  # two 16-head blocks for 20 heads
    assert len(reduces) == (launched > 1)


def test_partial_dtype_follows_a_16_bit_output_only_when_half_partials_are_on(monkeypatch):
    from rocmoe.backends.triton import sparse_mla_decode as mla

    for half in (False, True):
        monkeypatch.setattr(mla, "HALF_PARTIALS", half)
        for dtype in (torch.bfloat16, torch.float16):
            assert mla.partial_dtype(dtype) == (dtype if half else torch.float32)
        assert mla.partial_dtype(torch.float32) == torch.float32


def _dv_split_tune_shapes():
    from rocmoe.backends.triton.sparse_mla_decode import _TUNE_SHAPES, tune_config

    return [tune_config(shape, 2) for shape in _TUNE_SHAPES if shape[-1] > 1]


@pytest.mark.parametrize("config", _dv_split_tune_shapes(), ids=repr)
@pytest.mark.parametrize("dim, extra", [(576, 0), (512, 16)], ids=["v32", "v4"])
def test_dv_split_tune_shapes_at_the_models_head_dims(kernel_device, gen, config, dim, extra):
    # The sm90 tuner's d_v-split candidates at the models' D and 128 heads (few keys, two chunks):
    # both D halves and V4's tail-less rows, the extra keys and the sink, with the reduce.
    tokens, heads = 2, 128
    q, cache, idx, kw = _problem(gen, tokens, heads, dim, topk=40, extra=extra, rows=256, dtype=_dtype(kernel_device))
    if extra:
        kw["attn_sink"] = torch.randn(heads, generator=gen)
    out, lse = _launch(kernel_device, q, cache, idx, 512, config, scale=dim ** -0.5, **kw)
    _check(out, lse, q, cache, idx, 512, scale=dim ** -0.5, **kw)


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[2], CONFIGS[4]], ids=repr)
def test_nan_rows_outside_the_selection(kernel_device, gen, config):
    q, cache, idx, _ = _problem(gen, 3, 16, 80, topk=24, dtype=_dtype(kernel_device))
    clean = cache.clone()
    cache.view(-1, 80)[100:] = float("nan")
    idx = torch.randint(-1, 100, idx.shape, generator=gen, dtype=torch.int32)
    length = torch.tensor([24, 10, 3], dtype=torch.int32)
    idx[1, 10:] = 150  # past topk_length, pointing at NaN rows
    out, lse = _launch(kernel_device, q, cache, idx, 64, config, topk_length=length)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    _check(out, lse, q, clean, idx, 64, topk_length=length)


@pytest.mark.parametrize("split", [2, 3, 4, 8, 16, 32, 64])
def test_reduce_tiles_hold_every_partial_within_the_tile_budget(split):
    from rocmoe.backends.triton.sparse_mla_decode import REDUCE_BLOCK_H, REDUCE_TILE, reduce_blocks

    block_s, block_dv = reduce_blocks(split)
    assert block_s >= split and block_s & (block_s - 1) == 0  # every partial in one load
    assert block_dv >= 16 and block_dv & (block_dv - 1) == 0
    assert block_s * REDUCE_BLOCK_H * block_dv <= max(REDUCE_TILE, block_s * REDUCE_BLOCK_H * 16)


def test_split_dims():
    assert split_dims(576) == (512, 64) and split_dims(512) == (512, 0) and split_dims(80) == (64, 16)
    assert split_dims(96) == (64, 32) and split_dims(100) is None


@pytest.mark.parametrize("arch", ["sm90", "sm100", "gfx942", "gfx950"])
def test_heuristic_fills_the_device_at_small_batch(arch):
    # The family heuristic (what a device without a measured table runs; sm90's
    # table may choose fewer chunks where it measured them faster).
    device = Device.from_arch(arch)
    units = device.limits.compute_units
    choose = SPEC.heuristic(device)
    for heads, keys in ((128, 2048), (64, 640), (16, 2048)):
        def config(tokens, heads=heads, keys=keys):
            return choose({"tokens": tokens, "heads": heads, "keys": keys, "head_dim": 576, "compute_units": units})

        small = config(1)
        programs = -(-heads // small.BLOCK_H) * small.DV_SPLIT * small.SPLIT
        assert programs >= min(units, keys // (2 * small.BLOCK_N)), (heads, keys, small)
        assert config(512).SPLIT == 1  # a full batch fills the device without a reduce


def test_sm90_heuristic_and_table_use_probed_shapes():
    # tune_shapes(D) lists the (heads, keys, warps, stages, ids ahead, d_v split) of the tl kernel and
    # _WGMMA_TUNE_SHAPES the (keys, stages) of the Gluon one that compile without spills on
    # sm90 with Triton 3.6 and 3.9 at that D; the heuristic and the measured table may only use
    # those (build-check compiles them in CI). A table entry for no single D must fit both.
    from rocmoe.backends.triton.sparse_mla_decode import _WGMMA_TUNE_SHAPES, WGMMA_BLOCK_H, WGMMA_WARPS, tune_shapes

    device = Device.from_arch("sm90")
    choose = SPEC.heuristic(device)

    def probed(c, dims):
        if c.WGMMA:
            return ((c.BLOCK_H, c.num_warps, c.IDS_AHEAD, c.DV_SPLIT) == (WGMMA_BLOCK_H, WGMMA_WARPS, False, 1)
                    and (c.BLOCK_N, c.num_stages) in _WGMMA_TUNE_SHAPES)
        shape = (c.BLOCK_H, c.BLOCK_N, c.num_warps, c.num_stages, c.IDS_AHEAD, c.DV_SPLIT)
        return all(shape in tune_shapes(dim) for dim in dims)

    configs = [(choose({"tokens": t, "heads": h, "keys": 2048, "head_dim": dim, "compute_units": 132}), (dim,))
               for t in (1, 8, 64, 512) for h in (16, 64, 128) for dim in (576, 512)]
    configs += [(c, (when["head_dim"][0],) if "head_dim" in when else (576, 512))
                for when, c in SPEC.table("sm90").entries]
    assert [c for c, dims in configs if not probed(c, dims)] == []
    configs = [c for c, _ in configs]
    assert any(c.WGMMA for c in configs) and any(not c.WGMMA for c in configs)
    wide = choose({"tokens": 64, "heads": 128, "keys": 2048, "head_dim": 576, "compute_units": 114})
    assert (wide.BLOCK_H, wide.WGMMA, wide.SPLIT) == (64, True, 1)  # an H100 PCIe: 128 programs fill its 114 SMs
    assert wide.PINGPONG
    # 640 keys: chunks of two 64-key steps at least; at T <= 2, 16-head blocks spread a query further.
    few = choose({"tokens": 8, "heads": 64, "keys": 640, "head_dim": 512, "compute_units": 114})
    assert (few.BLOCK_H, few.PINGPONG, few.SPLIT) == (64, True, 8)
    small = choose({"tokens": 1, "heads": 64, "keys": 640, "head_dim": 512, "compute_units": 114})
    assert (small.BLOCK_H, small.WGMMA, small.SPLIT) == (16, False, 8)


def test_sm90_launches_come_from_the_measured_table():
    device = Device.from_arch("sm90")
    config = launch_config(device, 1, 128, 2048, 576)
    assert config == SPEC.table("sm90").lookup({"tokens": 1, "heads": 128, "keys": 2048, "head_dim": 576,
                                                 "compute_units": device.limits.compute_units})
    assert "sm90.json" in SPEC.source(device)


def test_wgmma_kernel_refuses_what_it_cannot_take():
    from rocmoe.backends.triton.sparse_mla_decode import wgmma_config, wgmma_unsupported_reasons

    config = wgmma_config((64, 2), 1)
    q = torch.zeros(2, 64, 576, dtype=torch.bfloat16)
    cache = torch.zeros(4, 64, 576, dtype=torch.bfloat16)
    # On this machine it never runs (the CPU, or the interpreter) ...
    assert wgmma_unsupported_reasons(q, cache, None, config)
    # ... and each input it cannot take is named, whatever the device.
    meta_q, meta_cache = q.to("meta"), cache.to("meta")

    def reasons(*args):
        return " | ".join(wgmma_unsupported_reasons(*args))

    if not reasons(meta_q, meta_cache, None, config).startswith("Gluon kernels do not run"):
        assert reasons(meta_q, meta_cache, None, config) == ""
    assert "bf16" in reasons(meta_q.half(), meta_cache, None, config)
    assert "D = 576 or 512" in reasons(torch.zeros(2, 64, 80, device="meta", dtype=torch.bfloat16),
                                       torch.zeros(4, 64, 80, device="meta", dtype=torch.bfloat16), None, config)
    assert "64 heads on 8 warps" in reasons(meta_q, meta_cache, None, MlaConfig(128, 64, 8, 2, 1, WGMMA=True))
    assert "32+ keys" in reasons(meta_q, meta_cache, None, MlaConfig(64, 16, 8, 2, 1, WGMMA=True))
    assert "ping-pong kernel takes 64 keys" in reasons(meta_q, meta_cache, None,
                                                       MlaConfig(64, 32, 8, 3, 1, WGMMA=True, PINGPONG=True))
    strided_q = torch.zeros(2, 64, 580, device="meta", dtype=torch.bfloat16)[..., :576]
    assert "q rows" in reasons(strided_q, meta_cache, None, config)
    extra = torch.zeros(4, 64, 580, device="meta", dtype=torch.bfloat16)[..., 1:577]
    assert "extra_kv_cache rows" in reasons(meta_q, meta_cache, extra, config)


def test_a_pingpong_config_falls_back_to_the_wgmma_kernel_before_the_tl_one(monkeypatch):
    # Which kernel a launch runs, for sm90 tensors (meta: no device needed): the ping-pong kernel where it
    # can; the wgmma kernel at the same launch where only the ping-pong kernel is missing; the tl kernel
    # where neither Gluon kernel can take the inputs.
    from rocmoe.backends.triton import sparse_mla_decode as mla

    monkeypatch.setattr(mla, "INTERPRET", False)
    q = torch.empty(2, 64, 576, device="meta", dtype=torch.bfloat16)
    cache = torch.empty(4, 64, 576, device="meta", dtype=torch.bfloat16)
    config = mla.pingpong_config(3)
    assert mla.launched_config(q, cache, None, config) == config
    assert mla.launched_config(q.half(), cache, None, config) == mla.tl_fallback(config)
    monkeypatch.setattr(mla, "_pingpong_kernel", lambda: None)
    wgmma = mla.launched_config(q, cache, None, config)
    assert wgmma == mla.wgmma_config((64, 2), 3) and not wgmma.PINGPONG
    assert mla.launched_config(q.half(), cache, None, config) == mla.tl_fallback(config)


@pytest.mark.parametrize("pingpong", [False, True])
@pytest.mark.parametrize("split", [1, 3])
def test_a_wgmma_config_it_cannot_take_runs_the_tl_kernel(kernel_device, gen, split, pingpong):
    # Here (the interpreter, or D = 80 on a GPU) the Gluon kernels cannot run: the same heads, split and
    # warps run on the tl kernel, every feature intact.
    from rocmoe.backends.triton.sparse_mla_decode import pingpong_config, wgmma_config

    heads, dim, d_v = 70, 80, 64
    q, cache, idx, kw = _problem(gen, 3, heads, dim, topk=37, extra=9, dtype=_dtype(kernel_device))
    kw.update(topk_length=torch.tensor([37, 5, 0], dtype=torch.int32), attn_sink=torch.randn(heads, generator=gen))
    config = pingpong_config(split) if pingpong else wgmma_config((64, 2), split)
    out, lse = _launch(kernel_device, q, cache, idx, d_v, config, **kw)
    _check(out, lse, q, cache, idx, d_v, **kw)


@pytest.mark.parametrize("arch", ["gfx942", "gfx950", "sm90", "sm100"])
def test_deepseek_v4_with_its_extra_keys_is_offered_and_built_on_every_gpu_arch(arch):
    # AITER has no kernel with a second key set, so on CDNA the Triton kernel is what serves V4
    # (D = 512, sliding window + compressed cache, sink); build-check compiles it there.
    from rocmoe.backends.triton.sparse_mla_decode import IMPLEMENTATION, build_variants
    from rocmoe.ops.sparse_mla_decode import SparseMlaProblem

    v4 = SparseMlaProblem(dtype=torch.bfloat16, num_heads=64, head_dim=512, d_v=512, block_size=64, topk=512,
                          has_topk_length=True, has_sink=True, extra_block_size=64, extra_topk=128)
    assert IMPLEMENTATION.not_supported_reasons(Device.from_arch(arch), v4) == []
    labels = [b.label for b in build_variants(arch)]
    assert {("partial" in label, "int64" in label) for label in labels if label.startswith("D=512 +extra +sink")} \
        == {(False, False), (False, True), (True, False), (True, True)}


def test_the_tuner_offers_the_wgmma_kernel_on_sm90_only():
    from rocmoe.backends.triton.sparse_mla_decode import _WGMMA_TUNE_SHAPES, _tune_candidates

    def wgmma(arch, heads, tokens=64):
        device = Device.from_arch(arch)
        regime = {"tokens": tokens, "heads": heads, "keys": 2048, "head_dim": 576,
                  "compute_units": device.limits.compute_units}
        return [c for c in _tune_candidates(regime, device) if c.WGMMA]

    assert {(c.BLOCK_N, c.num_stages) for c in wgmma("sm90", 128)} == set(_WGMMA_TUNE_SHAPES)
    assert all(c.BLOCK_H == 64 and c.num_warps == 8 and c.DV_SPLIT == 1 for c in wgmma("sm90", 128))
    # The ping-pong kernel comes beside the wgmma one at 64 keys a step, split for split.
    pingpong = [c for c in wgmma("sm90", 128) if c.PINGPONG]
    assert {c.SPLIT for c in pingpong} == {c.SPLIT for c in wgmma("sm90", 128) if c.BLOCK_N == 64 and not c.PINGPONG}
    assert pingpong and all(c.BLOCK_N == 64 for c in pingpong)
    assert not any(c.PINGPONG for c in wgmma("sm90", 16) + wgmma("sm100", 128))
    small = wgmma("sm90", 128, tokens=1)
    # Up to 64 chunks at T = 1 (128 programs), never a chunk shorter than a step.
    assert max(c.SPLIT for c in small if c.BLOCK_N == 64) == 32 and max(c.SPLIT for c in small) == 64
    assert not wgmma("sm90", 16) and not wgmma("sm100", 128) and not wgmma("gfx942", 128)


def test_build_check_builds_the_wgmma_kernel_for_sm90_only():
    from rocmoe.backends.triton.sparse_mla_decode import (
        _PINGPONG_KERNEL,
        _WGMMA_KERNEL,
        _WGMMA_TUNE_SHAPES,
        build_variants,
        tune_shapes,
    )

    sm90 = [b for b in build_variants("sm90") if b.kernel == _WGMMA_KERNEL]
    # each (keys, stages) x D 576 / 512 + extra, final / partial, int32 / int64
    assert len(sm90) == len(_WGMMA_TUNE_SHAPES) * 2 * 2 * 2
    pingpong = [b for b in build_variants("sm90") if b.kernel == _PINGPONG_KERNEL]
    assert len(pingpong) == 2 * 2 * 2 and all(dict(b.options)["maxnreg"] for b in pingpong)
    assert not [b for arch in ("sm100", "gfx942", "gfx950") for b in build_variants(arch)
                if b.kernel in (_WGMMA_KERNEL, _PINGPONG_KERNEL)]
    # A WGMMA table entry's tl build is its fallback launch (64 keys a step would spill there), so
    # every tl build on sm90 is a shape the tuner probed.
    def shape(build):
        c, o = dict(build.constexprs), dict(build.options)
        return c["BLOCK_H"], c["BLOCK_N"], o["num_warps"], o["num_stages"], c["IDS_AHEAD"], c["DV_SPLIT"]

    tl_builds = [b for b in build_variants("sm90") if b.kernel.endswith(":sparse_mla_decode_kernel")]
    assert tl_builds and all(shape(b) in tune_shapes(dict(b.constexprs)["D"]) for b in tl_builds)
