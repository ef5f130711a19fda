"""The benchmark runner: ops x backends x shapes, checked, then timed."""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import rocmoe
from rocmoe import registry
from rocmoe.bench.cases import BenchCase, cases_for
from rocmoe.bench.timing import Ceilings, measure_ceilings, rotating_sets, time_events, time_graph, time_host
from rocmoe.device import Device

__all__ = ["BenchRow", "COMPARE_MODES", "run_bench", "environment"]

# Comparison rows: the op's plain torch reference, eager and compiled.
COMPARE_MODES = {
    "eager": None,
    "compile": "default",
    "compile-max-autotune": "max-autotune-no-cudagraphs",
}


@dataclass
class BenchRow:
    op: str
    model: str
    shape: str
    size: int
    dtype: str
    backend: str
    graph_s: float | None
    events_s: float | None
    bytes: int
    flops: int
    gb_per_s: float | None
    tflop_per_s: float | None
    frac_copy_bw: float | None
    frac_bf16_peak: float | None
    check_ok: bool | None
    check: str
    note: str = ""


def environment(device: torch.device) -> dict[str, Any]:
    """What a result depends on: device, driver, versions, commit."""
    from rocmoe.info import collect

    info = collect(Device.for_torch_device(device))
    env = {"device": info["device"], "versions": info["versions"], "python": platform.python_version()}
    try:
        env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                       capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["driver"] = None
    try:
        root = Path(rocmoe.__file__).resolve().parent.parent
        env["git_commit"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                           text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    return env


def _time(calls: list[Callable[[], Any]], device: torch.device, graph: bool) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, time_host(calls[0], device)
    events = time_events(calls, device, reps=30)
    graph_s = None
    if graph:
        graph_s = time_graph(calls, device)
    return graph_s, events


def _row(case: BenchCase, inputs, backend: str, times, ceilings: Ceilings | None, check, note="") -> BenchRow:
    graph_s, events_s = times
    best = graph_s if graph_s is not None else events_s
    nbytes, flops = case.bytes_moved(inputs), case.flops(inputs)
    gbps = nbytes / best / 1e9 if best else None
    tflops = flops / best / 1e12 if best and flops else None
    return BenchRow(
        case.op, case.model, case.label, case.size, case.dtype, backend, graph_s, events_s, nbytes, flops, gbps,
        tflops,
        gbps * 1e9 / ceilings.copy_bytes_per_s if ceilings and gbps else None,
        tflops * 1e12 / ceilings.bf16_flops_per_s if ceilings and tflops else None,
        None if check is None else check.ok, "" if check is None else check.detail, note)


def run_bench(device: torch.device, *, ops: list[str], models: list[str] | None = None,
              backends: list[str] | None = None, compare: list[str] | None = None, seed: int = 0,
              sizes: list[int] | None = None, progress: Callable[[str], None] | None = None,
              checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every case of ``ops`` (and ``models``, ``sizes``) on ``device``.

    For each case: build rotating input sets, run each backend once and check
    it against the fp64 reference, then time it under CUDA-graph replay (when
    capturable) and with per-call events. ``compare`` adds the plain torch
    reference eagerly and under torch.compile. ``checkpoint`` receives the
    result so far after every case (a long run that is cut off keeps its rows).
    """
    desc = Device.for_torch_device(device)
    ceilings = measure_ceilings(device) if device.type == "cuda" else None
    env = environment(device)

    def result() -> dict[str, Any]:
        return {"environment": env, "ceilings": None if ceilings is None else asdict(ceilings),
                "rows": [asdict(r) for r in rows]}

    rows: list[BenchRow] = []
    compiled: dict[tuple[Callable, str], Callable] = {}  # one per function and mode: dynamo's own
    torch._dynamo.reset()                                  # shape handling applies, as in an engine
    for op in ops:
        cases = [c for m in (models or [None]) for c in cases_for(op, m)]
        for case in cases:
            if sizes and case.size not in sizes:
                continue
            if progress:
                progress(f"{op} {case.model} {case.label}")
            gen = torch.Generator().manual_seed(seed)
            sets = [case.make_inputs(device, gen) for _ in range(rotating_sets(device, case.set_bytes))]
            outs = [case.make_outputs(s) for s in sets]
            names = backends or [registry.select(op, desc, case.problem(sets[0])).impl.backend]
            for name in names:
                try:
                    impl = registry.select(op, desc, case.problem(sets[0]), name).impl
                except registry.BackendUnavailableError as exc:
                    rows.append(_row(case, sets[0], name, (None, None), ceilings, None,
                                     "unavailable: " + "; ".join(r for rs in exc.reasons.values() for r in rs)))
                    continue
                case.run(sets[0], outs[0], name)
                check = case.check(sets[0], outs[0])
                calls = [lambda s=s, o=o, case=case, name=name: case.run(s, o, name) for s, o in zip(sets, outs)]
                capturable = impl.graph_capturable(case.problem(sets[0]))
                rows.append(_row(case, sets[0], name, _time(calls, device, capturable), ceilings, check,
                                 "" if capturable else "not graph-capturable: event timing"))
            for mode in compare or []:
                if case.reference is None or (COMPARE_MODES[mode] and not case.compilable):
                    continue
                fn = case.reference
                if COMPARE_MODES[mode]:
                    key = (case.reference, mode)
                    if key not in compiled:
                        compiled[key] = torch.compile(case.reference, mode=COMPARE_MODES[mode])
                    fn = compiled[key]
                calls = [lambda s=s, fn=fn, case=case: fn(*case.reference_args(s)) for s in sets]
                try:
                    times = _time(calls, device, device.type == "cuda")
                    rows.append(_row(case, sets[0], f"{case.reference_name}-{mode}", times, ceilings, None))
                except Exception as exc:  # a compile failure is a result to report
                    rows.append(_row(case, sets[0], f"{case.reference_name}-{mode}", (None, None), ceilings, None,
                                     f"failed: {type(exc).__name__}: {str(exc)[:200]}"))
            del sets, outs
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if checkpoint:
                checkpoint(result())
    return result()
