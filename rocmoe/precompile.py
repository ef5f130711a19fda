"""``rocmoe precompile``: fill a Triton cache, on a machine with no GPU, with
every kernel the ops launch for the benchmark models on a given arch, so that
a container's first call loads a binary instead of compiling one.

How: the ops' own host code runs on ``meta`` tensors (shapes, dtypes and
alignments, no storage) under :func:`rocmoe.device.meta_tensors_as`, so config
tables, heuristics, workspaces and launch arguments are exactly those of a real
call. Triton's launcher is pointed at the target arch and each launch turns
into a compile-only ``warmup``: Triton specialises the arguments as it would on
the GPU and writes the binary under the same cache key the GPU process will
look up. That key also covers the Triton build and the Python version (so
precompile where the same Triton wheel is installed as on the GPU machine) and
the cache-relevant ``TRITON_*`` variables. Triton 3.6 and older also build a
small C launcher per kernel signature with gcc on first launch; those are
built here too.

Which launches: the benchmark models' shapes (``rocmoe.bench.cases``) at every
token count that can change a launch - each bound of every shipped table entry
and a ladder for the heuristics' thresholds. Token-count arguments are not
specialised by the kernels (``do_not_specialize``), so one count per config
stands for all. A shape outside the models (another expert count, an odd
row stride) still compiles on its first call.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import hashlib
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from rocmoe.device import KNOWN_ARCHS, meta_tensors_as

__all__ = ["TARGETS", "PrecompileResult", "PrecompileRun", "token_counts", "calls_for", "precompile", "run", "render",
           "aot_target", "compiling_for"]

TARGETS = tuple(a for a in KNOWN_ARCHS if a.startswith(("gfx", "sm")))
OPS = ("gemma4_routing", "sparse_topk", "sparse_mla_decode", "mxfp4_moe")

# Token counts up to which each op's launches are driven: past these every
# table and heuristic in the tree is flat (the MoE goes in passes of 4096).
MAX_TOKENS = {"gemma4_routing": 262144, "sparse_topk": 1024, "sparse_mla_decode": 1024, "mxfp4_moe": 8192}


def aot_target(arch: str):
    """Triton's ``GPUTarget`` for an arch name (``gfx942`` / ``sm90`` style)."""
    from triton.backends.compiler import GPUTarget

    if arch not in TARGETS:
        raise ValueError(f"--arch {arch!r}: precompile targets are {', '.join(TARGETS)}")
    if arch.startswith("gfx"):
        return GPUTarget("hip", arch, 64)
    return GPUTarget("cuda", int(arch[2:]), 32)


class _AheadOfTimeDriver:
    """Stands in for Triton's GPU driver: reports the target, never launches.

    The 'device' is a name of its own, so kernels compiled here never share
    Triton's per-device cache with a real GPU in the same process."""

    def __init__(self, arch: str):
        self.target = aot_target(arch)
        self.device = f"rocmoe-aot-{arch}"

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0


def _stub_libcuda() -> None:
    """Triton links its CUDA launcher modules against ``libcuda.so.1``, which
    a machine without the driver (a CPU box, a ``docker build``) lacks. Give
    the linker a stub with that soname that defines every driver function
    Triton's host code names (a stub defining none is dropped by
    ``--as-needed`` linkers, and the module then cannot find the driver where
    it runs); there the real driver library is loaded instead. The stub is
    also loaded into this process, so Triton's import of each freshly built
    module (which follows the build) finds a ``libcuda.so.1``."""
    if os.environ.get("TRITON_LIBCUDA_PATH"):
        _load_global(os.path.join(os.environ["TRITON_LIBCUDA_PATH"], "libcuda.so.1"))
        return
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        if "libcuda.so.1" in subprocess.run(["/sbin/ldconfig", "-p"], capture_output=True, text=True).stdout:
            return
    import re

    import triton.backends.nvidia as nvidia

    names: set[str] = set()
    for source in ("driver.c", "driver.py"):
        with open(os.path.join(os.path.dirname(nvidia.__file__), source)) as f:
            names |= set(re.findall(r"\b(cu[A-Z]\w+)\b", f.read()))
    code = "".join(f"void {name}(void) {{}}\n" for name in sorted(names))
    # A fixed place per stub: newer Triton keys its driver module on the
    # library directory, and a rerun should find that module cached.
    digest = hashlib.sha256(code.encode()).hexdigest()[:16]
    stub_dir = os.path.join(tempfile.gettempdir(), f"rocmoe-libcuda-stub-{digest}")
    if not os.path.exists(os.path.join(stub_dir, "libcuda.so.1")):
        building = tempfile.mkdtemp(prefix="rocmoe-libcuda-stub-")
        with open(os.path.join(building, "stub.c"), "w") as f:
            f.write(code)
        subprocess.run([os.environ.get("CC", "gcc"), "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1",
                        os.path.join(building, "stub.c"), "-o", os.path.join(building, "libcuda.so.1")], check=True)
        with contextlib.suppress(OSError):  # another worker got there first
            os.rename(building, stub_dir)
    os.environ["TRITON_LIBCUDA_PATH"] = stub_dir
    _load_global(os.path.join(stub_dir, "libcuda.so.1"))


def _load_global(path: str) -> None:
    import ctypes

    with contextlib.suppress(OSError):
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


class _LauncherBuilder:
    """Builds the host-side modules Triton compiles with the C compiler on a
    first launch: the driver utilities once, and (Triton <= 3.6) one launcher
    per kernel signature, each about a third of a second of gcc. Newer Triton
    launches through one generic launcher: nothing per kernel to build."""

    def __init__(self, arch: str):
        if arch.startswith("gfx"):
            from triton.backends.amd import driver as backend_driver

            self.utils, self.launcher = backend_driver.HIPUtils, backend_driver.HIPLauncher
        else:
            _stub_libcuda()
            from triton.backends.nvidia import driver as backend_driver

            self.utils, self.launcher = backend_driver.CudaUtils, backend_driver.CudaLauncher
        self.per_kernel = True
        self.built = 0
        self.problems: list[str] = []
        try:
            self._built_here(self.utils)
        except Exception as exc:  # e.g. no HIP runtime to name in the module: it is then built on first use
            self.problems.append(f"driver utilities not prebuilt: {str(exc)[:100]}")

    @staticmethod
    def _built_here(build: Callable[[], object]) -> None:
        """Run ``build``. Triton caches the module before importing it; should
        the import still miss a driver symbol the stub lacks, the cached module
        is what counts here."""
        try:
            build()
        except ImportError as exc:
            if "undefined symbol" not in str(exc):
                raise

    def __call__(self, kernel) -> None:
        if not self.per_kernel:
            return
        try:
            self._built_here(lambda: self.launcher(kernel.src, kernel.metadata))
        except AttributeError:  # the generic launcher asks the (absent) GPU driver for its utilities
            self.per_kernel = False
            return
        except Exception as exc:  # Triton 3.6's HIP launchers embed the HIP runtime's path: none here
            self.per_kernel = False
            self.problems.append(f"launchers not prebuilt (built on first use): {str(exc)[:100]}")
            return
        self.built += 1


@contextlib.contextmanager
def compiling_for(arch: str, compute_units: int | None = None,
                  launchers: _LauncherBuilder | None = None) -> Iterator[None]:
    """Inside this block a Triton launch compiles for ``arch`` (into the
    Triton cache) and launches nothing, and meta tensors stand for tensors on
    an ``arch`` GPU with ``compute_units`` CUs/SMs (see
    :func:`rocmoe.device.meta_tensors_as`). Not thread-safe: it swaps
    Triton's active driver."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction

    launch = JITFunction.run
    build_launcher = _LauncherBuilder(arch) if launchers is None else launchers
    seen: set[int] = set()

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        if kernel is not None and id(kernel) not in seen:
            seen.add(id(kernel))
            build_launcher(kernel)
        return kernel

    fake = _AheadOfTimeDriver(arch)
    # Not driver.active: on a machine with no GPU, asking for it raises.
    previous = getattr(driver, "_active", None)
    driver.set_active(fake)
    JITFunction.run = compile_only
    try:
        with meta_tensors_as(arch, compute_units):
            yield
    finally:
        JITFunction.run = launch
        driver.set_active(previous)


def token_counts(op: str, arch: str) -> list[int]:
    """Every token count that can select a different launch for ``op`` on
    ``arch``: 1..16, 2^k, 2^k + 1 and 3 * 2^k up to the op's ceiling, and both
    bounds of every token range in the op's shipped tables for ``arch``."""
    import importlib

    from rocmoe.configs import specs

    importlib.import_module(f"rocmoe.backends.triton.{op}")  # registers the op's config specs
    ceiling = MAX_TOKENS[op]
    counts = set(range(1, 17))
    power = 16
    while power <= ceiling:
        counts |= {power, power + 1, 3 * power // 2}
        power *= 2
    for spec in (s for s in specs() if s.op == op):
        table = spec.table(arch)
        for bounds, _ in table.entries if table is not None else ():
            lo, hi = bounds.get("tokens", (1, None))
            counts |= {lo, hi if hi is not None else lo}
    return sorted(c for c in counts if c <= ceiling)


def _meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def _routing_calls(tokens: int) -> Iterator[tuple[str, Callable[[], object]]]:
    import rocmoe

    experts, topk = 128, 8  # Gemma 4 26B-A4B
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        name = str(dtype).removeprefix("torch.")
        yield (f"E={experts} K={topk} {name} T={tokens}",
               lambda dtype=dtype: rocmoe.gemma4_routing(_meta(tokens, experts, dtype=dtype), topk, _meta(experts),
                                                         backend="triton"))


def _topk_calls(tokens: int) -> Iterator[tuple[str, Callable[[], object]]]:
    import rocmoe
    from rocmoe.bench.cases import TOPK_WIDTHS

    topk = 2048
    lens = _meta(tokens, dtype=torch.int32)
    yield (f"short-circuit topk={topk} T={tokens}",
           lambda: rocmoe.sparse_topk(None, lens, topk, max_seq_len=topk, backend="triton"))
    # A width that is not a multiple of 16 gets its own specialisation of the row stride.
    for width in (*TOPK_WIDTHS, TOPK_WIDTHS[0] + 1):
        yield (f"L={width} topk={topk} T={tokens}",
               lambda width=width: rocmoe.sparse_topk(_meta(tokens, width), lens, topk, backend="triton"))


def _mla_calls(tokens: int) -> Iterator[tuple[str, Callable[[], object]]]:
    import rocmoe
    from rocmoe.bench.cases import MLA_MODELS

    block_size, d_v = 64, 512
    for name, model in MLA_MODELS.items():
        for heads in model.heads:
            def call(model=model, heads=heads):
                extra = {}
                if model.extra:
                    extra = {"extra_kv_cache": _meta(tokens * 2, block_size, model.dim, dtype=torch.bfloat16),
                             "extra_indices": _meta(tokens, model.extra, dtype=torch.int32)}
                return rocmoe.sparse_mla_decode(
                    _meta(tokens, heads, model.dim, dtype=torch.bfloat16),
                    _meta(tokens * 64, block_size, model.dim, dtype=torch.bfloat16),
                    _meta(tokens, model.topk, dtype=torch.int32),
                    softmax_scale=model.dim ** -0.5, d_v=d_v, backend="triton", **extra)

            yield f"{name} H={heads} T={tokens}", call


def _moe_weights(model) -> object:
    import rocmoe

    def packed(rows: int, k: int):
        shape = (model.experts, rows)
        return _meta(*shape, k // 2, dtype=torch.uint8), _meta(*shape, k // 32, dtype=torch.uint8)

    w1b, w1s = packed(2 * model.inter, model.hidden)
    w2b, w2s = packed(model.hidden, model.inter)
    bias = {"b1": _meta(model.experts, 2 * model.inter), "b2": _meta(model.experts, model.hidden)} if model.bias else {}
    return rocmoe.Mxfp4MoeWeights(w1b, w1s, w2b, w2s, gate_up=model.gate_up, **bias)


def _moe_calls(tokens: int) -> Iterator[tuple[str, Callable[[], object]]]:
    import rocmoe
    from rocmoe.bench.cases import MOE_MODELS

    for name, model in MOE_MODELS.items():
        weights = _moe_weights(model)

        def call(model=model, weights=weights):
            return rocmoe.mxfp4_moe(_meta(tokens, model.hidden, dtype=torch.bfloat16), weights,
                                    _meta(tokens, model.topk), _meta(tokens, model.topk, dtype=torch.int32),
                                    activation=model.activation, limit=model.limit, backend="triton")

        yield f"{name} T={tokens}", call


_CALLS = {"gemma4_routing": _routing_calls, "sparse_topk": _topk_calls, "sparse_mla_decode": _mla_calls,
          "mxfp4_moe": _moe_calls}


def calls_for(op: str, arch: str) -> list[tuple[str, Callable[[], object]]]:
    """(label, call) for every launch sequence ``op`` makes for the benchmark
    models on ``arch``; run each inside :func:`compiling_for`."""
    if op not in _CALLS:
        raise ValueError(f"--op {op!r}: precompile knows {', '.join(_CALLS)}")
    return [call for tokens in token_counts(op, arch) for call in _CALLS[op](tokens)]


@dataclass
class PrecompileResult:
    arch: str
    op: str
    calls: int
    kernels: int  # distinct kernel binaries these calls need
    launchers: int  # per-kernel launcher modules built (Triton <= 3.6; later releases need none)
    seconds: float
    # Launch sequences the op's backend refuses on this arch (one line per reason): not compiled.
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # host modules left to the first call, and why
    error: str | None = None


def _cache_entries(cache_dir: str) -> set[str]:
    return set(os.listdir(cache_dir)) if os.path.isdir(cache_dir) else set()


def precompile(arch: str, op: str, cache_dir: str, compute_units: int | None = None) -> PrecompileResult:
    """Drive every benchmark launch of ``op`` for ``arch`` (with
    ``compute_units`` CUs/SMs: launch configs depend on it) into
    ``cache_dir``, in this process; sets ``TRITON_CACHE_DIR``."""
    from triton import knobs

    from rocmoe.registry import BackendUnavailableError

    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.pop("TRITON_INTERPRET", None)
    compiled: set[str] = set()

    def note(**hook):  # called once per kernel specialisation this process needs
        compiled.add((hook.get("repr"), str(hook.get("key"))))
        return False

    previous_hook = knobs.runtime.jit_post_compile_hook
    knobs.runtime.jit_post_compile_hook = note
    start = time.perf_counter()
    calls = calls_for(op, arch)
    error = None
    unsupported: set[str] = set()
    launchers = _LauncherBuilder(arch)
    try:
        with compiling_for(arch, compute_units, launchers):
            for label, call in calls:
                try:
                    call()
                except BackendUnavailableError as exc:  # nothing to compile: this arch takes another backend
                    reason = str(exc).strip().splitlines()[-1].strip(" -")
                    unsupported.add(f"{label.rsplit(' T=', 1)[0]}: {reason}")
                except Exception as exc:  # report which launch broke, keep the rest of the table
                    error = f"{label}: {type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"
                    break
    finally:
        knobs.runtime.jit_post_compile_hook = previous_hook
    return PrecompileResult(arch, op, len(calls), len(compiled), launchers.built, time.perf_counter() - start,
                            sorted(unsupported), launchers.problems, error)


def compiling_worker_init() -> None:
    """Initializer of the processes that compile kernels (precompile and
    build-check): kernels must be compiled, not interpreted, which triton.jit
    decides when a kernel module is imported - so before any is."""
    os.environ.pop("TRITON_INTERPRET", None)


def default_cache_dir() -> str:
    """Where Triton looks: ``$TRITON_CACHE_DIR``, else ``~/.triton/cache``."""
    return os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")


@dataclass
class PrecompileRun:
    cache_dir: str
    results: list[PrecompileResult]
    new_entries: int  # cache entries this run wrote: 0 when the cache already held every kernel


def run(archs: list[str], ops: list[str] | None = None, cache_dir: str | None = None,
        jobs: int | None = None, compute_units: int | None = None) -> PrecompileRun:
    """Precompile ``ops`` (default: all) for each of ``archs`` into
    ``cache_dir``, one spawned worker per (arch, op). ``compute_units``: the
    CU/SM count of the GPUs that will run them (default: each arch's flagship
    part; an H100 PCIe has 114 SMs, not the SXM's 132)."""
    for arch in archs:
        aot_target(arch)
    ops = list(ops or OPS)
    cache_dir = os.path.abspath(cache_dir or default_cache_dir())
    os.makedirs(cache_dir, exist_ok=True)
    before = _cache_entries(cache_dir)
    pairs = [(arch, op) for arch in archs for op in ops]
    context = multiprocessing.get_context("spawn")
    workers = max(1, min(jobs or os.cpu_count() or 1, len(pairs)))
    with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=compiling_worker_init) as pool:
        done = [pool.submit(precompile, arch, op, cache_dir, compute_units) for arch, op in pairs]
        results = [d.result() for d in done]
    return PrecompileRun(cache_dir, results, len(_cache_entries(cache_dir) - before))


def render(run: PrecompileRun, file=None) -> None:
    import triton
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(file=file or sys.stdout, width=140)
    table = Table(title=f"rocmoe precompile -> {run.cache_dir} (Triton {triton.__version__})")
    for column in ("arch", "op", "launch sequences", "kernels", "launchers", "seconds", "result"):
        table.add_column(column, overflow="fold")
    results = run.results
    for r in results:
        status = "[green]ok[/green]" if r.error is None else "[red]" + escape(r.error) + "[/red]"
        if r.notes:
            status += "\n[yellow]" + escape("; ".join(r.notes)) + "[/yellow]"
        if r.unsupported:
            status += "\n[yellow]not offered here (not compiled): " + escape("; ".join(r.unsupported)) + "[/yellow]"
        table.add_row(r.arch, r.op, str(r.calls), str(r.kernels), str(r.launchers), f"{r.seconds:.0f}", status)
    console.print(table)
    total = sum(r.kernels for r in results)
    console.print(f"{total} kernels for {len({r.arch for r in results})} arch(es), "
                  f"{run.new_entries} new cache entries, {sum(r.error is not None for r in results)} failed")


def as_json(run: PrecompileRun) -> dict:
    return asdict(run)
