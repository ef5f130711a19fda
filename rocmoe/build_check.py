"""``rocmoe build-check``: compile every Triton kernel, under every config it can
be launched with, for gfx942, gfx950, sm90 and sm100 - on a CPU-only machine.

Triton compiles ahead of time for a target it is not running on
(``triton.compile(ASTSource(...), target=GPUTarget(...))``). From AMDGCN we read
VGPR/SGPR/AGPR counts, spills, scratch, LDS and occupancy, and whether MFMA
(scaled MFMA on gfx950) was emitted; for NVIDIA, ptxas ``-v`` gives registers,
spills and stack, the metadata gives shared memory, and the PTX shows wgmma /
tcgen05. A build fails on a compile error, any spill or scratch use, LDS or
shared memory over the arch limit, or a dot kernel with no matrix instruction.

Each Triton op module exports ``build_variants(arch) -> list[KernelBuild]``.
"""

from __future__ import annotations

import concurrent.futures as futures
import importlib
import importlib.util
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from rocmoe.device import ARCH_LIMITS
from rocmoe.precompile import aot_target, compiling_worker_init
from rocmoe.registry import OPS

__all__ = ["KernelBuild", "BuildResult", "TARGETS", "collect_variants", "run", "render"]

TARGETS = ("gfx942", "gfx950", "sm90", "sm100")


@dataclass(frozen=True)
class KernelBuild:
    """One compile job: a kernel, its argument types and constexprs, launch options.

    ``kernel`` is ``"module:function"`` so jobs can travel to worker processes.
    ``expects_dot``: the kernel uses tl.dot, so matrix instructions must appear.
    ``aligned``: integer arguments that are multiples of 16 at the launches
    this build stands for. Triton specialises those (and every pointer, since
    torch allocations are 16-byte aligned) as divisible by 16 when it compiles
    for a launch, so the build does too: without it the loads would not be
    vectorised as they are on the GPU, and the register counts would be
    another kernel's.
    """

    op: str
    kernel: str
    signature: tuple[tuple[str, str], ...]
    constexprs: tuple[tuple[str, Any], ...]
    options: tuple[tuple[str, Any], ...]
    label: str
    expects_dot: bool = False
    aligned: tuple[str, ...] = ()

    def specialisation(self) -> dict[tuple[int], list[list[Any]]]:
        """Triton's per-argument attributes: 16-divisibility of the pointers and ``aligned``."""
        return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(self.signature)
                if kind.startswith("*") or name in self.aligned}


@dataclass
class BuildResult:
    op: str
    kernel: str
    label: str
    arch: str
    ok: bool
    problems: list[str] = field(default_factory=list)
    registers: int | None = None  # VGPRs (AMD) or registers per thread (NVIDIA)
    sgprs: int | None = None
    agprs: int | None = None
    spills: int = 0
    scratch_bytes: int = 0
    shared_bytes: int | None = None
    occupancy: int | None = None
    matrix_instructions: list[str] = field(default_factory=list)


def collect_variants(arch: str, ops: list[str] | None = None) -> list[KernelBuild]:
    """Every KernelBuild of every Triton op (that exists) for ``arch``."""
    builds: list[KernelBuild] = []
    for op in ops or OPS:
        name = f"rocmoe.backends.triton.{op}"
        if importlib.util.find_spec(name) is None:
            continue
        module = importlib.import_module(name)
        seen = set()
        for build in module.build_variants(arch):
            if build not in seen:
                seen.add(build)
                builds.append(build)
    return builds


def _metadata_int(text: str, key: str) -> int | None:
    match = re.search(rf"{re.escape(key)}\s*(-?\d+)", text)
    return int(match.group(1)) if match else None


def _ptxas_path(arch_number: int) -> str:
    from triton.backends.nvidia import compiler as nvidia

    try:
        return nvidia.get_ptxas(arch_number).path
    except TypeError:  # older Triton: get_ptxas() takes no arch
        tool = nvidia.get_ptxas()
        return tool.path if hasattr(tool, "path") else tool[0]


def _check_amd(result: BuildResult, gcn: str, limit_lds: int) -> None:
    result.registers = _metadata_int(gcn, ".vgpr_count:")
    result.sgprs = _metadata_int(gcn, ".sgpr_count:")
    result.agprs = _metadata_int(gcn, ".agpr_count:")
    result.spills = (_metadata_int(gcn, ".vgpr_spill_count:") or 0) + (_metadata_int(gcn, ".sgpr_spill_count:") or 0)
    result.scratch_bytes = _metadata_int(gcn, ".private_segment_fixed_size:") or 0
    result.shared_bytes = _metadata_int(gcn, ".group_segment_fixed_size:")
    result.occupancy = _metadata_int(gcn, "; Occupancy:")
    result.matrix_instructions = sorted(set(re.findall(r"\bv_mfma_\w+", gcn)))
    if result.shared_bytes is not None and result.shared_bytes > limit_lds:
        result.problems.append(f"LDS {result.shared_bytes} B > {limit_lds} B")


def _check_nvidia(result: BuildResult, ptx: str, shared: int, arch: str, limit_smem: int) -> None:
    number = int(arch[2:])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        gpu = f"sm_{number}a" if number >= 90 else f"sm_{number}"
        proc = subprocess.run([_ptxas_path(number), "-v", "--gpu-name", gpu, path, "-o", os.path.join(tmp, "k.o")],
                              capture_output=True, text=True)
    report = proc.stdout + proc.stderr
    if proc.returncode != 0:
        result.problems.append(f"ptxas failed: {report.strip()[-300:]}")
        return
    result.registers = _metadata_int(report, "Used")
    spill_stores = re.search(r"(\d+) bytes spill stores", report)
    spill_loads = re.search(r"(\d+) bytes spill loads", report)
    result.spills = int(spill_stores.group(1)) if spill_stores else 0
    result.spills += int(spill_loads.group(1)) if spill_loads else 0
    stack = re.search(r"(\d+) bytes stack frame", report)
    result.scratch_bytes = int(stack.group(1)) if stack else 0
    result.shared_bytes = shared
    result.matrix_instructions = nvidia_matrix_instructions(ptx)
    if shared > limit_smem:
        result.problems.append(f"shared memory {shared} B > {limit_smem} B")


def nvidia_matrix_instructions(ptx: str) -> list[str]:
    """The matrix instructions in PTX with their tile shapes (``wgmma.m64n32k16``,
    ``mma.m16n8k16``; ``tcgen05.mma`` keeps its shape in a runtime descriptor):
    a score dot issued as m64n16 where m64n32 was meant shows here."""
    found = {f"wgmma.{shape}" for shape in re.findall(r"\bwgmma\.mma_async[.\w]*?\.(m\d+n\d+k\d+)", ptx)}
    found |= {f"mma.{shape}" for shape in re.findall(r"\bmma\.sync[.\w]*?\.(m\d+n\d+k\d+)", ptx)}
    found |= set(re.findall(r"\btcgen05\.mma\b", ptx))
    return sorted(found)


def _root_cause(exc: BaseException) -> str:
    """The innermost exception's message: Triton wraps the real complaint in
    CompilationErrors whose text ends with a source caret."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    lines = [line for line in str(exc).strip().splitlines() if line.strip(" ^")]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"


def _source_class(kernel):
    """Triton's compile source for ``kernel``: Gluon kernels have their own."""
    from triton.compiler import ASTSource

    try:
        from triton.experimental.gluon._runtime import GluonASTSource, GluonJITFunction
    except ImportError:  # pragma: no cover - a Triton without Gluon
        return ASTSource
    return GluonASTSource if isinstance(kernel, GluonJITFunction) else ASTSource


def compile_one(build: KernelBuild, arch: str) -> BuildResult:
    """Compile ``build`` for ``arch`` and judge the result (runs in a worker)."""
    import triton

    result = BuildResult(build.op, build.kernel.split(":")[1], build.label, arch, ok=False)
    module_name, fn_name = build.kernel.split(":")
    kernel = getattr(importlib.import_module(module_name), fn_name)
    options = dict(build.options)
    if not arch.startswith("gfx"):
        options = {k: v for k, v in options.items() if k not in ("waves_per_eu", "matrix_instr_nonkdim", "kpack")}
    try:
        compiled = triton.compile(_source_class(kernel)(kernel, dict(build.signature), dict(build.constexprs),
                                                        build.specialisation()),
                                  target=aot_target(arch), options=options)
    except Exception as exc:  # a compile error is a result, not a crash
        result.problems.append(f"compile error: {_root_cause(exc)[:300]}")
        return result
    limits = ARCH_LIMITS[arch]
    if arch.startswith("gfx"):
        _check_amd(result, compiled.asm["amdgcn"], limits.shared_mem_per_block)
    else:
        _check_nvidia(result, compiled.asm["ptx"], compiled.metadata.shared, arch, limits.shared_mem_per_block)
    if result.spills:
        result.problems.append(f"{result.spills} spilled registers/bytes")
    if result.scratch_bytes:
        result.problems.append(f"{result.scratch_bytes} B scratch/stack")
    if build.expects_dot and not result.matrix_instructions:
        result.problems.append("no matrix instructions for a dot kernel")
    result.ok = not result.problems
    return result


def run(archs: list[str] | None = None, ops: list[str] | None = None, jobs: int | None = None,
        progress: bool = True, select: Callable[[KernelBuild], bool] | None = None) -> list[BuildResult]:
    """Compile every variant (those ``select`` keeps) for every arch, in
    parallel worker processes (spawned, with the interpreter off)."""
    archs = list(archs or TARGETS)
    unknown = [a for a in archs if a not in TARGETS]
    if unknown:
        raise ValueError(f"--arch {', '.join(unknown)}: build-check targets are {', '.join(TARGETS)}")
    # The interpreter must be off where kernels are compiled: spawned workers
    # start fresh and never see it.
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        jobs_list = [(b, arch) for arch in archs for b in collect_variants(arch, ops) if select is None or select(b)]
        context = multiprocessing.get_context("spawn")
        workers = jobs or min(len(jobs_list), os.cpu_count() or 1) or 1
        results: list[BuildResult] = []
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=compiling_worker_init) as pool:
            pending = [pool.submit(compile_one, b, a) for b, a in jobs_list]
            iterator = futures.as_completed(pending)
            if progress and sys.stderr.isatty():
                from rich.progress import track

                iterator = track(iterator, total=len(pending), description="compiling", transient=True)
            for done in iterator:
                results.append(done.result())
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved
    order = {a: i for i, a in enumerate(archs)}
    return sorted(results, key=lambda r: (r.op, r.kernel, r.label, order[r.arch]))


def render(results: list[BuildResult], file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=160)
    table = Table(title="rocmoe build-check")
    for column in ("op / kernel", "config", "arch", "regs", "spill", "scratch", "LDS/smem", "occ", "matrix", "result"):
        table.add_column(column, overflow="fold")
    for r in results:
        regs = "-" if r.registers is None else (f"{r.registers}v/{r.sgprs}s/{r.agprs}a" if r.arch.startswith("gfx")
                                               else str(r.registers))
        table.add_row(f"{r.op}/{r.kernel}", escape(r.label), r.arch, regs, str(r.spills), str(r.scratch_bytes),
                      "-" if r.shared_bytes is None else str(r.shared_bytes),
                      "-" if r.occupancy is None else str(r.occupancy),
                      ",".join(r.matrix_instructions)[:40] or "-",
                      "[green]ok[/green]" if r.ok else "[red]" + escape("; ".join(r.problems)) + "[/red]")
    console.print(table)
    failed = sum(not r.ok for r in results)
    console.print(f"{len(results)} builds, {failed} failed")


def as_json(results: list[BuildResult]) -> list[dict[str, Any]]:
    return [asdict(r) for r in results]
