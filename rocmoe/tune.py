"""``rocmoe tune``: measure candidate launch configs on this device and write
the per-arch table the registry's kernels read.

A Triton op opts in by exporting ``TUNING`` (a :class:`Tuning`): its config
spec, representative regime points, the candidate configs of a regime, and a
builder of checked, timeable inputs. For each regime point every candidate is
first checked against the reference, then timed (CUDA-graph replay over
rotating inputs); the fastest wins. Progress is saved after every measurement
(``<table>.partial.json``), so an interrupted run resumes where it stopped;
``budget_s`` bounds the time, and regimes not reached are left to the
heuristic. ``keep_from`` re-tunes part of an existing table: its entries for
the regime groups (every key but the split key) not measured now are kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rocmoe.configs import PACKAGE_DIR, SCHEMA_VERSION, ConfigSpec
from rocmoe.device import Device

__all__ = ["Tuning", "TuneInputs", "run_tune", "table_entries", "parse_where", "select_regimes", "merge_entries"]


@dataclass
class TuneInputs:
    """Inputs for one regime: ``launch(params, set_index)`` runs the kernel on
    input set ``set_index``; ``check(params)`` runs on set 0 and says whether
    the result matches the reference."""

    num_sets: int
    launch: Callable[[Any, int], None]
    check: Callable[[Any], bool]


@dataclass
class Tuning:
    spec: ConfigSpec
    regimes: Callable[[], list[dict[str, int]]]
    candidates: Callable[[dict[str, int], Device], list[Any]]
    make_inputs: Callable[[dict[str, int], torch.device, torch.Generator], TuneInputs]
    #: the regime key whose buckets the table splits on; others are matched exactly
    split_key: str
    #: a shape recorded by ROCMOE_SHAPE_LOG -> the regime to tune on ``device``
    #: (None: not tunable); by default the shape's values of the spec's regime keys
    regime_of_shape: Callable[[dict[str, Any], Device], dict[str, int] | None] | None = None
    #: ``meta_launch(regime, params)``: the candidate's launch on meta tensors of
    #: the regime's shapes (the same specialisations as make_inputs' tensors),
    #: so candidates can be compiled ahead, in parallel (see compile_ahead)
    meta_launch: Callable[[dict[str, int], Any], None] | None = None

    def project(self, shape: dict[str, Any], device: Device) -> dict[str, int] | None:
        if self.regime_of_shape is not None:
            return self.regime_of_shape(shape, device)
        if not all(k in shape for k in self.spec.regime_keys):
            return None
        return {k: int(shape[k]) for k in self.spec.regime_keys}


def _time(inputs: TuneInputs, params: Any, device: torch.device) -> float:
    from rocmoe.bench.timing import time_graph, time_host

    calls = [lambda i=i: inputs.launch(params, i) for i in range(inputs.num_sets)]
    if device.type == "cuda":
        return time_graph(calls, device, reps=10)
    return time_host(calls[0], device, reps=3, budget_s=0.5)


def _job_key(regime: dict[str, int], params: Any) -> str:
    """A (regime, candidate) pair as the partial file keys its measurement."""
    return json.dumps([regime, dataclasses.asdict(params)], sort_keys=True)


def table_path(op: str, arch: str, out: Path | str | None = None) -> Path:
    """Where ``rocmoe tune`` writes the table of (op, arch): ``out``, else the package's."""
    return Path(out) if out else PACKAGE_DIR / op / f"{arch}.json"


def _compile_share(op: str, arch: str, compute_units: int, cache_dir: str,
                   jobs: list[tuple[dict[str, int], Any]]) -> list[str]:
    """One worker of compile_ahead: compile ``jobs`` for ``arch`` into
    ``cache_dir``; returns one line per candidate that did not compile (the
    sweep reports it again when it gets there)."""
    import importlib

    from rocmoe.precompile import compiling_for

    os.environ["TRITON_CACHE_DIR"] = cache_dir
    tuning = importlib.import_module(f"rocmoe.backends.triton.{op}").TUNING
    failed = []
    with compiling_for(arch, compute_units):
        for regime, params in jobs:
            try:
                tuning.meta_launch(regime, params)
            except Exception as exc:  # reported, and measured as failing, by the sweep itself
                failed.append(f"{regime} {params}: {type(exc).__name__}: {str(exc)[:120]}")
    return failed


def compile_ahead(tuning: Tuning, jobs: Sequence[tuple[dict[str, int], Any]], device: Device, workers: int,
                  cache_dir: str | None = None) -> tuple[int, list[str]]:
    """Compile every (regime, candidate) of ``jobs`` for ``device`` into the
    Triton cache in ``workers`` processes, so the sweep, which compiles one
    kernel at a time and waits for each, finds them built. Returns the number
    of launches compiled and the lines of those that failed."""
    import concurrent.futures as futures
    import multiprocessing

    from rocmoe.precompile import compiling_worker_init, default_cache_dir

    if tuning.meta_launch is None or not jobs:
        return 0, []
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    # The split key (token count) sizes grids, not kernels: a candidate is
    # compiled once, at the first regime that differs from others only there.
    unique: dict[str, tuple[dict[str, int], Any]] = {}
    for regime, params in jobs:
        rest = {k: v for k, v in regime.items() if k != tuning.split_key}
        unique.setdefault(_job_key(rest, params), (regime, params))
    shares: list[list[tuple[dict[str, int], Any]]] = [[] for _ in range(max(1, min(workers, len(unique))))]
    for i, job in enumerate(unique.values()):
        shares[i % len(shares)].append(job)
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(len(shares), mp_context=context, initializer=compiling_worker_init) as pool:
        done = [pool.submit(_compile_share, tuning.spec.op, device.arch, device.limits.compute_units, cache_dir,
                            share) for share in shares]
        failed = [line for d in done for line in d.result()]
    return len(unique), failed


def table_entries(split_key: str, winners: Sequence[tuple[dict[str, int], Any]],
                  span: tuple[int, int | None] = (1, None)) -> list[dict[str, Any]]:
    """Turn measured (regime, params) winners into table entries: the split key
    gets geometric-midpoint buckets between measured points, other keys exact.
    The buckets of a group cover ``span`` of the split key (inclusive; None:
    open), the range a ``--where`` bound on it tuned."""
    groups: dict[tuple, list[tuple[dict[str, int], Any]]] = {}
    for regime, params in winners:
        rest = tuple(sorted((k, v) for k, v in regime.items() if k != split_key))
        groups.setdefault(rest, []).append((regime, params))
    entries = []
    for rest, items in groups.items():
        items.sort(key=lambda item: item[0][split_key])
        points = [r[split_key] for r, _ in items]
        for i, (_, params) in enumerate(items):
            lo = span[0] if i == 0 else math.floor(math.sqrt(points[i - 1] * points[i])) + 1
            hi = span[1] if i == len(items) - 1 else math.floor(math.sqrt(points[i] * points[i + 1]))
            when = {split_key: [lo, hi], **{k: [v, v] for k, v in rest}}
            entries.append({"when": when, "config": dataclasses.asdict(params)})
    return entries


def parse_where(texts: Sequence[str], keys: Sequence[str]) -> dict[str, tuple[int, int | None]]:
    """``["heads=128", "tokens=8:64", "tokens=512:"]`` -> inclusive bounds per
    regime key (an empty upper bound is open); a key the op's table is not
    indexed by, or a bound that is not an integer, is an error naming it."""
    bounds: dict[str, tuple[int, int | None]] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        if not sep or key not in keys:
            raise ValueError(f"--where {text!r}: expected KEY=VALUE or KEY=LO:HI with KEY one of {', '.join(keys)}")
        lo_text, colon, hi_text = value.partition(":")
        try:
            lo = int(lo_text)
            hi = (int(hi_text) if hi_text else None) if colon else lo
        except ValueError:
            raise ValueError(f"--where {text!r}: bounds must be integers") from None
        if hi is not None and hi < lo:
            raise ValueError(f"--where {text!r}: empty range (upper bound below lower)")
        bounds[key] = (lo, hi)
    return bounds


def select_regimes(regimes: Sequence[dict[str, int]], where: dict[str, tuple[int, int | None]]) -> list[dict[str, int]]:
    """The regimes whose every ``where`` key lies within its bounds."""
    return [r for r in regimes
            if all(lo <= r[k] and (hi is None or r[k] <= hi) for k, (lo, hi) in where.items())]


def _group(when: dict[str, Any], split_key: str) -> tuple:
    return tuple(sorted((k, tuple(v)) for k, v in when.items() if k != split_key))


def _regime_group(regime: dict[str, int], split_key: str) -> tuple:
    """The group of a regime, as _group names a table entry's."""
    return _group({k: [v, v] for k, v in regime.items()}, split_key)


def _outside(bounds: Sequence[int | None], span: tuple[int, int | None]) -> list[list[int | None]]:
    """The parts of the inclusive range ``bounds`` (upper None: open) outside ``span``."""
    lo, hi = bounds
    parts: list[list[int | None]] = []
    if lo < span[0]:
        parts.append([lo, span[0] - 1 if hi is None else min(hi, span[0] - 1)])
    if span[1] is not None and (hi is None or hi > span[1]):
        parts.append([max(lo, span[1] + 1), hi])
    return parts


def merge_entries(old_entries: Sequence[dict[str, Any]], new_entries: Sequence[dict[str, Any]],
                  split_key: str, span: tuple[int, int | None] = (1, None)) -> tuple[list[dict[str, Any]], int]:
    """New entries plus what the old ones say outside them: every old entry of a
    regime group (the exact keys, all but ``split_key``) the new ones do not
    cover, and, in a group they do cover, the parts of its split-key range
    outside ``span`` (the range tuned now). So a run tuned for some token
    counts keeps the old choices for the others, and split-key buckets of two
    runs never interleave. The new entries come first: the lookup takes the
    first match. Returns the entries and how many old ones were kept (whole or
    in part)."""
    tuned = {_group(e["when"], split_key) for e in new_entries}
    kept = []
    for entry in old_entries:
        if _group(entry["when"], split_key) not in tuned:
            kept.append(entry)
            continue
        kept += [{**entry, "when": {**entry["when"], split_key: part}}
                 for part in _outside(entry["when"][split_key], span)]
    return [*new_entries, *kept], len(kept)


def run_tune(tuning: Tuning, device: torch.device, *, out: Path | None = None, budget_s: float = 600.0,
             regimes: list[dict[str, int]] | None = None, command: str = "rocmoe tune",
             progress: bool = True, seed: int = 0, keep_from: Path | None = None,
             compile_workers: int = 0, split_span: tuple[int, int | None] = (1, None)) -> Path:
    """Sweep, pick, write the table; returns its path. The new entries cover
    ``split_span`` of the split key (the token counts a ``--where`` bound
    selected; by default all). With ``keep_from`` (an existing table of this
    op and arch) what it says outside the new entries is carried into the new
    table (see merge_entries). With
    ``compile_workers`` (on a GPU) the candidates not yet measured are first
    compiled in that many processes (see compile_ahead)."""
    desc = Device.for_torch_device(device)
    spec = tuning.spec
    out = table_path(spec.op, desc.arch, out)
    partial_path = out.with_name(out.name + ".partial.json")
    state: dict[str, Any] = {"measured": {}}
    if partial_path.exists():
        state = json.loads(partial_path.read_text())
    regimes = regimes or tuning.regimes()
    jobs = [(r, c) for r in regimes for c in tuning.candidates(r, desc)]
    started = time.monotonic()
    if compile_workers > 0 and device.type == "cuda" and tuning.meta_launch is not None:
        todo = [(r, c) for r, c in jobs if _job_key(r, c) not in state["measured"]]
        compiled, failed = compile_ahead(tuning, todo, desc, compile_workers)
        if progress:
            print(f"compiled {compiled} candidate launches in {compile_workers} processes in "
                  f"{time.monotonic() - started:.0f} s ({len(failed)} failed: the sweep reports them)")
    progress_cm = None
    if progress:
        from rich.progress import Progress

        progress_cm = Progress(transient=False)
        task = progress_cm.add_task(f"tuning {spec.op} on {desc.arch}", total=len(jobs))
        progress_cm.start()
    try:
        current_regime, inputs = None, None
        measured_now = 0
        for regime, params in jobs:
            key = _job_key(regime, params)
            if key in state["measured"]:
                if progress_cm:
                    progress_cm.advance(task)
                continue
            if measured_now and time.monotonic() - started > budget_s:
                break  # always measure one, so a resumed run makes progress
            measured_now += 1
            if regime != current_regime:
                gen = torch.Generator().manual_seed(seed)
                current_regime, inputs = regime, tuning.make_inputs(regime, device, gen)
            try:
                ok = inputs.check(params)
                seconds = _time(inputs, params, device) if ok else None
                state["measured"][key] = {"seconds": seconds, "error": None if ok else "wrong result"}
            except Exception as exc:  # a candidate that fails to compile or launch is just not chosen
                state["measured"][key] = {"seconds": None, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            partial_path.parent.mkdir(parents=True, exist_ok=True)
            partial_path.write_text(json.dumps(state))
            if progress_cm:
                progress_cm.advance(task)
    finally:
        if progress_cm:
            progress_cm.stop()

    winners = []
    for regime in regimes:
        best = None
        for params in tuning.candidates(regime, desc):
            m = state["measured"].get(_job_key(regime, params))
            if m and m["seconds"] is not None and (best is None or m["seconds"] < best[1]):
                best = (params, m["seconds"])
        if best is not None:
            winners.append((regime, best[0]))
    if not winners:
        raise RuntimeError(f"no candidate of {spec.op} was measured successfully on {desc.arch}")
    import rocmoe

    kept_note = {}
    if keep_from is not None:
        from rocmoe.configs import load_table

        load_table(keep_from, spec)  # a malformed or foreign table is an error naming the file, not merged
        old = json.loads(Path(keep_from).read_text())
        if old.get("arch") != desc.arch:
            raise ValueError(f"keep_from {keep_from} is a table for {old.get('arch')}, not {desc.arch}")
        # A group the budget cut short keeps its old entries whole: its new
        # buckets would stretch the measured token counts over the unmeasured
        # ones. Its measurements stay in the partial file for a resumed run.
        won = {json.dumps(r, sort_keys=True) for r, _ in winners}
        short = {_regime_group(r, tuning.split_key) for r in regimes if json.dumps(r, sort_keys=True) not in won}
        winners = [(r, p) for r, p in winners if _regime_group(r, tuning.split_key) not in short]
        if not winners:
            raise RuntimeError(f"the budget ended before any regime group of {spec.op} was measured whole; run the "
                               f"same command again to resume from {partial_path}")
        entries, kept = merge_entries(old["entries"], table_entries(tuning.split_key, winners, split_span),
                                      tuning.split_key, split_span)
        kept_note = {"kept_entries": kept, "kept_from": old["provenance"], "groups_cut_short": len(short)}
    else:
        entries = table_entries(tuning.split_key, winners, split_span)
    table = {
        "schema_version": SCHEMA_VERSION,
        "op": spec.op,
        "arch": desc.arch,
        "provenance": {
            "source": "measured",
            "device": desc.name,
            "date": datetime.date.today().isoformat(),
            "command": command,
            "versions": {"rocmoe": rocmoe.__version__, "torch": torch.__version__,
                         "triton": _triton_version()},
            "regimes_measured": len(winners),
            "regimes_planned": len(regimes),
            **kept_note,
        },
        "keys": list(spec.regime_keys),
        "entries": entries,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=2) + "\n")
    if len(winners) == len(regimes):
        partial_path.unlink(missing_ok=True)
    spec.forget()
    return out


def _triton_version() -> str | None:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None
