"""rocmoe precompile: the ahead-of-time cache filler, run for real on the CPU
(spawned workers compile for sm90 and gfx942 with the interpreter off)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import rocmoe
from rocmoe import precompile
from rocmoe.device import Device, launches_ahead_of_time, meta_tensors_as


def test_precompile_fills_the_cache_once(tmp_path):
    cache = str(tmp_path / "cache")
    first = precompile.run(["sm90", "gfx942"], ["gemma4_routing"], cache, jobs=2)
    assert [(r.arch, r.error) for r in first.results] == [("sm90", None), ("gfx942", None)]
    # fp32/bf16/fp16 logits, and more than one launch config per arch.
    assert all(r.kernels >= 6 for r in first.results), first.results
    assert first.new_entries >= sum(r.kernels for r in first.results)
    # The same launches map to the same cache keys: a second run compiles nothing.
    second = precompile.run(["sm90", "gfx942"], ["gemma4_routing"], cache, jobs=2)
    assert [r.kernels for r in second.results] == [r.kernels for r in first.results]
    assert second.new_entries == 0


def test_token_counts_are_not_specialised(tmp_path):
    """Within one config bucket every token count must reuse one binary, or a
    precompiled cache would miss on the counts it did not drive."""
    script = textwrap.dedent("""
        import sys, torch, rocmoe
        from triton import knobs
        from rocmoe import precompile
        compiled = []
        knobs.runtime.jit_post_compile_hook = lambda **hook: compiled.append(hook["repr"])
        with precompile.compiling_for("sm90"):
            for tokens in (5, 16, 17, 32, 45):  # one bucket of the shipped sm90 table
                logits = torch.empty(tokens, 128, dtype=torch.bfloat16, device="meta")
                rocmoe.gemma4_routing(logits, 8, torch.empty(128, device="meta"), backend="triton")
        print(len(compiled))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-1] == "1"


def test_token_counts_cover_every_table_bound():
    counts = set(precompile.token_counts("mxfp4_moe", "sm90"))
    from rocmoe.backends.triton.mxfp4_moe import SPEC

    for bounds, _ in SPEC.table("sm90").entries:
        lo, hi = bounds["tokens"]
        assert lo in counts and (hi is None or hi in counts)
    assert {1, 2, 3, 16, 17, 24, 4096, 4097, 8192} <= counts and max(counts) == precompile.MAX_TOKENS["mxfp4_moe"]


def test_meta_tensors_stand_for_a_gpu_only_inside_the_block():
    logits = torch.empty(3, 128, device="meta")
    assert not launches_ahead_of_time(logits)
    with pytest.raises(ValueError, match="meta_tensors_as"):
        Device.of(logits)
    # Outside the block meta tensors still get shape inference (the fake kernel), no launch.
    weights, ids = rocmoe.gemma4_routing(logits, 8, torch.ones(128, device="meta"))
    assert weights.shape == (3, 8) and ids.dtype == torch.int32 and ids.device.type == "meta"
    with meta_tensors_as("gfx942", compute_units=228) as device:
        assert launches_ahead_of_time(logits)
        assert Device.of(logits) == device
        assert (device.arch, device.family, device.limits.compute_units) == ("gfx942", "cdna3", 228)
    assert not launches_ahead_of_time(logits)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="--arch 'gfx908'"):
        precompile.run(["gfx908"])
    with pytest.raises(ValueError, match="--op 'nope'"):
        precompile.calls_for("nope", "sm90")
    with pytest.raises(ValueError, match="compute_units"), meta_tensors_as("sm90", compute_units=0):
        pass
