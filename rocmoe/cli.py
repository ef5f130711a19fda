"""The ``rocmoe`` command: ``rocmoe info`` and ``rocmoe bench --quick``."""

from __future__ import annotations

import argparse
import json
import sys

from rocmoe import registry


def _device_arg(value: str | None):
    import torch

    from rocmoe.device import Device

    if value is None:
        current = Device.current()
        return torch.device(current.torch_type, current.index) if current.index is not None else torch.device("cpu")
    return torch.device(value)


def _cmd_info(args: argparse.Namespace) -> int:
    from rocmoe.device import Device
    from rocmoe.info import collect, render

    info = collect(Device.for_torch_device(_device_arg(args.device)))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render(info)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if not args.quick:
        print("rocmoe bench: this version has the --quick suite only; run `rocmoe bench --quick`",
              file=sys.stderr)
        return 2
    from rocmoe.bench import render_quick, run_quick
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rocmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="versions, device, and which backend runs each op (and why not the others)")
    info.add_argument("--json", action="store_true", help="print JSON instead of tables")
    info.add_argument("--device", help="torch device to describe (default: the current one)")
    info.set_defaults(fn=_cmd_info)

    bench = sub.add_parser("bench", help="check and time every op on this device")
    bench.add_argument("--quick", action="store_true", help="small real-model shapes, one per op")
    bench.add_argument("--op", action="append", choices=registry.OPS, help="only this op (repeatable)")
    bench.add_argument("--backend", help="backend name or comma list (default: the registry's choice)")
    bench.add_argument("--device", help="torch device (default: the current GPU, else the CPU)")
    bench.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    bench.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    bench.set_defaults(fn=_cmd_bench)
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
