"""``rocmoe bench --quick``: every op at a small real-model shape on the current
device with the selected backend, each result checked against the fp64 torch
reference on the CPU before it is timed. The cases are the full benchmark's
(:mod:`rocmoe.bench.cases`) at small sizes.

Timing: CUDA events on GPUs (median of repeated calls after a warm-up), the
host clock on the CPU.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from rocmoe import registry
from rocmoe.bench import cases
from rocmoe.bench.timing import time_events, time_host
from rocmoe.device import Device

__all__ = ["quick_cases", "run_quick", "render_quick"]


def quick_cases() -> list[cases.BenchCase]:
    """One small real-model shape per op (two for sparse_topk: both paths)."""
    return [
        cases.routing_case(1024, torch.float32),
        cases.moe_case("gpt-oss-20b", 4),
        cases.mla_case("dsv32", 16, 8),
        cases.topk_case(8, 32768),
        cases.topk_case(64, None),
    ]


def run_quick(device: torch.device, *, ops: list[str] | None = None, backend: str | None = None,
              seed: int = 0, reps: int | None = None) -> list[dict[str, Any]]:
    """Run, check and time every --quick case; returns one JSON-ready row each."""
    desc = Device.for_torch_device(device)
    reps = reps or (50 if desc.is_gpu else 5)
    rows = []
    gen = torch.Generator().manual_seed(seed)
    for case in quick_cases():
        if ops and case.op not in ops:
            continue
        row: dict[str, Any] = {"op": case.op, "shape": f"{case.model} {case.label}"}
        try:
            inputs = case.make_inputs(device, gen)
            outputs = case.make_outputs(inputs)
            row["backend"] = registry.select(case.op, desc, case.problem(inputs), backend).impl.backend
            case.run(inputs, outputs, backend)
            check = case.check(inputs, outputs)
            row.update(check_ok=check.ok, check=check.detail)
            call = lambda case=case, inputs=inputs, outputs=outputs: case.run(inputs, outputs, backend)  # noqa: E731
            row["median_s"] = (time_events([call], device, reps=reps) if device.type == "cuda"
                               else time_host(call, device, reps=reps))
        except (registry.BackendUnavailableError, ValueError) as exc:
            row.update(backend=row.get("backend", backend or "-"), check_ok=False, check=f"error: {exc}",
                       median_s=None)
        rows.append(row)
    return rows


def render_quick(rows: list[dict[str, Any]], device: Device, file=None) -> None:
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
        table.add_row(r["op"], r["backend"], escape(r["shape"]), time_s, f"{mark} {escape(r['check'])}")
    console.print(table)
    if not device.is_gpu:
        console.print("CPU run: these are CPU timings of the torch backend; GPU numbers need a GPU.")
