"""build-check: metadata parsing (pure) and a real ahead-of-time compile."""

from __future__ import annotations

import pytest

from rocmoe import build_check
from rocmoe.build_check import BuildResult, KernelBuild, _check_amd, nvidia_matrix_instructions
from rocmoe.precompile import compiling_worker_init

GCN = """
    .group_segment_fixed_size: 70000
    .private_segment_fixed_size: 16
    .sgpr_count:     60
    .sgpr_spill_count: 0
    .vgpr_count:     256
    .vgpr_spill_count: 12
    - .agpr_count:     0
; Occupancy: 2
    v_mfma_f32_32x32x8_bf16 a[0:15], v[2:3], v[4:5], 0
"""


def test_amd_metadata_is_read_and_judged():
    r = BuildResult("op", "k", "cfg", "gfx942", ok=False)
    _check_amd(r, GCN, 64 * 1024)
    assert (r.registers, r.sgprs, r.agprs, r.spills, r.scratch_bytes, r.shared_bytes, r.occupancy) == (
        256, 60, 0, 12, 16, 70000, 2)
    assert r.matrix_instructions == ["v_mfma_f32_32x32x8_bf16"]
    assert r.problems == ["LDS 70000 B > 65536 B"]


def test_nvidia_matrix_instructions_keep_their_tile_shapes():
    ptx = """
    wgmma.fence.sync.aligned;
    wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r1, %r2}, %rd1, %rd2, p, 1, 1, 0, 0;
    wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%r1, %r2}, %rd1, %rd2, p, 1, 1, 0, 0;
    wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%r3, %r4}, %rd3, %rd4, p, 1, 1, 0, 0;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
    tcgen05.mma.cta_group::1.kind::f16 [%r1], %rd1, %rd2, %r3, p;
    tcgen05.commit.cta_group::1.mbarrier::arrive::one.b64 [%r4];
    """
    assert nvidia_matrix_instructions(ptx) == ["mma.m16n8k16", "tcgen05.mma", "wgmma.m64n256k16", "wgmma.m64n32k16"]
    assert nvidia_matrix_instructions("wgmma.fence.sync.aligned; ld.global.b32 %r1, [%rd1];") == []


def test_unknown_arch_is_rejected():
    with pytest.raises(ValueError, match="build-check targets are gfx942, gfx950, sm90, sm100"):
        build_check.run(["gfx908"])


def test_routing_variants_cover_benchmarks_and_extremes():
    labels = [b.label for b in build_check.collect_variants("gfx942", ["gemma4_routing"])]
    assert any("E=1024" in label for label in labels) and any("bf16" in label for label in labels)
    assert len(labels) == len(set(labels))


def test_builds_are_specialised_like_a_launch():
    # Every pointer (torch allocations are 16-byte aligned) and the listed
    # integers get Triton's divisibility attribute; nothing else does.
    build = KernelBuild(op="x", kernel="m:k", signature=(("a_ptr", "*bf16"), ("n", "i32"), ("stride", "i32"),
                                                         ("scale", "fp32"), ("b_ptr", "*i32")),
                        constexprs=(), options=(), label="x", aligned=("stride",))
    assert build.specialisation() == {(0,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]],
                                      (4,): [["tt.divisibility", 16]]}
    mla = [b for b in build_check.collect_variants("sm90", ["sparse_mla_decode"])
           if b.kernel.endswith("sparse_mla_decode_kernel")]
    assert mla and all({"q_stride_h", "chunk", "num_heads"} <= set(b.aligned) for b in mla)
    # Arguments Triton is told not to specialise must not be claimed aligned.
    assert not any({"rows", "xrows", "split"} & set(b.aligned) for b in mla)


def test_real_compile_for_gfx942_and_sm90():
    # The benchmark shape (E=128); build-check itself covers every variant in CI.
    # (Triton 3.6, on the lent GPU machine, spills 4 bytes for E=1024 fp32 on gfx942.)
    # The first E=128 variant of each arch (their heuristics differ: 64- vs 32-wide warps).
    firsts = {next(b.label for b in build_check.collect_variants(arch, ["gemma4_routing"])
                   if b.label.startswith("E=128 ")) for arch in ("gfx942", "sm90")}
    results = build_check.run(["gfx942", "sm90"], ["gemma4_routing"], jobs=2, progress=False,
                              select=lambda b: b.label in firsts)
    assert {r.arch for r in results} == {"gfx942", "sm90"}
    for r in results:
        assert r.ok, r.problems
        assert r.registers and r.registers > 0 and r.spills == 0


def test_mla_dv_split_gives_each_warpgroup_its_own_score_tile():
    # The premise of DV_SPLIT on sm90: with 64 heads on eight warps the score dot is issued as
    # m64n16 (the warpgroups split nothing of it); 128 heads with d_v in two programs issue it as
    # m64n32 and the output dot as m64n256, each warpgroup on its own 64 heads.
    labels = {"D=576 BLOCK_H=64 BLOCK_N=32 warps=8 stages=2 final": ["wgmma.m64n128k16", "wgmma.m64n16k16"],
              "D=576 BLOCK_H=128 BLOCK_N=32 warps=8 stages=2 dv-split final": ["wgmma.m64n256k16",
                                                                               "wgmma.m64n32k16"]}
    results = build_check.run(["sm90"], ["sparse_mla_decode"], jobs=2, progress=False,
                              select=lambda b: b.label in labels)
    assert sorted(r.label for r in results) == sorted(labels)
    for r in results:
        assert r.ok, r.problems
        assert r.matrix_instructions == labels[r.label], r.label


def test_mla_wgmma_kernel_computes_each_score_once():
    # The premise of the Gluon kernel: its two warpgroups split the score tile along the keys, so
    # with 64 keys a step each issues the score dot as m64n32 (32 keys of its own) and the output
    # dot as m64n256 (its half of d_v); a shared score tile would show m64n64 for both.
    label = "wgmma D=576 BLOCK_H=64 BLOCK_N=64 warps=8 stages=2 final"
    results = build_check.run(["sm90"], ["sparse_mla_decode"], jobs=1, progress=False,
                              select=lambda b: b.label == label)
    assert [r.label for r in results] == [label]
    assert results[0].ok and results[0].spills == 0, results[0].problems
    assert results[0].matrix_instructions == ["wgmma.m64n256k16", "wgmma.m64n32k16"]


def _compile_bad_build(arch):
    import os

    os.environ.pop("TRITON_INTERPRET", None)
    bad = KernelBuild(op="gemma4_routing",
                      kernel="rocmoe.backends.triton._gemma4_routing_kernel:gemma4_routing_kernel",
                      signature=(("logits_ptr", "*fp32"),), constexprs=(), options=(("num_warps", 4),),
                      label="missing arguments")
    return build_check.compile_one(bad, arch)


def test_compile_errors_are_reported_not_raised():
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=compiling_worker_init) as pool:
        result = pool.submit(_compile_bad_build, "sm90").result()
    assert not result.ok and result.problems[0].startswith("compile error")
