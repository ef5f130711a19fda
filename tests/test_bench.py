"""The benchmark harness: byte/FLOP models, the result schema, markdown, plot."""

from __future__ import annotations

import json

import pytest
import torch
from reference import moe_ref

from rocmoe.backends.torch.mxfp4_moe import IMPLEMENTATION
from rocmoe.bench import cases
from rocmoe.bench.report import markdown, plot
from rocmoe.bench.runner import run_bench
from rocmoe.cli import main


def test_routing_bytes_by_hand():
    # T=1024 fp32 logits of 128 experts, K=8: 1024*128*4 read + 1024*8*(4+4) written
    assert cases.routing_bytes(1024, 128, 8, 4) == 524288 + 65536
    assert cases.routing_bytes(262144, 128, 8, 2) == 262144 * 256 + 262144 * 64


def test_moe_models_by_hand():
    # gpt-oss-20b, M=1, k=4: 4 experts x (2*2880*2880 + 2880*2880) weights at 4.25 bits
    weights = 4 * 3 * 2880 * 2880 * 4.25 / 8
    assert cases.moe_bytes(4, 2880, 2880, 1, 4) == int(weights) + 2 * 2880 * 2 + 4 * 8
    assert cases.moe_flops(1, 4, 2880, 2880) == 2 * 4 * 3 * 2880 * 2880
    assert cases.moe_flops(4096, 4, 2880, 2880) == 4096 * 2 * 4 * 3 * 2880 * 2880


def test_mla_models_by_hand():
    # V3.2, T=64, H=128, 2048 keys of D=576, d_v=512
    assert cases.mla_flops(64, 128, 2048, 576, 512) == 2 * 64 * 128 * 2048 * (576 + 512)
    assert cases.mla_bytes(64, 128, 2048, 576, 512) == 64 * 2048 * 576 * 2 + 64 * 128 * 576 * 2 + 64 * 128 * 512 * 2


def test_topk_bytes_by_hand():
    assert cases.topk_bytes(64, 131072, 2048) == 64 * 131072 * 4 + 64 * 4 + 64 * 2048 * 4
    assert cases.topk_bytes(64, None, 2048) == 64 * 4 + 64 * 2048 * 4  # the short-circuit reads no logits


def test_every_op_has_cases_at_spec_shapes():
    assert [c.size for c in cases.cases_for("gemma4_routing")][:7] == [1, 16, 128, 1024, 8192, 65536, 262144]
    moe = cases.cases_for("mxfp4_moe", "gpt-oss-20b")
    assert [c.size for c in moe] == [1, 8, 64, 512, 4096, 16384]
    # V3.2 at 16 / 64 / 128 heads (64: the small-batch goal), V4-Flash, V4-pro; five T each.
    assert len(cases.cases_for("sparse_mla_decode")) == (3 + 1 + 1) * 5
    assert cases.cases_for("gemma4_routing", "gpt-oss-20b") == []
    with pytest.raises(ValueError, match="unknown op"):
        cases.cases_for("attention")


def test_cpu_bench_rows_are_checked_and_complete():
    result = run_bench(torch.device("cpu"), ops=["gemma4_routing", "sparse_topk"], sizes=[16, 8192],
                       compare=["eager"])
    rows = result["rows"]
    assert result["ceilings"] is None
    assert {r["backend"] for r in rows} == {"torch", "torch-eager"}
    for r in rows:
        assert r["events_s"] > 0 and r["graph_s"] is None and r["bytes"] > 0
        assert r["check_ok"] is (None if r["backend"] == "torch-eager" else True)
    env = result["environment"]
    assert env["device"]["arch"] == "cpu" and env["versions"]["torch"] == torch.__version__


def test_markdown_and_plot(tmp_path):
    result = {
        "environment": {"device": {"name": "NVIDIA H100", "arch": "sm90"}, "driver": "580",
                        "versions": {"torch": "2.11", "triton": "3.6", "rocmoe": "0.1"}},
        "ceilings": {"copy_bytes_per_s": 3.0e12, "bf16_flops_per_s": 7.9e14},
        "rows": [
            {"op": "gemma4_routing", "model": "m", "shape": f"T={t}", "size": t, "dtype": "fp32", "backend": b,
             "graph_s": t * f * 1e-9 + 2e-6, "events_s": 5e-6, "bytes": t * 576, "flops": 0,
             "gb_per_s": 1.0, "tflop_per_s": None, "frac_copy_bw": 0.5, "frac_bf16_peak": None,
             "check_ok": True, "check": "ids exact", "note": ""}
            for t in (1, 1024, 65536) for b, f in (("triton", 1), ("torch", 9))
        ],
    }
    text = markdown(result, "rocmoe bench --op gemma4_routing")
    assert "`rocmoe bench --op gemma4_routing`" in text and "3000 GB/s" in text
    assert text.count("| gemma4_routing |") == 6
    path = tmp_path / "bench.png"
    plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_full_bench_json_and_load(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert main(["bench", "--op", "sparse_topk", "--size", "8192", "--device", "cpu", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["command"].startswith("rocmoe bench") and saved["rows"]
    md = tmp_path / "r.md"
    assert main(["bench", "--load", str(path), "--markdown", str(md)]) == 0
    assert "| sparse_topk |" in md.read_text()


def test_cli_rejects_bad_bench_arguments(capsys):
    assert main(["bench", "--op", "gemma4_routing", "--model", "gpt-oss-20b"]) == 2
    assert "not a benchmark model" in capsys.readouterr().err
    assert main(["bench", "--op", "gemma4_routing", "--compare", "jit"]) == 2


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
@pytest.mark.parametrize("gate_up, activation, limit, bias", [("interleaved", "swigluoai", 7.0, True),
                                                              ("concatenated", "silu", None, False)])
def test_bf16_grouped_mm_baseline_computes_the_same_moe(gen, gate_up, activation, limit, bias):
    """The comparison row the MoE benchmark times must be the same layer:
    against the fp64 token-by-token reference, at bf16 accuracy, with an
    idle expert and a token whose slots share nothing."""
    w = cases.random_mxfp4_weights(5, 64, 32, gate_up, bias, torch.device("cpu"), gen)
    x = torch.randn(7, 64, generator=gen).to(torch.bfloat16)
    ids = torch.randint(0, 4, (7, 3), generator=gen, dtype=torch.int32)  # expert 4 idle
    tw = torch.rand(7, 3, generator=gen)
    layout = IMPLEMENTATION.prepare(w)  # the torch backend's layout: W1 rows [gate; up]
    w1, w2 = cases.bf16_experts(layout)
    got = cases.moe_bf16_grouped_mm(x, w1, w2, layout.b1 if bias else None, layout.b2 if bias else None, tw, ids,
                                    activation, limit)
    ref = moe_ref(x, w.w1_blocks, w.w1_scales, w.w2_blocks, w.w2_scales, w.b1, w.b2, w.gate_up, tw, ids, activation,
                  1.702, limit)
    assert float((got.double() - ref).norm() / ref.norm()) <= 1e-2
