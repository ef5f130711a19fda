"""Each op's benchmark cases timed with and without programmatic dependent
launch, in one process and one run: CUDA-graph replay, alternating PDL off /
on twice, the better of each kept (a developer tool:
``python ci/pdl_compare.py [--op OP ...] [--max-size N]``)."""

from __future__ import annotations

import argparse
import functools
import json
import os

import torch

from rocmoe.backends.triton import _common
from rocmoe.bench.cases import cases_for
from rocmoe.bench.timing import measure_ceilings, rotating_sets, time_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--op", nargs="*", default=["gemma4_routing", "sparse_mla_decode", "sparse_topk", "mxfp4_moe"])
    parser.add_argument("--max-size", type=int, default=1 << 30, help="skip cases larger than this (tokens/M)")
    parser.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "pdl_compare.json"))
    args = parser.parse_args()
    device = torch.device("cuda")
    ceilings = measure_ceilings(device)
    print(f"copy {ceilings.copy_bytes_per_s / 1e9:.0f} GB/s, minimal kernel under graph replay "
          f"{ceilings.launch_floor_s * 1e6:.2f} us", flush=True)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for op in args.op:
        for case in cases_for(op):
            if op != "sparse_topk" and case.size > args.max_size:
                continue
            inputs = [case.make_inputs(device, gen) for _ in range(rotating_sets(device, case.set_bytes))]
            outputs = case.make_outputs(inputs[0])
            calls = [functools.partial(case.run, i, outputs, "triton") for i in inputs]
            best = {}
            for _ in range(2):
                for pdl in (False, True):
                    _common.PDL_ALLOWED = pdl
                    seconds = time_graph(calls, device)
                    best[pdl] = min(best.get(pdl, seconds), seconds)
            _common.PDL_ALLOWED = True
            case.run(inputs[0], outputs, "triton")
            torch.cuda.synchronize()
            check = case.check(inputs[0], outputs)
            row = dict(op=op, model=case.model, shape=case.label, off_us=best[False] * 1e6, on_us=best[True] * 1e6,
                       check=check.ok)
            rows.append(row)
            print(f"{op:18s} {case.model:15s} {case.label:40s} PDL off {row['off_us']:8.2f} us  on "
                  f"{row['on_us']:8.2f} us  {row['off_us'] / row['on_us']:5.2f}x  {'ok' if check.ok else 'FAIL'}",
                  flush=True)
            del inputs, outputs, calls
            torch.cuda.empty_cache()
    with open(args.json, "w") as f:
        json.dump({"launch_floor_us": ceilings.launch_floor_s * 1e6, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
