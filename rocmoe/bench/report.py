"""Presenting benchmark results: terminal table, markdown, PNG plot."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["render_table", "markdown", "summary_markdown", "plot"]


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _ceilings_line(result: dict[str, Any]) -> str:
    c = result.get("ceilings")
    dev = result["environment"]["device"]
    if not c:
        return f"{dev['name']}: no ceilings (GPU numbers need a GPU; these are CPU timings)"
    return (f"{dev['name']} ({dev['arch']}): copy {c['copy_bytes_per_s'] / 1e9:.0f} GB/s (read+write), "
            f"bf16 matmul {c['bf16_flops_per_s'] / 1e12:.0f} TFLOP/s, minimal kernel under graph replay "
            f"{c.get('launch_floor_s', 0) * 1e6:.2f} µs, measured in this run")


COLUMNS = ("op", "model", "shape", "backend", "graph µs", "events µs", "GB/s", "% copy", "TFLOP/s", "% peak",
           "check")


def _cells(r: dict[str, Any]) -> list[str]:
    check = "-" if r["check_ok"] is None else ("ok " if r["check_ok"] else "FAIL ") + r["check"]
    if r["note"]:
        check = f"{check} ({r['note']})" if r["check_ok"] is not None else r["note"]
    return [r["op"], r["model"], r["shape"], r["backend"], _us(r["graph_s"]), _us(r["events_s"]),
            _num(r["gb_per_s"]), _pct(r["frac_copy_bw"]), _num(r["tflop_per_s"], 1), _pct(r["frac_bf16_peak"]),
            check]


def render_table(result: dict[str, Any], file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=190)
    table = Table(title="rocmoe bench")
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for r in result["rows"]:
        table.add_row(*(escape(c) for c in _cells(r)))
    console.print(table)
    console.print(_ceilings_line(result))


def markdown(result: dict[str, Any], command: str) -> str:
    """A markdown section: the command, the environment, the table."""
    env = result["environment"]
    lines = [f"Measured with `{command}`", "",
             f"{_ceilings_line(result)}; torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
             f"rocmoe {env['versions']['rocmoe']}, driver {env.get('driver') or '-'}.", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in result["rows"]:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in _cells(r)) + " |")
    return "\n".join(lines) + "\n"


def summary_markdown(result: dict[str, Any], command: str, baseline: str = "triton") -> str:
    """One row per shape, backends as columns (best of graph/event time, µs),
    the speed-up of ``baseline`` over each other backend, and its fraction of
    copy bandwidth and bf16 peak - all from the same run."""
    env = result["environment"]
    shapes: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
    for r in result["rows"]:
        t = r["graph_s"] if r["graph_s"] is not None else r["events_s"]
        if t is not None:
            shapes.setdefault((r["op"], r["model"], r["shape"]), {})[r["backend"]] = {**r, "t": t}
    backends = sorted({b for per in shapes.values() for b in per}, key=lambda b: (b != baseline, b))
    others = [b for b in backends if b != baseline]
    head = (["op", "shape"] + [f"{b} µs" for b in backends] + [f"{baseline} vs {b}" for b in others]
            + ["% copy BW", "% bf16 peak", "check"])
    lines = [f"Measured with `{command}`", "",
             f"{_ceilings_line(result)}; torch {env['versions']['torch']}, triton {env['versions']['triton']}, "
             f"rocmoe {env['versions']['rocmoe']}. Times are CUDA-graph replay medians where the backend can be "
             f"captured (per-call events otherwise).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, _, shape), per in shapes.items():
        base = per.get(baseline)
        cells = [op, shape] + [_us(per[b]["t"]) if b in per else "-" for b in backends]
        cells += [f"{per[b]['t'] / base['t']:.1f}x" if base and b in per else "-" for b in others]
        cells += [_pct(base["frac_copy_bw"]) if base else "-", _pct(base["frac_bf16_peak"]) if base else "-",
                  ("ok" if base["check_ok"] else "FAIL") if base and base["check_ok"] is not None else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
    """Time vs size per backend, one panel per (op, model, dtype), with the
    roofline time (bytes at copy bandwidth, FLOPs at bf16 peak, never below
    the launch floor) drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        if r["size"] and (r["graph_s"] or r["events_s"]):
            groups.setdefault((r["op"], r["model"], r["dtype"]), []).append(r)
    if not groups:
        raise ValueError("nothing to plot: no timed rows with a size")
    cols = min(3, len(groups))
    rows_n = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(6 * cols, 4.2 * rows_n), squeeze=False)
    c = result.get("ceilings")
    for ax, ((op, model, dtype), rows) in zip(axes.flat, groups.items()):
        by_backend: dict[str, list[tuple[int, float]]] = {}
        roof: dict[int, float] = {}
        for r in rows:
            t = r["graph_s"] or r["events_s"]
            by_backend.setdefault(r["backend"], []).append((r["size"], t * 1e6))
            if c:
                roof[r["size"]] = max(r["bytes"] / c["copy_bytes_per_s"], r["flops"] / c["bf16_flops_per_s"],
                                      c.get("launch_floor_s", 0.0)) * 1e6
        for backend, points in sorted(by_backend.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=backend)
        if roof:
            xs = sorted(roof)
            ax.plot(xs, [roof[x] for x in xs], "k--", linewidth=1, label="roofline")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"{op} - {model} ({dtype})")
        ax.set_xlabel("tokens" if op != "sparse_topk" else "window L")
        ax.set_ylabel("µs per call")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.suptitle(_ceilings_line(result), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
