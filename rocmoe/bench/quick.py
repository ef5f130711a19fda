"""``rocmoe bench --quick``: every op at a small real-model shape on the current
device with the selected backend, each result checked against the fp64 torch
reference on the CPU before it is timed.

Timing: CUDA events on GPUs (median of repeated calls after a warm-up), the
host clock on the CPU. The full benchmark (``rocmoe bench`` without --quick)
adds graph replay, ceilings and comparisons.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

import rocmoe
from rocmoe import registry
from rocmoe.backends.torch.gemma4_routing import gemma4_routing_torch
from rocmoe.backends.torch.mxfp4_moe import mxfp4_moe_torch, to_torch_layout
from rocmoe.backends.torch.sparse_mla_decode import sparse_mla_decode_torch
from rocmoe.backends.torch.sparse_topk import sparse_topk_torch
from rocmoe.bench.cases import random_mxfp4_weights
from rocmoe.bench.timing import time_events, time_host
from rocmoe.device import Device
from rocmoe.ops import gemma4_routing as routing_op
from rocmoe.ops import mxfp4_moe as moe_op
from rocmoe.ops import sparse_mla_decode as mla_op
from rocmoe.ops import sparse_topk as topk_op

__all__ = ["QuickCase", "quick_cases", "run_quick"]


@dataclass
class Check:
    ok: bool
    detail: str


@dataclass
class QuickCase:
    """One op at one shape: inputs, the call under test, its reference check."""

    op: str
    shape: str
    problem: Any
    call: Callable[[str | None], Any]
    check: Callable[[Any], Check]


def _rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().cpu().double(), ref.detach().cpu().double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _routing_case(device: torch.device, gen: torch.Generator) -> QuickCase:
    tokens, experts, k = 1024, 128, 8
    logits = torch.randn(tokens, experts, generator=gen).to(device)
    scale = (torch.rand(experts, generator=gen) + 0.5).to(device)

    def check(result) -> Check:
        weights, ids = result
        ref_w, ref_ids = gemma4_routing_torch(logits.cpu().double(), k, scale.cpu().double(), torch.float64)
        ids_ok = torch.equal(ids.cpu(), ref_ids)
        err = float((weights.cpu().double() - ref_w).abs().max())
        ok = ids_ok and torch.allclose(weights.cpu().double(), ref_w, rtol=1e-5, atol=1e-6)
        return Check(ok, f"ids {'exact' if ids_ok else 'DIFFER'}, max|dw| {err:.1e}")

    return QuickCase("gemma4_routing", f"gemma4-26b-a4b T={tokens} E={experts} K={k} fp32",
                     routing_op.problem_of(logits, k, scale),
                     lambda b: rocmoe.gemma4_routing(logits, k, scale, backend=b), check)


def _moe_case(device: torch.device, gen: torch.Generator) -> QuickCase:
    tokens, experts, k, hidden, inter = 4, 32, 4, 2880, 2880
    weights = random_mxfp4_weights(experts, hidden, inter, "interleaved", True, device, gen)
    x = torch.randn(tokens, hidden, generator=gen).to(torch.bfloat16).to(device)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)]).int().to(device)
    topk_weights = torch.softmax(torch.randn(tokens, k, generator=gen), -1).to(device)

    def check(out) -> Check:
        cpu_weights = rocmoe.Mxfp4MoeWeights(
            weights.w1_blocks.cpu(), weights.w1_scales.cpu(), weights.w2_blocks.cpu(), weights.w2_scales.cpu(),
            weights.b1.cpu(), weights.b2.cpu(), weights.gate_up)
        ref = mxfp4_moe_torch(x.cpu(), to_torch_layout(cpu_weights), topk_weights.cpu(), ids.cpu(),
                              compute_dtype=torch.float64)
        err = _rel_l2(out, ref)
        return Check(err <= 1e-2, f"rel-L2 {err:.1e}")

    problem = moe_op._problem(x.dtype, weights, k, "swigluoai", False, False)
    return QuickCase("mxfp4_moe", f"gpt-oss-20b M={tokens} E={experts} k={k} H=I={hidden}", problem,
                     lambda b: rocmoe.mxfp4_moe(x, weights, topk_weights, ids, backend=b), check)


def _mla_case(device: torch.device, gen: torch.Generator) -> QuickCase:
    tokens, heads, dim, topk, block = 8, 16, 576, 2048, 64
    # Each query's keys live in a region of their own, as in real decode.
    blocks_per_query = topk // block + 2
    cache = torch.randn(tokens * blocks_per_query, block, dim, generator=gen).to(torch.bfloat16).to(device)
    q = torch.randn(tokens, heads, dim, generator=gen).to(torch.bfloat16).to(device)
    region = blocks_per_query * block
    picks = torch.stack([torch.randperm(region, generator=gen)[:topk] + t * region for t in range(tokens)])
    indices = picks.int().to(device)
    scale = 1.0 / math.sqrt(192)

    def check(result) -> Check:
        out, lse = result
        ref_out, ref_lse = sparse_mla_decode_torch(q.cpu(), cache.cpu(), indices.cpu(), scale, 512,
                                                   compute_dtype=torch.float64)
        err = _rel_l2(out, ref_out)
        lse_err = float((lse.cpu().double() - ref_lse).abs().max())
        ok = (torch.allclose(out.cpu().double(), ref_out, atol=2e-2, rtol=2e-2) and err <= 5e-3
              and lse_err <= 1e-3)
        return Check(ok, f"rel-L2 {err:.1e}, max|dlse| {lse_err:.1e}")

    problem = mla_op.problem_of(q, cache, indices, 512, None, None, None, None)
    return QuickCase("sparse_mla_decode", f"dsv32 T={tokens} H={heads} D={dim} topk={topk} bs={block}", problem,
                     lambda b: rocmoe.sparse_mla_decode(q, cache, indices, softmax_scale=scale, backend=b), check)


def _topk_cases(device: torch.device, gen: torch.Generator) -> list[QuickCase]:
    tokens, width, topk = 8, 32768, 2048
    logits = torch.randn(tokens, width, generator=gen).to(device)
    lens = torch.randint(topk + 1, width + 1, (tokens,), generator=gen).int().to(device)

    def check_general(out) -> Check:
        ref = sparse_topk_torch(logits.cpu(), lens.cpu(), topk)
        same = all(set(out[t].cpu().tolist()) == set(ref[t].tolist()) for t in range(tokens))
        return Check(same, "index sets equal" if same else "index sets DIFFER")

    short_tokens = 64
    short_lens = torch.randint(0, topk + 1, (short_tokens,), generator=gen).int().to(device)

    def check_window(out) -> Check:
        ref = sparse_topk_torch(None, short_lens.cpu(), topk)
        same = torch.equal(out.cpu(), ref)
        return Check(same, "window exact" if same else "window DIFFERS")

    return [
        QuickCase("sparse_topk", f"dsv32 indexer T={tokens} L={width} topk={topk}",
                  topk_op.problem_of(logits, topk, None),
                  lambda b: rocmoe.sparse_topk(logits, lens, topk, backend=b), check_general),
        QuickCase("sparse_topk", f"short-circuit T={short_tokens} seq_len<=topk={topk}",
                  topk_op.problem_of(None, topk, None),
                  lambda b: rocmoe.sparse_topk(None, short_lens, topk, max_seq_len=topk, backend=b),
                  check_window),
    ]


def quick_cases(device: torch.device, seed: int = 0) -> list[QuickCase]:
    """The --quick cases, with fresh random inputs from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [_routing_case(device, gen), _moe_case(device, gen), _mla_case(device, gen), *_topk_cases(device, gen)]


def run_quick(device: torch.device, *, ops: list[str] | None = None, backend: str | None = None,
              seed: int = 0, reps: int | None = None) -> list[dict[str, Any]]:
    """Run, check and time every --quick case; returns one JSON-ready row each."""
    desc = Device.for_torch_device(device)
    reps = reps or (50 if desc.is_gpu else 5)
    rows = []
    for case in quick_cases(device, seed):
        if ops and case.op not in ops:
            continue
        row: dict[str, Any] = {"op": case.op, "shape": case.shape}
        try:
            chosen = registry.select(case.op, desc, case.problem, backend).impl.backend
            row["backend"] = chosen
            result = case.call(backend)
            check = case.check(result)
            row.update(check_ok=check.ok, check=check.detail)
            call = lambda: case.call(backend)  # noqa: E731
            row["median_s"] = (time_events([call], device, reps=reps) if device.type == "cuda"
                               else time_host(call, device, reps=reps))
        except (registry.BackendUnavailableError, ValueError) as exc:
            row.update(backend=row.get("backend", backend or "-"), check_ok=False, check=f"error: {exc}",
                       median_s=None)
        rows.append(row)
    return rows


def render_quick(rows: list[dict[str, Any]], device: Device, file=None) -> None:
    import sys

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=140)
    table = Table(title=f"rocmoe bench --quick on {device.describe()}")
    for column in ("op", "backend", "shape", "time", "check"):
        table.add_column(column, overflow="fold")
    for r in rows:
        t = r.get("median_s")
        time_s = "-" if t is None else (f"{t * 1e6:.1f} us" if t < 1e-3 else f"{t * 1e3:.2f} ms")
        mark = "[green]ok[/green]" if r["check_ok"] else "[red]FAIL[/red]"
        table.add_row(r["op"], r["backend"], r["shape"], time_s, f"{mark} {escape(r['check'])}")
    console.print(table)
    if not device.is_gpu:
        console.print("CPU run: these are CPU timings of the torch backend; GPU numbers need a GPU.")
