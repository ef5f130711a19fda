"""Instruction mix of Triton kernels as ptxas builds them for sm90/sm100, on a
machine without a GPU (a developer tool: ``python ci/sass_histogram.py
--op gemma4_routing --label "bf16 BLOCK_T=16"``).

Each build-check variant of the op whose label contains every ``--label``
text is compiled like build-check compiles it (Triton's launch
specialisation included), assembled by Triton's bundled ptxas and
disassembled by its cuobjdump; the output is the variant's registers, its
instruction count and the count per opcode. Static counts are a proxy: where
an op is bound by what it issues (the routing kernel at large T), fewer
instructions per logit is the goal, but only a timed run on a GPU says what
a change is worth."""

from __future__ import annotations

import argparse
import collections
import importlib
import os
import re
import subprocess
import tempfile


def sass_of(ptx: str, arch_number: int) -> tuple[int | None, str]:
    """(registers, SASS text) of a PTX module, through Triton's ptxas and cuobjdump."""
    from rocmoe.build_check import _ptxas_path

    ptxas = _ptxas_path(arch_number)
    gpu = f"sm_{arch_number}a" if arch_number >= 90 else f"sm_{arch_number}"
    with tempfile.TemporaryDirectory() as tmp:
        src, obj = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.o")
        with open(src, "w") as f:
            f.write(ptx)
        report = subprocess.run([ptxas, "-v", "--gpu-name", gpu, src, "-o", obj], capture_output=True, text=True,
                                check=True)
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    used = re.search(r"Used (\d+) registers", report.stdout + report.stderr)
    return (int(used.group(1)) if used else None), sass


def opcodes(sass: str) -> collections.Counter:
    """Opcode (without modifiers or predicate) of every instruction line."""
    counts = collections.Counter()
    for line in sass.splitlines():
        match = re.match(r"\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if match:
            counts[match.group(1)] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", required=True)
    parser.add_argument("--arch", default="sm90", choices=["sm90", "sm100"])
    parser.add_argument("--label", action="append", default=[], help="text the variant's label must contain")
    parser.add_argument("--top", type=int, default=24, help="opcodes listed per variant")
    parser.add_argument("--sass", metavar="FILE", help="also write the first match's SASS here")
    args = parser.parse_args()

    from rocmoe.precompile import compiling_worker_init

    compiling_worker_init()
    import triton
    from triton.compiler import ASTSource

    from rocmoe.build_check import collect_variants
    from rocmoe.precompile import aot_target

    builds = [b for b in collect_variants(args.arch, [args.op]) if all(text in b.label for text in args.label)]
    if not builds:
        raise SystemExit(f"no {args.op} variant for {args.arch} has a label containing {args.label}")
    print(f"triton {triton.__version__}, {args.arch}")
    for i, build in enumerate(builds):
        module, name = build.kernel.split(":")
        kernel = getattr(importlib.import_module(module), name)
        compiled = triton.compile(ASTSource(kernel, dict(build.signature), dict(build.constexprs),
                                            build.specialisation()),
                                  target=aot_target(args.arch), options=dict(build.options))
        registers, sass = sass_of(compiled.asm["ptx"], int(args.arch[2:]))
        counts = opcodes(sass)
        print(f"{build.label}: {registers} registers, {sum(counts.values())} instructions")
        print("   " + ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top)))
        if args.sass and i == 0:
            with open(args.sass, "w") as f:
                f.write(sass)


if __name__ == "__main__":
    main()
