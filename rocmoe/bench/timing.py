"""Timing on a device: CUDA-graph replay and event timing (medians), host
clock on the CPU, and the device's ceilings measured on the spot."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

__all__ = ["Ceilings", "measure_ceilings", "rotating_sets", "time_events", "time_graph", "time_host"]

MAX_INPUT_SETS = 16


def rotating_sets(device: torch.device, set_bytes: int) -> int:
    """How many input sets to rotate so that together they outgrow twice the
    L2 cache (repeated calls then read memory, not a warm cache); 1 off-GPU."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
    return max(1, min(MAX_INPUT_SETS, math.ceil(2 * l2 / max(set_bytes, 1))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "xpu":
        torch.xpu.synchronize(device)


def time_host(fn: Callable[[], object], device: torch.device, *, reps: int = 20, budget_s: float = 2.0) -> float:
    """Median seconds per call by the host clock (synchronising after each call)."""
    fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    per_call = time.perf_counter() - t0
    reps = max(3, min(reps, int(budget_s / max(per_call, 1e-9))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def time_events(calls: Sequence[Callable[[], object]], device: torch.device, *, reps: int = 50,
                warmup: int = 5) -> float:
    """Median seconds of one call, each call bracketed by CUDA events; ``calls``
    rotate (one per input set) so repeated calls do not re-read a warm cache."""
    for i in range(warmup):
        calls[i % len(calls)]()
    torch.cuda.synchronize(device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        calls[i % len(calls)]()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) / 1e3


def time_graph(calls: Sequence[Callable[[], object]], device: torch.device, *, calls_per_graph: int = 0,
               reps: int = 20) -> float:
    """Median seconds per call under CUDA-graph replay: one graph holds
    ``calls_per_graph`` calls cycling over ``calls``; replayed ``reps`` times."""
    n = calls_per_graph or max(len(calls), 20)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for i in range(min(n, 3 * len(calls))):
            calls[i % len(calls)]()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize(device)
    samples = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / n)
    del graph
    return statistics.median(samples)


@dataclass(frozen=True)
class Ceilings:
    """Measured in the same run: device-copy bandwidth (bytes read + written per
    second) and dense bf16 matmul rate (FLOP/s)."""

    copy_bytes_per_s: float
    bf16_flops_per_s: float
    #: one minimal kernel (a 1-element add) under CUDA-graph replay: what any launch costs
    launch_floor_s: float


def _copy_seconds(device: torch.device, n: int) -> float:
    """Median seconds of one device-to-device copy of ``n`` fp32 elements (the
    buffers go when this returns)."""
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    return time_events([lambda: dst.copy_(src)], device, reps=20, warmup=3)


def _matmul_seconds(device: torch.device, m: int) -> float:
    """Median seconds of one bf16 ``m`` x ``m`` x ``m`` matmul on random data."""
    a = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    b = torch.randn(m, m, device=device, dtype=torch.bfloat16)
    out = torch.empty(m, m, device=device, dtype=torch.bfloat16)
    return time_events([lambda: torch.matmul(a, b, out=out)], device, reps=20, warmup=3)


def measure_ceilings(device: torch.device) -> Ceilings:
    """A 1 GiB device-to-device copy, an 8192^3 bf16 matmul on random data, and
    the graph-replay time of a minimal kernel."""
    n, m = 1 << 28, 8192  # a 1 GiB fp32 copy; an 8192^3 matmul
    copy_s = _copy_seconds(device, n)
    mm_s = _matmul_seconds(device, m)
    tiny = [torch.rand(1, device=device) for _ in range(3)]
    floor_s = time_graph([lambda: torch.add(tiny[0], tiny[1], out=tiny[2])], device, calls_per_graph=100)
    return Ceilings(copy_bytes_per_s=2 * n * 4 / copy_s, bf16_flops_per_s=2 * m**3 / mm_s, launch_floor_s=floor_s)
