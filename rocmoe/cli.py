"""The ``rocmoe`` command: ``info``, ``bench``, ``tune``, ``build-check`` and ``precompile``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from rocmoe import registry


def _device_arg(value: str | None):
    import torch

    from rocmoe.device import Device

    if value is None:
        current = Device.current()
        return torch.device(current.torch_type, current.index) if current.index is not None else torch.device("cpu")
    try:
        return torch.device(value)
    except RuntimeError as exc:  # torch's message does not say which argument held the string
        raise ValueError(f"--device must be a torch device such as 'cuda:0', 'xpu' or 'cpu' (an architecture "
                         f"name such as gfx942 goes to `rocmoe info --arch`), got {value!r}") from exc


def _cmd_info(args: argparse.Namespace) -> int:
    from rocmoe.device import Device
    from rocmoe.info import collect, render

    if args.arch is not None:
        try:
            device = Device.from_arch(args.arch)
        except ValueError as exc:
            raise ValueError(f"--arch: {exc}") from exc
    else:
        device = Device.for_torch_device(_device_arg(args.device))
    info = collect(device)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render(info)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if not args.quick:
        return _full_bench(args)
    from rocmoe.bench.quick import render_quick, run_quick
    from rocmoe.device import Device
    from rocmoe.info import collect

    device = _device_arg(args.device)
    rows = run_quick(device, ops=args.op, backend=args.backend, seed=args.seed)
    render_quick(rows, Device.for_torch_device(device))
    if args.json:
        info = collect(Device.for_torch_device(device))
        with open(args.json, "w") as f:
            json.dump({"versions": info["versions"], "device": info["device"], "results": rows}, f, indent=2)
    return 0 if rows and all(r["check_ok"] for r in rows) else 1


def _cmd_build_check(args: argparse.Namespace) -> int:
    from rocmoe import build_check

    results = build_check.run(args.arch, args.op, jobs=args.jobs)
    build_check.render(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(build_check.as_json(results), f, indent=2)
    if not results:
        print("rocmoe build-check: no Triton kernel matched", file=sys.stderr)
        return 1
    return 0 if all(r.ok for r in results) else 1


def _cmd_precompile(args: argparse.Namespace) -> int:
    from rocmoe import precompile

    run = precompile.run(args.arch, args.op, args.cache_dir, jobs=args.jobs, compute_units=args.compute_units)
    precompile.render(run)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(precompile.as_json(run), f, indent=2)
    return 0 if run.results and all(r.error is None for r in run.results) else 1


def _full_bench(args: argparse.Namespace) -> int:
    from rocmoe.bench import report
    from rocmoe.bench.cases import MODELS
    from rocmoe.bench.runner import run_bench

    if args.load:
        with open(args.load) as f:
            result = json.load(f)
    else:
        compare = [c.strip() for c in (args.compare or "").split(",") if c.strip()]
        modes = []
        for c in compare:  # "compile" means both compile modes
            if c not in ("eager", "compile"):
                raise ValueError(f"--compare takes eager and/or compile, got {c!r}")
            modes += ["eager"] if c == "eager" else ["compile", "compile-max-autotune"]
        ops = args.op or list(registry.OPS)
        known = {m for op in ops for m in MODELS[op]}
        bad = [m for m in args.model or [] if m not in known]
        if bad:
            raise ValueError(f"--model {', '.join(bad)} is not a benchmark model of {', '.join(ops)}; "
                             f"valid: {', '.join(sorted(known))}")
        backends = [b.strip() for b in args.backend.split(",")] if args.backend else None
        device = _device_arg(args.device)
        command = "rocmoe bench " + " ".join(sys.argv[2:])

        def checkpoint(partial: dict) -> None:
            if args.json:
                with open(args.json, "w") as f:
                    json.dump({**partial, "command": command, "complete": False}, f, indent=2)

        result = run_bench(device, ops=ops, models=args.model, backends=backends, compare=modes,
                           seed=args.seed, sizes=args.size,
                           progress=lambda s: print(f"  {s}", file=sys.stderr, flush=True), checkpoint=checkpoint)
        result["command"] = command
        result["complete"] = True
    report.render_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            render = report.summary_markdown if args.summary else report.markdown
            f.write(render(result, result.get("command", "rocmoe bench")))
    if args.plot:
        report.plot(result, args.plot)
    return 0 if all(r["check_ok"] is not False for r in result["rows"]) else 1


def _cmd_tune(args: argparse.Namespace) -> int:
    import importlib
    import importlib.util

    from rocmoe.device import Device
    from rocmoe.tune import run_tune

    module_name = f"rocmoe.backends.triton.{args.op}"
    if importlib.util.find_spec(module_name) is None:
        print(f"rocmoe tune: the triton backend has no {args.op} kernel to tune", file=sys.stderr)
        return 2
    tuning = getattr(importlib.import_module(module_name), "TUNING", None)
    if tuning is None:
        print(f"rocmoe tune: {args.op} has no tunable launch parameters", file=sys.stderr)
        return 2
    device = _device_arg(args.device)
    regimes = None
    if args.from_log:
        from rocmoe import shape_log

        desc = Device.for_torch_device(device)
        regimes = shape_log.regimes_from_log(shape_log.load(args.from_log), args.op,
                                             lambda shape: tuning.project(shape, desc), tuning.split_key,
                                             args.max_regimes)
        if not regimes:
            print(f"rocmoe tune: the shape log in {args.from_log} has no {args.op} calls", file=sys.stderr)
            return 2
        print(f"tuning {len(regimes)} logged regime(s) of {args.op}: "
              + ", ".join(" ".join(f"{k}={v}" for k, v in r.items()) for r in regimes))
    keep_from = None
    split_span: tuple[int, int | None] = (1, None)
    if args.where or args.merge:
        from rocmoe.configs import find_table
        from rocmoe.tune import parse_where, select_regimes, table_path

        try:
            where = parse_where(args.where or [], tuning.spec.regime_keys)
        except ValueError as exc:
            print(f"rocmoe tune: {exc}", file=sys.stderr)
            return 2
        desc = Device.for_torch_device(device)
        regimes = select_regimes(regimes or tuning.regimes(), where)
        split_span = where.get(tuning.split_key, split_span)
        if not regimes:
            print(f"rocmoe tune: no {args.op} regime matches --where {' '.join(args.where or [])}", file=sys.stderr)
            return 2
        if args.merge:
            out = table_path(args.op, desc.arch, args.out)
            keep_from = out if out.is_file() else find_table(args.op, desc.arch)
            if keep_from is None:
                print(f"rocmoe tune: --merge: no {args.op} table for {desc.arch} to keep entries from",
                      file=sys.stderr)
                return 2
            # Read now: the new table may be written over it.
            keep_copy = Path(tempfile.mkdtemp()) / keep_from.name
            shutil.copy(keep_from, keep_copy)
            keep_from = keep_copy
    path = run_tune(tuning, device, out=args.out, budget_s=args.budget_s, regimes=regimes,
                    command="rocmoe tune " + " ".join(sys.argv[2:]), keep_from=keep_from,
                    compile_workers=(os.cpu_count() or 1) if args.compile_jobs is None else args.compile_jobs,
                    split_span=split_span)
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, device, and which backend runs each op (and why not the others)")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    where = info.add_mutually_exclusive_group()
    where.add_argument("--device", help="torch device to describe (default: the current one)")
    where.add_argument("--arch", help="an architecture to describe without its hardware (gfx942, gfx950, sm90, "
                                      "sm100, sm80, xpu): what this install would select there")
    info.set_defaults(fn=_cmd_info)

    bench = sub.add_parser("bench", help="check and time every op on this device (roofline, graphs, compare)")
    bench.add_argument("--quick", action="store_true", help="small real-model shapes, one per op")
    bench.add_argument("--op", action="append", choices=registry.OPS, help="only this op (repeatable)")
    bench.add_argument("--model", action="append", help="only this model's shapes (repeatable)")
    bench.add_argument("--size", action="append", type=int, help="only this token count / window (repeatable)")
    bench.add_argument("--backend", help="backend name or comma list (default: the registry's choice)")
    bench.add_argument("--compare", help="eager,compile: also time the torch reference eagerly / compiled")
    bench.add_argument("--device", help="torch device (default: the current GPU, else the CPU)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.add_argument("--markdown", metavar="FILE", help="also write a markdown table (for the README)")
    bench.add_argument("--summary", action="store_true",
                       help="markdown as one row per shape, backends as columns, with speed-up ratios")
    bench.add_argument("--plot", metavar="FILE", help="also draw time vs size with the roofline (PNG)")
    bench.add_argument("--load", metavar="JSON", help="re-render a saved result instead of running")
    bench.set_defaults(fn=_cmd_bench)

    tune = sub.add_parser("tune", help="measure launch configs on this device and write the config table")
    tune.add_argument("--op", required=True, choices=registry.OPS)
    tune.add_argument("--out", help="table path (default: rocmoe/configs/<op>/<arch>.json in the package)")
    tune.add_argument("--budget-s", type=float, default=600.0, help="stop sweeping after this many seconds")
    tune.add_argument("--device", help="torch device (default: the current GPU)")
    tune.add_argument("--from-log", metavar="DIR",
                      help="tune the regimes a ROCMOE_SHAPE_LOG=DIR run recorded (hottest first)")
    tune.add_argument("--max-regimes", type=int, default=16, help="with --from-log: at most this many regimes")
    tune.add_argument("--where", action="append", metavar="KEY=LO[:HI]",
                      help="tune only the regimes with KEY in [LO, HI] (repeatable; KEY a key of the op's table, "
                           "e.g. heads=128 or tokens=8:64; an empty HI is open)")
    tune.add_argument("--compile-jobs", type=int, default=None,
                      help="compile the candidates first in this many processes (default: the CPU count; 0: "
                           "let the sweep compile each as it reaches it)")
    tune.add_argument("--merge", action="store_true",
                      help="keep what the existing table says outside the regimes tuned now (other regime groups, "
                           "and token counts outside a --where tokens= bound)")
    tune.set_defaults(fn=_cmd_tune)

    check = sub.add_parser("build-check", help="compile every Triton kernel and config for gfx942, gfx950, "
                                                "sm90 and sm100 (no GPU needed); fail on errors, spills, LDS")
    check.add_argument("--arch", action="append", help="only this target (repeatable)")
    check.add_argument("--op", action="append", choices=registry.OPS, help="only this op (repeatable)")
    check.add_argument("--jobs", type=int, help="parallel compile processes (default: CPU count)")
    check.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    check.set_defaults(fn=_cmd_build_check)

    pre = sub.add_parser("precompile", help="fill a Triton cache for a GPU arch on any machine (no GPU needed), "
                                            "so that first calls load kernels instead of compiling them")
    pre.add_argument("--arch", action="append", required=True,
                     help="target arch, e.g. gfx942, gfx950, sm90, sm100 (repeatable)")
    pre.add_argument("--op", action="append", choices=registry.OPS, help="only this op (repeatable)")
    pre.add_argument("--cache-dir", help="Triton cache to fill (default: $TRITON_CACHE_DIR, else ~/.triton/cache); "
                                         "point TRITON_CACHE_DIR at it where the kernels run")
    pre.add_argument("--compute-units", type=int, help="CU/SM count of the GPUs that will run the kernels "
                                                        "(launch configs depend on it; default: the arch's flagship)")
    pre.add_argument("--jobs", type=int, help="parallel compile processes (default: CPU count)")
    pre.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    pre.set_defaults(fn=_cmd_precompile)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, registry.BackendUnavailableError) as exc:
        print(f"rocmoe {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
