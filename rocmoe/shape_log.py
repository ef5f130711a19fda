"""Live shape log: which shapes each op sees in a real serving run.

Set ``ROCMOE_SHAPE_LOG=DIR`` before the process starts and every op records
its static shape (a count per distinct shape), and ``mxfp4_moe`` also a
histogram of tokens per expert. ``rocmoe tune --op OP --from-log DIR`` then
tunes exactly the regimes that production hits, hottest first.

Cost model:
- Off (the default): the ops test one module-level boolean, read once at import.
- On: a dict update per call; nothing while a CUDA graph is being captured
  (the capture would bake the record into nothing, and a replay never calls
  Python anyway). The tokens-per-expert histogram is computed on the device
  every ``ROCMOE_SHAPE_LOG_EVERY``-th call (default 64) with scatter-adds (no
  ``bincount``: that syncs to size its output), copied to pinned host memory
  without blocking, and folded in only once its event has completed.

Each process writes ``DIR/shapes-<host>-<pid>.json`` when it first meets a new
shape, every few thousand calls, and at exit (atomically: write + rename).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["ENABLED", "record", "record_moe_histogram", "flush", "ShapeLog", "load", "HISTOGRAM_BUCKETS"]

ENV = "ROCMOE_SHAPE_LOG"
EVERY_ENV = "ROCMOE_SHAPE_LOG_EVERY"

_DIR = os.environ.get(ENV, "").strip() or None
ENABLED = _DIR is not None

#: bucket b >= 1 holds experts that got [2^(b-1), 2^b) tokens; bucket 0 holds idle experts
HISTOGRAM_BUCKETS = 33
_FLUSH_EVERY_CALLS = 4096

_lock = threading.Lock()
_calls: Counter = Counter()
_histograms: dict[tuple, list[int]] = {}
_hist_samples: Counter = Counter()
_pending: list[tuple[tuple, torch.Tensor, Any]] = []
_since_flush = 0
_moe_calls = 0
_every = 64


def _configure(directory: str | os.PathLike | None, every: int | None = None) -> None:
    """(Re)configure the log; tests use this instead of restarting the process."""
    global _DIR, ENABLED, _every, _moe_calls
    _DIR = None if directory is None else str(directory)
    _moe_calls = 0
    ENABLED = _DIR is not None
    if every is not None:
        _every = max(1, int(every))
    _calls.clear()
    _histograms.clear()
    _hist_samples.clear()
    _pending.clear()


try:
    _every = max(1, int(os.environ.get(EVERY_ENV, "64")))
except ValueError:
    _every = 64


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _key(op: str, shape: dict[str, Any]) -> tuple:
    return (op, tuple(sorted(shape.items())))


def record(op: str, like: torch.Tensor, **shape: Any) -> None:
    """Count one call of ``op`` with static ``shape`` (ints/strings). ``like``
    is any input tensor (to see whether a graph capture is in progress).
    Callers check :data:`ENABLED` first."""
    global _since_flush
    if _capturing(like):
        return
    key = _key(op, shape)
    with _lock:
        new = key not in _calls
        _calls[key] += 1
        _since_flush += 1
        due = new or _since_flush >= _FLUSH_EVERY_CALLS
    if due:
        flush(wait=False)


def record_moe_histogram(shape: dict[str, Any], topk_ids: torch.Tensor, num_local_experts: int,
                         expert_map: torch.Tensor | None) -> None:
    """Every N-th call, histogram the tokens each local expert receives.

    Args:
        shape: the call's static shape (the same dict given to :func:`record`).
        topk_ids: [M, k] int32 expert ids (global when ``expert_map`` is
            given; -1 = skip).
        num_local_experts: experts held by this rank (the weights' E).
        expert_map: optional [E_global] int32 global -> local id (-1 = remote).
    """
    global _moe_calls
    if _capturing(topk_ids):
        return
    _moe_calls += 1
    if _moe_calls % _every:
        return
    ids = topk_ids.reshape(-1).to(torch.int64)
    local_count = num_local_experts
    if expert_map is not None:
        local = expert_map.to(torch.int64)[ids.clamp(0, expert_map.shape[0] - 1)]
        ids = torch.where(ids >= 0, local, -1)
    # Slot local_count collects skipped (-1) assignments and is dropped.
    slots = torch.where(ids >= 0, ids, local_count)
    per_expert = torch.zeros(local_count + 1, dtype=torch.int64, device=ids.device)
    per_expert.scatter_add_(0, slots, torch.ones_like(slots))
    per_expert = per_expert[:local_count]
    buckets = torch.where(per_expert > 0,
                          torch.floor(torch.log2(per_expert.clamp(min=1).double())).long() + 1, 0)
    buckets = buckets.clamp(max=HISTOGRAM_BUCKETS - 1)
    hist = torch.zeros(HISTOGRAM_BUCKETS, dtype=torch.int64, device=ids.device)
    hist.scatter_add_(0, buckets, torch.ones_like(buckets))
    if hist.is_cuda:
        host = torch.empty(HISTOGRAM_BUCKETS, dtype=torch.int64, pin_memory=True)
        host.copy_(hist, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    else:
        host, event = hist, None
    with _lock:
        _pending.append((_key("mxfp4_moe", shape), host, event))
    _fold(wait=False)


def _fold(wait: bool) -> None:
    """Move completed histogram copies into the totals."""
    with _lock:
        keep = []
        for key, host, event in _pending:
            if event is not None and not wait and not event.query():
                keep.append((key, host, event))
                continue
            if event is not None:
                event.synchronize()
            totals = _histograms.setdefault(key, [0] * HISTOGRAM_BUCKETS)
            for i, v in enumerate(host.tolist()):
                totals[i] += int(v)
            _hist_samples[key] += 1
        _pending[:] = keep


def _snapshot() -> dict[str, Any]:
    with _lock:
        shapes = [{"op": op, "shape": dict(items), "calls": n} for (op, items), n in _calls.items()]
        hists = [{"op": op, "shape": dict(items), "samples": _hist_samples[(op, items)], "experts_by_tokens": h}
                 for (op, items), h in _histograms.items()]
    return {"schema": 1, "host": socket.gethostname(), "pid": os.getpid(),
            "histogram_buckets": "bucket 0: experts with no token; bucket b: [2^(b-1), 2^b) tokens",
            "shapes": shapes, "histograms": hists}


def flush(wait: bool = True) -> Path | None:
    """Write this process's log file now; returns its path (None when off)."""
    global _since_flush
    if _DIR is None:
        return None
    _fold(wait)
    directory = Path(_DIR)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"shapes-{socket.gethostname()}-{os.getpid()}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_snapshot(), indent=1))
    tmp.replace(path)
    with _lock:
        _since_flush = 0
    return path


def _flush_at_exit() -> None:
    with contextlib.suppress(Exception):  # never turn a clean interpreter exit into a traceback
        flush(wait=True)


atexit.register(_flush_at_exit)


@dataclass
class ShapeLog:
    """The merged log files of a directory."""

    calls: Counter = field(default_factory=Counter)
    histograms: dict[tuple, list[int]] = field(default_factory=dict)

    def shapes(self, op: str) -> list[tuple[dict[str, Any], int]]:
        """(shape, calls) of ``op``, most called first."""
        items = [(dict(shape), n) for (o, shape), n in self.calls.items() if o == op]
        return sorted(items, key=lambda item: -item[1])

    def histogram(self, op: str, shape: dict[str, Any]) -> list[int] | None:
        return self.histograms.get(_key(op, shape))


def load(directory: str | os.PathLike) -> ShapeLog:
    """Merge every ``shapes-*.json`` under ``directory``."""
    directory = Path(directory)
    files = sorted(directory.glob("shapes-*.json"))
    if not files:
        raise ValueError(f"--from-log: no shapes-*.json files in {directory} "
                         f"(run the workload with {ENV}={directory} first)")
    log = ShapeLog()
    for path in files:
        try:
            data = json.loads(path.read_text())
            for entry in data["shapes"]:
                log.calls[_key(entry["op"], entry["shape"])] += int(entry["calls"])
            for entry in data["histograms"]:
                totals = log.histograms.setdefault(_key(entry["op"], entry["shape"]), [0] * HISTOGRAM_BUCKETS)
                for i, v in enumerate(entry["experts_by_tokens"]):
                    totals[i] += int(v)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"--from-log: {path} is not a rocmoe shape log: {exc}") from exc
    return log


def regimes_from_log(log: ShapeLog, op: str, project: Callable[[dict[str, Any]], dict[str, int] | None],
                     split_key: str, max_regimes: int) -> list[dict[str, int]]:
    """The regimes to tune: each logged shape of ``op`` projected to a tuning
    regime by ``project`` (None = not tunable), the split key rounded up to a
    power of two (a serving run meets every batch size; the table interpolates
    between measured points anyway), merged, and the ``max_regimes``
    most-called kept, in ascending split-key order."""
    weights: Counter = Counter()
    for shape, calls in log.shapes(op):
        regime = project(shape)
        if regime is None:
            continue
        value = regime[split_key]
        regime[split_key] = 1 << max(0, (value - 1).bit_length())
        weights[tuple(sorted(regime.items()))] += calls
    hottest = [dict(items) for items, _ in weights.most_common(max_regimes)]
    return sorted(hottest, key=lambda r: (r[split_key], sorted(r.items())))
