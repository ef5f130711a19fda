"""``rocmoe info``: versions, the device, and every op x backend's status."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import platform
import sys
from typing import Any

import torch

import rocmoe
from rocmoe import registry
from rocmoe.device import Device
from rocmoe.ops.gemma4_routing import Gemma4RoutingProblem
from rocmoe.ops.mxfp4_moe import Mxfp4MoeProblem
from rocmoe.ops.sparse_mla_decode import SparseMlaProblem
from rocmoe.ops.sparse_topk import SparseTopkProblem

__all__ = ["collect", "render", "REPRESENTATIVE_PROBLEMS"]

# The problem each op is explained for: the first benchmark shape of SPEC.md.
REPRESENTATIVE_PROBLEMS: dict[str, tuple[str, Any]] = {
    "gemma4_routing": ("Gemma-4-26B-A4B router, E=128 K=8, fp32 logits",
                       Gemma4RoutingProblem(torch.float32, torch.float32, 128, 8)),
    "mxfp4_moe": ("gpt-oss-20b layer, E=32 k=4 H=I=2880, bf16, swigluoai",
                  Mxfp4MoeProblem(torch.bfloat16, 32, 2880, 2880, 4, "interleaved", "swigluoai",
                                  True, False, False)),
    "sparse_mla_decode": ("DeepSeek-V3.2 decode, H=128 D=576 topk=2048, block 64, bf16",
                          SparseMlaProblem(torch.bfloat16, 128, 576, 512, 64, 2048, False, False, None, None)),
    "sparse_topk": ("DeepSeek-V3.2 indexer, L=131072 topk=2048",
                    SparseTopkProblem(torch.float32, 131072, 2048, False)),
}


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def collect(device: Device | None = None) -> dict[str, Any]:
    """Everything ``rocmoe info`` shows, as JSON-ready data."""
    device = device or Device.current()
    ops = []
    for op, (label, problem) in REPRESENTATIVE_PROBLEMS.items():
        try:
            rows = registry.explain(op, device, problem)
            error = None
        except ValueError as exc:  # a malformed ROCMOE_*BACKEND value: every call of the op fails
            error = str(exc)
            rows = [dataclasses.replace(r, selected=False)
                    for r in registry.explain(op, device, problem, backend="auto")]
        if error is None and not any(r.selected for r in rows):
            try:
                registry.select(op, device, problem)
            except registry.BackendUnavailableError as exc:
                error = str(exc).splitlines()[0]
        ops.append({
            "op": op,
            "problem": label,
            "error": error,
            "backends": [
                {"backend": r.backend, "selected": r.selected, "available": r.available,
                 "reasons": list(r.reasons), "config": r.config_source}
                for r in rows
            ],
        })
    return {
        "versions": {
            "rocmoe": rocmoe.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_hip": torch.version.hip,
            "torch_cuda": torch.version.cuda,
            "triton": _version("triton") or _version("pytorch-triton-rocm") or _version("pytorch-triton-xpu"),
            "amd-aiter": _version("amd-aiter"),
        },
        "device": {
            "name": device.name, "vendor": device.vendor, "arch": device.arch, "family": device.family,
            "index": device.index, "present": device.present, "compute_units": device.limits.compute_units,
            "shared_mem_per_block": device.limits.shared_mem_per_block, "warp_size": device.limits.warp_size,
        },
        "default_order": list(registry.default_order("gemma4_routing", device)),
        "env": registry.env_settings(),
        "ops": ops,
    }


def render(info: dict[str, Any], file=None) -> None:
    """Print ``info`` as tables (rich)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=140)
    versions = "  ".join(f"{k} {v}" for k, v in info["versions"].items() if v and k != "rocmoe")
    console.print(f"[bold]rocmoe[/bold] {info['versions']['rocmoe']}   {versions}")
    dev = info["device"]
    console.print(f"device: {dev['name']}  arch {dev['arch']}  family {dev['family']}  "
                  f"{dev['compute_units']} CU/SM  {dev['shared_mem_per_block'] // 1024} KiB shared/block  "
                  f"warp {dev['warp_size']}"
                  + ("" if dev.get("present", True) else "  (described from its arch: not this machine's device)"))
    console.print(f"default backend order: {' > '.join(info['default_order'])}")
    console.print("environment: " + escape(", ".join(f"{k}={v}" for k, v in info["env"].items()) or "no overrides"))
    table = Table(title="op x backend", show_lines=True)
    for column in ("op (explained for)", "backend", "status", "launch config / reasons"):
        table.add_column(column, overflow="fold")
    for op in info["ops"]:
        first = True
        for b in op["backends"]:
            status = "[green]selected[/green]" if b["selected"] else (
                "available" if b["available"] else "[red]unavailable[/red]")
            detail = "\n".join(b["reasons"]) if b["reasons"] else (b["config"] or "-")
            label = f"{op['op']}\n({op['problem']})" if first else ""
            table.add_row(label, b["backend"], status, escape(detail))
            first = False
        if op["error"]:
            table.add_row("", "", "[red]error[/red]", escape(op["error"]))
    console.print(table)
